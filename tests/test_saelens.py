"""SAELens-native folders: SAELens itself loads ours (every architecture, same reconstructions), and evaluate,
features and steer take a folder SAELens wrote (hand-written here as SAELens 6 writes it).

The round trip through SAELens runs where `sae_lens` is importable (`pip install 'instructsae[saelens]'`);
without it those tests skip, except in CI, which installs it."""

import importlib
import json
import os

import pytest
import torch
from helpers import assert_one_line_error, run_cli
from safetensors.torch import save_file

from instructsae.errors import UserError
from instructsae.schemas import JumpReLUConfig, StandardConfig
from instructsae.schemas.train import BatchTopKConfig, MatryoshkaBatchTopKConfig, TopKConfig
from instructsae.sae.export import load_sae, save_sae
from instructsae.sae import SAE_CLASSES, build_sae
from instructsae.sae.folder import layer_from_hook_name, sae_layer, sae_model

D_IN = 64  # the tiny model's d_model


def saelens():
    """sae_lens, or a skip; CI sets INSTRUCTSAE_REQUIRE_SAELENS so that a missing install fails instead."""
    if os.environ.get("INSTRUCTSAE_REQUIRE_SAELENS"):
        return importlib.import_module("sae_lens")
    return pytest.importorskip("sae_lens")


CONFIGS = {"standard": StandardConfig(expansion=2), "jumprelu": JumpReLUConfig(expansion=2, init_threshold=0.05),
           "topk": TopKConfig(expansion=2, k=6), "batchtopk": BatchTopKConfig(expansion=2, k=6),
           "matryoshka_batchtopk": MatryoshkaBatchTopKConfig(expansion=2, k=6, prefixes=(16, 64))}


def trained_like(arch: str):
    torch.manual_seed(0)
    sae = build_sae(CONFIGS[arch], D_IN)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        if arch in ("batchtopk", "matryoshka_batchtopk"):  # as if estimated in training
            sae.threshold.fill_(0.4)
    return sae.eval()


def saelens_folder(folder, *, hook_name="blocks.1.hook_resid_post", model_name=None, architecture="jumprelu",
                   apply_b_dec_to_input=True, normalize="none", d_sae=2 * D_IN, seed=0, version="6.54.12"):
    """A folder as SAELens 6 saves one (`SAE.save_model`): its fields, its metadata, no instructsae block."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {"W_enc": torch.randn(D_IN, d_sae, generator=generator) / D_IN ** 0.5,
               "W_dec": torch.randn(d_sae, D_IN, generator=generator) / D_IN ** 0.5,
               "b_enc": torch.randn(d_sae, generator=generator) * 0.1, "b_dec": torch.randn(D_IN, generator=generator)}
    if architecture == "jumprelu":
        tensors["threshold"] = torch.rand(d_sae, generator=generator) * 0.2
    cfg = {"d_in": D_IN, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": normalize,
           "reshape_activations": "none", "architecture": architecture,
           "metadata": {"sae_lens_version": version, "sae_lens_training_version": version, "model_name": model_name,
                        "hook_name": hook_name, "hook_head_index": None, "context_size": 128, "prepend_bos": True,
                        "seqpos_slice": [None], "dataset_path": "some/dataset", "model_class_name": "HookedTransformer",
                        "model_from_pretrained_kwargs": {}, "neuronpedia_id": None}}
    if architecture == "topk":
        cfg["k"] = 8
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder, tensors


# --- SAELens loads what we write -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(SAE_CLASSES))
def test_saelens_loads_every_architecture_with_our_reconstructions(arch, tmp_path):
    sae_lens = saelens()
    ours = trained_like(arch)
    save_sae(tmp_path, ours, input_scale=0.25, metadata={"layer": 1, "model": "smollm2", "store_fingerprint": "f"})
    loaded, _ = load_sae(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    x_BD = torch.randn(48, D_IN) * 4
    with torch.no_grad():
        ours_latents_BF, their_latents_BF = loaded.encode(x_BD), theirs.encode(x_BD)
        assert (ours_latents_BF > 0).any() and (ours_latents_BF == 0).any(), "the comparison must be non-trivial"
        torch.testing.assert_close(their_latents_BF, ours_latents_BF, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(their_latents_BF), loaded.decode(ours_latents_BF),
                                   rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(theirs(x_BD), loaded(x_BD), rtol=1e-5, atol=1e-4)
    metadata = theirs.cfg.metadata
    assert metadata.hook_name == "blocks.1.hook_resid_post" and metadata.prepend_bos is False
    assert metadata["instructsae"]["architecture"] == arch  # our provenance survives SAELens's loader


def test_saelens_keeps_the_metadata_of_a_trained_run(tmp_path, monkeypatch, capsys, tiny_model_dir,
                                                     dialogues_jsonl):
    sae_lens = saelens()
    store, run = tmp_path / "store", tmp_path / "run"
    assert run_cli(monkeypatch, capsys, "extract", "--model", str(tiny_model_dir), "--dataset", str(dialogues_jsonl),
                   "--layers", "1", "--chunk-tokens", "64", "--out", str(store))[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", str(store), "--out", str(run), "--expansion", "2",
                           "--batch-size", "64", "--tokens", "640", "--buffer-tokens", "256")
    assert code == 0, err
    metadata = sae_lens.SAE.load_from_disk(str(run)).cfg.metadata
    assert (metadata.model_name, metadata.hook_name) == (str(tiny_model_dir), "blocks.1.hook_resid_post")
    assert (metadata.context_size, metadata.seqpos_slice, metadata.prepend_bos) == (8192, [1, None], False)
    assert metadata.dataset_path == str(dialogues_jsonl)
    assert metadata["instructsae"]["store"] == str(store)


# --- we load what SAELens writes -------------------------------------------------------------------------

@pytest.mark.parametrize("hook, layer", [
    ("blocks.15.hook_resid_post", 15), ("model.layers.15", 15), ("layers.3", 3), ("blocks.4.hook_resid_pre", 3),
    ("transformer.h.2", 2), ("blocks.0.hook_resid_pre", None), ("blocks.15.hook_mlp_out", 15),
    ("blocks.15.attn.hook_z", None),
])
def test_layer_from_hook_name(hook, layer):
    assert layer_from_hook_name(hook) == layer


def test_a_saelens_folder_gives_its_layer_model_and_maths(tmp_path, tiny_model_dir):
    folder, tensors = saelens_folder(tmp_path / "sae", hook_name="model.layers.1", model_name=str(tiny_model_dir))
    sae, cfg = load_sae(folder)
    assert (sae_layer(cfg, folder), sae_model(cfg), sae.architecture) == (1, str(tiny_model_dir), "jumprelu")
    x_BD = torch.randn(16, D_IN) * 3
    pre_BF = (x_BD - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    expected_BF = torch.relu(pre_BF) * (pre_BF > tensors["threshold"])  # SAELens's JumpReLU encode
    torch.testing.assert_close(sae.encode(x_BD), expected_BF)


def test_the_embedded_models_hub_id_maps_back_to_it(tmp_path):
    folder, _ = saelens_folder(tmp_path / "sae", model_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert sae_model(load_sae(folder)[1]) == "smollm2"


def test_an_encoder_without_b_dec_on_its_input_is_folded(tmp_path):
    folder, tensors = saelens_folder(tmp_path / "sae", architecture="standard", apply_b_dec_to_input=False)
    sae, _ = load_sae(folder)
    x_BD = torch.randn(16, D_IN)
    expected_BF = torch.relu(x_BD @ tensors["W_enc"] + tensors["b_enc"])
    torch.testing.assert_close(sae.encode(x_BD), expected_BF, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, expected", [
    ({"normalize": "expected_average_only_in"}, "normalises its inputs"),
    ({"hook_name": "blocks.1.attn.hook_z"}, "no site a store holds"),
    ({"hook_name": None}, "does not say which layer"),
    ({"architecture": "gated"}, "unknown architecture 'gated'"),
])
def test_what_we_cannot_run_is_one_line(tmp_path, change, expected):
    folder, _ = saelens_folder(tmp_path / "sae", **change)
    with pytest.raises(UserError) as caught:
        sae, cfg = load_sae(folder)
        sae_layer(cfg, folder)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["W_dec", "threshold"])
def test_a_saelens_folder_with_nan_or_inf_weights_is_one_line(tmp_path, name):
    folder, tensors = saelens_folder(tmp_path / "sae")
    tensors[name][3] = float("nan") if name == "W_dec" else float("inf")
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(UserError) as caught:
        load_sae(folder)
    message = str(caught.value)
    assert f"NaN/inf values in {name}" in message and str(folder) in message and "\n" not in message


@pytest.fixture
def store(tiny_model_dir, dialogues_jsonl, tmp_path, monkeypatch, capsys):
    out = tmp_path / "store"
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", str(tiny_model_dir), "--dataset",
                           str(dialogues_jsonl), "--layers", "1", "--chunk-tokens", "64", "--dtype", "float32",
                           "--max-instances", "4", "--out", str(out))
    assert code == 0, err
    return out


def test_evaluate_features_and_steer_take_a_folder_saelens_wrote(store, tiny_model_dir, tmp_path, monkeypatch,
                                                               capsys):
    folder, _ = saelens_folder(tmp_path / "sae", model_name=str(tiny_model_dir), architecture="topk")
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", "--sae", str(folder), "--store", str(store),
                             "--json", "--lm-tokens", "0")
    assert code == 0, err
    result = json.loads(out)
    assert (result["layer"], result["architecture"], result["l0"]) == (1, "topk", pytest.approx(8.0))
    code, _, err = run_cli(monkeypatch, capsys, "features", "--sae", str(folder), "--store", str(store),
                           "--out", str(tmp_path / "features"))
    assert code == 0, err
    assert (tmp_path / "features" / "features.json").exists()
    code, _, err = run_cli(monkeypatch, capsys, "steer", "--sae", str(folder), "--feature", "3", "--alpha", "0,50",
                           "--prompt", "Tell me a story", "--max-new-tokens", "4", "--out", str(tmp_path / "s.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "s.json").read_text())["layer"] == 1


def test_a_foreign_folder_on_the_wrong_hook_is_one_line(store, tmp_path, monkeypatch, capsys):
    folder, _ = saelens_folder(tmp_path / "sae", hook_name="blocks.1.hook_mlp_out")
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--sae", str(folder), "--store", str(store))
    assert_one_line_error(code, err, "blocks.1.hook_mlp_out", str(folder))
