"""One suite for every place a store can live: a local path, a file:// URL, fsspec's in-memory file system, and
S3 (a real S3-compatible server, moto's, started on loopback by the tests).

Extraction writes, resumes after a kill and refuses what it must in the same way everywhere, and training and
evaluation read a store by its URL as they read a local one."""

import uuid

import numpy as np
import pytest
import torch
import zarr
from helpers import assert_one_line_error, interrupt_extraction_at, run_cli
from test_extract import config

from instructsae.errors import UserError
from instructsae.evaluate.run import evaluate_sae_on_store
from instructsae.extract import run as extract_run
from instructsae.extract.run import run_extract
from instructsae.locks import writer_lock
from instructsae.store.layout import TOKEN_COLUMNS, layer_array_name
from instructsae.store.location import location_exists, remove_store, zarr_location
from instructsae.store.reader import StoreReader, open_store
from instructsae.store.verify import verify_report
from instructsae.schemas import OptimConfig, StandardConfig, TrainConfig
from instructsae.train.run import run_training

LOCATIONS = ("local path", "file URL", "memory URL", "S3 URL")


@pytest.fixture(params=LOCATIONS)
def place(request, tmp_path):
    """A function naming a fresh store location of this kind: place("a"), place("b"), ..."""
    if request.param == "S3 URL":
        remote_root = f"{request.getfixturevalue('s3_server')}/{uuid.uuid4().hex}"
    else:
        remote_root = f"memory://instructsae-tests/{uuid.uuid4().hex}"
    named = {"local path": lambda name: str(tmp_path / name),
             "file URL": lambda name: f"file://{tmp_path / name}"}.get(request.param,
                                                                        lambda name: f"{remote_root}/{name}")
    yield named
    if request.param in ("memory URL", "S3 URL"):
        remove_store(remote_root)


def assert_same_store(a, b) -> None:
    assert b.manifest.complete and (a.n_tokens, a.n_instances) == (b.n_tokens, b.n_instances)
    for name in list(TOKEN_COLUMNS) + ["instance_start", "instance_length", "instance_source"]:
        np.testing.assert_array_equal(a.read_column(name), b.read_column(name))
    for layer in a.layers:
        torch.testing.assert_close(a.read_acts(layer, 0, a.n_tokens), b.read_acts(layer, 0, b.n_tokens))
    assert a.manifest.layer_stats == b.manifest.layer_stats


def test_a_store_reads_back_what_a_local_one_holds(place, tiny_model_dir, dialogues_jsonl, tmp_path):
    local = config(tiny_model_dir, dialogues_jsonl, tmp_path / "reference", max_tokens=120)
    run_extract(local, show_progress=False)
    here = local.model_copy(update={"out": place("store")})
    run_extract(here, show_progress=False)
    assert_same_store(open_store(local.out), open_store(here.out))


def test_a_killed_extraction_resumes_to_the_same_store(place, tiny_model_dir, dialogues_jsonl, tmp_path,
                                                       monkeypatch):
    reference = config(tiny_model_dir, dialogues_jsonl, tmp_path / "reference", batch_tokens=64)
    run_extract(reference, show_progress=False)
    interrupted = reference.model_copy(update={"out": place("interrupted")})
    real_forward = interrupt_extraction_at(monkeypatch, 3)  # stands in for a kill between groups
    with pytest.raises(KeyboardInterrupt):
        run_extract(interrupted, show_progress=False)
    monkeypatch.setattr(extract_run, "forward_group", real_forward)
    assert not open_store(interrupted.out).manifest.complete
    # rows written after the last commit (a kill between the two) are cut off on resume
    for name in [layer_array_name(0), "token_id"]:
        array = zarr.open_array(f"{zarr_location(interrupted.out)}/{name}", mode="r+")
        committed = array.shape[0]
        array.resize((committed + 7, *array.shape[1:]))
        array[committed:] = 9

    run_extract(interrupted, show_progress=False)
    assert_same_store(open_store(reference.out), open_store(interrupted.out))


def test_a_failed_first_group_leaves_nothing_behind(place, tiny_model_dir, dialogues_jsonl, monkeypatch):
    cfg = config(tiny_model_dir, dialogues_jsonl, place("store"))
    monkeypatch.setattr(extract_run, "forward_group", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg, show_progress=False)
    assert not location_exists(cfg.out)


def test_another_config_and_a_foreign_folder_are_refused(place, tiny_model_dir, dialogues_jsonl, tmp_path):
    cfg = config(tiny_model_dir, dialogues_jsonl, place("store"), max_tokens=50)
    run_extract(cfg, show_progress=False)
    with pytest.raises(UserError, match="made with another config"):
        run_extract(cfg.model_copy(update={"max_tokens": 60}), show_progress=False)
    assert open_store(cfg.out).n_tokens == 50

    foreign = place("notes")
    zarr.open_group(zarr_location(foreign), mode="w").create_array("unrelated", shape=(3,), dtype="i4")
    with pytest.raises(UserError, match="exists and is not a store"):
        run_extract(cfg.model_copy(update={"out": foreign}), show_progress=False)
    assert location_exists(f"{foreign}/unrelated")


def test_train_and_evaluate_read_a_store_by_its_location(place, tiny_model_dir, dialogues_jsonl, tmp_path):
    store = place("store")
    run_extract(config(tiny_model_dir, dialogues_jsonl, store, layers=(1,)), show_progress=False)
    run = tmp_path / "sae"
    summary = run_training(TrainConfig(store=store, out=str(run), sae=StandardConfig(expansion=2), batch_size=32,
                                       tokens=320, buffer_tokens=128, optim=OptimConfig(lr=3e-3)))
    assert summary["tokens_seen"] == 320
    result = evaluate_sae_on_store(str(run), store)
    assert result["n_tokens"] == open_store(store).n_tokens and 0 < result["nmse"] < 2


def test_verify_and_train_catch_a_flipped_byte_wherever_the_store_lives(place, tiny_model_dir, dialogues_jsonl,
                                                                       tmp_path, monkeypatch, capsys):
    store = place("store")
    run_extract(config(tiny_model_dir, dialogues_jsonl, store, layers=(1,)), show_progress=False)
    assert verify_report(store, show_progress=False)["ok"]
    acts = StoreReader(store).arrays[layer_array_name(1)]
    offset, length = acts._shard_index(0, 0)[0]
    shard = acts.shard_path(0)
    damaged = bytearray(acts.fs.cat_file(shard))
    damaged[int(offset) + int(length) // 2] ^= 0x10
    acts.fs.pipe_file(shard, bytes(damaged))

    report = verify_report(store, show_progress=False)
    assert [(p["array"], p["what"]) for p in report["problems"]] == [(layer_array_name(1), "checksum")], report
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", store, "--out", str(tmp_path / "run"),
                           "--layer", "1", "--sae", "standard", "--expansion", "2", "--batch-size", "32",
                           "--tokens", "256", "--buffer-tokens", "128")
    assert_one_line_error(code, err, layer_array_name(1), "checksum")


def test_a_second_writer_is_refused_wherever_the_store_lives(place):
    store = place("store")
    with writer_lock(store, "store"):
        with pytest.raises(UserError, match=f"store {store} is being written by pid"):
            with writer_lock(store, "store"):
                pass
    with writer_lock(store, "store"):  # released: the next writer gets it
        pass


def test_an_unknown_protocol_gives_one_line(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "inspect", "nosuchproto://bucket/store")
    assert_one_line_error(code, err, "nosuchproto://bucket/store")


def test_an_output_path_that_is_a_file_gives_one_line(tiny_model_dir, dialogues_jsonl, tmp_path, monkeypatch,
                                                      capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", str(tiny_model_dir), "--dataset",
                           str(dialogues_jsonl), "--layers", "1", "--out", str(a_file))
    assert_one_line_error(code, err, "is a file, not a folder", str(a_file))
    assert a_file.read_text() == "mine"
