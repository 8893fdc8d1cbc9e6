"""A real `instructsae train` process killed with SIGKILL, then resumed, ends with the same weights and metrics
as a run that was never interrupted; the SAE it was replacing stays intact until then."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from instructsae.cli_options import build
from instructsae.extract.run import run_extract
from instructsae.run_folder import RunPaths
from instructsae.schemas import ExtractConfig, TrainConfig
from instructsae.train.run import run_training

STEPS, BATCH = 400, 32
# (sae settings, the same as train flags): JumpReLU, with a target L0, and Matryoshka BatchTopK, whose threshold is
# a running estimate
SAES = {"jumprelu": ({"arch": "jumprelu"}, ["--sae", "jumprelu"]),
        # its steered aim is state beside the weights
        "jumprelu_target": ({"arch": "jumprelu", "target_l0": 12}, ["--sae", "jumprelu", "--target-l0", "12"]),
        "matryoshka_batchtopk": ({"arch": "matryoshka_batchtopk", "k": 4, "prefixes": [8, 32]},
                                 ["--sae", "matryoshka_batchtopk", "--k", "4", "--prefixes", "8,32"])}


def train_args(store, out, sae: dict) -> dict:
    return {"store": str(store), "out": str(out), "sae": {**sae, "expansion": 4},
            "optim": {"lr": 3e-3, "lr_warmup_steps": 10, "beta1": 0.9, "sparsity_warmup_steps": 50},
            "tokens": STEPS * BATCH, "batch_size": BATCH, "buffer_tokens": 256, "checkpoint_every": 10 * BATCH,
            "log_every": 7, "geometric_median_tokens": 128}


@pytest.mark.parametrize("arch", sorted(SAES))
def test_sigkilled_training_resumes_to_the_same_weights(arch, tiny_model_dir, dialogues_jsonl, tmp_path):
    sae, sae_flags = SAES[arch]
    store = tmp_path / "store"
    run_extract(ExtractConfig(model=str(tiny_model_dir), dataset=str(dialogues_jsonl), out=str(store), layers=(1,),
                              dtype="float32", chunk_tokens=64), show_progress=False)
    killed = tmp_path / "killed"
    # an SAE of another config already sits in --out: the killed run was replacing it (--overwrite)
    run_training(build(TrainConfig, {**train_args(store, killed, sae), "tokens": 10 * BATCH}))
    old = {path.name: path.read_bytes() for path in killed.iterdir()}
    building = RunPaths(killed).building
    flags = ["--overwrite", "--store", str(store), "--out", str(killed), *sae_flags, "--expansion", "4",
             "--lr", "3e-3", "--lr-warmup-steps", "10", "--beta1", "0.9", "--sparsity-warmup-steps", "50",
             "--tokens", str(STEPS * BATCH), "--batch-size", str(BATCH), "--buffer-tokens", "256",
             "--checkpoint-every", str(10 * BATCH), "--log-every", "7", "--geometric-median-tokens", "128"]
    process = subprocess.Popen([sys.executable, "-m", "instructsae.cli", "train", *flags],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 120
    while not building.checkpoint.exists():
        assert process.poll() is None, "the training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(0.1)  # die somewhere after the checkpoint, with a few steps logged past it
    assert process.poll() is None, "the training ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert {path.name: path.read_bytes() for path in killed.iterdir()} == old  # the old SAE, untouched
    assert not building.summary.exists()
    checkpoint_step = torch.load(building.checkpoint, weights_only=True)["step"]
    assert 0 < checkpoint_step < STEPS

    run_training(build(TrainConfig, train_args(store, killed, sae)), resume=True, overwrite=True)
    run_training(build(TrainConfig, train_args(store, tmp_path / "whole", sae)))

    resumed, whole = load_file(str(killed / "sae_weights.safetensors")), load_file(str(tmp_path / "whole" /
                                                                                        "sae_weights.safetensors"))
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name

    def metrics(folder):
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{key: value for key, value in record.items() if key != "elapsed_s"} for record in records]

    assert metrics(killed) == metrics(tmp_path / "whole")  # no step logged twice, none missing
    if "target_l0" in sae:  # the aim was steered, so the equality above covers it
        assert {record["l0_aim"] for record in metrics(killed)} != {sae["target_l0"]}
    assert not (killed / "checkpoint.pt").exists() and not building.root.exists()
