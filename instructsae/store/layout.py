"""What a store holds: array names, their dtypes and chunking, and the storage dtype of activations."""

import math
from dataclasses import dataclass

import numpy as np
import torch

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
    if dtype == "bfloat16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(raw).float()


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
