"""What a store holds: array names, their dtypes and chunking, and the storage dtype of activations."""

import math
from dataclasses import dataclass

import numpy as np
import torch

from instructsae.schemas.manifest import ROLES
from instructsae.schemas.sites import DEFAULT_SITE

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
    """float32 activations from stored ones (which may be a read-only view of the bytes read)."""
    if dtype == "bfloat16":  # a bf16 is the high half of the float32 with the same bits
        wide = raw.astype(np.uint32)
        wide <<= 16
        return torch.from_numpy(wide.view(np.float32))
    return torch.from_numpy(raw.astype(np.float32))


ACTS_PREFIX = "acts/layer_"


def acts_as_stored(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """The stored values as a tensor of the store's dtype (bf16: the uint16 view reinterpreted, no widening)."""
    if not raw.flags.writeable:  # torch wants writable memory; chunks read may be views of the bytes read
        raw = raw.copy()
    if dtype == "bfloat16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(raw)


def layer_array_name(layer: int, site: str = DEFAULT_SITE) -> str:
    """acts/layer_15 for resid_post (the name stores had before sites), acts/layer_15_mlp_out for the others."""
    return f"{ACTS_PREFIX}{layer}" if site == DEFAULT_SITE else f"{ACTS_PREFIX}{layer}_{site}"


def acts_key_of(name: str) -> tuple[int, str]:
    """(layer, site) of an activation array's name."""
    layer, _, site = name.removeprefix(ACTS_PREFIX).partition("_")
    return int(layer), site or DEFAULT_SITE


@dataclass
class TokenBlock:
    """A committed unit of writing: whole instances, in order, with their activations per layer."""

    acts: dict[tuple[int, str], np.ndarray]  # (layer, site) -> (n, d_model), already in storage dtype
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

    def column(self, name: str) -> np.ndarray:
        """The block's rows for the store array `name`."""
        if name.startswith(ACTS_PREFIX):
            return self.acts[acts_key_of(name)]
        return getattr(self, name)



DEFAULT_SHARD_MB = 512.0
# Token columns (13 bytes a token against 2 x d_model for bf16 activations) share the activations' shards,
# row for row, so a shard of every token-row array is written once, whole, at the same commit; their inner
# chunks hold up to 16 activation chunks of rows. Instance columns are shorter still (one row an instance).
COLUMN_CHUNKS_PER_CHUNK = 16
INSTANCE_CHUNK_ROWS = 65536
INSTANCE_SHARD_ROWS = 4 * INSTANCE_CHUNK_ROWS


def default_shard_tokens(d_model: int, dtype: str, chunk_tokens: int, shard_mb: float = DEFAULT_SHARD_MB) -> int:
    """Tokens per shard: whole chunks adding up to about `shard_mb` MB of activations (a multiple of 16 chunks
    when there are that many, so the token columns' bigger chunks tile it too), at least one chunk."""
    bytes_per_token = d_model * np.dtype(ACTS_ZARR_DTYPE[dtype]).itemsize
    chunks = int(shard_mb * 2**20 // (bytes_per_token * chunk_tokens))
    if chunks >= COLUMN_CHUNKS_PER_CHUNK:
        chunks -= chunks % COLUMN_CHUNKS_PER_CHUNK
    return max(1, chunks) * chunk_tokens


def column_chunk_rows(chunk_tokens: int, shard_tokens: int) -> int:
    """Rows of a token column's inner chunk: up to 16 activation chunks, tiling the shard exactly."""
    chunks_per_shard = shard_tokens // chunk_tokens
    return chunk_tokens * math.gcd(COLUMN_CHUNKS_PER_CHUNK, chunks_per_shard)


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store: rows of `row_shape` values, inner chunks and shards of whole rows."""

    name: str
    dtype: type
    row_shape: tuple[int, ...]
    chunk_rows: int
    shard_rows: int
    compressed: bool
    per: str  # "token" or "instance": which count of the manifest is its length

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * np.dtype(self.dtype).itemsize


def array_specs(identity) -> list[ArraySpec]:
    """Every array of a store with this identity (a StoreIdentity), activations first."""
    chunk, shard = identity.chunk_tokens, identity.shard_tokens
    specs = [ArraySpec(layer_array_name(layer, site), ACTS_ZARR_DTYPE[identity.dtype], (identity.d_model,), chunk,
                       shard, False, "token") for layer, site in identity.acts_keys]
    specs += [ArraySpec(name, dtype, (), column_chunk_rows(chunk, shard), shard, True, "token")
              for name, dtype in TOKEN_COLUMNS.items()]
    specs += [ArraySpec(name, dtype, (), INSTANCE_CHUNK_ROWS, INSTANCE_SHARD_ROWS, True, "instance")
              for name, dtype in INSTANCE_COLUMNS.items()]
    return specs


def array_attributes(spec: ArraySpec, identity) -> dict:
    """What an array says about itself, for any zarr reader: activations name their real dtype (bf16 is
    stored as its uint16 bit pattern, zarr having no bfloat16), layer, hook site and width."""
    if spec.name == "role":  # the codes' names, so a plain zarr reader can tell reasoning from the answer
        return {"rows": "one per stored token", "codes": {str(code): name for code, name in enumerate(ROLES)}}
    if not spec.name.startswith(ACTS_PREFIX):
        return {"rows": f"one per stored {spec.per}"}
    layer, site = acts_key_of(spec.name)
    return {"dtype": identity.dtype, "layer": layer, "hook_site": site, "d_model": identity.d_model,
            "model": identity.model,
            "rows": "one per stored token"}


def count_nonfinite(raw: np.ndarray, dtype: str) -> int:
    """NaN and inf values among activations in their storage dtype."""
    if dtype == "bfloat16":  # all exponent bits set: inf or NaN
        return int(np.count_nonzero((raw & 0x7F80) == 0x7F80))
    return int(raw.size - np.count_nonzero(np.isfinite(raw)))
