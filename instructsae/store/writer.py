"""Writes a store in whole shards and commits the manifest after each; resume cuts back to the last commit.

Rows are buffered in memory and a shard is written once, whole (zarr rewrites a shard for every partial
write into it: 16.5 MB/s measured appending 3,000-row blocks). Every token-row array (activations and token
columns) shares the same shard rows, so one shard of each is written at once; the manifest, the commit
record, then counts the instances that end within them. Instance columns (a row per instance, small) are
written up to the committed count at each commit, their last partial shard rewritten. A killed run leaves
shards beyond the commit: `resume` reads back the committed rows of each array's unfinished shard, cuts the
rest, and the extraction redoes the work after the commit. The last partial shards are written by `finish`.
"""

import os
import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import Crc32cCodec, ZstdCodec

from instructsae.errors import UserError
from instructsae.fileio import PARTIAL_SUFFIX
from instructsae.schemas.manifest import FORMAT_VERSION, MANIFEST_KEY, StoreManifest
from instructsae.store.checks import leftover_files
from instructsae.store.chunks import ShardedArray, shard_path
from instructsae.store.layout import ArraySpec, TokenBlock, array_attributes, array_specs
from instructsae.store.location import filesystem, zarr_location
from instructsae.store.shards import encode_shard, put_shard


def create_array(group: zarr.Group, spec: ArraySpec, attributes: dict) -> None:
    # crc32c inside the inner chain: every inner chunk carries its own checksum (zarr's default puts one only
    # on the shard index). shards.py writes the files this metadata describes, every chunk of them, even an
    # all-zero one (zarr would skip it), so a chunk absent is an error.
    compressors = [ZstdCodec(level=3), Crc32cCodec()] if spec.compressed else [Crc32cCodec()]
    group.create_array(
        spec.name, shape=(0, *spec.row_shape), dtype=spec.dtype, chunks=(spec.chunk_rows, *spec.row_shape),
        shards=(spec.shard_rows, *spec.row_shape), compressors=compressors, fill_value=0, attributes=attributes,
    )


def _skeleton(location: str, manifest: StoreManifest) -> None:
    """The group, its empty arrays and the first manifest (the commit record) at `location`."""
    group = zarr.open_group(location, mode="w", zarr_format=3)
    for spec in array_specs(manifest.identity):
        create_array(group, spec, array_attributes(spec, manifest.identity))
    group.attrs[MANIFEST_KEY] = manifest.model_copy(update={"format_version": FORMAT_VERSION}).model_dump(mode="json")


def _remove_skeleton(building: str) -> None:
    """Remove what a killed creation left at STORE.partial, only if it is that: zarr metadata files alone."""
    found = [] if os.path.islink(building) else [os.path.join(folder, name) for folder, _, names in
                                                  os.walk(building) for name in names]
    if os.path.islink(building) or not os.path.isdir(building) or \
            any(os.path.basename(file) != "zarr.json" and not file.endswith(PARTIAL_SUFFIX) for file in found):
        raise UserError(f"{building} is in the way of the new store and is not a skeleton this command left: move "
                        "it away")
    shutil.rmtree(building)


class PendingRows:
    """The rows of one array from the start of its unfinished shard on, held until written whole: the
    appended blocks themselves, not copies (a copy into a shard buffer cost more than the write)."""

    def __init__(self, spec: ArraySpec, base: int, rows: np.ndarray):
        self.spec, self.base = spec, base
        self.pieces: list[np.ndarray] = [rows] if len(rows) else []
        self.n = len(rows)

    @property
    def end(self) -> int:
        return self.base + self.n

    def append(self, values: np.ndarray) -> None:
        if len(values):
            self.pieces.append(values)
            self.n += len(values)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) counted from `base`: a view when one block holds them all, else a copy."""
        out, offset = [], 0
        for piece in self.pieces:
            if offset >= stop:
                break
            if offset + len(piece) > start:
                out.append(piece[max(start - offset, 0): stop - offset])
            offset += len(piece)
        return out[0] if len(out) == 1 else np.concatenate(out)

    def drop_before(self, row: int) -> None:
        """Forget the rows before `row` (counted from `base`), which is the new base."""
        while self.pieces and len(self.pieces[0]) <= row:
            row -= len(self.pieces[0])
            self.n -= len(self.pieces[0])
            self.base += len(self.pieces[0])
            self.pieces.pop(0)
        if row:
            self.pieces[0] = self.pieces[0][row:]
            self.n -= row
            self.base += row

    def write(self, array: zarr.Array, fs: fsspec.AbstractFileSystem, root: str, upto: int, store_id: str) -> None:
        """Write rows [base, upto) of `array`, each shard one whole file, and keep only the rows of the
        shard that `upto` leaves unfinished (they are written again, with more, next time)."""
        if upto <= self.base:
            return
        shard_rows, chunk_rows = self.spec.shard_rows, self.spec.chunk_rows
        for shard in range(self.base // shard_rows, -(-upto // shard_rows)):
            first = shard * shard_rows - self.base
            stop = min(first + shard_rows, upto - self.base)
            chunks = (self.rows(start, min(start + chunk_rows, stop)) for start in range(first, stop, chunk_rows))
            first_chunk = shard * (shard_rows // chunk_rows)
            put_shard(fs, shard_path(root, self.spec, shard), encode_shard(self.spec, chunks, store_id, first_chunk))
        if array.shape[0] != upto:  # after the data, so the array never claims rows that are not there
            array.resize((upto, *self.spec.row_shape))
        self.drop_before(upto - upto % shard_rows - self.base)


class StoreWriter:
    """`create` or `resume`, then `append` blocks of whole instances, then `finish`."""

    def __init__(self, path: str | Path, group: zarr.Group, manifest: StoreManifest,
                 pending: dict[str, PendingRows]):
        self.group = group
        self.fs, self.root = filesystem(path)
        self.arrays = {name: group[name] for name in pending}
        self.manifest = manifest  # the last one committed
        self.store_id = manifest.store_id or uuid.uuid4().hex  # a new store draws its id; a resumed one keeps it
        self.pending = pending
        self.uncommitted: list[StoreManifest] = []  # one per appended block, counting the rows through it
        self.specs = array_specs(manifest.identity)
        self.shard_tokens = manifest.identity.shard_tokens

    @classmethod
    def create(cls, path: str | Path, manifest: StoreManifest) -> "StoreWriter":
        """A new, empty store. On the local disk its skeleton (group, arrays, first manifest) is built in
        `STORE.partial` and renamed into place, so a kill while zarr writes it never leaves a folder that is
        neither a store nor empty (which a rerun would have to refuse)."""
        fs, root = filesystem(path)
        manifest = manifest.model_copy(update={"store_id": manifest.store_id or uuid.uuid4().hex})
        building = f"{root.rstrip('/')}{PARTIAL_SUFFIX}" if isinstance(fs, LocalFileSystem) else None
        if building is not None and os.path.lexists(building):
            _remove_skeleton(building)  # a killed creation's
        _skeleton(building or zarr_location(path), manifest)
        if building is not None:
            os.replace(building, root)  # `root` is absent or an empty folder (the caller checked)
        group = zarr.open_group(zarr_location(path), mode="r+")
        pending = {spec.name: PendingRows(spec, 0, np.empty((0, *spec.row_shape), dtype=spec.dtype))
                   for spec in array_specs(manifest.identity)}
        return cls(path, group, manifest, pending)

    @classmethod
    def resume(cls, path: str | Path) -> "StoreWriter":
        group = zarr.open_group(zarr_location(path), mode="r+")
        manifest = StoreManifest.model_validate(group.attrs[MANIFEST_KEY])
        if manifest.format_version != FORMAT_VERSION or manifest.store_id is None:
            raise UserError(f"store {path} is an unfinished store of format {manifest.format_version}, which this "
                            f"version cannot continue (it writes format {FORMAT_VERSION}): extract it again with "
                            "--overwrite")
        fs, root = filesystem(path)
        for leftover in leftover_files(fs, root):  # half-written files of the writer that was killed: ours
            fs.rm(leftover)
        pending = {}
        for spec in array_specs(manifest.identity):
            committed = manifest.n_tokens if spec.per == "token" else manifest.n_instances
            base = committed - committed % spec.shard_rows
            # The committed rows of the unfinished shard, checked as any read is; then everything after
            # `base` goes, and the shard is written again, whole, when it fills.
            rows = ShardedArray(fs, root, spec, committed, str(path), manifest.store_id).read_rows(base, committed)
            group[spec.name].resize((base, *spec.row_shape))
            pending[spec.name] = PendingRows(spec, base, rows)
        return cls(path, group, manifest, pending)

    def append(self, block: TokenBlock, manifest: StoreManifest) -> None:
        """Buffer the block's rows (`manifest` counts them); write and commit whatever shards they fill."""
        for spec in self.specs:
            self.pending[spec.name].append(block.column(spec.name))
        self.uncommitted.append(manifest)
        token_rows = [self.pending[spec.name] for spec in self.specs if spec.per == "token"]
        filled = token_rows[0].end - token_rows[0].end % self.shard_tokens
        if filled <= token_rows[0].base:
            return
        for rows in token_rows:
            rows.write(self.arrays[rows.spec.name], self.fs, self.root, filled, self.store_id)
        done = [m for m in self.uncommitted if m.n_tokens <= filled]
        if done:  # else one block spans the whole shard: its commit comes with a later shard
            self._commit_through(done[-1])

    def _commit_through(self, manifest: StoreManifest) -> None:
        for spec in self.specs:
            if spec.per == "instance":
                self.pending[spec.name].write(self.arrays[spec.name], self.fs, self.root, manifest.n_instances,
                                              self.store_id)
        self.commit(manifest)
        self.uncommitted = [m for m in self.uncommitted if m.n_tokens > manifest.n_tokens]

    def finish(self, manifest: StoreManifest) -> None:
        """Write every row still held (the last, partial shards) and commit `manifest`, the final record."""
        for spec in self.specs:
            count = manifest.n_tokens if spec.per == "token" else manifest.n_instances
            self.pending[spec.name].write(self.arrays[spec.name], self.fs, self.root, count, self.store_id)
        self.commit(manifest)
        self.uncommitted = []

    def commit(self, manifest: StoreManifest) -> None:
        manifest = manifest.model_copy(update={"store_id": self.store_id, "format_version": FORMAT_VERSION})
        self.group.attrs[MANIFEST_KEY] = manifest.model_dump(mode="json")
        self.manifest = manifest
