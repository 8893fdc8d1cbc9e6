"""What `train --out RUN` may do to a RUN that exists: skip the same SAE, refuse another unless --overwrite,
never touch a folder it did not write, and replace an SAE only once the new one is whole."""

import json
import os

import pytest
from helpers import assert_one_line_error, run_cli
from test_train_run import FakeReader, train_cfg, use_reader

from instructsae.errors import UserError
from instructsae.locks import writer_lock
from instructsae.run_folder import RunPaths
from instructsae.train.run import run_training


def snapshot(folder) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_the_same_config_is_already_trained(tmp_path, monkeypatch, capsys):
    reader = FakeReader()
    use_reader(monkeypatch, reader)
    first = run_training(train_cfg(tmp_path / "run"))
    before, reads = snapshot(tmp_path / "run"), len(reader.reads)
    # a runtime knob (log_every) differs: still the same SAE
    assert run_training(train_cfg(tmp_path / "run", log_every=3)) == first
    assert "already trained" in capsys.readouterr().err
    assert len(reader.reads) == reads and snapshot(tmp_path / "run") == before

    code, out, err = run_cli(monkeypatch, capsys, "train", "--store", "fake-store", "--out", str(tmp_path / "run"),
                             "--config", str(write_yaml(tmp_path, train_cfg(tmp_path / "run"))))
    assert code == 0 and "already trained" in err and json.loads(out) == first
    assert len(reader.reads) == reads and snapshot(tmp_path / "run") == before


def write_yaml(folder, cfg) -> str:
    path = folder / "train.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json", exclude={"store", "out"})))  # JSON is YAML
    return path


def test_another_config_is_refused_naming_what_differs_unless_overwrite(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    run_training(train_cfg(tmp_path / "run"))
    before = snapshot(tmp_path / "run")
    with pytest.raises(UserError, match=r"another config \(.*batch_size: 32 -> 16.*--overwrite"):
        run_training(train_cfg(tmp_path / "run", batch_size=16))
    assert snapshot(tmp_path / "run") == before

    summary = run_training(train_cfg(tmp_path / "run", "jumprelu"), overwrite=True)
    assert summary["architecture"] == "jumprelu"
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


def test_a_crash_while_replacing_leaves_the_old_sae_intact(tmp_path, monkeypatch):
    reader = FakeReader()
    use_reader(monkeypatch, reader)
    run_training(train_cfg(tmp_path / "run"))
    before = snapshot(tmp_path / "run")
    reader.fail_after = len(reader.reads) + 2  # the disk goes away during the second run's training
    with pytest.raises(OSError, match="disk gone"):
        run_training(train_cfg(tmp_path / "run", "jumprelu"), overwrite=True)
    assert snapshot(tmp_path / "run") == before
    assert not RunPaths(tmp_path / "run").building.summary.exists()


def test_overwrite_never_touches_a_folder_no_run_wrote(tmp_path, monkeypatch, capsys):
    use_reader(monkeypatch, FakeReader())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    (tmp_path / "mine" / "cfg.json").write_text("{}")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", "fake-store", "--out", str(tmp_path / "mine"),
                           "--overwrite")
    assert_one_line_error(code, err, "notes.txt")
    assert snapshot(tmp_path / "mine") == {"cfg.json": b"{}", "notes.txt": b"precious"}


@pytest.mark.parametrize("out", [".", ".."])
def test_never_the_working_directory_or_above(out, tmp_path, monkeypatch, capsys):
    use_reader(monkeypatch, FakeReader())
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", "fake-store", "--out", out, "--overwrite")
    assert_one_line_error(code, err, "working directory")
    assert os.listdir(tmp_path) == ["here"] and os.listdir(tmp_path / "here") == []


def test_a_second_writer_of_a_run_folder_is_refused(tmp_path, monkeypatch, capsys):
    use_reader(monkeypatch, FakeReader())
    with writer_lock(tmp_path / "run", "run folder"):
        code, _, err = run_cli(monkeypatch, capsys, "train", "--store", "fake-store", "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "being written by", f"pid {os.getpid()}")
    assert not (tmp_path / "run").exists()
