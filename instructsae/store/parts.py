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
from instructsae.store.layout import INSTANCE_COLUMNS, TOKEN_COLUMNS
from instructsae.store.location import _filesystem
from instructsae.store.reader import StoreReader, is_store, read_manifest
from instructsae.schemas.manifest import StoreManifest

PARTS_FOLDER = "parts"


def part_name(index: int) -> str:
    return f"unit-{index:06d}"


def part_location(out: str, index: int) -> str:
    return f"{str(out).rstrip('/')}/{PARTS_FOLDER}/{part_name(index)}"


def existing_parts(out: str) -> dict[int, StoreManifest]:
    """{unit index: its manifest} for every part with a committed manifest (complete or not)."""
    fs, root = _filesystem(out)
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


class PartsReader:
    """The StoreReader interface over the parts of a complete multi-rank store, in unit order."""

    def __init__(self, path: str, manifest: StoreManifest):
        self.path, self.manifest = str(path), manifest
        self.parts = []
        for index, expected in enumerate(manifest.parts):
            location = part_location(self.path, index)
            if not is_store(location):
                raise UserError(f"store {path}: part {expected.name} is missing")
            part = StoreReader(location)
            if (part.n_tokens, part.n_instances) != (expected.n_tokens, expected.n_instances):
                raise UserError(f"store {path}: part {expected.name} holds {part.n_tokens} tokens, "
                                f"the manifest says {expected.n_tokens}")
            self.parts.append(part)
        identity = manifest.identity
        self.n_tokens, self.n_instances = manifest.n_tokens, manifest.n_instances
        self.chunk_tokens, self.d_model, self.layers = identity.chunk_tokens, identity.d_model, identity.layers
        self.token_offsets = np.cumsum([0, *[part.n_tokens for part in self.parts]])
        self.instance_offsets = np.cumsum([0, *[part.n_instances for part in self.parts]])
        self.chunks = [(p, c) for p, part in enumerate(self.parts) for c in range(part.n_chunks)]
        self.n_chunks = len(self.chunks)

    def chunk_bounds(self, chunk_index: int) -> tuple[int, int]:
        p, c = self.chunks[chunk_index]
        start, stop = self.parts[p].chunk_bounds(c)
        return int(self.token_offsets[p]) + start, int(self.token_offsets[p]) + stop

    def read_acts_chunk(self, layer: int, chunk_index: int) -> torch.Tensor:
        p, c = self.chunks[chunk_index]
        return self.parts[p].read_acts_chunk(layer, c)

    def read_acts(self, layer: int, start: int, stop: int) -> torch.Tensor:
        pieces = [self.parts[p].read_acts(layer, local_start, local_stop)
                  for p, local_start, local_stop in self._spans(self.token_offsets, start, stop)]
        return torch.cat(pieces) if pieces else torch.empty(0, self.d_model)

    def read_column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows of the whole store: instance indices and instance starts shifted by the parts before."""
        per_instance = name in INSTANCE_COLUMNS
        offsets = self.instance_offsets if per_instance else self.token_offsets
        stop = int(offsets[-1]) if stop is None else min(stop, int(offsets[-1]))
        pieces = []
        for p, local_start, local_stop in self._spans(offsets, start, stop):
            values = self.parts[p].read_column(name, local_start, local_stop)
            if name == "instance":
                values = values + values.dtype.type(self.instance_offsets[p])
            elif name == "instance_start":
                values = values + values.dtype.type(self.token_offsets[p])
            pieces.append(values)
        if pieces:
            return np.concatenate(pieces)
        return np.empty(0, dtype={**TOKEN_COLUMNS, **INSTANCE_COLUMNS}[name])

    @staticmethod
    def _spans(offsets: np.ndarray, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(part, local start, local stop) of the parts that rows start..stop cross."""
        spans = []
        for p in range(len(offsets) - 1):
            lo, hi = max(start, int(offsets[p])), min(stop, int(offsets[p + 1]))
            if lo < hi:
                spans.append((p, lo - int(offsets[p]), hi - int(offsets[p])))
        return spans
