"""The LM view on the tiny model: an identity SAE gives the clean loss exactly, a zero SAE the ablated loss."""

import numpy as np
import pytest
import torch

from instructsae.evaluate import splice
from instructsae.evaluate.dialogues import StoredSequence
from instructsae.evaluate.splice import QUANTITIES, final_hidden, lm_view, zero_replacement
from instructsae.extract.data import Message
from instructsae.extract.instances import tokenize_dialogue
from instructsae.lm.models import decoder_layers, load_model
from instructsae.schemas import StandardConfig
from instructsae.sae import build_sae
from instructsae.sae.standard import StandardSAE

LAYER = 0


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def standard_sae(W_enc_DF: torch.Tensor, W_dec_FD: torch.Tensor) -> StandardSAE:
    sae = StandardSAE(*W_enc_DF.shape)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc_DF), sae.W_dec.copy_(W_dec_FD), sae.b_enc.zero_(), sae.b_dec.zero_()
    return sae.eval()


def identity_sae(d: int) -> StandardSAE:
    """relu(x) − relu(−x) = x exactly: W_enc = [I, −I], W_dec = [I; −I], no biases."""
    eye = torch.eye(d)
    return standard_sae(torch.cat([eye, -eye], dim=1), torch.cat([eye, -eye], dim=0))


def zero_sae(d: int) -> StandardSAE:
    return standard_sae(torch.randn(d, 2 * d), torch.zeros(2 * d, d))


def sequences(tokenizer, first_stored: int) -> list[StoredSequence]:
    """Dialogues of different lengths (so batches are padded), roles of the stored tokens as extract keeps them."""
    out = []
    for i in range(5):
        messages = (Message("user", f"Tell me story {i} about a robot." * (1 + i)),
                    Message("assistant", "Once upon a time there was a small robot. " * (1 + i % 3)))
        tokenized = tokenize_dialogue(tokenizer, messages, max_len=None)
        out.append(StoredSequence(i, tokenized.token_ids, tokenized.roles[first_stored:]))
    return out


def run(lm, sae, first_stored: int = 1, batch_tokens: int = 256) -> dict:
    return run_many(lm, [sae], first_stored, batch_tokens)[0]


def run_many(lm, saes, first_stored: int = 1, batch_tokens: int = 256) -> list[dict]:
    return lm_view(lm.model, LAYER, saes, sequences(lm.tokenizer, first_stored), first_stored, batch_tokens,
                   pad_id=lm.tokenizer.pad_token_id)


def test_identity_sae_gives_the_clean_loss_exactly(lm):
    result = run(lm, identity_sae(lm.d_model))
    assert result["ce_spliced"] == result["ce_clean"]
    assert result["kl_spliced"] == 0.0
    assert result["ce_loss_recovered"] == 1.0
    assert result["ce_ablated"] != result["ce_clean"]  # the ablation changes the loss, so recovery is defined
    for role in result["per_role"].values():
        assert role["ce_spliced"] == role["ce_clean"] and role["kl_spliced"] == 0.0


def test_zero_sae_gives_the_ablated_loss_exactly(lm):
    result = run(lm, zero_sae(lm.d_model))
    assert result["ce_spliced"] == result["ce_ablated"]
    assert result["kl_spliced"] == result["kl_ablated"] > 0
    assert result["ce_loss_recovered"] == 0.0


def test_per_role_figures_add_up_to_the_overall_ones(lm):
    result = run(lm, zero_sae(lm.d_model))
    per_role = result["per_role"]
    assert {"template", "system", "user", "assistant"} <= set(per_role)
    n_tokens = sum(role["n_tokens"] for role in per_role.values())
    # every stored token but the first of each sequence is predicted from a stored position
    assert n_tokens == result["n_tokens"] == sum(len(s.roles) - 1 for s in sequences(lm.tokenizer, 1))
    for quantity in QUANTITIES:
        weighted = sum(role[quantity] * role["n_tokens"] for role in per_role.values()) / n_tokens
        assert weighted == pytest.approx(result[quantity], rel=1e-9)


def test_clean_loss_is_the_models_own_loss(lm):
    """With every position stored, the counted predictions are exactly those HF's labels loss averages."""
    sequence = sequences(lm.tokenizer, 0)[:1]
    (result,) = lm_view(lm.model, LAYER, [identity_sae(lm.d_model)], sequence, 0, 1024, lm.tokenizer.pad_token_id)
    input_ids_1S = torch.from_numpy(sequence[0].token_ids.astype(np.int64))[None]
    with torch.no_grad():
        reference = lm.model(input_ids=input_ids_1S, labels=input_ids_1S).loss
    assert result["ce_clean"] == pytest.approx(float(reference), rel=1e-5)


def test_positions_the_sae_never_saw_stay_clean(lm):
    input_ids_BS = torch.from_numpy(sequences(lm.tokenizer, 1)[0].token_ids.astype(np.int64))[None]
    clean_BSD = final_hidden(lm.model, LAYER, input_ids_BS, 1, None)
    ablated_BSD = final_hidden(lm.model, LAYER, input_ids_BS, 1, zero_replacement)
    assert torch.equal(ablated_BSD[:, 0], clean_BSD[:, 0])  # the dropped first token is not replaced
    assert not torch.allclose(ablated_BSD[:, 1:], clean_BSD[:, 1:])


def test_several_saes_share_one_view_and_get_their_own_results(lm):
    """The clean and ablated runs are shared; each SAE's figures equal those of its own view."""
    torch.manual_seed(1)
    trained_like = build_sae(StandardConfig(expansion=2), lm.d_model).eval()
    saes = [identity_sae(lm.d_model), zero_sae(lm.d_model), trained_like]
    together = run_many(lm, saes)
    for sae, shared in zip(saes, together):
        alone = run(lm, sae)
        per_sequence, alone_per_sequence = shared.pop("per_sequence"), alone.pop("per_sequence")
        assert shared == alone
        for name, array in per_sequence.items():  # the sums behind the figures, per sequence and role
            assert np.array_equal(array, alone_per_sequence[name]), name
        assert per_sequence["count_IR"].sum() == shared["n_tokens"]
        clean = QUANTITIES.index("ce_clean")
        assert per_sequence["sums_IQR"][:, clean].sum() / shared["n_tokens"] == pytest.approx(shared["ce_clean"])
    assert together[0]["ce_loss_recovered"] == 1.0 and together[1]["ce_loss_recovered"] == 0.0


def without_sequences(results: list[dict]) -> list[dict]:
    return [{name: value for name, value in result.items() if name != "per_sequence"} for result in results]


@pytest.mark.parametrize("layer", [0, 1])
def test_skipping_the_layers_below_the_splice_changes_no_figure(lm, layer, monkeypatch):
    torch.manual_seed(2)
    saes = [identity_sae(lm.d_model), build_sae(StandardConfig(expansion=2), lm.d_model).eval()]
    first_layer = decoder_layers(lm.model)[0]
    computed, layer_forward = [], type(first_layer).forward

    def counted(module, *args, **kwargs):
        computed.append(module is first_layer)
        return layer_forward(module, *args, **kwargs)

    monkeypatch.setattr(type(first_layer), "forward", counted)
    views, first_layer_runs = [], []
    for reuse in (True, False):
        monkeypatch.setattr(splice, "lower_layers_can_be_reused", lambda *args, reuse=reuse: reuse)
        computed.clear()
        views.append(lm_view(lm.model, layer, saes, sequences(lm.tokenizer, 1), 1, 256, lm.tokenizer.pad_token_id))
        first_layer_runs.append(sum(computed))
    assert without_sequences(views[0]) == without_sequences(views[1])
    assert first_layer_runs[0] * 4 == first_layer_runs[1], "layer 0 ran for more than the clean run"
    assert all("forward" not in vars(module) for module in decoder_layers(lm.model)), "a layer kept its stand-in"


def test_lower_layers_are_skipped_only_where_that_gives_the_clean_run(lm, monkeypatch):
    """A model whose top reads what layer 0 left behind (as layers sharing a KV cache do) runs whole when the
    splice is at layer 1."""
    input_ids_BS = torch.from_numpy(sequences(lm.tokenizer, 1)[0].token_ids.astype(np.int64))[None]
    clean = splice.clean_run(lm.model, 1, input_ids_BS)
    assert splice.lower_layers_can_be_reused(lm.model, 1, input_ids_BS, *clean)
    left_behind = {}
    keep = lambda _module, _inputs, output: left_behind.update(output=output)  # noqa: E731
    handles = [decoder_layers(lm.model)[0].register_forward_hook(keep),
               lm.model.base_model.norm.register_forward_pre_hook(
                   lambda _m, args: (args[0] + 0.5 * left_behind["output"], *args[1:]))]
    try:
        assert not splice.lower_layers_can_be_reused(lm.model, 1, input_ids_BS,
                                                     *splice.clean_run(lm.model, 1, input_ids_BS))
        saes = [zero_sae(lm.d_model)]
        figures = lm_view(lm.model, 1, saes, sequences(lm.tokenizer, 1), 1, 256, lm.tokenizer.pad_token_id)
        monkeypatch.setattr(splice, "lower_layers_can_be_reused", lambda *args: False)
        whole = lm_view(lm.model, 1, saes, sequences(lm.tokenizer, 1), 1, 256, lm.tokenizer.pad_token_id)
        assert without_sequences(figures) == without_sequences(whole)
    finally:
        for handle in handles:
            handle.remove()


def test_an_instance_forward_comes_back_after_the_view(lm):
    """accelerate puts its own forward on a module instance; the view must leave it there."""
    layer = decoder_layers(lm.model)[0]
    original = layer.forward
    layer.forward = lambda *args, **kwargs: original(*args, **kwargs)
    own = layer.forward
    try:
        run(lm, identity_sae(lm.d_model))
        assert vars(layer)["forward"] is own
    finally:
        del layer.forward
