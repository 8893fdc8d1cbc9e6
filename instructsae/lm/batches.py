"""Token sequences into padded forward batches: who goes with whom, and how big a batch is."""

from collections.abc import Sequence

import numpy as np
import torch


def batch_budget(batch_tokens: int | None, device: str) -> int:
    """Padded tokens per forward pass. On 2 CPU cores only small batches keep up (BENCHMARKS.md)."""
    if batch_tokens is not None:
        return batch_tokens
    return 1024 if device == "cpu" else 16384


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices batched longest first so padding stays small: a batch's padded size is at most batch_tokens
    (a single sequence longer than that runs alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        # the first (longest) member of the current batch sets its padded length
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def padded_batch(sequences: Sequence, batch: list[int], pad_id: int) -> torch.Tensor:
    """[len(batch), longest] token ids of sequences[i].token_ids for i in batch, right-padded."""
    lengths = [len(sequences[index].token_ids) for index in batch]
    input_ids_BS = torch.full((len(batch), max(lengths)), pad_id, dtype=torch.long)
    for row, index in enumerate(batch):
        input_ids_BS[row, : lengths[row]] = torch.from_numpy(sequences[index].token_ids.astype(np.int64))
    return input_ids_BS
