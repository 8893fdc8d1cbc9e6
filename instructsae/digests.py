"""Digests of large local files, computed once while the files stay unchanged.

A store records the sha256 of the data and the model it came from. Reading a 15 GB model folder or a 100 GB
dataset again at every `extract` (and on every rank under torchrun) costs minutes, so a digest is kept in a
small cache keyed by the files' paths, sizes, modification times and inodes, the stamp git's index and make
trust too: a file rewritten in place keeps its inode but not its mtime. As in git's "racy" rule, a digest of a
file modified in the last few seconds is not kept (a rewrite within the clock's granularity could keep the
mtime). The cache lives in
$INSTRUCTSAE_CACHE_DIR, else $XDG_CACHE_HOME/instructsae, else ~/.cache/instructsae; when it cannot be read or
written the digest is simply computed.
"""

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

CACHE_FILE = "file-digests.json"
MAX_ENTRIES = 1000
RACY_NS = 3 * 10**9


def cache_dir() -> Path:
    if os.environ.get("INSTRUCTSAE_CACHE_DIR"):
        return Path(os.environ["INSTRUCTSAE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "instructsae"


def cached_digest(kind: str, files: Sequence[Path], compute: Callable[[], str]) -> str:
    """compute()'s digest of `files`, from the cache while none of them has changed since it was computed."""
    try:
        stamp = [kind] + [[str(Path(file).resolve()), *_file_stamp(Path(file))] for file in files]
    except OSError:
        return compute()  # a file vanished or cannot be stat'ed: let compute() report it
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()
    entries = _read_cache()
    if key in entries:
        return entries[key]
    digest = compute()
    newest = max((modified for _, _, modified, _ in stamp[1:]), default=0)
    if newest > time.time_ns() - RACY_NS:
        return digest
    entries[key] = digest
    _write_cache(dict(list(entries.items())[-MAX_ENTRIES:]))  # the oldest entries go first
    return digest


def _file_stamp(file: Path) -> list[int]:
    status = file.stat()
    return [status.st_size, status.st_mtime_ns, status.st_ino]


def _read_cache() -> dict[str, str]:
    try:
        entries = json.loads((cache_dir() / CACHE_FILE).read_text())
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(entries: dict[str, str]) -> None:
    """Atomically: a reader never sees half a file; of two writers at once the last wins (both are right)."""
    folder = cache_dir()
    temporary = folder / f"{CACHE_FILE}.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(entries))
        os.replace(temporary, folder / CACHE_FILE)
    except OSError:
        temporary.unlink(missing_ok=True)
