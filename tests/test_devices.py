"""`--device auto`: the rank's own GPU under torchrun when CUDA exists, else the CPU; bf16 compute only on a GPU."""

import torch

from instructsae.devices import resolve_device, resolve_model_dtype
from instructsae.extract.run import resolved
from instructsae.schemas import ExtractConfig, TrainConfig


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_model_dtype("auto", "cpu") == "float32"
    cfg = resolved(ExtractConfig(out="x"))
    assert (cfg.device, cfg.model_dtype) == ("cpu", "float32")


def test_auto_is_the_local_ranks_gpu_under_torchrun(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == "cuda:3"
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == "cuda:0"
    assert resolve_model_dtype("auto", "cuda:0") == "bfloat16"
    assert resolve_model_dtype("float32", "cuda:0") == "float32"  # an explicit dtype is kept


def test_auto_is_every_commands_default():
    assert ExtractConfig(out="x").device == "auto" and TrainConfig(store="s", out="o").device == "auto"
    assert resolve_device("cpu") == "cpu"
