"""One writer at a time: an exclusive lock next to what a command writes (a store, a run folder, a sweep folder).

The lock is `TARGET.lock` beside TARGET, not inside it: creating a store and replacing a run folder swap TARGET
itself. Its content names the holder (host, pid, start time, command) for the refusal a second writer gets.
Readers never take it.

- Local disk (a path or a `file://` URL): `flock` on the lock file. The kernel releases it when its holder dies
  however it dies, so a lock can never be left held by a dead writer; a file naming a dead holder is taken over
  with a note on stderr.
- Any other fsspec URL (`s3://`, `memory://`, ...): the lock object is created with exclusive create (`xb`),
  which fails when it exists (s3fs does this with a conditional put). A lock naming a dead pid on this host is
  taken over with a note; one held from another host cannot be checked from here, so it is refused, and the
  message says which file to delete once that writer is known to be gone. Where the file system has no
  exclusive create, existence is checked and then the lock written: two writers starting within the same
  moment could both pass (the README says so).
"""

import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from instructsae.errors import UserError, first_line

LOCK_SUFFIX = ".lock"


def lock_location(target: str | Path) -> str:
    """Where the lock of TARGET lives: TARGET.lock, on TARGET's file system (a path on the local disk). The
    folders above TARGET are resolved, so two spellings of one target (through a linked folder) share a lock."""
    fs, root = _filesystem(target)
    root = root.rstrip("/") or "/"
    if isinstance(fs, LocalFileSystem):
        path = Path(os.path.abspath(root))
        return str(Path(os.path.realpath(path.parent)) / path.name) + LOCK_SUFFIX
    return fs.unstrip_protocol(root + LOCK_SUFFIX)


def local_path(location: str | Path) -> Path | None:
    """The absolute path of a location on the local disk (a path or a file:// URL); None for any other URL."""
    fs, root = _filesystem(location)
    return Path(os.path.abspath(root)) if isinstance(fs, LocalFileSystem) else None


@contextmanager
def writer_lock(target: str | Path, what: str, is_file: bool = False) -> Iterator[None]:
    """Hold TARGET's writer lock for the block; `what` names TARGET in messages ("store", "run folder");
    `is_file`: TARGET is one file (dedup's parquet), not a folder.

    Every command that writes takes it before it writes or removes anything, so this is also where a target
    that is a symbolic link is refused: swapping a folder into its place, or removing it, would replace the link
    and leave what it points to stale."""
    refuse_symlink(target, what)
    fs, root = _filesystem(target)
    release = (_lock_local(target, what, is_file) if isinstance(fs, LocalFileSystem)
               else _lock_remote(fs, root, target, what))
    try:
        yield
    finally:
        release()


def holder_description(holder: dict | None) -> str:
    if not holder:
        return "another process (its lock file names no holder yet)"
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}{command}"


def refuse_symlink(target: str | Path, what: str) -> None:
    """A target on the local disk that is a symbolic link is refused, naming what it points to."""
    path = local_path(target)
    if path is not None and path.is_symlink():
        raise UserError(f"{what} {target} is a symbolic link (to {os.path.realpath(path)}): give the path it "
                        "points to, so that what is replaced is the folder itself, not the link")


def check_writable(target: str | Path, what: str, is_file: bool = False) -> None:
    """TARGET can be written: it (if it exists) or the nearest folder above it accepts new entries (a file
    target: its folder, where it is built aside and renamed into place).

    Checked before any slow work, so a read-only location is one line at once rather than a traceback later."""
    fs, root = _filesystem(target)
    if not isinstance(fs, LocalFileSystem):
        return  # remote permissions show only on the first write; the lock object is that first write
    path = Path(os.path.abspath(root))
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if existing == path and is_file:
        existing = path.parent
    elif existing == path and not path.is_dir():
        raise UserError(f"output path exists and is not a {what}: {target} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "the file system is read-only" if _read_only_mount(existing) else "no write permission"
        raise UserError(f"cannot write {what} {target}: {existing} is not writable ({reason})")


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _filesystem(target: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    # (instructsae.store.location has the same for stores; this one serves run and sweep folders too)
    try:
        return fsspec.core.url_to_fs(str(target))
    except (ImportError, ValueError) as error:  # an unknown protocol, or one whose package is missing
        raise UserError(f"cannot open location {target}: {first_line(error)}") from None


def _this_holder() -> dict:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv and sys.argv[0] else ""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "command": command}


def _parse(raw: bytes) -> dict | None:
    try:
        holder = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _refusal(target, what: str, holder: dict | None, lock: str) -> UserError:
    return UserError(f"{what} {target} is being written by {holder_description(holder)}: wait for it to finish "
                     f"(lock {lock})")


def _lock_local(target, what: str, is_file: bool):
    check_writable(target, what, is_file)
    lock = lock_location(target)
    try:
        Path(lock).parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write {what} {target}: {first_line(error)}") from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise UserError(f"cannot write {what} {target}: cannot create its lock {lock}: {first_line(error)}") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(os.pread(fd, 4096, 0))
            os.close(fd)
            raise _refusal(target, what, holder, lock) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the previous holder released and removed the file between our open and our flock: again

    previous = _parse(os.pread(fd, 4096, 0))
    if previous:
        print(f"note: took over the lock {lock} left by {holder_description(previous)}, which is no longer "
              "running", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_this_holder()).encode(), 0)

    def release() -> None:
        try:
            os.unlink(lock)  # while still holding it: a process waiting on this file sees it is gone and retries
        except FileNotFoundError:
            pass
        os.close(fd)

    return release


def _pid_is_dead(holder: dict) -> bool:
    """Only a pid on this host can be checked; anything else counts as alive."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _lock_remote(fs: fsspec.AbstractFileSystem, root: str, target, what: str):
    lock = root.rstrip("/") + LOCK_SUFFIX
    shown = fs.unstrip_protocol(lock)
    mine = _this_holder()
    for attempt in range(2):
        try:
            _create_exclusively(fs, lock, json.dumps(mine).encode())
            break
        except FileExistsError:
            try:
                holder = _parse(fs.cat_file(lock))
            except FileNotFoundError:
                continue  # released between the two calls
            if attempt == 0 and holder and _pid_is_dead(holder):
                print(f"note: took over the lock {shown} left by {holder_description(holder)}, which is no longer "
                      "running", file=sys.stderr)
                fs.rm(lock)
                continue
            raise UserError(f"{what} {target} is being written by {holder_description(holder)}: wait for it to "
                            f"finish, or delete {shown} if that writer is gone") from None
        except OSError as error:
            raise UserError(f"cannot write {what} {target}: cannot create its lock {shown}: {first_line(error)}") \
                from None
    else:
        raise UserError(f"{what} {target}: could not take its lock {shown}: another writer keeps taking it")

    def release() -> None:
        try:
            if _parse(fs.cat_file(lock)) == mine:  # never remove a lock someone else took over
                fs.rm(lock)
        except FileNotFoundError:
            pass

    return release


def _create_exclusively(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    try:
        with fs.open(path, "xb") as file:
            file.write(data)
        return
    except (ValueError, NotImplementedError, TypeError):
        pass  # no exclusive create on this file system: check, then write (see the module docstring)
    if fs.exists(path):
        raise FileExistsError(path)
    fs.pipe_file(path, data)
