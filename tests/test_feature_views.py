"""Feature views: activation histograms, per-token activations of contexts and logit effects, each against a
direct computation written here."""

import numpy as np
import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from instructsae.evaluate.contexts import latents_at, role_runs, significant
from instructsae.evaluate.feature_stats import HISTOGRAM_BINS, FeatureStats, add_to_histograms
from instructsae.lm.unembed import HISTOGRAM_BINS as HISTOGRAM_BINS_V
from instructsae.lm.unembed import logit_effects, norm_gain, row_histograms


def sparse_latents(n_tokens: int, d_sae: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n_tokens, d_sae, generator=generator) - 1.0)


# --- histograms ----------------------------------------------------------------------------------------------

def test_histograms_grown_batch_by_batch_equal_numpy_on_the_final_bins():
    latents_NF = sparse_latents(2000, 5)
    latents_NF[:1000] *= 0.01  # small values first: the bins must double several times (pairs merged)
    latents_NF[:, 3] = 0  # never fires
    latents_NF[:, 4] = 0
    latents_NF[1500:1510, 4] = 7.0  # fires late, all at one value
    counts_FB = torch.zeros(5, HISTOGRAM_BINS, dtype=torch.int64)
    width_F = torch.zeros(5, dtype=torch.float64)
    for start in range(0, 2000, 97):
        batch_BF = latents_NF[start:start + 97]
        token_K, feature_K = batch_BF.nonzero(as_tuple=True)
        counts_FB, width_F = add_to_histograms(counts_FB, width_F, feature_K, batch_BF[token_K, feature_K])
    for f in (0, 1, 2, 4):
        nonzero = latents_NF[:, f][latents_NF[:, f] > 0].double().numpy()
        width = float(width_F[f])
        assert nonzero.max() <= width * HISTOGRAM_BINS and nonzero.max() > width * HISTOGRAM_BINS / 2
        expected, _ = np.histogram(nonzero, bins=HISTOGRAM_BINS, range=(0, width * HISTOGRAM_BINS))
        assert counts_FB[f].tolist() == expected.tolist()
    assert width_F[0] > 8 * (latents_NF[:1000, 0].max() * 1.001 / HISTOGRAM_BINS)  # it did grow (from the first batch)
    assert counts_FB[3].sum() == 0 and width_F[3] == 0
    assert counts_FB[4].tolist() == [0] * (HISTOGRAM_BINS - 1) + [10]


def test_feature_stats_histogram_trims_empty_top_bins():
    stats = FeatureStats.empty(2, 5, top_n=2)
    latents_BF = torch.tensor([[1.0, 0.0], [2.0, 0.0], [4.0, 0.0]])
    stats.add(latents_BF, torch.arange(3), torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.bool))
    counts, width = stats.histogram(0)
    assert sum(counts) == 3 and counts[-1] == 1 and len(counts) == HISTOGRAM_BINS  # 4.0 is in the last bin
    assert width == pytest.approx(4.0 * (1 + 2**-10) / HISTOGRAM_BINS)
    role_0, not_special = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.bool)
    stats.add(torch.tensor([[0.0, 0.5]]), torch.tensor([3]), role_0, not_special)
    assert stats.histogram(1) == ([0] * (HISTOGRAM_BINS - 1) + [1], pytest.approx(0.5 * (1 + 2**-10) / HISTOGRAM_BINS))
    stats.add(torch.tensor([[9.0, 0.0]]), torch.tensor([4]), role_0, not_special)
    counts, width = stats.histogram(0)
    assert width == pytest.approx(4 * 4.0 * (1 + 2**-10) / HISTOGRAM_BINS)  # doubled twice to hold 9.0
    assert sum(counts) == 4 and len(counts) == int(9.0 // width) + 1 == 18  # the empty bins above 9.0 left out


# --- contexts: per-token latents -----------------------------------------------------------------------------

class FakeReader:
    """The two things latents_at reads: chunked activations (reads counted) and the chunk size."""

    def __init__(self, x_ND: torch.Tensor, chunk_tokens: int):
        self.x_ND, self.chunk_tokens, self.n_tokens, self.reads = x_ND, chunk_tokens, len(x_ND), []

    def read_acts(self, layer: int, start: int, stop: int, site: str = "resid_post") -> torch.Tensor:
        self.reads.append((layer, start, stop))
        return self.x_ND[start:stop]


def test_latents_at_equals_encoding_every_row():
    x_ND = torch.randn(100, 6, generator=torch.Generator().manual_seed(3))
    W_DF = torch.randn(6, 9, generator=torch.Generator().manual_seed(4))
    encoded_rows = []

    def encode(x_BD):
        encoded_rows.append(len(x_BD))
        return torch.relu(x_BD @ W_DF)

    reader = FakeReader(x_ND, chunk_tokens=16)
    rows_P = np.array([50, 3, 3, 99, 50, 17, 18, 3])  # repeats and any order
    features_P = np.array([0, 8, 2, 4, 4, 1, 1, 8])
    acts_P = latents_at(encode, reader, 2, rows_P, features_P, batch_tokens=2)
    expected = torch.relu(x_ND @ W_DF).numpy()[rows_P, features_P]
    np.testing.assert_allclose(acts_P, expected, rtol=1e-6)
    assert sum(encoded_rows) == 5 and max(encoded_rows) <= 2  # each distinct row once, in batches of 2
    assert sorted(start for _, start, _ in reader.reads) == [0, 16, 48, 96]  # only the chunks that hold a row


def test_role_runs_and_significant_digits():
    assert role_runs(["template", "template", "user", "user", "user", "template"]) == [
        ["template", 2], ["user", 3], ["template", 1]]
    assert role_runs([]) == []
    assert significant(np.array([0.0, 1.23456, -98765.4, 3.14159e-7], dtype=np.float32)) == [
        0.0, 1.235, -98770.0, pytest.approx(3.142e-7)]


# --- logit effects -------------------------------------------------------------------------------------------

class TinyLM(torch.nn.Module):
    """The shape lm/unembed.py reads: base_model.layers, base_model.<final norm>, get_output_embeddings()."""

    def __init__(self, norm: torch.nn.Module | None, d_model: int, vocab: int, norm_name: str = "norm"):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Identity()])
        if norm is not None:
            setattr(self, norm_name, norm)
        self.lm_head = torch.nn.Linear(d_model, vocab, bias=False)
        torch.nn.init.normal_(self.lm_head.weight, generator=torch.Generator().manual_seed(5))

    def get_output_embeddings(self):
        return self.lm_head


def randomised(norm: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for parameter in norm.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(6)))
    return norm


@pytest.mark.parametrize("d_model", [8, 7])
def test_norm_gain_of_each_kind_of_final_norm(d_model):
    llama = randomised(LlamaRMSNorm(d_model))
    gemma = randomised(GemmaRMSNorm(d_model))
    layer_norm = randomised(torch.nn.LayerNorm(d_model))
    for norm, gain, centres in [(llama, llama.weight, False), (gemma, 1 + gemma.weight, False),
                                (layer_norm, layer_norm.weight, True)]:
        measured, measured_centres = norm_gain(norm, d_model)
        torch.testing.assert_close(measured, gain.detach(), rtol=1e-4, atol=1e-4)
        assert measured_centres == centres, type(norm).__name__
    ones, centres = norm_gain(None, d_model)
    assert ones.eq(1).all() and not centres


@pytest.mark.parametrize("kind", ["llama", "gemma", "layernorm", "none"])
def test_logit_effects_equal_the_direct_product(kind):
    d_model, vocab = 16, 50
    norm = {"llama": LlamaRMSNorm(d_model), "gemma": GemmaRMSNorm(d_model), "layernorm": torch.nn.LayerNorm(d_model),
            "none": None}[kind]
    norm_name = "ln_f" if kind == "layernorm" else "norm"  # GPT-2's name, and Llama's and Gemma's
    model = TinyLM(None if norm is None else randomised(norm), d_model, vocab, norm_name)
    directions_FD = torch.randn(5, d_model, generator=torch.Generator().manual_seed(7))
    d_FD = directions_FD - directions_FD.mean(dim=1, keepdim=True) if kind == "layernorm" else directions_FD
    gain_D = {"llama": lambda: norm.weight, "gemma": lambda: 1 + norm.weight, "layernorm": lambda: norm.weight,
              "none": lambda: torch.ones(d_model)}[kind]().detach()
    logits_FV = (d_FD * gain_D) @ model.lm_head.weight.detach().T
    effects = logit_effects(directions_FD, model, top=4)
    expected_top, expected_bottom = logits_FV.topk(4, dim=1), logits_FV.topk(4, dim=1, largest=False)
    assert torch.equal(effects.promoted_ids_FK, expected_top.indices)
    assert torch.equal(effects.suppressed_ids_FK, expected_bottom.indices)
    torch.testing.assert_close(effects.promoted_FK, expected_top.values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(effects.suppressed_FK, expected_bottom.values, rtol=1e-4, atol=1e-4)
    assert effects.final_norm == (None if norm is None else type(norm).__name__)
    for f in range(5):  # the whole vocabulary's logit effects, binned from their minimum to their maximum
        low, high = logits_FV[f].min().item(), logits_FV[f].max().item()
        width = (high - low) / HISTOGRAM_BINS_V
        expected, _ = np.histogram(logits_FV[f].numpy(), bins=HISTOGRAM_BINS_V, range=(low, high))
        counts = effects.hist_counts_FN[f].numpy()
        assert counts.sum() == vocab and counts[0] >= 1 and counts[-1] >= 1
        # the two products differ in the last float bits: a value on a bin edge may land on either side of it
        assert np.abs(counts - expected).sum() <= 2
        assert effects.hist_low_F[f].item() == pytest.approx(low, abs=1e-4)
        assert effects.hist_width_F[f].item() == pytest.approx(width, rel=1e-3)


def test_row_histograms_put_the_extremes_in_the_end_bins():
    x_BV = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    counts_BN, low_B, width_B = row_histograms(x_BV, 4)
    assert counts_BN.tolist() == [[1, 1, 1, 2], [5, 0, 0, 0]]  # the maximum in the last bin; a constant row in one
    assert low_B.tolist() == [0.0, 5.0] and width_B[0].item() == 1.0


def test_logit_effects_rank_tokens_as_the_model_does_for_a_small_step(tiny_model_dir):
    """Through the real tiny Llama's final norm and head: adding eps * d to a residual that is orthogonal to d
    changes the logits by eps * (d * gain) @ W_U^T / rms(x), the same ranking as logit_effects gives."""
    from instructsae.lm.models import load_model

    lm = load_model(str(tiny_model_dir))
    norm, head = lm.model.model.norm, lm.model.lm_head
    generator = torch.Generator().manual_seed(8)
    d_D, x_D = torch.randn(lm.d_model, generator=generator), torch.randn(lm.d_model, generator=generator)
    x_D -= (x_D @ d_D) / (d_D @ d_D) * d_D  # orthogonal: RMSNorm's own rescaling is second order in eps
    with torch.no_grad():
        change_V = (head(norm(x_D + 1e-3 * d_D)) - head(norm(x_D))) / 1e-3
    effects = logit_effects(d_D[None], lm.model, top=5)
    rms = x_D.pow(2).mean().sqrt()
    torch.testing.assert_close(effects.promoted_FK[0] / rms, change_V.topk(5).values, rtol=2e-2, atol=2e-2)
    assert effects.promoted_ids_FK[0].tolist() == change_V.topk(5).indices.tolist()
    assert effects.suppressed_ids_FK[0].tolist() == change_V.topk(5, largest=False).indices.tolist()


def tiny_hf_model(family: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    small = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
    configs = {
        "llama": lambda: transformers.LlamaConfig(**small, intermediate_size=32, num_key_value_heads=2),
        "gemma2": lambda: transformers.Gemma2Config(**small, intermediate_size=32, num_key_value_heads=2, head_dim=8),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2),
        "opt": lambda: transformers.OPTConfig(**small, ffn_dim=32, word_embed_proj_dim=16),
    }
    return transformers.AutoModelForCausalLM.from_config(configs[family]()).eval()


@pytest.mark.parametrize("family, path", [("llama", "model.norm"), ("gemma2", "model.norm"),
                                          ("gpt2", "transformer.ln_f"), ("opt", "model.decoder.final_layer_norm")])
def test_the_final_norm_of_each_family_is_found(family, path):
    from instructsae.lm.unembed import final_norm

    model = tiny_hf_model(family)
    assert final_norm(model) is model.get_submodule(path)
    randomised(final_norm(model))  # a gain that is not all ones, so finding the wrong module would show
    directions_FD = torch.randn(3, 16, generator=torch.Generator().manual_seed(9))
    norm = final_norm(model)
    gain_D, centres = norm_gain(norm, 16)
    d_FD = directions_FD - directions_FD.mean(dim=1, keepdim=True) if centres else directions_FD
    logits_FV = (d_FD * gain_D) @ model.get_output_embeddings().weight.detach().T
    assert centres == isinstance(norm, torch.nn.LayerNorm)
    effects = logit_effects(directions_FD, model, top=3)
    assert torch.equal(effects.promoted_ids_FK, logits_FV.topk(3, dim=1).indices)
