"""Warm-ups fitted to short runs unless set; the effective schedule printed and recorded; a default run of a few
steps trains."""

import json

import pytest
from helpers import run_cli

from instructsae.schemas import OptimConfig
from instructsae.train.schedule import describe_schedule, fitted_optim, schedule_line


def test_default_warmups_shrink_to_their_share_of_a_short_run():
    fitted = fitted_optim(OptimConfig(), n_steps=73)
    assert (fitted.lr_warmup_steps, fitted.sparsity_warmup_steps) == (3, 36)


def test_a_long_run_keeps_the_defaults():
    fitted = fitted_optim(OptimConfig(), n_steps=1_000_000)
    assert (fitted.lr_warmup_steps, fitted.sparsity_warmup_steps) == (1000, 10_000)


def test_a_warmup_set_explicitly_is_kept_and_a_run_inside_it_is_named():
    given = OptimConfig(lr_warmup_steps=500)
    fitted = fitted_optim(given, n_steps=73)
    assert (fitted.lr_warmup_steps, fitted.sparsity_warmup_steps) == (500, 36)
    schedule = describe_schedule(given, fitted, 73, has_penalty=True)
    assert schedule["fitted"] == {"sparsity_warmup_steps": {"default": 10_000, "used": 36}}
    assert len(schedule["warnings"]) == 1 and "inside the lr warm-up" in schedule["warnings"][0]
    line = schedule_line("run", schedule)
    assert "lr warm-up 500 steps;" in line and "sparsity warm-up 36 steps (fitted" in line


def test_topk_has_no_sparsity_warmup_to_report():
    schedule = describe_schedule(OptimConfig(), fitted_optim(OptimConfig(), 10), 10, has_penalty=False)
    assert "sparsity_warmup_steps" not in schedule and schedule["warnings"] == []


@pytest.fixture
def store(tiny_model_dir, dialogues_jsonl, tmp_path, monkeypatch, capsys):
    out = tmp_path / "store"
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", str(tiny_model_dir), "--dataset",
                           str(dialogues_jsonl), "--layers", "1", "--chunk-tokens", "64", "--out", str(out))
    assert code == 0, err
    return out


def test_a_short_default_run_trains(store, tmp_path, monkeypatch, capsys):
    """Only --tokens is given: 12 steps of the default 4096 tokens, far inside the default warm-ups."""
    run = tmp_path / "run"
    code, out, err = run_cli(monkeypatch, capsys, "train", "--store", str(store), "--out", str(run),
                             "--tokens", str(12 * 4096))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["nmse"] < 1.0, "a default run of a few steps must beat predicting zero"
    schedule = summary["schedule"]
    assert (schedule["n_steps"], schedule["lr_warmup_steps"], schedule["sparsity_warmup_steps"]) == (12, 0, 6)
    assert json.loads((run / "summary.json").read_text())["schedule"] == schedule
    assert "run: 12 steps; lr warm-up 0 steps (fitted" in err and "warning" not in err
