"""The store as training sees it: the layers its SAEs read, scaled to unit mean squared norm, split into training
and held-out chunks."""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from instructsae.errors import UserError
from instructsae.schemas.train import TrainConfig
from instructsae.store.reader import StoreReader, open_complete_store


def choose_layer(cfg: TrainConfig, reader: StoreReader) -> int:
    layers = list(reader.layers)
    layer = layers[0] if cfg.layer is None else cfg.layer
    if layer not in layers:
        raise UserError(f"layer {layer} is not in store {cfg.store} (it has layers {layers})")
    return layer


def split_chunks(n_chunks: int, holdout_fraction: float) -> tuple[list[int], list[int]]:
    """The last chunks are held out (whole dialogues, mostly unseen in training); none if only one chunk.

    At least one chunk always stays for training, whatever the fraction."""
    n_holdout = 0 if n_chunks <= 1 else max(1, math.ceil(holdout_fraction * n_chunks)) if holdout_fraction else 0
    n_holdout = min(n_holdout, max(n_chunks - 1, 0))
    return list(range(n_chunks - n_holdout)), list(range(n_chunks - n_holdout, n_chunks))


def store_scale(reader, layer: int, store: str) -> float:
    """1/sqrt(E||x||^2): training inputs get unit mean squared norm, so coefficients carry across models."""
    stats = reader.manifest.layer_stats.get(str(layer))
    if stats is None or stats.mean_sq_norm <= 0:
        raise UserError(f"store {store} has no normalisation statistics for layer {layer}: re-extract it")
    return 1.0 / math.sqrt(stats.mean_sq_norm)


@dataclass
class StoreView:
    """The store as training sees it: chosen layers, scaled to unit mean squared norm, split into chunks."""

    reader: StoreReader
    layers: list[int]
    scales: dict[int, float]
    train_chunks: list[int]
    holdout_chunks: list[int]

    def read_chunk(self, index: int) -> torch.Tensor:
        """[rows, d_model] with one layer, [rows, layers, d_model] with several, in the store's dtype, unscaled."""
        parts = [self.reader.read_acts_chunk_as_stored(layer, index) for layer in self.layers]
        return parts[0] if len(parts) == 1 else torch.stack(parts, dim=1)

    def on_device(self, batches: Iterator[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
        """Each batch copied to the device as stored (bf16: half the bytes), then made float32 and scaled there.

        The same float32 values, bit for bit, as converting and scaling on the CPU before the copy."""
        scale = self.scales[self.layers[0]] if len(self.layers) == 1 else \
            torch.tensor([self.scales[layer] for layer in self.layers], device=device)[:, None]
        for batch in batches:
            yield batch.to(device, non_blocking=True).float() * scale

    def train_tokens(self) -> int:
        return sum(stop - start for start, stop in map(self.reader.chunk_bounds, self.train_chunks))


def open_view(configs: list[TrainConfig]) -> tuple[StoreView, list[int]]:
    """The common store of SAEs trained together, and the layer each of them reads."""
    first = configs[0]
    reader = open_complete_store(first.store)
    if reader.n_tokens == 0:
        raise UserError(f"store {first.store} holds no tokens")
    member_layers = [choose_layer(cfg, reader) for cfg in configs]
    layers = sorted(set(member_layers))
    scales = {layer: store_scale(reader, layer, first.store) for layer in layers}
    return StoreView(reader, layers, scales, *split_chunks(reader.n_chunks, first.holdout_fraction)), member_layers
