"""Transcoders and skip transcoders on a real tiny store of mlp_in/mlp_out: every activation trains, mixed in
one sweep with SAEs (each equal to its solo run), exports that SAELens 6 loads with equal outputs, the LM view
splices it in place of the MLP, and a killed run resumes to the same weights."""

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli, write_dialogues
from safetensors.torch import load_file

from instructsae.errors import UserError
from instructsae.evaluate.run import evaluate_sae_on_store
from instructsae.evaluate.splice import lm_view
from instructsae.evaluate.dialogues import first_stored_position, stored_sequences
from instructsae.extract.run import run_extract
from instructsae.lm.models import decoder_layers, load_model
from instructsae.sae import TRANSCODER_CLASSES, build_sae
from instructsae.sae.folder import load_sae
from instructsae.schemas import ExtractConfig, OptimConfig, TrainConfig
from instructsae.schemas.evaluate import LMViewConfig
from instructsae.schemas.sweep import SweepConfig
from instructsae.schemas.transcoder import SkipTranscoderConfig, TranscoderConfig
from instructsae.store.reader import open_complete_store
from instructsae.train.memory import COPIES_PER_PARAMETER, FLOAT_BYTES, sae_bytes
from instructsae.train.run import run_training
from instructsae.train.sweep import expand_sweep, run_sweep

LAYER = 1
OPTIM = {"lr": 3e-3, "lr_warmup_steps": 2, "beta1": 0.9, "sparsity_warmup_steps": 4}
TRAIN = {"batch_size": 32, "buffer_tokens": 128, "tokens": 640, "log_every": 5, "geometric_median_tokens": 64}
ACTIVATIONS = {"relu": {}, "jumprelu": {"init_threshold": 0.01}, "topk": {"k": 4}, "batchtopk": {"k": 4}}


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("transcoders")
    dataset = write_dialogues(folder / "dialogues.jsonl", 10)
    out = folder / "store"
    run_extract(ExtractConfig(model=str(tiny_model_dir), dataset=str(dataset), layers=(LAYER,), chunk_tokens=64,
                              sites=("resid_post", "mlp_in", "mlp_out"), dtype="float32", model_dtype="float32",
                              out=str(out)), show_progress=False)
    return out


def config(store, out, sae, **overrides) -> TrainConfig:
    return TrainConfig(store=str(store), out=str(out), sae=sae, optim=OptimConfig(**OPTIM), **{**TRAIN, **overrides})


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_each_activation_trains_towards_the_mlp_output(store, tmp_path, activation, skip):
    family = SkipTranscoderConfig if skip else TranscoderConfig
    sae_cfg = family(expansion=2, activation=activation, **ACTIVATIONS[activation])
    summary = run_training(config(store, tmp_path / "run", sae_cfg))
    assert summary["architecture"] == sae_cfg.architecture and type(load_sae(tmp_path / "run")[0]).transcoder
    assert (summary["site"], summary["target_site"]) == ("mlp_in", "mlp_out")
    # a fit against mlp_out, measured against mlp_out: far better than predicting its mean (NMSE 1)
    assert 0 < summary["nmse"] < 0.9
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["nmse"] < lines[0]["nmse"]


def test_the_exported_folder_acts_on_raw_activations(store, tmp_path):
    run_training(config(store, tmp_path / "run", SkipTranscoderConfig(expansion=2, activation="jumprelu",
                                                                        init_threshold=0.01)))
    transcoder, cfg = load_sae(tmp_path / "run")
    reader = open_complete_store(store)
    x_ND = reader.read_acts(LAYER, 0, 200, "mlp_in")
    y_ND = reader.read_acts(LAYER, 0, 200, "mlp_out")
    mine = transcoder(x_ND)
    assert float((mine - y_ND).pow(2).sum() / (y_ND - y_ND.mean(0)).pow(2).sum()) < 0.9
    assert cfg["metadata"]["hook_name"] == f"blocks.{LAYER}.ln2.hook_normalized"
    assert cfg["metadata"]["hook_name_out"] == f"blocks.{LAYER}.hook_mlp_out"
    assert cfg["architecture"] == "jumprelu_skip_transcoder" and cfg["apply_b_dec_to_input"] is False


SAELENS_NAMES = {"transcoder": "transcoder", "skip_transcoder": "skip_transcoder",
                 "jumprelu_transcoder": "jumprelu_transcoder", "jumprelu_skip_transcoder": "jumprelu_skip_transcoder",
                 "batchtopk_transcoder": "jumprelu_transcoder",
                 "batchtopk_skip_transcoder": "jumprelu_skip_transcoder"}


@pytest.mark.parametrize("architecture", sorted(SAELENS_NAMES))
def test_saelens_loads_each_with_equal_outputs(architecture, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    from instructsae.sae.export import save_sae

    torch.manual_seed(0)
    cls = TRANSCODER_CLASSES[architecture]
    settings = {"k": 4} if "topk" in architecture else {}
    ours = cls(16, 48, **settings)
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        if hasattr(ours, "threshold"):
            ours.threshold.copy_(torch.rand(48) * 0.3)
        if ours.selects_by_rank:  # TopK-style training keeps every decoder row at one norm (the export folds it)
            ours.W_dec.div_(ours.W_dec.norm(dim=1, keepdim=True)).mul_(2.5)
    ours.eval()
    save_sae(tmp_path / "tc", ours, 0.5, {"layer": 2, "site": "mlp_in", "target_site": "mlp_out"},
             output_scale=2.0)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "tc"), device="cpu")
    # exported decoders are unit norm, a transcoder's too (its W_skip is left as it is)
    torch.testing.assert_close(theirs.W_dec.norm(dim=1), torch.ones(48))
    assert type(theirs).__name__.lower().replace("relu", "relu_").startswith(SAELENS_NAMES[architecture][:4])
    assert theirs.cfg.metadata.hook_name == "blocks.2.ln2.hook_normalized"
    assert theirs.cfg.metadata.hook_name_out == "blocks.2.hook_mlp_out"
    x_raw = torch.randn(32, 16) * 3
    loaded, _ = load_sae(tmp_path / "tc")
    expected = ours(x_raw * 0.5) / 2.0  # trained on scaled input and scaled target
    torch.testing.assert_close(loaded(x_raw), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(theirs(x_raw).detach(), expected.detach(), rtol=1e-4, atol=1e-4)
    # latents in raw units of the output: each one carries its decoder row's norm (in raw target units)
    raw_norms_F = ours.W_dec.detach().norm(dim=1) / 2.0
    torch.testing.assert_close(theirs.encode(x_raw).detach(), ours.encode(x_raw * 0.5).detach() * raw_norms_F,
                               rtol=1e-4, atol=1e-4)


def test_a_topk_transcoder_is_written_under_our_own_name(tmp_path):
    from instructsae.sae.export import save_sae

    ours = TRANSCODER_CLASSES["topk_transcoder"](16, 48, k=4).eval()
    save_sae(tmp_path / "tc", ours, 1.0, {"layer": 0, "site": "mlp_in", "target_site": "mlp_out"})
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk_transcoder" and cfg["k"] == 4
    x = torch.randn(8, 16)
    torch.testing.assert_close(load_sae(tmp_path / "tc")[0](x), ours(x))


class TrueMLP(torch.nn.Module):
    """A 'transcoder' that returns the MLP's own output for its input (a copy: the model's MLP carries the hooks)."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = copy.deepcopy(mlp)

    def forward(self, x_ND):
        return self.mlp(x_ND)


def test_splicing_the_true_mlp_gives_the_clean_loss(tiny_model_dir, store):
    lm = load_model(str(tiny_model_dir), "float32")
    reader = open_complete_store(store)
    sequences = stored_sequences(reader, lm, 300, None)
    mlp = decoder_layers(lm.model)[LAYER].mlp
    (true, zero_weights), = [lm_view(lm.model, LAYER, [TrueMLP(mlp), ZeroOut()], sequences,
                                     first_stored_position(reader), 256, lm.tokenizer.pad_token_id,
                                     site="mlp_in", target="mlp_out")]
    assert true["ce_spliced"] == pytest.approx(true["ce_clean"], abs=1e-5) and true["kl_spliced"] < 1e-6
    # the MLP matters (a little, in a random model): removing it moves the loss where the true MLP does not
    assert true["kl_ablated"] > 1e-5 and true["ce_ablated"] != pytest.approx(true["ce_clean"], abs=1e-4)
    # a transcoder putting out zeros is the zero-ablation of the MLP's output
    assert zero_weights["ce_spliced"] == pytest.approx(true["ce_ablated"], abs=1e-5)


class ZeroOut(torch.nn.Module):
    def forward(self, x_ND):
        return torch.zeros_like(x_ND)


def test_evaluate_a_trained_transcoder_with_the_lm_view(store, tmp_path):
    run_training(config(store, tmp_path / "run", TranscoderConfig(expansion=2, k=4)))
    result = evaluate_sae_on_store(str(tmp_path / "run"), str(store), lm=LMViewConfig(lm_tokens=200))
    assert (result["site"], result["target_site"]) == ("mlp_in", "mlp_out")
    assert 0 < result["nmse"] < 1 and result["lm"]["ce_spliced"] > 0 and result["l0"] <= 4


def test_a_store_without_the_sites_is_one_line(tiny_model_dir, dialogues_jsonl, tmp_path):
    plain = tmp_path / "plain"
    run_extract(ExtractConfig(model=str(tiny_model_dir), dataset=str(dialogues_jsonl), layers=(LAYER,),
                              chunk_tokens=64, dtype="float32", out=str(plain)), show_progress=False)
    with pytest.raises(UserError, match="site mlp_in at layer 1 is not in store .* --sites mlp_in,mlp_out"):
        run_training(config(plain, tmp_path / "run", TranscoderConfig(expansion=2)))


def test_a_sweep_mixing_transcoders_and_saes_equals_their_solo_runs(store, tmp_path):
    grid = {"sae": [{"arch": "transcoder", "expansion": 2, "activation": "jumprelu", "init_threshold": 0.01},
                    {"arch": "skip_transcoder", "expansion": 2, "k": 4},
                    {"arch": "jumprelu", "expansion": 2, "init_threshold": 0.01},
                    {"arch": "topk", "expansion": 2, "k": 4}]}
    sweep = SweepConfig(store=str(store), out=str(tmp_path / "sweep"), base={**TRAIN, "optim": OPTIM}, grid=grid)
    run_sweep(sweep)
    points = expand_sweep(sweep)
    assert len(points) == 4
    for cfg in points:
        alone = tmp_path / "alone" / Path(cfg.out).name
        run_training(cfg.model_copy(update={"out": str(alone)}))
        swept, single = load_file(str(Path(cfg.out) / "sae_weights.safetensors")), \
            load_file(str(alone / "sae_weights.safetensors"))
        assert swept.keys() == single.keys()
        for name in single:
            torch.testing.assert_close(swept[name], single[name], rtol=0, atol=0)


def test_the_cli_trains_a_transcoder(store, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "train", "--store", str(store), "--out", str(tmp_path / "run"),
                             "--sae", "skip_transcoder", "--k", "4", "--expansion", "2", "--tokens", "320",
                             "--batch-size", "32", "--buffer-tokens", "128")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["architecture"] == "topk_skip_transcoder" and summary["target_site"] == "mlp_out"


def test_features_and_steering_use_the_transcoders_sites(tiny_model_dir, store, tmp_path):
    from instructsae.evaluate.features import run_features
    from instructsae.evaluate.steering import residual_added
    from instructsae.lm.hooks import activations_at
    from instructsae.schemas.features import FeaturesConfig

    run_training(config(store, tmp_path / "run", TranscoderConfig(expansion=2, k=4)))
    result = run_features(FeaturesConfig(sae=str(tmp_path / "run"), store=str(store), out=str(tmp_path / "features"),
                                         top=3))
    transcoder, _ = load_sae(tmp_path / "run")
    reader = open_complete_store(store)
    # features are the latents of mlp_in: every live one fires somewhere on the store's mlp_in
    latents_NF = transcoder.encode(reader.read_acts(LAYER, 0, reader.n_tokens, "mlp_in"))
    assert result["n_live"] == int((latents_NF > 0).any(dim=0).sum()) > 0
    assert (tmp_path / "features" / "dashboard.html").stat().st_size > 0
    # steering writes where the decoder writes, the MLP's output, which the layer's output carries on
    lm = load_model(str(tiny_model_dir), "float32")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    vector_D = torch.randn(lm.d_model)
    clean = activations_at(lm.model, [(LAYER, "mlp_out"), (LAYER, "resid_post")], ids)
    with residual_added(lm.model, LAYER, vector_D, "mlp_out"):
        steered = activations_at(lm.model, [(LAYER, "resid_post")], ids)
    torch.testing.assert_close(steered[(LAYER, "resid_post")], clean[(LAYER, "resid_post")] + vector_D, rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
def test_a_killed_run_resumes_to_the_same_weights(store, tmp_path, monkeypatch, activation):
    from instructsae.train import checkpoint

    sae_cfg = SkipTranscoderConfig(expansion=2, activation=activation, **ACTIVATIONS[activation])
    cfg = config(store, tmp_path / "killed", sae_cfg, tokens=1280, checkpoint_every=8 * 32)
    real_save, saves = checkpoint.save, []

    def save_then_die(path, state):
        real_save(path, state)
        saves.append(state["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed right after its second checkpoint

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg)
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert saves == [8, 16]
    run_training(cfg, resume=True)
    run_training(cfg.model_copy(update={"out": str(tmp_path / "whole")}))
    resumed = load_file(str(tmp_path / "killed" / "sae_weights.safetensors"))
    whole = load_file(str(tmp_path / "whole" / "sae_weights.safetensors"))
    assert "W_skip" in whole
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name


def test_a_foreign_folders_sites_come_from_its_hook_names():
    from instructsae.sae.folder import sae_layer, sae_sites

    cfg = {"metadata": {"hook_name": "blocks.2.ln2.hook_normalized", "hook_name_out": "blocks.2.hook_mlp_out"}}
    assert sae_sites(cfg) == ("mlp_in", "mlp_out") and sae_layer(cfg, "x") == 2
    assert sae_sites({"metadata": {"hook_name": "blocks.2.hook_resid_post"}}) == ("resid_post", "resid_post")
    assert sae_sites({"metadata": {"hook_name": "blocks.2.hook_attn_out"}}) == ("attn_out", "attn_out")


@pytest.mark.parametrize("config", [TranscoderConfig(expansion=2), SkipTranscoderConfig(expansion=2),
                                    TranscoderConfig(expansion=2, activation="jumprelu")])
def test_the_memory_check_counts_every_parameter_a_dictionary_trains(config):
    """A skip transcoder's W_skip (d_in² more) included: the estimate is the built model's own parameters."""
    cfg = TrainConfig(store="unused", out="unused", sae=config)
    built = sum(parameter.numel() for parameter in build_sae(config, 24).parameters())
    assert sae_bytes(cfg, 24) == built * FLOAT_BYTES * COPIES_PER_PARAMETER
    if isinstance(config, SkipTranscoderConfig):
        plain = TrainConfig(store="unused", out="unused", sae=TranscoderConfig(expansion=2))
        assert sae_bytes(cfg, 24) - sae_bytes(plain, 24) == 24 * 24 * FLOAT_BYTES * COPIES_PER_PARAMETER
