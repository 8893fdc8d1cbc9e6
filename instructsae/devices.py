"""The torch device a command was asked to run on, checked before any work: one line, not torch's assertion."""

import torch

from instructsae.errors import UserError, first_line


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
