"""The torch device a command runs on: `auto` resolved (the rank's own GPU under torchrun, else the CPU), and any
device checked before any work: one line, not torch's assertion."""

import os

import torch

from instructsae.errors import UserError, first_line

AUTO = "auto"


def local_rank() -> int:
    """This process's index among the ranks on its machine (torchrun sets LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str) -> str:
    """`auto`: CUDA when there is a GPU (under torchrun the one of this rank's LOCAL_RANK), else the CPU.
    Any other value is checked and returned as given."""
    if device != AUTO:
        checked_device(device)
        return device
    if torch.cuda.is_available():
        return f"cuda:{local_rank() % torch.cuda.device_count()}"
    return "cpu"


def resolve_model_dtype(model_dtype: str, device: str) -> str:
    """`auto`: bf16 on an accelerator (its tensor cores), float32 on a CPU (bf16 is ~5x slower without bf16 units)."""
    if model_dtype != AUTO:
        return model_dtype
    return "float32" if torch.device(device).type == "cpu" else "bfloat16"


def checked_device(device: str) -> torch.device:
    try:
        chosen = torch.device(device)
    except RuntimeError as error:
        raise UserError(f"unknown device {device!r}: {first_line(error)}") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device}: this torch build or machine has no CUDA GPU")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise UserError(f"device {device}: there are only {torch.cuda.device_count()} CUDA GPU(s)")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device}: MPS is not available here")
    return chosen
