"""`extract` under torchrun (gloo, 2 ranks): one store from its ranks' parts, equal per instance to a single-process
extraction, also after a rank is SIGKILLed and the command rerun on 1 or 2 ranks."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from test_distributed import env, instructsae

from instructsae.extract.inspect import describe_store
from instructsae.extract.plan import work_units
from instructsae.extract.run import run_extract
from instructsae.store.layout import TOKEN_COLUMNS
from instructsae.store.parts import existing_parts
from instructsae.store.reader import is_store, open_store, read_manifest
from instructsae.schemas import ExtractConfig, JumpReLUConfig, OptimConfig, TrainConfig
from instructsae.train.run import run_training, split_chunks

SETTINGS = dict(dataset="chatterbot", layers=(0, 1), max_instances=160, dtype="float32", chunk_tokens=32,
                batch_tokens=64)


def args(model_dir, out, part_tokens=400) -> list[str]:
    return ["extract", "--model", str(model_dir), "--dataset", "chatterbot", "--layers", "0,1", "--max-instances",
            "160", "--dtype", "float32", "--chunk-tokens", "32", "--batch-tokens", "64", "--part-tokens",
            str(part_tokens), "--out", str(out)]


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "store"
    run_extract(ExtractConfig(model=str(tiny_model_dir), out=str(out), **SETTINGS), show_progress=False)
    return open_store(out)


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
    for layer, stats in expected.manifest.layer_stats.items():
        assert got.manifest.layer_stats[layer].count == stats.count
        assert got.manifest.layer_stats[layer].sum_sq_norm == pytest.approx(stats.sum_sq_norm, rel=1e-6)


def test_two_ranks_write_one_store_equal_to_one_process(tiny_model_dir, single, tmp_path):
    result = instructsae(*args(tiny_model_dir, tmp_path / "two"), ranks=2)
    assert result.stdout.count("complete=True") == 1  # rank 0 speaks for the store
    assert_same_instances(single, tmp_path / "two")
    # the same command again: complete, nothing to do
    instructsae(*args(tiny_model_dir, tmp_path / "two"), ranks=2)

    # readers see one store: its chunks are its parts' chunks, and training reads them like any store's
    reader = open_store(tmp_path / "two")
    assert f"{len(reader.parts)} work units" in describe_store(str(tmp_path / "two"), as_json=False)
    assert reader.n_chunks == sum(part.n_chunks for part in reader.parts)
    assert sum(stop - start for start, stop in map(reader.chunk_bounds, range(reader.n_chunks))) == reader.n_tokens
    summary = run_training(TrainConfig(store=str(tmp_path / "two"), out=str(tmp_path / "sae"), layer=1,
                                       sae=JumpReLUConfig(expansion=2), batch_size=64, buffer_tokens=256,
                                       geometric_median_tokens=64, optim=OptimConfig(lr_warmup_steps=2)))
    train_chunks, _ = split_chunks(reader.n_chunks, 0.05)
    train_tokens = sum(stop - start for start, stop in map(reader.chunk_bounds, train_chunks))
    assert summary["tokens_seen"] == train_tokens // 64 * 64  # one epoch of the training chunks, whole batches


def kill_a_rank_midway(model_dir, out) -> None:
    """2 ranks started, one worker SIGKILLed once some unit is committed but the store is unfinished."""
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


@pytest.mark.parametrize("rerun_ranks", [1, 2])
def test_a_killed_rank_and_a_rerun_on_any_number_of_ranks_give_the_same_store(tiny_model_dir, single, tmp_path,
                                                                                rerun_ranks):
    out = tmp_path / "killed"
    kill_a_rank_midway(tiny_model_dir, out)
    instructsae(*args(tiny_model_dir, out), ranks=rerun_ranks)
    assert_same_instances(single, out)


def test_work_units_do_not_depend_on_the_number_of_ranks():
    from instructsae.extract.instances import TokenizedInstance

    instances = [TokenizedInstance(token_ids=np.arange(n), roles=np.zeros(n, np.uint8), source_row=i)
                 for i, n in enumerate([5, 3, 9, 2, 2, 7])]
    units = [[item.source_row for item in unit] for _, unit in work_units(instances, 8, keep_first_token=False)]
    assert units == [[0, 1, 2], [3, 4, 5]]  # 4+2+8 stored tokens, then 1+1+6
