"""Reads a store's committed rows; `open_store` and `open_complete_store` are what the stages call.

Every read goes through chunks.py, which checks each chunk's crc32c and refuses a missing one; opening
checks the cheap things first (format version, array lengths against the manifest, shard files present
and, where their size is known, whole), so most damage stops a command before it starts.
"""

import math
from pathlib import Path

import numpy as np
import torch
import zarr

from instructsae.errors import UserError, first_line
from instructsae.schemas.manifest import FORMAT_VERSION, MANIFEST_KEY, READABLE_FORMATS, StoreManifest
from instructsae.store.checks import length_problems, shard_file_problems
from instructsae.schemas.sites import DEFAULT_SITE
from instructsae.store.chunks import ShardedArray
from instructsae.store.layout import acts_as_stored, acts_from_storage, array_specs, layer_array_name
from instructsae.store.location import filesystem, location_exists, zarr_location


def is_store(path: str | Path) -> bool:
    try:
        group = zarr.open_group(zarr_location(path), mode="r")
    except Exception:
        return False
    return MANIFEST_KEY in group.attrs


def parse_manifest(attributes: dict, path: str | Path) -> StoreManifest:
    """The manifest of a store this version reads; an older format is one line saying how to convert it."""
    raw = attributes[MANIFEST_KEY]
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version not in READABLE_FORMATS:
        if isinstance(version, int) and version < FORMAT_VERSION:
            raise UserError(f"store {path} is in store format {version} (this version reads {FORMAT_VERSION}): "
                            f"run `instructsae convert {path} --out NEW` to rewrite it")
        raise UserError(f"store {path} has store format {version!r}, which this version does not know "
                        f"(it reads format {FORMAT_VERSION})")
    try:
        return StoreManifest.model_validate(raw)
    except Exception as error:
        raise UserError(f"store {path} has an unreadable manifest: {first_line(error)}") from None


def read_manifest(path: str | Path) -> StoreManifest:
    return parse_manifest(zarr.open_group(zarr_location(path), mode="r").attrs, path)


class StoreReader:
    """Reads committed rows only, each chunk checked; activations come back as float32 tensors, or raw."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.group = zarr.open_group(zarr_location(path), mode="r")
        self.manifest = parse_manifest(self.group.attrs, path)
        identity = self.manifest.identity
        self.n_tokens = self.manifest.n_tokens
        self.n_instances = self.manifest.n_instances
        self.chunk_tokens = identity.chunk_tokens
        self.n_chunks = math.ceil(self.n_tokens / self.chunk_tokens)
        self.d_model = identity.d_model
        self.layers = identity.layers
        self.sites, self.acts_keys = identity.stored_sites, identity.acts_keys
        fs, root = filesystem(path)
        self.specs = {spec.name: spec for spec in array_specs(identity)}
        self.arrays = {name: ShardedArray(fs, root, spec, self.committed_rows(spec.per), self.path,
                                          self.manifest.store_id)
                       for name, spec in self.specs.items()}

    def committed_rows(self, per: str) -> int:
        return self.n_tokens if per == "token" else self.n_instances

    def read_raw(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows of any array in its storage dtype (activations in bf16 stores: uint16 bit patterns)."""
        array = self.arrays[name]
        return array.read_rows(start, array.n_rows if stop is None else stop)

    def read_acts(self, layer: int, start: int, stop: int, site: str = DEFAULT_SITE) -> torch.Tensor:
        raw = self.read_raw(layer_array_name(layer, site), start, stop)
        return acts_from_storage(raw, self.manifest.identity.dtype)

    def read_acts_as_stored(self, layer: int, start: int, stop: int, site: str = DEFAULT_SITE) -> torch.Tensor:
        """Rows in the store's dtype (bf16 stays bf16: half the bytes of float32 to shuffle and to transfer)."""
        return acts_as_stored(self.read_raw(layer_array_name(layer, site), start, stop), self.manifest.identity.dtype)

    def chunk_bounds(self, chunk_index: int) -> tuple[int, int]:
        start = chunk_index * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.n_tokens)

    def read_acts_chunk_raw(self, layer: int, chunk_index: int, site: str = DEFAULT_SITE) -> np.ndarray:
        """One chunk of activations as stored (read-only; the unit the training stream shuffles)."""
        return self.arrays[layer_array_name(layer, site)].read_chunk(chunk_index)

    def read_acts_chunk(self, layer: int, chunk_index: int, site: str = DEFAULT_SITE) -> torch.Tensor:
        return acts_from_storage(self.read_acts_chunk_raw(layer, chunk_index, site), self.manifest.identity.dtype)

    def read_acts_chunk_as_stored(self, layer: int, chunk_index: int, site: str = DEFAULT_SITE) -> torch.Tensor:
        return acts_as_stored(self.read_acts_chunk_raw(layer, chunk_index, site), self.manifest.identity.dtype)

    def read_column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.read_raw(name, start, stop)


def check_cheaply(reader: StoreReader) -> None:
    """Refuse a store whose arrays disagree with its manifest or whose shard files are missing or short,
    before a command spends any time on it (checksums are checked as chunks are read)."""
    problems = list(length_problems(reader))
    if not any(problem.what in ("missing", "damaged") and problem.chunks is None for problem in problems):
        problems += shard_file_problems(reader)
    if problems:
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise UserError(f"store {reader.path}: {problems[0].line()}{more} (`instructsae verify {reader.path}` "
                        f"lists every problem)")


def open_store(path: str | Path) -> StoreReader:
    if not location_exists(path):
        raise UserError(f"store not found: {path}")
    if not is_store(path):
        raise UserError(f"not an instructsae store (no zarr group with a manifest): {path}")
    manifest = read_manifest(path)
    if manifest.part_tokens is not None:  # written by several ranks: its parts, each checked so, read as one store
        from instructsae.store.parts import PartsReader

        return PartsReader(path, manifest)
    reader = StoreReader(path)
    check_cheaply(reader)
    return reader


def open_complete_store(path: str | Path, allow_nonfinite: bool = False) -> StoreReader:
    """A store whose extraction finished: what training and evaluation may read."""
    reader = open_store(path)
    if not reader.manifest.complete:
        raise UserError(f"store {path} is incomplete: rerun its extract to finish it")
    bad = {layer: stats.nonfinite for layer, stats in reader.manifest.layer_stats.items() if stats.nonfinite}
    if bad and not allow_nonfinite:
        layer, count = next(iter(bad.items()))
        raise UserError(f"store {path} holds {count:,} NaN/inf activations at layer {layer} (kept by "
                        f"--keep-nonfinite): training or evaluating on them gives NaN")
    return reader
