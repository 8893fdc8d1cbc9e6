"""The notebook path, as a notebook would run it, through `import instructsae as isae` alone: a dialogue to per-token
activations and latents, the top features, a steered generation; and nothing written unless an output is named."""

import os

import pytest
import torch

import instructsae as isae

DIALOGUE = [{"role": "user", "content": "Tell me a story about a robot."},
            {"role": "assistant", "content": "Once upon a time there was a small robot who liked to read."}]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A store of a few dialogues and a small JumpReLU SAE trained on it, as the README's first steps make."""
    folder = tmp_path_factory.mktemp("notebook")
    dialogues = [[{"role": "user", "content": f"Tell me story {i} about a robot."},
                  {"role": "assistant", "content": "Once upon a time there was a small robot. " * (1 + i % 3)}]
                 for i in range(10)]
    isae.extract_activations(dialogues=dialogues, model=str(tiny_model_dir), layers=(1,), out=str(folder / "store"),
                             chunk_tokens=64, dtype="float32", show_progress=False)
    isae.train_sae(store=str(folder / "store"), out=str(folder / "sae"), sae={"arch": "jumprelu", "d_sae": 128},
                   batch_size=64, tokens=1280, buffer_tokens=256, optim={"lr": 3e-3, "lr_warmup_steps": 2})
    return folder


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_a_dialogue_to_latents_top_features_and_a_steered_generation(trained, tiny_model_dir, empty_cwd):
    model = str(tiny_model_dir)
    acts = isae.activations(model, DIALOGUE, layers=1, show_progress=False)
    tokens = acts.tokens
    assert list(tokens.columns) == ["dialogue", "position", "token_id", "text", "role"]
    assert acts[1].shape == (len(tokens), 64) and acts[1].dtype == torch.float32
    assert set(tokens["role"]) >= {"user", "assistant", "template"}
    # as extract does: the first token (the attention sink) is not there unless asked for
    assert tokens["position"].tolist() == list(range(1, len(tokens) + 1))
    with_sink = isae.activations(model, DIALOGUE, layers=1, keep_first_token=True, show_progress=False)
    assert with_sink.tokens["position"].tolist() == list(range(len(tokens) + 1))
    assert (with_sink.tokens["token_id"].iloc[1:].to_numpy() == tokens["token_id"].to_numpy()).all()
    torch.testing.assert_close(with_sink[1][1:], acts[1])
    assert "".join(with_sink.tokens["text"]).count("Once upon a time") == 1  # the text of each token, in order

    sae = isae.load_sae(trained / "sae", device="cpu")
    latents = isae.latents(sae, None, DIALOGUE, show_progress=False)  # the model the SAE names
    assert latents.latents.shape == (len(tokens), 128) and latents.layer == 1
    torch.testing.assert_close(latents.latents, sae.encode(acts[1]))
    top = latents.top_features(5)
    assert 0 < len(top) <= 5 and (top["activation"].diff().dropna() <= 0).all()
    peak = top.iloc[0]
    assert latents.latents[:, int(peak["feature"])].max() == pytest.approx(peak["activation"])

    steered = isae.steer(trained / "sae", int(peak["feature"]), "Tell me a story.", alpha=[0, 200],
                         max_new_tokens=6, model=model)
    assert [g["alpha"] for g in steered["generations"]] == [0, 200]
    assert all(g["token_ids"] for g in steered["generations"]) and steered["out"] is None
    assert steered["generations"][0]["token_ids"] != steered["generations"][1]["token_ids"]
    assert os.listdir(empty_cwd) == []  # no JSON left in the working directory


def test_features_and_dedup_return_their_results_and_write_nothing(trained, empty_cwd, dialogues_jsonl):
    result = isae.features(trained / "sae", trained / "store", top=3)
    assert result["out"] is None and result["n_live"] == len(result["features"]) > 0
    assert all(len(record["top"]) <= 3 for record in result["features"])
    report = isae.dedup(str(dialogues_jsonl))
    assert report["out"] is None and len(report["rows"]) == report["rows_out"] > 0
    assert report["rows"][0]["messages"][0]["role"] == "user"
    assert os.listdir(empty_cwd) == []
    written = isae.features(trained / "sae", trained / "store", top=3, out=str(empty_cwd / "features"))
    assert (empty_cwd / "features" / "features.json").is_file() and written["n_live"] == result["n_live"]


def test_the_sae_object_meets_saebenchs_custom_sae_contract(trained):
    """SAEBench's custom SAEs (sae_bench/custom_saes/README.md): encode/decode/forward, W_dec [d_sae, d_in] with
    unit-norm rows (its check_decoder_norms: allclose to 1 at atol 1e-5 in float32), .dtype, .device, and a cfg
    with d_in, d_sae, hook_name, hook_layer, model_name. (sae-bench itself pins numpy<2 and datasets<4, too
    heavy to install here, so its check is mirrored.)"""
    sae = isae.load_sae(trained / "sae")
    assert sae.W_dec.shape == (sae.cfg.d_sae, sae.cfg.d_in) == (128, 64)
    norms = torch.norm(sae.W_dec, dim=1).to(dtype=sae.dtype, device=sae.device)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert sae.dtype == torch.float32 and sae.device == torch.device("cpu")
    assert (sae.cfg.hook_name, sae.cfg.hook_layer) == ("blocks.1.hook_resid_post", 1)
    assert sae.cfg.model_name and sae.cfg.architecture == "jumprelu" and sae.cfg.hook_head_index is None
    sae.cfg.dtype = "float32"  # SAEBench's core eval sets it; the dict keeps it
    assert sae.cfg["dtype"] == "float32" and sae.cfg["metadata"]["hook_name"] == sae.cfg.hook_name
    x_BD = torch.randn(8, 64)
    torch.testing.assert_close(sae(x_BD), sae.decode(sae.encode(x_BD)))


def test_autointerp_and_compare_wrap_their_commands(empty_cwd, monkeypatch, tmp_path):
    """The thin wrappers: autointerp takes features() held in Python (its folder made in a scratch space that is
    gone afterwards), compare returns the report and the results it wrote under its out."""
    seen = {}

    def fake_autointerp(cfg):
        import json
        from pathlib import Path

        seen["features"] = json.loads((Path(cfg.features) / "features.json").read_text())
        seen["cfg"] = cfg
        Path(cfg.out).write_text("{}")
        return {"n_scored": 1, "out": cfg.out}

    monkeypatch.setattr("instructsae.evaluate.autointerp.run_autointerp", fake_autointerp)
    features = {"sae": "s", "store": "t", "features": [{"id": 3, "density": 0.1, "top": []}]}
    report = isae.autointerp(features, endpoint="http://127.0.0.1:9/v1", model="judge", n_features=1)
    assert report == {"n_scored": 1, "out": None} and seen["features"] == features
    assert (seen["cfg"].model, seen["cfg"].n_features) == ("judge", 1)
    from pathlib import Path

    assert not Path(seen["cfg"].features).exists() and os.listdir(empty_cwd) == []

    def fake_compare(cfg):
        root = Path(cfg.out)
        root.mkdir(parents=True)
        (root / "results.json").write_text('[{"method": "fast"}]')
        (root / "verdicts.json").write_text('{"sharegpt": {}}')
        return f"# report, {cfg.seeds} seeds"

    monkeypatch.setattr("instructsae.pipelines.compare.run_compare", fake_compare)
    result = isae.compare(str(tmp_path / "cmp"), seeds=2)
    assert result == {"report": "# report, 2 seeds", "results": [{"method": "fast"}], "verdicts": {"sharegpt": {}},
                      "out": str(tmp_path / "cmp")}
