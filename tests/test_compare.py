"""`instructsae pipeline compare` end to end on the tiny model: three stores, one grid each, one held-out store."""

import json

import pytest
from helpers import assert_one_line_error, run_cli


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_compare_writes_a_report_for_three_methods(tiny_model_dir, tmp_path, monkeypatch, capsys):
    dialogues = write_jsonl(tmp_path / "dialogues.jsonl", [{"messages": [
        {"role": "user", "content": f"Tell me story {i} about a robot."},
        {"role": "assistant", "content": "Once upon a time there was a small robot. " * (1 + i % 3)}]}
        for i in range(40)])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "The quick brown fox jumps over the lazy dog. " * 6}
                                                 for _ in range(20)])
    config = tmp_path / "compare.yaml"
    config.write_text(json.dumps({
        "grid": {"sae": [{"arch": "standard", "sparsity_coeff": [0.05, 0.2]},
                         {"arch": "jumprelu", "sparsity_coeff": 0.001}], "expansion": [2]},
        "train": {"batch_size": 32, "buffer_tokens": 128},
    }))
    args = ["--model", str(tiny_model_dir), "--dialogues", dialogues, "--pretraining-text", text, "--layer", "1",
            "--tokens", "400", "--heldout-tokens", "300", "--train-tokens", "640", "--block-len", "64",
            "--lm-tokens", "120", "--out", str(tmp_path / "out")]
    code, out, err = run_cli(monkeypatch, capsys, "pipeline", "compare", "--config", str(config), *args)
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted({r["method"] for r in results}) == ["bt-f", "bt-p", "fast"]
    assert len(results) == 9  # 3 methods x 3 SAEs
    heldout = {r["store_fingerprint"] for r in results}
    assert len(heldout) == 1  # all on the one held-out store
    for r in results:
        assert 0 < r["nmse"] < 5 and r["l0"] > 0 and "lm" in r and r["lm"]["n_tokens"] > 0
    report = (tmp_path / "out" / "report.md").read_text()
    for label in ("BT(P)", "BT(F)", "FAST", "CE recovered", "frontier.png"):
        assert label in report
    assert report.split("## Per token role")[0].count("| BT(P) | standard |") == 2
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 0
    assert "| FAST | jumprelu |" in out

    # a rerun with a smaller grid reports its own SAEs only, though the folders of the first grid are still there
    config.write_text(json.dumps({"grid": {"sae": [{"arch": "jumprelu", "sparsity_coeff": 0.001}], "expansion": [2]},
                                  "train": {"batch_size": 32, "buffer_tokens": 128}}))
    code, out, err = run_cli(monkeypatch, capsys, "pipeline", "compare", "--config", str(config), *args)
    assert code == 0, err
    rerun = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(rerun) == 3 and {r["architecture"] for r in rerun} == {"jumprelu"}
    assert [r["nmse"] for r in rerun] == [r["nmse"] for r in results if r["architecture"] == "jumprelu"]


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
