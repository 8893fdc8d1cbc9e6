"""Strict reads of one sharded array: every inner chunk is checked before its rows are used.

zarr returns fill values for a chunk that is not there (zarr 3.1 has no switch to refuse), and with the
sharding codec's defaults only the shard index carries a checksum. So the store reads its own arrays here:
the shard index (crc32c-checked, cached per shard), then the inner chunk's bytes, whose trailing crc32c
(the `crc32c` codec in the inner chain, see layout.py) is checked before decoding. Any problem is a
ChunkError naming the array, the chunk and its rows. Plain zarr reads the same files (README).
"""

import threading

import crc32c
import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from numcodecs import Zstd

from instructsae.errors import UserError
from instructsae.store.layout import ArraySpec
from instructsae.store.places import TAG_BYTES, place_tag, read_tags

EMPTY = np.uint64(2**64 - 1)  # the shard index's offset and length of a chunk that was never written
CRC_BYTES = 4


def shard_path(root: str, spec: ArraySpec, shard: int) -> str:
    # zarr v3's default chunk key encoding: c/<shard>/0 for (rows, d_model), c/<shard> for a column
    return f"{root.rstrip('/')}/{spec.name}/c/{shard}" + "/0" * len(spec.row_shape)


class ChunkError(UserError):
    """A chunk that cannot be trusted; `what` is one of: missing, truncated, checksum, misplaced."""

    def __init__(self, store: str, array: str, chunk: int, rows: tuple[int, int], what: str, detail: str):
        self.array, self.chunk, self.rows, self.what, self.detail = array, chunk, rows, what, detail
        super().__init__(f"store {store}: {array} chunk {chunk} (rows {rows[0]:,}-{rows[1]:,}) is {what}: {detail} "
                         f"(`instructsae verify {store}` lists every bad chunk)")


def crc32c_ok(payload: bytes | np.ndarray) -> bool:
    view = memoryview(payload).cast("B")  # views: no copy of a 4 MB chunk
    return len(view) >= CRC_BYTES and crc32c.crc32c(view[:-CRC_BYTES]) == int.from_bytes(view[-CRC_BYTES:], "little")


def read_local_range(path: str, start: int, length: int) -> np.ndarray:
    """Bytes [start, start + length) of a local file, read straight into new writable memory: fsspec's
    cat_file, a slice and the copy torch needs of read-only bytes cost ~10x the CPU of this one read."""
    payload = np.empty(length, dtype=np.uint8)
    n_read = 0
    with open(path, "rb", buffering=0) as source:
        source.seek(start)
        while n_read < length and (got := source.readinto(memoryview(payload)[n_read:])):  # a read may be short
            n_read += got
    return payload[:n_read]


class ShardedArray:
    """One array of a store, read inner chunk by inner chunk; `n_rows` is how many rows are committed."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, spec: ArraySpec, n_rows: int, store: str,
                 store_id: str | None = None):
        """`store_id`: the manifest's (format 3), whose place tags are then checked; None for format 2."""
        self.fs, self.root, self.spec, self.n_rows, self.store = fs, root.rstrip("/"), spec, n_rows, store
        self.store_id = store_id
        self.n_chunks = -(-n_rows // spec.chunk_rows)
        self.chunks_per_shard = spec.shard_rows // spec.chunk_rows
        self.index_bytes = 16 * self.chunks_per_shard + CRC_BYTES
        self.tag_bytes = 0 if store_id is None else TAG_BYTES * self.chunks_per_shard
        self.tail_bytes = self.tag_bytes + self.index_bytes  # what follows the chunks in a shard file
        self.chunk_bytes = spec.chunk_rows * spec.row_bytes  # before the codecs; what an uncompressed chunk holds
        self._indexes: dict[int, np.ndarray] = {}
        self._tags: dict[int, np.ndarray | None] = {}
        self._lock = threading.Lock()
        self._local = isinstance(fs, LocalFileSystem)

    def shard_path(self, shard: int) -> str:
        return shard_path(self.root, self.spec, shard)

    def chunk_rows(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.spec.chunk_rows
        return start, min(start + self.spec.chunk_rows, self.n_rows)

    def expected_shard_size(self, shard: int, n_rows: int) -> int | None:
        """Bytes of a whole shard holding rows up to `n_rows`; None where compression makes it unknowable."""
        if self.spec.compressed:
            return None
        first = shard * self.chunks_per_shard
        present = min(self.chunks_per_shard, -(-n_rows // self.spec.chunk_rows) - first)
        return present * (self.chunk_bytes + CRC_BYTES) + self.tail_bytes

    def _error(self, chunk: int, what: str, detail: str) -> ChunkError:
        return ChunkError(self.store, self.spec.name, chunk, self.chunk_rows(chunk), what, detail)

    def _missing_shard(self, chunk: int, path: str) -> ChunkError:
        return self._error(chunk, "missing", f"its shard file {path} is not there")

    def _shard_index(self, shard: int, chunk: int) -> np.ndarray:
        """The shard's index of (offset, length) pairs; its chunks' place tags (format 3) are kept beside it."""
        cached = self._indexes.get(shard)
        if cached is not None:
            return cached
        path = self.shard_path(shard)
        try:
            tail = self.fs.cat_file(path, start=-self.tail_bytes)
        except FileNotFoundError:
            raise self._missing_shard(chunk, path) from None
        raw = tail[self.tag_bytes:]
        if len(tail) < self.tail_bytes or not crc32c_ok(raw):
            size = self.fs.size(path)
            expected = self.expected_shard_size(shard, self.n_rows)
            if expected is not None and size < expected:
                raise self._error(chunk, "truncated", f"shard file {path} has {size:,} of {expected:,} bytes")
            raise self._error(chunk, "checksum", f"the index of shard file {path} fails its crc32c "
                                                 f"(truncated or overwritten)")
        index = np.frombuffer(raw[:-CRC_BYTES], dtype="<u8").reshape(self.chunks_per_shard, 2)
        tags = read_tags(tail[: self.tag_bytes], self.chunks_per_shard) if self.tag_bytes else None
        with self._lock:
            self._tags[shard] = tags
            self._indexes[shard] = index
        return index

    def read_chunk(self, chunk: int) -> np.ndarray:
        """The committed rows of inner chunk `chunk`, in the storage dtype."""
        if not 0 <= chunk < self.n_chunks:
            raise IndexError(f"{self.spec.name}: chunk {chunk} outside 0..{self.n_chunks - 1}")
        shard, local = divmod(chunk, self.chunks_per_shard)
        offset, length = self._shard_index(shard, chunk)[local]
        tags = self._tags[shard]
        if offset == EMPTY:
            raise self._error(chunk, "missing", f"shard file {self.shard_path(shard)} has no bytes for it")
        payload = self._read_range(self.shard_path(shard), int(offset), int(length), chunk)
        if len(payload) < length:
            raise self._error(chunk, "truncated", f"{len(payload):,} of {int(length):,} bytes")
        if not crc32c_ok(payload):
            raise self._error(chunk, "checksum", "its bytes fail their crc32c (changed since written)")
        if tags is not None and \
                int(tags[local]) != place_tag(self.store_id, self.spec.name, chunk, payload[-CRC_BYTES:]):
            raise self._error(chunk, "misplaced", f"shard file {self.shard_path(shard)} holds a chunk written for "
                                                  "another place (shard files moved or swapped, or copied from "
                                                  "another store)")
        body = memoryview(payload)[:-CRC_BYTES]  # a view; writable where the payload is (local reads)
        if self.spec.compressed:
            body = Zstd().decode(body)
        if len(body) != self.chunk_bytes:
            raise self._error(chunk, "truncated", f"decodes to {len(body):,} bytes, not {self.chunk_bytes:,}")
        values = np.frombuffer(body, dtype=np.dtype(self.spec.dtype).newbyteorder("<"))
        start, stop = self.chunk_rows(chunk)
        return values.reshape(self.spec.chunk_rows, *self.spec.row_shape)[: stop - start]

    def _read_range(self, path: str, start: int, length: int, chunk: int) -> bytes | np.ndarray:
        if not self._local:
            return self.fs.cat_file(path, start=start, end=start + length)
        try:
            return read_local_range(path, start, length)
        except FileNotFoundError:
            raise self._missing_shard(chunk, path) from None

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the committed rows, gathered from the chunks they span."""
        stop = min(stop, self.n_rows)
        if start >= stop:
            return np.empty((0, *self.spec.row_shape), dtype=self.spec.dtype)
        rows = self.spec.chunk_rows
        pieces = []
        for chunk in range(start // rows, -(-stop // rows)):
            values = self.read_chunk(chunk)
            first = chunk * rows
            pieces.append(values[max(start - first, 0): stop - first])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
