"""Training checkpoints: one file per run (or sweep), written atomically, checked before it is trusted."""

from pathlib import Path

import torch

from instructsae.errors import UserError, first_line
from instructsae.fileio import write_atomically


def save(path: Path, state: dict) -> None:
    write_atomically(path, lambda partial: _save(state, partial))


def _save(state: dict, partial: Path) -> None:
    # through a Python file: a full disk is then an OSError naming ENOSPC (torch's own file writer reports it
    # as "enforce fail at inline_container.cc: unexpected pos")
    with open(partial, "wb") as file:
        torch.save(state, file)


def load(path: Path, store_fingerprint: str, member_keys: list[str]) -> dict:
    """The checkpoint to resume from; refused when it was written for other SAEs or another store."""
    if not path.is_file():
        raise UserError(f"no checkpoint at {path} to resume from: run without --resume to start")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"checkpoint {path} is unreadable: {first_line(error)}") from None
    if state.get("store_fingerprint") != store_fingerprint or state.get("member_keys") != member_keys:
        raise UserError(f"checkpoint {path} was written for other SAE settings or another store: "
                        "resume with the same config and store, or delete it to start again")
    return state


def refuse_to_overwrite(path: Path) -> None:
    """Starting afresh over a checkpoint would silently throw away the work it holds."""
    if path.is_file():
        raise UserError(f"{path} holds a checkpoint of an unfinished run: pass --resume to continue it, "
                        "or delete it to start again")
