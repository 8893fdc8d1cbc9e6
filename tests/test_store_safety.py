"""A store is safe to share: one writer at a time, --overwrite removes only a store of ours, and what the
arguments alone show is refused before the model loads."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import assert_one_line_error, run_cli
from test_extract import SHARD_MB, config
from test_store_locations import assert_same_store

from instructsae.extract.run import run_extract
from instructsae.store.reader import open_store
from instructsae.locks import lock_location


def extract_flags(model_dir, dataset, out, *extra) -> list[str]:
    return ["extract", "--model", str(model_dir), "--dataset", str(dataset), "--out", str(out), "--layers", "0,1",
            "--dtype", "float32", "--chunk-tokens", "32", "--batch-tokens", "256", "--shard-mb", str(SHARD_MB),
            *extra]


def test_a_second_extraction_into_the_same_out_is_refused(tiny_model_dir, dialogues_jsonl, tmp_path):
    out = tmp_path / "store"
    command = [sys.executable, "-m", "instructsae.cli", *extract_flags(tiny_model_dir, dialogues_jsonl, out)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    lock, deadline = lock_location(out), time.time() + 120
    while not (os.path.exists(lock) and f'"pid": {first.pid}' in open(lock).read()):
        assert first.poll() is None, first.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # the first writer holds the lock, frozen mid-work, while the second tries
    try:
        second = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"is being written by pid {first.pid}" in lines[0], second.stderr
    assert first.wait(timeout=120) == 0, first.communicate()
    assert not os.path.exists(lock)

    solo = config(tiny_model_dir, dialogues_jsonl, tmp_path / "solo")
    run_extract(solo, show_progress=False)
    shared, alone = open_store(out), open_store(solo.out)
    assert_same_store(alone, shared)
    # equal but for the id each store draws when it is created (its chunks' place tags name it)
    assert shared.manifest.store_id != alone.manifest.store_id
    assert shared.manifest.model_copy(update={"store_id": None}) == alone.manifest.model_copy(update={"store_id": None})


def test_overwrite_refuses_a_folder_that_is_not_a_store(tiny_model_dir, dialogues_jsonl, tmp_path, monkeypatch,
                                                       capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    code, _, err = run_cli(monkeypatch, capsys, *extract_flags(tiny_model_dir, dialogues_jsonl, folder, "--overwrite"))
    assert_one_line_error(code, err, "not a store", "--overwrite replaces only")
    assert [path.name for path in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "precious" and sorted(os.listdir(tmp_path)) == ["dialogues.jsonl",
                                                                                               "mine"]


def test_overwrite_replaces_a_store_of_ours(tiny_model_dir, dialogues_jsonl, tmp_path):
    cfg = config(tiny_model_dir, dialogues_jsonl, tmp_path / "store", max_tokens=50)
    run_extract(cfg, show_progress=False)
    run_extract(cfg.model_copy(update={"max_tokens": 60, "overwrite": True}), show_progress=False)
    assert open_store(cfg.out).n_tokens == 60


@pytest.mark.parametrize("out", [".", ".."])
def test_never_the_working_directory_or_above(out, tiny_model_dir, dialogues_jsonl, tmp_path, monkeypatch,
                                              capsys):
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "here")
    code, _, err = run_cli(monkeypatch, capsys, *extract_flags(tiny_model_dir, dialogues_jsonl, out, "--overwrite"))
    assert_one_line_error(code, err, "working directory")
    assert os.listdir(tmp_path / "here") == ["keep.txt"]


def test_another_config_is_refused_before_the_model_loads_naming_what_differs(tiny_model_dir, dialogues_jsonl,
                                                                              tmp_path, monkeypatch, capsys):
    out = tmp_path / "store"
    run_extract(config(tiny_model_dir, dialogues_jsonl, out, max_tokens=50), show_progress=False)
    missing_model = tmp_path / "no-model"  # were it loaded, the error would be about the model
    code, _, err = run_cli(monkeypatch, capsys, *extract_flags(missing_model, dialogues_jsonl, out, "--max-tokens",
                                                                "60"))
    assert_one_line_error(code, err, "another config", "max_tokens: 50 -> 60", "model: ")
    assert open_store(out).n_tokens == 50


def test_a_missing_file_system_package_is_one_line_before_the_model_loads(dialogues_jsonl, tmp_path, monkeypatch,
                                                                         capsys):
    registry = importlib.import_module("fsspec.registry")  # (`fsspec.registry` is the registry mapping itself)
    monkeypatch.setitem(registry.known_implementations, "nosuchfs",
                        {"class": "nosuchfs_package.NoSuchFileSystem", "err": "Install nosuchfs_package to use it"})
    code, _, err = run_cli(monkeypatch, capsys, *extract_flags(tmp_path / "no-model", dialogues_jsonl,
                                                               "nosuchfs://bucket/store"))
    assert_one_line_error(code, err, "nosuchfs_package")


def test_readers_never_take_the_lock(tiny_model_dir, dialogues_jsonl, tmp_path, monkeypatch, capsys):
    from instructsae.locks import writer_lock

    out = tmp_path / "store"
    run_extract(config(tiny_model_dir, dialogues_jsonl, out, max_tokens=50), show_progress=False)
    with writer_lock(out, "store"):
        code, stdout, _ = run_cli(monkeypatch, capsys, "inspect", str(out), "--json")
    assert code == 0 and json.loads(stdout)["manifest"]["n_tokens"] == 50
