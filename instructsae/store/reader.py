"""Reads a store's committed rows; `open_store` and `open_complete_store` are what the stages call."""

import math
from pathlib import Path

import numpy as np
import torch
import zarr

from instructsae.errors import UserError
from instructsae.schemas.manifest import MANIFEST_KEY, StoreManifest
from instructsae.store.layout import INSTANCE_COLUMNS, acts_from_storage, layer_array_name
from instructsae.store.location import location_exists, zarr_location


def is_store(path: str | Path) -> bool:
    try:
        group = zarr.open_group(zarr_location(path), mode="r")
    except Exception:
        return False
    return MANIFEST_KEY in group.attrs


def read_manifest(path: str | Path) -> StoreManifest:
    group = zarr.open_group(zarr_location(path), mode="r")
    return StoreManifest.model_validate(group.attrs[MANIFEST_KEY])


class StoreReader:
    """Reads committed rows only; activations come back as float32 tensors."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.group = zarr.open_group(zarr_location(path), mode="r")
        self.manifest = StoreManifest.model_validate(self.group.attrs[MANIFEST_KEY])
        self.n_tokens = self.manifest.n_tokens
        self.n_instances = self.manifest.n_instances
        self.chunk_tokens = self.manifest.identity.chunk_tokens
        self.n_chunks = math.ceil(self.n_tokens / self.chunk_tokens)
        self.d_model = self.manifest.identity.d_model
        self.layers = self.manifest.identity.layers

    def read_acts(self, layer: int, start: int, stop: int) -> torch.Tensor:
        stop = min(stop, self.n_tokens)
        raw = self.group[layer_array_name(layer)][start:stop]
        return acts_from_storage(np.ascontiguousarray(raw), self.manifest.identity.dtype)

    def chunk_bounds(self, chunk_index: int) -> tuple[int, int]:
        start = chunk_index * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.n_tokens)

    def read_acts_chunk(self, layer: int, chunk_index: int) -> torch.Tensor:
        return self.read_acts(layer, *self.chunk_bounds(chunk_index))

    def read_column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        limit = self.n_instances if name in INSTANCE_COLUMNS else self.n_tokens
        stop = limit if stop is None else min(stop, limit)
        return self.group[name][start:stop]


def open_complete_store(path: str | Path) -> StoreReader:
    """A store whose extraction finished: what training and evaluation may read."""
    reader = open_store(path)
    if not reader.manifest.complete:
        raise UserError(f"store {path} is incomplete: rerun its extract to finish it")
    return reader


def open_store(path: str | Path) -> StoreReader:
    if not location_exists(path):
        raise UserError(f"store not found: {path}")
    if not is_store(path):
        raise UserError(f"not an instructsae store (no zarr group with a manifest): {path}")
    try:
        return StoreReader(path)
    except Exception as error:
        raise UserError(f"store {path} has an unreadable manifest: {str(error).splitlines()[0]}") from None
