"""`instructsae pipeline compare` end to end on the tiny model: three stores, one grid each, one held-out store."""

import json
import re
from pathlib import Path

import pytest
from helpers import assert_one_line_error, robot_dialogues, run_cli

from instructsae.pipelines.compare_report import summary_tables


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# fast enough to sparsify in 20 steps, so the three settings spread over L0 and the methods' ranges overlap
TRAIN = {"batch_size": 32, "buffer_tokens": 128,
         "optim": {"lr": 0.01, "lr_warmup_steps": 2, "beta1": 0.9, "sparsity_warmup_steps": 5}}


def test_compare_writes_a_report_for_three_methods(tiny_model_dir, tmp_path, monkeypatch, capsys):
    dialogues = write_jsonl(tmp_path / "dialogues.jsonl", robot_dialogues(40))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "The quick brown fox jumps over the lazy dog. " * 6}
                                                 for _ in range(20)])
    other = write_jsonl(tmp_path / "other.jsonl", [{"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"It is {2 * i}."}]}
        for i in range(30)])
    config = tmp_path / "compare.yaml"
    config.write_text(json.dumps({
        "grid": {"sae": [{"arch": "standard", "sparsity_coeff": [0.01, 0.1, 1.0]}], "expansion": [2]},
        "train": TRAIN,
    }))
    args = ["--model", str(tiny_model_dir), "--dialogues", dialogues, "--pretraining-text", text, "--layer", "1",
            "--tokens", "400", "--heldout-tokens", "300", "--train-tokens", "640", "--block-len", "64",
            "--lm-tokens", "120", "--heldout", other, "--bootstrap", "50", "--out", str(tmp_path / "out")]
    code, out, err = run_cli(monkeypatch, capsys, "pipeline", "compare", "--config", str(config), *args)
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted({r["method"] for r in results}) == ["bt-f", "bt-p", "fast"]
    assert len(results) == 3 * 3 * 3 * 2  # 3 methods x 3 SAEs x 3 seeds, on 2 held-out stores
    assert {r["seed"] for r in results} == {0, 1, 2}
    assert len({r["store_fingerprint"] for r in results}) == 2 and len({r["heldout"] for r in results}) == 2
    for r in results:
        assert 0 < r["nmse"] < 5 and r["l0"] > 0 and "lm" in r and r["lm"]["n_tokens"] > 0
    report = (tmp_path / "out" / "report.md").read_text()
    for label in ("FAST − BT(F)", "FAST − BT(P)", "Held out: later", "Held out: " + other, "CE recovered",
                  "log2 MSE (Eq. 7)", "log2 MSE_st", "explained variance", "Eq. 7", "frontier.png"):
        assert label in report, label
    verdicts = json.loads((tmp_path / "out" / "verdicts.json").read_text())
    for rows in (heldout["rows"] for heldout in verdicts.values()):
        compared = [row for row in rows if "refused" not in row]
        assert all(row["verdict"] in ("better", "worse", "indistinguishable") for row in compared)
        assert {row["metric"] for row in rows} >= {"nmse", "log2_eq7", "ce_recovered"}
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 0
    assert "| standard | NMSE |" in out
    nmse = next(row for row in verdicts["later " + dialogues]["rows"] if row["metric"] == "nmse"
                and row["other"] == "bt-f")
    assert "refused" not in nmse, nmse  # the frontiers overlap: a verdict with its interval
    assert nmse["l0_low"] <= nmse["l0_high"] and nmse["interval"][0] <= nmse["interval"][1]

    # a rerun with a smaller grid trains and evaluates nothing again, and reports its own SAEs only
    config.write_text(json.dumps({"grid": {"sae": [{"arch": "standard", "sparsity_coeff": 0.1}], "expansion": [2]},
                                  "train": TRAIN}))
    code, out, err = run_cli(monkeypatch, capsys, "pipeline", "compare", "--config", str(config), *args)
    assert code == 0, err
    assert not re.search(r"evaluating \d+ \S+ SAEs", out) and "training 0 in one pass" in out
    rerun = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(rerun) == 3 * 3 * 2 and {r["setting"] for r in rerun} == {"standard-x2-c0.1-lr0.01-l1"}
    kept = {(r["sae"], r["heldout"]): r["nmse"] for r in results}
    assert all(kept[(r["sae"], r["heldout"])] == r["nmse"] for r in rerun)


def test_a_heldout_set_the_saes_train_on_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "pipeline", "compare", "--model", str(tiny_model_dir),
                           "--heldout", "sharegpt", "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "--heldout sharegpt", "train on it")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("grid, expected", [
    ({"sae": []}, "grid"),
    ({"sae": [{"arch": "standard", "sparsity_coeff": -1.0}]}, "sparsity_coeff"),
    ({"sae": [{"arch": "gated"}]}, "unknown architecture"),
])
def test_a_bad_grid_is_refused_before_any_extraction(grid, expected, tiny_model_dir, tmp_path, monkeypatch, capsys):
    config = tmp_path / "compare.yaml"
    config.write_text(json.dumps({"grid": grid}))
    code, _, err = run_cli(monkeypatch, capsys, "pipeline", "compare", "--config", str(config),
                           "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / "out" / "stores").exists()


def test_readme_verdict_tables_come_from_the_committed_report():
    """The README's verdict tables are summary_tables of docs/compare/verdicts.json, as report.md shows them."""
    root = Path(__file__).parent.parent
    tables = summary_tables(json.loads((root / "docs/compare/verdicts.json").read_text()), 0.95)
    assert "| jumprelu | NMSE |" in tables
    assert tables in (root / "docs/compare/report.md").read_text()
    assert tables in (root / "README.md").read_text()
