"""Activations computed elsewhere (a tensor, or an iterator of tensors) written as a store, so that training on
them is training on a store: the same stream, normalisation, held-out chunks, checkpoints and export.

Each tensor of the iterator is one sequence (rows are tokens, in order); there are no token ids (-1) and every
row has the role "text". The store's identity names the data by the sha256 of the activations' bytes. NaN or
inf values are refused (an SAE trained on one has NaN weights), and the store is written holding its writer
lock, as extract writes one.
"""

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from instructsae import __version__
from instructsae.errors import UserError
from instructsae.locks import writer_lock
from instructsae.schemas.manifest import ROLE_CODE, LayerStats, StoreIdentity, StoreManifest
from instructsae.schemas.sites import DEFAULT_SITE
from instructsae.store.layout import TokenBlock, acts_to_storage, default_chunk_tokens, default_shard_tokens
from instructsae.store.location import location_is_occupied, remove_store
from instructsae.store.writer import StoreWriter

SOURCE = "in-memory activations"


def _batches(activations: torch.Tensor | Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """[rows, d_model] float32 CPU tensors; a 2-D tensor is one batch."""
    if isinstance(activations, torch.Tensor):
        activations = [activations]
    for index, batch in enumerate(activations):
        if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or len(batch) == 0:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise UserError(f"activations: item {index} is {shape}, not a non-empty [tokens, d_model] tensor")
        batch = batch.detach().float().cpu()
        bad = int((~torch.isfinite(batch)).sum())
        if bad:
            raise UserError(f"activations: item {index} holds {bad:,} NaN/inf values; an SAE trained on them "
                            "would have NaN weights")
        yield batch


def write_activation_store(activations: torch.Tensor | Iterable[torch.Tensor], out: str, layer: int = 0,
                           max_tokens: int | None = None, dtype: str = "float32") -> StoreManifest:
    """Write the activations (at most max_tokens rows) to a new store at `out`, labelled as `layer`."""
    with writer_lock(out, "store"):
        return _write(activations, out, layer, max_tokens, dtype)


def _write(activations, out: str, layer: int, max_tokens: int | None, dtype: str) -> StoreManifest:
    if location_is_occupied(out):
        raise UserError(f"store location for the activations is not empty: {out}")
    batches = _batches(activations)
    first = next(batches, None)
    if first is None:
        raise UserError("activations: nothing to train on (an empty iterator)")
    d_model = first.shape[1]
    chunk_tokens = default_chunk_tokens(d_model, dtype)
    identity = StoreIdentity(
        model=SOURCE, tokenizer=SOURCE, chat_template_sha256=None, dataset=SOURCE, dataset_sha256="", split="",
        mode="fast", max_len=0, block_len=0, max_instances=None, skip_instances=0, max_tokens=max_tokens,
        keep_first_token=True, layers=(layer,), d_model=d_model, dtype=dtype, model_dtype="float32",
        chunk_tokens=chunk_tokens, shard_tokens=default_shard_tokens(d_model, dtype, chunk_tokens))
    manifest = StoreManifest(tool_version=__version__, identity=identity, fingerprint="", n_tokens=0,
                             n_truncated=0, tokens_truncated=0)  # nothing is cut: the tensors are stored whole
    writer = StoreWriter.create(out, manifest)
    digest = hashlib.sha256()
    try:
        for batch in _chained(first, batches):
            if batch.shape[1] != d_model:
                raise UserError(f"activations: a batch of width {batch.shape[1]} after batches of {d_model}")
            if max_tokens is not None:
                batch = batch[: max_tokens - manifest.n_tokens]
            block, stats = _block(batch, manifest, layer, dtype)
            digest.update(block.acts[(layer, DEFAULT_SITE)].tobytes())
            manifest = _advanced(manifest, block, stats, layer)
            writer.append(block, manifest)
            if max_tokens is not None and manifest.n_tokens >= max_tokens:
                break
        # the identity names the data by its bytes, so equal activations give equal fingerprints
        identity = identity.model_copy(update={"dataset_sha256": digest.hexdigest()})
        manifest = manifest.model_copy(update={"identity": identity, "fingerprint": identity.fingerprint(),
                                               "complete": True})
        writer.finish(manifest)  # the last, partial shards, then the final record
    except BaseException:
        remove_store(out)
        raise
    return manifest


def _chained(first: torch.Tensor, rest: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield first
    yield from rest


def _block(batch_ND: torch.Tensor, manifest: StoreManifest, layer: int, dtype: str) -> tuple[TokenBlock, tuple]:
    n = len(batch_ND)
    squared_N = batch_ND.pow(2).sum(-1, dtype=torch.float64)
    block = TokenBlock(
        acts={(layer, DEFAULT_SITE): acts_to_storage(batch_ND, dtype)}, token_id=np.full(n, -1, dtype=np.int32),
        instance=np.full(n, manifest.n_instances, dtype=np.int32), position=np.arange(n, dtype=np.int32),
        role=np.full(n, ROLE_CODE["text"], dtype=np.uint8),
        instance_start=np.array([manifest.n_tokens], dtype=np.int64), instance_length=np.array([n], dtype=np.int32),
        instance_source=np.array([manifest.n_instances], dtype=np.int64))
    return block, (n, float(squared_N.sum()), float(squared_N.sqrt().sum()))  # finite: _batches refused the rest


def _advanced(manifest: StoreManifest, block: TokenBlock, stats: tuple, layer: int) -> StoreManifest:
    previous = manifest.layer_stats.get(str(layer), LayerStats())
    return manifest.model_copy(update={
        "n_tokens": manifest.n_tokens + block.n_tokens, "n_instances": manifest.n_instances + 1,
        "layer_stats": {str(layer): previous.add(*stats)}})
