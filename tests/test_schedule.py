"""Warm-ups fitted to short runs unless set; the effective schedule printed and recorded; a default run of a few
steps trains."""

import json

import pytest
from helpers import run_cli

from instructsae.schemas import OptimConfig, TrainConfig
from instructsae.train.schedule import describe_schedule, fitted_batch_size, fitted_optim, schedule_line


def test_default_warmups_and_lr_fit_a_short_run():
    fitted = fitted_optim(OptimConfig(), n_steps=73)
    assert (fitted.lr_warmup_steps, fitted.sparsity_warmup_steps, fitted.lr) == (3, 36, 1e-3)
    assert fitted_optim(OptimConfig(), n_steps=10_000).lr == pytest.approx(7e-5 * 10 ** 0.5)


def test_a_long_run_keeps_the_defaults():
    fitted = fitted_optim(OptimConfig(), n_steps=1_000_000)
    assert (fitted.lr_warmup_steps, fitted.sparsity_warmup_steps, fitted.lr) == (1000, 10_000, 7e-5)


def test_the_default_batch_halves_for_a_short_run_unless_set():
    default = TrainConfig(store="s", out="o")
    assert fitted_batch_size([default], 300_000) == 1024
    assert fitted_batch_size([default], 3_000_000) == 2048
    assert fitted_batch_size([default], 5_000_000) == 4096
    assert fitted_batch_size([default, TrainConfig(store="s", out="p", batch_size=4096)], 300_000) == 4096


def test_what_is_set_explicitly_is_kept_and_a_run_inside_a_warmup_is_named():
    given = OptimConfig(lr_warmup_steps=500, lr=2e-4)
    fitted = fitted_optim(given, n_steps=73)
    assert (fitted.lr_warmup_steps, fitted.sparsity_warmup_steps, fitted.lr) == (500, 36, 2e-4)
    schedule = describe_schedule(given, fitted, 73, has_penalty=True, batch_size=4096, default_batch_size=4096)
    assert schedule["fitted"] == {"sparsity_warmup_steps": {"default": 10_000, "used": 36}}
    assert len(schedule["warnings"]) == 1 and "inside the lr warm-up" in schedule["warnings"][0]
    line = schedule_line("run", schedule)
    assert line.startswith("run: 73 steps of 4096 tokens; lr 0.0002;")
    assert "lr warm-up 500 steps;" in line and "sparsity warm-up 36 steps (fitted, default 10000)" in line


def test_topk_has_no_sparsity_warmup_to_report():
    schedule = describe_schedule(OptimConfig(), fitted_optim(OptimConfig(), 100), 100, has_penalty=False)
    assert "sparsity_warmup_steps" not in schedule and schedule["warnings"] == []
    assert "sparsity_warmup_steps" not in schedule["fitted"]  # fitted for a penalty TopK does not have


@pytest.fixture
def store(tiny_model_dir, dialogues_jsonl, tmp_path, monkeypatch, capsys):
    out = tmp_path / "store"
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", str(tiny_model_dir), "--dataset",
                           str(dialogues_jsonl), "--layers", "1", "--chunk-tokens", "64", "--out", str(out))
    assert code == 0, err
    return out


def test_a_short_default_run_trains(store, tmp_path, monkeypatch, capsys):
    """Only --tokens is given, the issue's 300,000: with Gemma Scope's defaults as they stand, 73 steps inside
    both warm-ups at lr 7e-5 (this tiny store: held-out NMSE ~48, as the untrained SAE)."""
    run = tmp_path / "run"
    code, out, err = run_cli(monkeypatch, capsys, "train", "--store", str(store), "--out", str(run),
                             "--tokens", "300000")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["nmse"] < 1.0, "a default short run must beat predicting zero"
    schedule = summary["schedule"]
    assert (schedule["n_steps"], schedule["batch_size"], schedule["lr"]) == (292, 1024, 1e-3)
    assert (schedule["lr_warmup_steps"], schedule["sparsity_warmup_steps"]) == (14, 146)
    assert json.loads((run / "summary.json").read_text())["schedule"] == schedule
    assert "schedule: run: 292 steps of 1024 tokens (fitted, default 4096); lr 0.001 (fitted, default 7e-05)" in err
    assert "warning" not in err

    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", str(store), "--out", str(run), "--tokens", "300000")
    assert code == 0 and "already trained" in err
    # the default lr given explicitly is not the lr this run was fitted to: another SAE, so not "already trained"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", str(store), "--out", str(run), "--tokens", "300000",
                           "--lr", "7e-5")
    assert code == 2 and "already trained" not in err and "fitted_to_run" in err, err


def test_saes_with_one_schedule_share_its_line(capsys):
    from instructsae.train.run import _print_schedules

    configs = [TrainConfig(store="runs/store", out=f"runs/sae-{i}") for i in range(3)]
    same = describe_schedule(OptimConfig(), fitted_optim(OptimConfig(), 100), 100, has_penalty=True)
    other = describe_schedule(OptimConfig(), fitted_optim(OptimConfig(), 10), 10, has_penalty=True)
    _print_schedules(configs, [same, same, other])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("schedule: ")]
    assert lines[0].startswith("schedule: 2 SAEs (sae-0, ...): 100 steps")
    assert lines[1].startswith("schedule: sae-2: 10 steps") and len(lines) == 2
