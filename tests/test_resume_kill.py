"""A real `instructsae extract` process killed with SIGKILL, then resumed, equals an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from instructsae.extract.run import run_extract
from instructsae.store.layout import TOKEN_COLUMNS
from instructsae.store.reader import is_store, open_store, read_manifest
from instructsae.schemas import ExtractConfig


def extract_args(model_dir, out):
    return ["--model", str(model_dir), "--dataset", "chatterbot", "--layers", "0,1", "--max-instances", "200",
            "--dtype", "float32", "--chunk-tokens", "32", "--batch-tokens", "64", "--shard-mb", "0.02",
            "--out", str(out)]


def test_sigkilled_extraction_resumes_to_the_same_store(tiny_model_dir, tmp_path):
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "instructsae.cli", "extract",
                                *extract_args(tiny_model_dir, killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for a few commits, then kill mid-run
        if is_store(killed) and read_manifest(killed).n_tokens > 300:
            break
        assert process.poll() is None, "the extraction ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = read_manifest(killed)
    assert not partial.complete and partial.n_tokens > 0

    cfg = ExtractConfig(model=str(tiny_model_dir), dataset="chatterbot", layers=(0, 1), max_instances=200,
                        dtype="float32", chunk_tokens=32, batch_tokens=64, shard_mb=0.02, out=str(killed))
    run_extract(cfg, show_progress=False)
    run_extract(cfg.model_copy(update={"out": str(tmp_path / "whole")}), show_progress=False)

    a, b = open_store(tmp_path / "whole"), open_store(killed)
    assert b.manifest.complete and (a.n_tokens, a.n_instances) == (b.n_tokens, b.n_instances)
    assert a.n_tokens > partial.n_tokens
    for name in [*TOKEN_COLUMNS, "instance_start", "instance_length", "instance_source"]:
        np.testing.assert_array_equal(a.read_column(name), b.read_column(name))
    for layer in (0, 1):
        torch.testing.assert_close(a.read_acts(layer, 0, a.n_tokens), b.read_acts(layer, 0, b.n_tokens))
    assert a.manifest.layer_stats == b.manifest.layer_stats
