"""Build aside, swap in, remove only what we made: a file is written to `FILE.partial` and renamed over FILE (a
reader sees the old file or the new one, never half of one), a folder is built beside its target and swapped
in; a write that fails (a full disk, a read-only file system, no permission) removes its `.partial` and is one
line naming the file; folders made for a command that then fails are removed again while they are still empty.
"""

import ctypes
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from instructsae.errors import UserError, first_line

PARTIAL_SUFFIX = ".partial"


def os_error_line(error: OSError, path: str | Path | None = None) -> str:
    """'cannot write FILE: No space left on device' from an OSError (its own file name where it has one)."""
    where = error.filename if error.filename is not None else path
    reason = error.strerror or (os.strerror(error.errno) if error.errno else first_line(error))
    verb = "read" if isinstance(error, FileNotFoundError) else "write"
    return f"cannot {verb} {where}: {reason}" if where is not None else f"{type(error).__name__}: {reason}"


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException as error:
        partial.unlink(missing_ok=True)  # nothing half-written stays behind to be taken for good
        if isinstance(error, OSError):
            raise UserError(os_error_line(error, partial)) from None
        raise


@contextmanager
def made_for_this_command(folder: Path) -> Iterator[None]:
    """Create `folder` (and the folders above it that are missing) for the block; if the block fails, the
    folders it created that are still empty go again, so a refused command leaves nothing behind. Nothing that
    existed before is touched."""
    folder = Path(os.path.abspath(folder))
    created = [f for f in (folder, *folder.parents) if not f.exists()][::-1]  # outermost first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(os_error_line(error, folder)) from None
    try:
        yield
    except BaseException:
        for made in reversed(created):
            try:
                made.rmdir()  # only when empty
            except OSError:
                break
        raise


@contextmanager
def built_aside(target: Path, ours: Callable[[str], bool]) -> Iterator[Path]:
    """A folder of several files built in TARGET.partial (yielded, empty) and swapped into TARGET's place when the
    block ends, so a reader finds the old set or the new one, never a mix. A TARGET.partial that a killed run
    left is cleared first only when every entry in it is one `ours` accepts (else refused: it is not ours); if
    the block fails, the building folder goes."""
    building = target.with_name(target.name + PARTIAL_SUFFIX)
    if building.is_symlink() or (building.exists() and not building.is_dir()):
        raise UserError(f"{building} is in the way (not a folder this command built): move it away")
    if building.is_dir():
        foreign = sorted(entry.name for entry in building.iterdir() if not ours(entry.name))
        if foreign:
            raise UserError(f"{building} holds files this command did not write ({', '.join(foreign[:3])}): "
                            "move them away")
        shutil.rmtree(building)
    try:
        building.mkdir(parents=True)
        yield building
        move_folder_into_place(building, target)
    except BaseException as error:
        shutil.rmtree(building, ignore_errors=True)
        if isinstance(error, OSError):
            raise UserError(os_error_line(error, building)) from None
        raise


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda partial: partial.write_text(text))


def move_folder_into_place(built: Path, target: Path) -> None:
    """`built` takes `target`'s place; what `target` held is removed after. A reader (or a kill) sees the old
    folder or the new one: the two swap in one step (Linux's renameat2 RENAME_EXCHANGE) where the file system
    can, and otherwise the old one is renamed aside first, a window of one rename with neither in place."""
    if target.is_symlink():  # the writer lock refuses these first; a link swapped away would leave its target stale
        raise UserError(f"{target} is a symbolic link: give the folder it points to")
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
