"""The store as training sees it: the (layer, site)s its SAEs read and reconstruct, each scaled to unit mean squared norm, split into training
and held-out chunks."""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from instructsae.errors import UserError
from instructsae.sae import config_class
from instructsae.schemas.sites import DEFAULT_SITE, stats_key
from instructsae.schemas.train import TrainConfig
from instructsae.store.reader import StoreReader, open_complete_store


def choose_layer(cfg: TrainConfig, reader: StoreReader) -> int:
    layers = list(reader.layers)
    layer = layers[0] if cfg.layer is None else cfg.layer
    if layer not in layers:
        raise UserError(f"layer {layer} is not in store {cfg.store} (it has layers {layers})")
    return layer


Slot = tuple[int, str]  # (layer, site): one array of activations of the store


def choose_slots(cfg: TrainConfig, reader: StoreReader) -> tuple[Slot, Slot]:
    """The (layer, site) the dictionary reads and the one it reconstructs: an SAE its own input (resid_post
    unless told), a transcoder mlp_in to mlp_out unless told."""
    layer = choose_layer(cfg, reader)
    transcoder = config_class(cfg.sae).transcoder
    site = cfg.site or ("mlp_in" if transcoder else DEFAULT_SITE)
    target = cfg.target_site or ("mlp_out" if transcoder else site)
    if not transcoder and target != site:
        raise UserError(f"{cfg.sae.arch} reconstructs its own input: target_site {target} differs from site {site} "
                        "(a transcoder, --sae transcoder, reconstructs another site)")
    for wanted in dict.fromkeys((site, target)):
        if (layer, wanted) not in reader.acts_keys:
            needed = ",".join(dict.fromkeys((site, target)))
            raise UserError(f"site {wanted} at layer {layer} is not in store {cfg.store} (it has "
                            f"{', '.join(reader.sites)}): extract with --sites {needed}")
    return (layer, site), (layer, target)


def split_chunks(n_chunks: int, holdout_fraction: float) -> tuple[list[int], list[int]]:
    """The last chunks are held out (whole dialogues, mostly unseen in training); none if only one chunk.

    At least one chunk always stays for training, whatever the fraction."""
    n_holdout = 0 if n_chunks <= 1 else max(1, math.ceil(holdout_fraction * n_chunks)) if holdout_fraction else 0
    n_holdout = min(n_holdout, max(n_chunks - 1, 0))
    return list(range(n_chunks - n_holdout)), list(range(n_chunks - n_holdout, n_chunks))


def store_scale(reader, slot: Slot, store: str) -> float:
    """1/sqrt(E||x||^2): training inputs get unit mean squared norm, so coefficients carry across models."""
    layer, site = slot
    stats = reader.manifest.layer_stats.get(stats_key(layer, site))
    if stats is None or stats.mean_sq_norm <= 0:
        where = f"layer {layer}" if site == DEFAULT_SITE else f"layer {layer} {site}"
        raise UserError(f"store {store} has no normalisation statistics for {where}: re-extract it")
    return 1.0 / math.sqrt(stats.mean_sq_norm)


@dataclass
class StoreView:
    """The store as training sees it: chosen (layer, site) slots, each scaled to unit mean squared norm, split
    into chunks."""

    reader: StoreReader
    slots: list[Slot]
    scales: dict[Slot, float]
    train_chunks: list[int]
    holdout_chunks: list[int]

    def read_chunk(self, index: int) -> torch.Tensor:
        """[rows, d_model] with one slot, [rows, slots, d_model] with several, in the store's dtype, unscaled."""
        parts = [self.reader.read_acts_chunk_as_stored(layer, index, site) for layer, site in self.slots]
        return parts[0] if len(parts) == 1 else torch.stack(parts, dim=1)

    def on_device(self, batches: Iterator[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
        """Each batch copied to the device as stored (bf16: half the bytes), then made float32 and scaled there.

        The same float32 values, bit for bit, as converting and scaling on the CPU before the copy."""
        scale = self.scales[self.slots[0]] if len(self.slots) == 1 else \
            torch.tensor([self.scales[slot] for slot in self.slots], device=device)[:, None]
        for batch in batches:
            yield batch.to(device, non_blocking=True).float() * scale

    def train_tokens(self) -> int:
        return sum(stop - start for start, stop in map(self.reader.chunk_bounds, self.train_chunks))


def open_view(configs: list[TrainConfig]) -> tuple[StoreView, list[tuple[Slot, Slot]]]:
    """The common store of SAEs trained together, and the (input, target) slots of each."""
    first = configs[0]
    reader = open_complete_store(first.store)
    if reader.n_tokens == 0:
        raise UserError(f"store {first.store} holds no tokens")
    member_slots = [choose_slots(cfg, reader) for cfg in configs]
    slots = sorted({slot for pair in member_slots for slot in pair})
    scales = {slot: store_scale(reader, slot, first.store) for slot in slots}
    return StoreView(reader, slots, scales, *split_chunks(reader.n_chunks, first.holdout_fraction)), member_slots
