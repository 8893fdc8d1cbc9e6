"""The SAELens folder: its cfg.json and tensors, raw-activation weights, and one-line errors for bad folders."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from instructsae.errors import UserError
from instructsae.schemas import JumpReLUConfig, StandardConfig
from instructsae.schemas.train import BatchTopKConfig, MatryoshkaBatchTopKConfig, TopKConfig
from instructsae.sae.export import load_sae, saelens_metadata, save_sae
from instructsae.sae import SAE_CLASSES, build_sae

D_IN = 12
CONFIGS = {"standard": StandardConfig(expansion=2), "jumprelu": JumpReLUConfig(expansion=2, init_threshold=0.02),
           "topk": TopKConfig(expansion=2, k=5, aux_k=3), "batchtopk": BatchTopKConfig(expansion=2, k=5),
           "matryoshka_batchtopk": MatryoshkaBatchTopKConfig(expansion=2, k=5, prefixes=(4, 12))}
BATCH_TOPK = ("batchtopk", "matryoshka_batchtopk")  # a global threshold at inference: SAELens runs a JumpReLU


@pytest.fixture(params=sorted(SAE_CLASSES))
def sae(request):
    """An SAE with non-trivial biases, so that a wrongly folded scale would show."""
    torch.manual_seed(0)
    sae = build_sae(CONFIGS[request.param], D_IN)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        if sae.architecture in BATCH_TOPK:
            sae.threshold.fill_(0.3)  # as if estimated in training, so that the threshold matters
    return sae.eval()


def test_cfg_and_tensors_follow_the_saelens_layout(sae, tmp_path):
    save_sae(tmp_path, sae, input_scale=0.5, metadata={"layer": 7, "store_fingerprint": "abc"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    # BatchTopK runs as a JumpReLU with its threshold at inference: SAELens has no batchtopk inference class
    assert cfg["architecture"] == ("jumprelu" if sae.architecture in BATCH_TOPK else sae.architecture)
    assert (cfg["d_in"], cfg["d_sae"]) == (D_IN, 2 * D_IN)
    assert (cfg["dtype"], cfg["device"], cfg["normalize_activations"]) == ("float32", "cpu", "none")
    metadata = cfg["metadata"]
    assert metadata["hook_name"] == "blocks.7.hook_resid_post" and metadata["sae_lens_version"].startswith("6.")
    assert metadata["prepend_bos"] is False
    own = metadata["instructsae"]
    assert (own["layer"], own["store_fingerprint"], own["architecture"]) == (7, "abc", sae.architecture)
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    expected = {"W_enc": (D_IN, 2 * D_IN), "W_dec": (2 * D_IN, D_IN), "b_enc": (2 * D_IN,), "b_dec": (D_IN,)}
    if sae.architecture in ("jumprelu", *BATCH_TOPK):
        expected["threshold"] = (2 * D_IN,)
    if sae.architecture in ("topk", *BATCH_TOPK):
        assert (own["settings"]["k"], own["settings"]["aux_k"], own["settings"]["aux_coeff"]) == (5, sae.aux_k, 1 / 32)
    if sae.architecture == "topk":
        assert cfg["k"] == 5  # SAELens's own field
    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert not list(tmp_path.glob("*.partial")), "temporary files were left behind"


def test_saelens_metadata_comes_from_the_store_identity(tmp_path):
    identity = SimpleNamespace(model="smollm2", mode="fast", max_len=8192, block_len=2048, keep_first_token=False,
                               dataset="sharegpt")
    metadata = saelens_metadata(15, identity)
    assert metadata["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (metadata["hook_name"], metadata["context_size"], metadata["seqpos_slice"]) == \
        ("blocks.15.hook_resid_post", 8192, [1, None])
    assert (metadata["prepend_bos"], metadata["dataset_path"]) == (False, "sharegpt")
    kept = saelens_metadata(3, SimpleNamespace(**{**vars(identity), "keep_first_token": True, "mode": "bt",
                                                   "model": "org/other"}))
    assert (kept["seqpos_slice"], kept["context_size"], kept["model_name"]) == ([None], 2048, "org/other")


def test_loaded_sae_acts_on_raw_activations(sae, tmp_path):
    scale = 0.05  # trained on x_train = scale * x_raw
    save_sae(tmp_path, sae, input_scale=scale, metadata={"layer": 0})
    loaded, _ = load_sae(tmp_path)
    x_raw_BD = torch.randn(32, D_IN) / scale
    with torch.no_grad():
        latents_BF = sae.encode(x_raw_BD * scale)
        recon_BD = sae(x_raw_BD * scale) / scale
    assert (latents_BF > 0).any(), "the comparison must involve active latents"
    torch.testing.assert_close(loaded.encode(x_raw_BD), latents_BF, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded(x_raw_BD), recon_BD, rtol=1e-4, atol=1e-3)
    if "threshold" in sae.extra_parameters:
        torch.testing.assert_close(loaded.threshold, sae.threshold.detach())
    for name in sae.exported_settings:
        assert getattr(loaded, name) == getattr(sae, name), name


def test_saving_again_replaces_the_folder_contents(sae, tmp_path):
    save_sae(tmp_path, sae, input_scale=1.0, metadata={"layer": 1})
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    save_sae(tmp_path, sae, input_scale=1.0, metadata={"layer": 2})
    loaded, cfg = load_sae(tmp_path)
    assert cfg["metadata"]["instructsae"]["layer"] == 2
    torch.testing.assert_close(loaded.W_dec, sae.W_dec.detach())


def write_folder(folder, cfg, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))


GOOD_TENSORS = {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8),
                "W_dec": torch.zeros(8, 4), "b_dec": torch.zeros(4)}
GOOD_CFG = {"architecture": "standard", "d_in": 4, "d_sae": 8}


@pytest.mark.parametrize("case, expected", [
    ("missing", "not an SAE folder"),
    ("empty", "not an SAE folder"),
    ("garbage_cfg", "unreadable"),
    ("cfg_not_a_dict", "unknown architecture"),
    ("unknown_arch", "unknown architecture 'gated'"),
    ("topk_without_k", "does not describe a topk SAE"),
    ("no_W_enc", "W_enc"),
    ("missing_threshold", "do not fit"),
    ("wrong_d_sae", "cfg.json says"),
])
def test_bad_folders_raise_one_clear_line(tmp_path, case, expected):
    folder = tmp_path / "sae"
    if case == "empty":
        folder.mkdir()
    elif case == "garbage_cfg":
        write_folder(folder, "{not json", GOOD_TENSORS)
    elif case == "cfg_not_a_dict":
        write_folder(folder, "[1, 2]", GOOD_TENSORS)
    elif case == "unknown_arch":
        write_folder(folder, {**GOOD_CFG, "architecture": "gated"}, GOOD_TENSORS)
    elif case == "topk_without_k":
        write_folder(folder, {**GOOD_CFG, "architecture": "topk"}, GOOD_TENSORS)
    elif case == "no_W_enc":
        write_folder(folder, GOOD_CFG, {k: v for k, v in GOOD_TENSORS.items() if k != "W_enc"})
    elif case == "missing_threshold":
        write_folder(folder, {**GOOD_CFG, "architecture": "jumprelu"}, GOOD_TENSORS)
    elif case == "wrong_d_sae":
        write_folder(folder, {**GOOD_CFG, "d_sae": 16}, GOOD_TENSORS)
    with pytest.raises(UserError) as caught:
        load_sae(folder)
    message = str(caught.value)
    assert expected in message and "\n" not in message and str(folder) in message


def test_a_good_hand_written_folder_loads(tmp_path):
    write_folder(tmp_path / "sae", GOOD_CFG, GOOD_TENSORS)
    sae, cfg = load_sae(tmp_path / "sae")
    assert (sae.d_in, sae.d_sae) == (4, 8) and not any(p.requires_grad for p in sae.parameters())
