"""The whole pipeline through the CLI on the tiny model: extract -> inspect -> train -> evaluate."""

import json

import pytest
from helpers import assert_one_line_error, run_cli

from instructsae.schemas import StandardConfig
from instructsae.sae.export import save_sae
from instructsae.sae import build_sae


@pytest.fixture
def stores(tiny_model_dir, dialogues_jsonl, tmp_path, monkeypatch, capsys):
    """A training store (first 8 dialogues) and a held-out one (the 4 after)."""
    common = ["--model", str(tiny_model_dir), "--dataset", str(dialogues_jsonl), "--layers", "1",
              "--chunk-tokens", "64", "--dtype", "float32"]
    train, heldout = tmp_path / "train", tmp_path / "heldout"
    assert run_cli(monkeypatch, capsys, "extract", *common, "--max-instances", "8", "--out", str(train))[0] == 0
    assert run_cli(monkeypatch, capsys, "extract", *common, "--skip-instances", "8", "--out", str(heldout))[0] == 0
    return train, heldout


def test_inspect_json(stores, monkeypatch, capsys):
    train, _ = stores
    code, out, _ = run_cli(monkeypatch, capsys, "inspect", str(train), "--json")
    summary = json.loads(out)
    assert code == 0
    assert summary["manifest"]["complete"] is True
    assert summary["counts"]["instances"] == 8
    assert summary["manifest"]["identity"]["layers"] == [1]
    assert sum(summary["counts"]["tokens_by_role"].values()) == summary["counts"]["tokens"]
    assert summary["counts"]["tokens_by_role"]["assistant"] > 0


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_train_then_evaluate(stores, arch, tmp_path, monkeypatch, capsys):
    train, heldout = stores
    run = tmp_path / f"run-{arch}"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", str(train), "--sae", arch, "--out", str(run),
                           "--expansion", "2", "--batch-size", "32", "--tokens", "3000", "--lr", "3e-3",
                           "--lr-warmup-steps", "5", "--sparsity-warmup-steps", "20", "--buffer-tokens", "256")
    assert code == 0, err
    for name in ("cfg.json", "sae_weights.safetensors", "metrics.jsonl", "summary.json"):
        assert (run / name).exists(), name
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["nmse"] < lines[0]["nmse"], "reconstruction did not improve with training"
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", "--sae", str(run), "--store", str(heldout), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["n_tokens"] > 0 and 0 < result["nmse"] < 1.0 and result["l0"] > 0
    assert 0 <= result["dead_fraction"] <= 1


def test_sae_that_does_not_match_the_store(stores, tmp_path, monkeypatch, capsys):
    train, _ = stores
    narrow = build_sae(StandardConfig(expansion=2), d_in=32)
    save_sae(tmp_path / "narrow", narrow, input_scale=1.0, metadata={"layer": 1})
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--sae", str(tmp_path / "narrow"), "--store", str(train))
    assert_one_line_error(code, err, "d_in 32", "d_model 64")


def test_train_refuses_a_layer_the_store_lacks(stores, tmp_path, monkeypatch, capsys):
    train, _ = stores
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", str(train), "--out", str(tmp_path / "r"),
                           "--layer", "0")
    assert_one_line_error(code, err, "layer 0")
