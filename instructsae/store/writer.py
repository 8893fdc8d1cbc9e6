"""Appends whole groups of instances to a store and commits the manifest after each; resume cuts the rest."""

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from instructsae.schemas.manifest import MANIFEST_KEY, StoreManifest
from instructsae.store.layout import ACTS_ZARR_DTYPE, INSTANCE_COLUMNS, TOKEN_COLUMNS, TokenBlock, layer_array_name
from instructsae.store.location import zarr_location


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
