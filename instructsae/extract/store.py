"""The activation store: a zarr v3 group. Writer (append whole groups, commit, resume) and reader.

Layout (one row per stored token unless noted):
  acts/layer_{L}     (n_tokens, d_model)  bf16 kept as a uint16 view (zarr has no bfloat16), fp16 or fp32
  token_id           (n_tokens,)          int32
  instance           (n_tokens,)          int32    index of the sequence the model ran
  position           (n_tokens,)          int32    position in that sequence
  role               (n_tokens,)          uint8    code from schemas.manifest.ROLES
  instance_start     (n_instances,)       int64    row of the instance's first stored token
  instance_length    (n_instances,)       int32    stored tokens of the instance
  instance_source    (n_instances,)       int64    dataset row of the instance (its first token's, in BT)
The manifest in the group attributes is the commit record: rows beyond its counts are uncommitted
and are cut off on resume, so a killed extraction loses and duplicates nothing.

A store lives at a local path or any fsspec URL (`file://`, `memory://`, `s3://` with s3fs installed, ...).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import torch
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import ZstdCodec

from instructsae.errors import UserError
from instructsae.schemas.manifest import MANIFEST_KEY, StoreManifest

TOKEN_COLUMNS = {"token_id": np.int32, "instance": np.int32, "position": np.int32, "role": np.uint8}
INSTANCE_COLUMNS = {"instance_start": np.int64, "instance_length": np.int32, "instance_source": np.int64}
# Activations barely compress (zstd saves ~10% for a lot of CPU), so they are stored raw.
ACTS_ZARR_DTYPE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
TARGET_CHUNK_BYTES = 4 * 2**20


def default_chunk_tokens(d_model: int, dtype: str) -> int:
    """Chunks of ~4 MB (zarr's advice: at least ~1 MB), a power of two of tokens."""
    bytes_per_token = d_model * np.dtype(ACTS_ZARR_DTYPE[dtype]).itemsize
    return max(256, 2 ** int(math.log2(max(TARGET_CHUNK_BYTES // bytes_per_token, 1))))


def acts_to_storage(acts_ND: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return acts_ND.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return acts_ND.to(getattr(torch, dtype)).cpu().numpy()


def acts_from_storage(raw: np.ndarray, dtype: str) -> torch.Tensor:
    return acts_as_stored(raw, dtype).float()


def acts_as_stored(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """The stored values as a tensor of the store's dtype, without a copy (bf16: the uint16 view reinterpreted)."""
    if dtype == "bfloat16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(raw)


def layer_array_name(layer: int) -> str:
    return f"acts/layer_{layer}"


@dataclass
class TokenBlock:
    """A committed unit of writing: whole instances, in order, with their activations per layer."""

    acts: dict[int, np.ndarray]  # layer -> (n, d_model), already in storage dtype
    token_id: np.ndarray
    instance: np.ndarray
    position: np.ndarray
    role: np.ndarray
    instance_start: np.ndarray
    instance_length: np.ndarray
    instance_source: np.ndarray

    @property
    def n_tokens(self) -> int:
        return len(self.token_id)


def _filesystem(path: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system a store lives on and its path there (local paths and file:// URLs: the local disk)."""
    try:
        return fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError) as error:  # an unknown protocol, or one whose package is missing
        raise UserError(f"cannot open store location {path}: {str(error).splitlines()[0]}") from None


def zarr_location(path: str | Path) -> str:
    """What zarr opens: a plain path on the local disk (zarr's own LocalStore), the URL anywhere else."""
    fs, root = _filesystem(path)
    return root if isinstance(fs, LocalFileSystem) else str(path)


def location_exists(path: str | Path) -> bool:
    fs, root = _filesystem(path)
    return fs.exists(root)


def location_is_occupied(path: str | Path) -> bool:
    """Something is there: a file, or a folder with anything in it."""
    fs, root = _filesystem(path)
    return fs.exists(root) and (not fs.isdir(root) or bool(fs.ls(root)))


def is_store(path: str | Path) -> bool:
    try:
        group = zarr.open_group(zarr_location(path), mode="r")
    except Exception:
        return False
    return MANIFEST_KEY in group.attrs


def read_manifest(path: str | Path) -> StoreManifest:
    group = zarr.open_group(zarr_location(path), mode="r")
    return StoreManifest.model_validate(group.attrs[MANIFEST_KEY])


def remove_store(path: str | Path) -> None:
    fs, root = _filesystem(path)
    if fs.exists(root):
        fs.rm(root, recursive=True)


class StoreWriter:
    """Appends TokenBlocks and commits the manifest after each; `resume` cuts uncommitted rows."""

    def __init__(self, group: zarr.Group, manifest: StoreManifest):
        self.group = group
        self.manifest = manifest

    @classmethod
    def create(cls, path: str | Path, manifest: StoreManifest) -> "StoreWriter":
        identity = manifest.identity
        group = zarr.open_group(zarr_location(path), mode="w", zarr_format=3)
        for layer in identity.layers:
            group.create_array(
                layer_array_name(layer), shape=(0, identity.d_model), dtype=ACTS_ZARR_DTYPE[identity.dtype],
                chunks=(identity.chunk_tokens, identity.d_model), compressors=None, fill_value=0,
            )
        for name, dtype in TOKEN_COLUMNS.items():
            group.create_array(name, shape=(0,), dtype=dtype, chunks=(identity.chunk_tokens * 16,),
                               compressors=ZstdCodec(level=3), fill_value=0)
        for name, dtype in INSTANCE_COLUMNS.items():
            group.create_array(name, shape=(0,), dtype=dtype, chunks=(65536,),
                               compressors=ZstdCodec(level=3), fill_value=0)
        writer = cls(group, manifest)
        writer.commit(manifest)
        return writer

    @classmethod
    def resume(cls, path: str | Path) -> "StoreWriter":
        group = zarr.open_group(zarr_location(path), mode="r+")
        manifest = StoreManifest.model_validate(group.attrs[MANIFEST_KEY])
        writer = cls(group, manifest)
        writer._truncate_to(manifest.n_tokens, manifest.n_instances)
        return writer

    def _truncate_to(self, n_tokens: int, n_instances: int) -> None:
        for layer in self.manifest.identity.layers:
            self.group[layer_array_name(layer)].resize((n_tokens, self.manifest.identity.d_model))
        for name in TOKEN_COLUMNS:
            self.group[name].resize((n_tokens,))
        for name in INSTANCE_COLUMNS:
            self.group[name].resize((n_instances,))

    def _append(self, name: str, values: np.ndarray) -> None:
        array = self.group[name]
        start = array.shape[0]
        array.resize((start + values.shape[0], *array.shape[1:]))
        array[start:] = values

    def append(self, block: TokenBlock, manifest: StoreManifest) -> None:
        """Write the block's rows, then commit `manifest` (which already counts them)."""
        for layer, acts in block.acts.items():
            self._append(layer_array_name(layer), acts)
        for name in TOKEN_COLUMNS:
            self._append(name, getattr(block, name))
        for name in INSTANCE_COLUMNS:
            self._append(name, getattr(block, name))
        self.commit(manifest)

    def commit(self, manifest: StoreManifest) -> None:
        self.group.attrs[MANIFEST_KEY] = manifest.model_dump(mode="json")
        self.manifest = manifest


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
        self._arrays: dict[int, zarr.Array] = {}

    def read_acts(self, layer: int, start: int, stop: int) -> torch.Tensor:
        return self.read_acts_as_stored(layer, start, stop).float()

    def read_acts_as_stored(self, layer: int, start: int, stop: int) -> torch.Tensor:
        """Rows in the store's dtype (bf16 stays bf16: half the bytes of float32 to shuffle and to transfer)."""
        stop = min(stop, self.n_tokens)
        if layer not in self._arrays:  # opened once: opening reads and parses the array's metadata
            self._arrays[layer] = self.group[layer_array_name(layer)]
        raw = self._arrays[layer][start:stop]
        return acts_as_stored(np.ascontiguousarray(raw), self.manifest.identity.dtype)

    def chunk_bounds(self, chunk_index: int) -> tuple[int, int]:
        start = chunk_index * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.n_tokens)

    def read_acts_chunk(self, layer: int, chunk_index: int) -> torch.Tensor:
        return self.read_acts(layer, *self.chunk_bounds(chunk_index))

    def read_acts_chunk_as_stored(self, layer: int, chunk_index: int) -> torch.Tensor:
        return self.read_acts_as_stored(layer, *self.chunk_bounds(chunk_index))

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
