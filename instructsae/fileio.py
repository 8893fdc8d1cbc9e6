"""Atomic file writes: a reader sees the old file or the new one, never half of one; and a folder moved into
place the same way."""

import ctypes
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda partial: partial.write_text(text))


def move_folder_into_place(built: Path, target: Path) -> None:
    """`built` takes `target`'s place; what `target` held is removed after. A reader (or a kill) sees the old
    folder or the new one: the two swap in one step (Linux's renameat2 RENAME_EXCHANGE) where the file system
    can, and otherwise the old one is renamed aside first, a window of one rename with neither in place."""
    if not target.exists():
        os.rename(built, target)
        return
    if _exchange(built, target):
        shutil.rmtree(built)  # now the old folder
        return
    aside = target.with_name(target.name + ".replaced")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(target, aside)
    os.rename(built, target)
    shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the C library or the file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
