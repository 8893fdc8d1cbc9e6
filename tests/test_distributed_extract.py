"""`extract` under torchrun (gloo, 2 ranks): one store from its ranks' parts, equal per instance to a single-process
extraction, also after a rank is SIGKILLed and the command rerun on 1 or 2 ranks, and into an s3:// store; its
writer lock; `verify` of every part. Each torchrun start costs ~10-20 s of imports on 2 cores, so the tests share
what they can: one 2-rank store, one killed store copied for both reruns, reruns on 1 rank in this process."""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import psutil
import pytest
import torch
from helpers import run_cli
from test_distributed import env, instructsae

from instructsae.extract.inspect import describe_store
from instructsae.extract.plan import work_units
from instructsae.extract.run import run_extract
from instructsae.store.layout import TOKEN_COLUMNS
from instructsae.locks import writer_lock
from instructsae.store.parts import existing_parts, part_location
from instructsae.store.reader import is_store, open_store, read_manifest
from instructsae.schemas import ExtractConfig, JumpReLUConfig, OptimConfig, TrainConfig
from instructsae.store.reader import StoreReader
from instructsae.train.run import run_training, split_chunks

# Shards of 2 chunks: a part (250 tokens) commits as it goes, so a killed rank leaves a part to resume midway.
# max_len 120 cuts a few of the 60 dialogues: the parts' truncation counts must add up to one process's.
SETTINGS = dict(dataset="chatterbot", layers=(0, 1), max_instances=60, dtype="float32", chunk_tokens=32,
                batch_tokens=64, shard_mb=0.02, max_len=120)
PART_TOKENS = 250


def args(model_dir, out) -> list[str]:
    return ["extract", "--model", str(model_dir), "--dataset", "chatterbot", "--layers", "0,1", "--max-instances",
            "60", "--dtype", "float32", "--chunk-tokens", "32", "--batch-tokens", "64", "--shard-mb", "0.02",
            "--max-len", "120", "--part-tokens", str(PART_TOKENS), "--out", str(out)]


def extract_here(model_dir, out) -> None:
    """The same command in this process, without torchrun: one rank, which continues a multi-rank store."""
    run_extract(ExtractConfig(model=str(model_dir), out=str(out), part_tokens=PART_TOKENS, **SETTINGS),
                show_progress=False)


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "store"
    run_extract(ExtractConfig(model=str(tiny_model_dir), out=str(out), **SETTINGS), show_progress=False)
    return open_store(out)


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tmp_path_factory):
    """A store written by 2 ranks, and what rank 0 printed."""
    out = tmp_path_factory.mktemp("two") / "store"
    result = instructsae(*args(tiny_model_dir, out), ranks=2)
    return out, result.stdout


def assert_same_instances(expected, store) -> None:
    """Same instances (by dataset row), each with the same tokens, positions, roles and activations."""
    got = open_store(store)
    assert got.manifest.complete and len(got.manifest.parts) > 1
    assert (got.n_tokens, got.n_instances) == (expected.n_tokens, expected.n_instances)
    assert got.manifest.fingerprint == expected.manifest.fingerprint
    columns = {name: (got.read_column(name), expected.read_column(name))
               for name in [*TOKEN_COLUMNS, "instance_start", "instance_length", "instance_source"]}
    acts = {layer: (got.read_acts(layer, 0, got.n_tokens), expected.read_acts(layer, 0, expected.n_tokens))
            for layer in (0, 1)}
    sources, expected_sources = columns["instance_source"]
    assert sorted(sources) == sorted(expected_sources)
    where = {int(source): index for index, source in enumerate(expected_sources)}
    for mine, source in enumerate(sources):
        theirs = where[int(source)]
        n = int(columns["instance_length"][0][mine])
        assert n == int(columns["instance_length"][1][theirs])
        a, b = int(columns["instance_start"][0][mine]), int(columns["instance_start"][1][theirs])
        for name in ("token_id", "position", "role"):
            np.testing.assert_array_equal(columns[name][0][a:a + n], columns[name][1][b:b + n])
        for layer, (mine_acts, their_acts) in acts.items():
            torch.testing.assert_close(mine_acts[a:a + n], their_acts[b:b + n])
    assert expected.manifest.n_truncated > 0
    assert (got.manifest.n_truncated, got.manifest.tokens_truncated) == \
        (expected.manifest.n_truncated, expected.manifest.tokens_truncated)
    for layer, stats in expected.manifest.layer_stats.items():
        assert got.manifest.layer_stats[layer].count == stats.count
        assert got.manifest.layer_stats[layer].sum_sq_norm == pytest.approx(stats.sum_sq_norm, rel=1e-6)


def test_two_ranks_write_one_store_equal_to_one_process(tiny_model_dir, single, two_ranks, tmp_path):
    out, stdout = two_ranks
    assert stdout.count("complete=True") == 1  # rank 0 speaks for the store
    assert_same_instances(single, out)
    assert not list(out.parent.glob("*.lock"))  # rank 0 released the store's lock
    # the same command again (here on one rank): complete, nothing to do
    extract_here(tiny_model_dir, out)

    # readers see one store: its chunks are its parts' chunks, and training reads them like any store's
    reader = open_store(out)
    assert f"{len(reader.parts)} work units" in describe_store(str(out), as_json=False)
    assert reader.n_chunks == sum(part.n_chunks for part in reader.parts)
    assert sum(stop - start for start, stop in map(reader.chunk_bounds, range(reader.n_chunks))) == reader.n_tokens
    for chunk in (0, reader.n_chunks - 1):  # the stream's raw reads: the stored values, a part's chunk
        start, stop = reader.chunk_bounds(chunk)
        torch.testing.assert_close(reader.read_acts_chunk_as_stored(1, chunk).float(), reader.read_acts(1, start, stop))
    summary = run_training(TrainConfig(store=str(out), out=str(tmp_path / "sae"), layer=1,
                                       sae=JumpReLUConfig(expansion=2), batch_size=64, buffer_tokens=256,
                                       geometric_median_tokens=64, optim=OptimConfig(lr_warmup_steps=2)))
    train_chunks, _ = split_chunks(reader.n_chunks, 0.05)
    train_tokens = sum(stop - start for start, stop in map(reader.chunk_bounds, train_chunks))
    assert summary["tokens_seen"] == train_tokens // 64 * 64  # one epoch of the training chunks, whole batches


def test_two_ranks_write_one_store_into_object_storage(tiny_model_dir, single, s3_server, monkeypatch, capsys):
    """The same 2-rank extraction into an s3:// store (the loopback S3 server's environment reaches the ranks)."""
    out = f"{s3_server}/{uuid.uuid4().hex}/store"
    instructsae(*args(tiny_model_dir, out), ranks=2)
    assert_same_instances(single, out)
    code, stdout, _ = run_cli(monkeypatch, capsys, "verify", out)
    assert code == 0, stdout


def test_verify_reads_every_part_and_names_a_damaged_chunk(two_ranks, tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    shutil.copytree(two_ranks[0], store)
    code, out, _ = run_cli(monkeypatch, capsys, "verify", str(store))
    parts = open_store(store).parts
    assert code == 0 and "ok (" in out, out
    assert f"{sum(a.n_chunks for part in parts for a in part.arrays.values()):,} chunks read" in out

    # one byte of one chunk of the second part's activations flipped
    array = StoreReader(part_location(str(store), 1)).arrays["acts/layer_1"]
    offset, length = array._shard_index(0, 0)[0]
    with open(array.shard_path(0), "r+b") as file:
        file.seek(int(offset) + int(length) // 2)
        byte = file.read(1)[0]
        file.seek(int(offset) + int(length) // 2)
        file.write(bytes([byte ^ 0x10]))
    code, out, _ = run_cli(monkeypatch, capsys, "verify", str(store))
    problems = [line for line in out.splitlines() if "checksum" in line]
    assert code == 1 and problems == [line for line in out.splitlines() if line.startswith("parts/")], out
    assert len(problems) == 1 and problems[0].startswith("parts/unit-000001/acts/layer_1 chunk 0"), out


def test_a_second_torchrun_into_the_store_is_refused_on_every_rank(tiny_model_dir, tmp_path):
    """Every rank stops; rank 0 says why, once, and no rank aborts on its way out (SIGABRT from a process group
    left behind: 'terminate called without an active exception')."""
    out = tmp_path / "store"
    with writer_lock(out, "store"):  # this process writes the store
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                   "instructsae", *args(tiny_model_dir, out)]
        result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if line.startswith("error: store")]
    assert len(refusals) == 1 and "is being written by pid" in refusals[0], result.stderr[-3000:]
    assert "terminate called" not in result.stderr and "SIGABRT" not in result.stderr, result.stderr[-3000:]
    assert not out.exists()


def kill_a_rank_midway(model_dir, out) -> None:
    """2 ranks started, one worker SIGKILLed once some part has committed rows but the store is unfinished."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "instructsae", *args(model_dir, out)]
    agent = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        if is_store(out) and any(manifest.n_tokens for manifest in existing_parts(str(out)).values()):
            break
        assert agent.poll() is None, "the extraction ended before a rank could be killed"
        time.sleep(0.05)
    workers = psutil.Process(agent.pid).children()
    os.kill(workers[-1].pid, signal.SIGKILL)
    agent.wait(timeout=120)
    assert agent.returncode != 0 and not read_manifest(out).complete


@pytest.fixture(scope="module")
def killed(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("killed") / "store"
    kill_a_rank_midway(tiny_model_dir, out)
    return out


@pytest.mark.parametrize("rerun_ranks", [1, 2])
def test_a_killed_rank_and_a_rerun_on_any_number_of_ranks_give_the_same_store(tiny_model_dir, single, killed,
                                                                                tmp_path, rerun_ranks):
    out = tmp_path / "store"
    shutil.copytree(killed, out)
    if rerun_ranks == 1:
        extract_here(tiny_model_dir, out)
    else:
        instructsae(*args(tiny_model_dir, out), ranks=rerun_ranks)
    assert_same_instances(single, out)


def test_work_units_do_not_depend_on_the_number_of_ranks():
    from instructsae.extract.instances import TokenizedInstance

    instances = [TokenizedInstance(token_ids=np.arange(n), roles=np.zeros(n, np.uint8), source_row=i)
                 for i, n in enumerate([5, 3, 9, 2, 2, 7])]
    units = [[item.source_row for item in unit] for _, unit in work_units(instances, 8, keep_first_token=False)]
    assert units == [[0, 1, 2], [3, 4, 5]]  # 4+2+8 stored tokens, then 1+1+6
