"""Bad input: one clear line on stderr, exit 2, no traceback, nothing half-written."""

import json

import pytest

from helpers import assert_one_line_error, run_cli


def test_unknown_model_path(monkeypatch, capsys, dialogues_jsonl, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", str(tmp_path / "nope"),
                           "--dataset", str(dialogues_jsonl), "--out", str(tmp_path / "s"))
    assert_one_line_error(code, err, "nope")
    assert not (tmp_path / "s").exists()


def test_layer_out_of_range(monkeypatch, capsys, tiny_model_dir, dialogues_jsonl, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", str(tiny_model_dir), "--dataset",
                           str(dialogues_jsonl), "--layers", "5", "--out", str(tmp_path / "s"))
    assert_one_line_error(code, err, "layer 5", "2 layers")
    assert not (tmp_path / "s").exists()


def test_rows_without_the_column_are_skipped_and_reported_once(monkeypatch, capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "mixed.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                    + json.dumps({"prompt": "no messages here"}) + "\n")
    code, out, err = run_cli(monkeypatch, capsys, "extract", "--model", str(tiny_model_dir), "--dataset", str(data),
                             "--layers", "1", "--out", str(tmp_path / "s"))
    assert code == 0, err
    assert (out + err).count("1 of 2 dataset rows skipped: 1 empty") == 1


def test_empty_dataset(monkeypatch, capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", str(tiny_model_dir), "--dataset", str(data),
                           "--layers", "1", "--out", str(tmp_path / "s"))
    assert_one_line_error(code, err, "empty.jsonl")
    assert not (tmp_path / "s").exists()


def test_store_path_that_is_not_a_store(monkeypatch, capsys, tmp_path):
    (tmp_path / "folder").mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "inspect", str(tmp_path / "folder"))
    assert_one_line_error(code, err, "not an instructsae store")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", str(tmp_path / "folder"), "--out",
                           str(tmp_path / "run"))
    assert_one_line_error(code, err, "not an instructsae store")


def test_invalid_option_value(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", "x", "--out", "y", "--batch-size", "-3")
    assert_one_line_error(code, err, "batch_size")


def test_bad_yaml_config(monkeypatch, capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("layers: [15\n")
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--config", str(config), "--out", "x")
    assert_one_line_error(code, err, "c.yaml")


def test_missing_required_option(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", "x")
    assert_one_line_error(code, err, "missing --store")


@pytest.mark.parametrize("args, expected", [
    (["evaluate", "--sae", "x", "--store", "y", "--max-tokens", "0"], "--max-tokens"),
    (["train", "--store", "x", "--out", "y", "--sae", "gated"], "gated"),
    (["inspect", "x", "--no-such-flag"], "--no-such-flag"),
])
def test_a_bad_flag_gets_one_line(args, expected, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert_one_line_error(code, err, expected)


@pytest.mark.parametrize("device", ["cuda:99", "tpu"])
def test_a_device_this_machine_lacks_is_one_line(device, monkeypatch, capsys, tiny_model_dir, dialogues_jsonl,
                                                tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", str(tiny_model_dir), "--dataset",
                           str(dialogues_jsonl), "--layers", "1", "--out", str(tmp_path / "store"), "--device", device)
    assert_one_line_error(code, err, device)
    assert not (tmp_path / "store").exists()
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", str(tmp_path / "store"), "--out",
                           str(tmp_path / "run"), "--device", device)
    assert_one_line_error(code, err, device)


@pytest.mark.parametrize("yaml_text, expected", [
    ("sae: jumprelu\n", "invalid sae: must be a mapping"),
    ("optim: 0.001\n", "invalid optim: must be a mapping"),
])
def test_a_train_yaml_section_of_the_wrong_shape_is_one_line(yaml_text, expected, monkeypatch, capsys, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml_text)
    code, _, err = run_cli(monkeypatch, capsys, "train", "--config", str(config), "--store", "x", "--out", "y")
    assert_one_line_error(code, err, expected, yaml_text.split(":")[1].strip())


def test_a_sweep_base_sae_of_the_wrong_shape_is_one_line(monkeypatch, capsys, tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text("base: {sae: jumprelu}\ngrid: {sae: [{arch: topk}]}\n")
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--config", str(config), "--store", "x", "--out", "y")
    assert_one_line_error(code, err, "base.sae")


def test_yaml_layers_may_be_one_number(tmp_path):
    from instructsae.cli_options import build, read_yaml
    from instructsae.schemas import ExtractConfig

    config = tmp_path / "extract.yaml"
    config.write_text("layers: 15\nout: s\n")
    assert build(ExtractConfig, read_yaml(str(config))).layers == (15,)
    config.write_text("layers: '20, 15'\nout: s\n")
    assert build(ExtractConfig, read_yaml(str(config))).layers == (15, 20)


def test_read_only_out_is_one_line_before_the_model_loads(monkeypatch, capsys, read_only_dir, dialogues_jsonl,
                                                          tmp_path):
    # the model does not exist: a refusal naming the out location shows the check ran before any loading
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", str(tmp_path / "no-model"), "--dataset",
                           str(dialogues_jsonl), "--layers", "1", "--out", str(read_only_dir / "store"))
    assert_one_line_error(code, err, "not writable", str(read_only_dir))
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", str(tmp_path / "no-store"), "--out",
                           str(read_only_dir / "run"))
    assert_one_line_error(code, err, "not writable", str(read_only_dir))


def _dialogue_lines(n: int) -> list[str]:
    return [json.dumps({"messages": [{"role": "user", "content": f"Tell me a story number {i}."},
                                     {"role": "assistant", "content": "Once upon a time there was a robot."}]})
            for i in range(n)]


@pytest.mark.parametrize("name, content, expected", [
    ("latin.jsonl", "\n".join(_dialogue_lines(3)).encode() + "\n{\"text\": \"caf\xe9\"}\n".encode("latin-1"),
     ("latin.jsonl: line 4 is not UTF-8 text",)),
    ("garbage.parquet", b"this is no parquet file" * 20, ("garbage.parquet is not a parquet file",)),
    ("late.jsonl", ("\n".join(_dialogue_lines(40) + ['{"messages": [oops']) + "\n").encode(),
     ("late.jsonl: line 41 is not valid JSON",)),
])
def test_dataset_errors_are_one_line_before_anything_is_written(monkeypatch, capsys, tiny_model_dir, tmp_path,
                                                                name, content, expected):
    data = tmp_path / name
    data.write_bytes(content)
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", str(tiny_model_dir), "--dataset", str(data),
                           "--layers", "1", "--out", str(tmp_path / "s"))
    assert_one_line_error(code, err, *expected)
    assert not (tmp_path / "s").exists()  # the bad row is found before the first activation is written
