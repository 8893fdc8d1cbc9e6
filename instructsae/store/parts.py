"""A store written by several ranks, read as one.

Layout: the top-level zarr group holds only the manifest (the commit record of the whole store); each work unit
is a complete store of its own under `parts/unit-NNNNNN` (same identity, its own arrays, manifest and commit
record). Units are consecutive runs of the planned instances, so the parts concatenated in unit order are the
store a single process would have written, row for row. The top-level manifest becomes complete, and lists its
parts, only once every unit is; readers open it through `open_store` and see one store.

Chunks: a part's last chunk is usually short, so chunk i of the whole store is chunk j of some part, and its
rows are `chunk_bounds(i)`; a chunk never spans two parts.
"""

import numpy as np
import torch

from instructsae.errors import UserError
from instructsae.schemas.sites import DEFAULT_SITE
from instructsae.store.layout import INSTANCE_COLUMNS, acts_as_stored, acts_from_storage, array_specs, layer_array_name
from instructsae.store.location import filesystem
from instructsae.store.reader import StoreReader, check_cheaply, is_store, read_manifest
from instructsae.schemas.manifest import StoreManifest

PARTS_FOLDER = "parts"


def part_name(index: int) -> str:
    return f"unit-{index:06d}"


def part_location(out: str, index: int) -> str:
    return f"{str(out).rstrip('/')}/{PARTS_FOLDER}/{part_name(index)}"


def existing_parts(out: str) -> dict[int, StoreManifest]:
    """{unit index: its manifest} for every part with a committed manifest (complete or not)."""
    fs, root = filesystem(out)
    folder = f"{root.rstrip('/')}/{PARTS_FOLDER}"
    if not fs.exists(folder):
        return {}
    found = {}
    for entry in fs.ls(folder, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("unit-") and name[5:].isdigit():
            index = int(name[5:])
            if is_store(part_location(out, index)):
                found[index] = read_manifest(part_location(out, index))
    return found


def part_problem(path: str, index: int, expected) -> str | None:
    """What is wrong with a listed part before its arrays are looked at: absent, or other counts than listed."""
    location = part_location(path, index)
    if not is_store(location):
        return f"part {expected.name} is missing (no store at {location})"
    manifest = read_manifest(location)
    if (manifest.n_tokens, manifest.n_instances) != (expected.n_tokens, expected.n_instances):
        return (f"part {expected.name} holds {manifest.n_tokens:,} tokens in {manifest.n_instances:,} instances, "
                f"the store's manifest lists {expected.n_tokens:,} in {expected.n_instances:,}")
    if not manifest.complete:
        return f"part {expected.name} is incomplete, yet the store's manifest lists it"
    return None


class PartsReader:
    """The StoreReader interface over the parts of a multi-rank store, in unit order. Each part is opened as any
    store is (its arrays against its manifest, its shard files present: store.reader.check_cheaply); every chunk
    read is checked as in one store."""

    def __init__(self, path: str, manifest: StoreManifest):
        self.path, self.manifest = str(path), manifest
        self.parts = []
        for index, expected in enumerate(manifest.parts):
            problem = part_problem(self.path, index, expected)
            if problem:
                raise UserError(f"store {path}: {problem} (`instructsae verify {path}` lists every problem)")
            part = StoreReader(part_location(self.path, index))
            check_cheaply(part)
            self.parts.append(part)
        identity = manifest.identity
        self.n_tokens, self.n_instances = manifest.n_tokens, manifest.n_instances
        self.chunk_tokens, self.d_model, self.layers = identity.chunk_tokens, identity.d_model, identity.layers
        self.sites, self.acts_keys = identity.stored_sites, identity.acts_keys
        self.token_offsets = np.cumsum([0, *[part.n_tokens for part in self.parts]])
        self.instance_offsets = np.cumsum([0, *[part.n_instances for part in self.parts]])
        self.chunks = [(p, c) for p, part in enumerate(self.parts) for c in range(part.n_chunks)]
        self.n_chunks = len(self.chunks)

    def chunk_bounds(self, chunk_index: int) -> tuple[int, int]:
        p, c = self.chunks[chunk_index]
        start, stop = self.parts[p].chunk_bounds(c)
        return int(self.token_offsets[p]) + start, int(self.token_offsets[p]) + stop

    def read_acts_chunk_raw(self, layer: int, chunk_index: int, site: str = DEFAULT_SITE) -> np.ndarray:
        p, c = self.chunks[chunk_index]
        return self.parts[p].read_acts_chunk_raw(layer, c, site)

    def read_acts_chunk(self, layer: int, chunk_index: int, site: str = DEFAULT_SITE) -> torch.Tensor:
        return acts_from_storage(self.read_acts_chunk_raw(layer, chunk_index, site), self.manifest.identity.dtype)

    def read_acts_chunk_as_stored(self, layer: int, chunk_index: int, site: str = DEFAULT_SITE) -> torch.Tensor:
        return acts_as_stored(self.read_acts_chunk_raw(layer, chunk_index, site), self.manifest.identity.dtype)

    def read_acts(self, layer: int, start: int, stop: int, site: str = DEFAULT_SITE) -> torch.Tensor:
        raw = self.read_raw(layer_array_name(layer, site), start, stop)
        return acts_from_storage(raw, self.manifest.identity.dtype)

    def read_acts_as_stored(self, layer: int, start: int, stop: int, site: str = DEFAULT_SITE) -> torch.Tensor:
        return acts_as_stored(self.read_raw(layer_array_name(layer, site), start, stop), self.manifest.identity.dtype)

    def read_column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.read_raw(name, start, stop)

    def read_raw(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows of any array of the whole store in its storage dtype; instance indices and instance starts
        shifted by the parts before."""
        per_instance = name in INSTANCE_COLUMNS
        offsets = self.instance_offsets if per_instance else self.token_offsets
        stop = int(offsets[-1]) if stop is None else min(stop, int(offsets[-1]))
        pieces = []
        for p, local_start, local_stop in self._spans(offsets, start, stop):
            values = self.parts[p].read_raw(name, local_start, local_stop)
            if name == "instance":
                values = values + values.dtype.type(self.instance_offsets[p])
            elif name == "instance_start":
                values = values + values.dtype.type(self.token_offsets[p])
            pieces.append(values)
        if not pieces:
            return self._empty(name)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _empty(self, name: str) -> np.ndarray:
        """No rows of `name`, with its dtype and row shape (a store whose parts are not listed yet)."""
        spec = next(spec for spec in array_specs(self.manifest.identity) if spec.name == name)
        return np.empty((0, *spec.row_shape), dtype=spec.dtype)

    @staticmethod
    def _spans(offsets: np.ndarray, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(part, local start, local stop) of the parts that rows start..stop cross."""
        spans = []
        for p in range(len(offsets) - 1):
            lo, hi = max(start, int(offsets[p])), min(stop, int(offsets[p + 1]))
            if lo < hi:
                spans.append((p, lo - int(offsets[p]), hi - int(offsets[p])))
        return spans
