"""Digests of large files are read once while the files stay unchanged, and never served stale."""

import hashlib
import os

from instructsae import digests
from instructsae.extract.sources import hash_files


def aged(path, seconds: float = 60) -> None:
    """Back-date a file's mtime: files modified in the last seconds are never cached (the racy rule)."""
    status = path.stat()
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns - int(seconds * 1e9)))


def test_a_digest_is_computed_once_while_the_files_are_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTRUCTSAE_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"x" * 1000)
    aged(data)
    calls = []

    def compute():
        calls.append(1)
        return hashlib.sha256(data.read_bytes()).hexdigest()

    first = digests.cached_digest("test", [data], compute)
    assert digests.cached_digest("test", [data], compute) == first and len(calls) == 1
    assert digests.cached_digest("another kind", [data], compute) == first and len(calls) == 2

    data.write_bytes(b"y" * 1000)  # same size, rewritten in place: the mtime moves
    aged(data, 30)
    assert digests.cached_digest("test", [data], compute) == hashlib.sha256(b"y" * 1000).hexdigest()
    assert len(calls) == 3


def test_a_freshly_modified_file_is_never_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTRUCTSAE_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"fresh")
    calls = []
    for _ in range(2):
        digests.cached_digest("test", [data], lambda: calls.append(1) or "digest")
    assert len(calls) == 2


def test_hash_files_gives_the_same_digest_from_the_cache_and_survives_a_broken_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("INSTRUCTSAE_CACHE_DIR", str(cache))
    parts = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    for index, part in enumerate(parts):
        part.write_bytes(bytes(range(256)) * (index + 1))
        aged(part)
    expected = hashlib.sha256(b"".join(part.read_bytes() for part in parts)).hexdigest()
    assert hash_files(parts) == expected
    assert (cache / digests.CACHE_FILE).exists()
    assert hash_files(parts) == expected
    (cache / digests.CACHE_FILE).write_text("{not json")
    assert hash_files(parts) == expected
