"""Shuffled activations from a store: chunk order, prefetching, and the FAST mixing buffer. Model-free."""

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch


def chunk_order(n_chunks: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded permutation: every chunk once per epoch, a new order each epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n_chunks)


_END = object()


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Produce items on a background thread (disk reads release the GIL), so the consumer never waits.

    depth 0: no thread, items are produced on the consumer's thread when it asks.
    """
    if depth == 0:
        yield from items
        return
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(item) -> bool:
        # a plain put would block forever on a full queue once the consumer has stopped early
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand_over(item):
                    return
            hand_over(_END)
        except BaseException as error:  # handed to the consumer, raised there
            hand_over(error)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class MixingBuffer:
    """Fill to capacity, shuffle, hand out half as batches, refill (the seed paper's mixing buffer).

    Tokens of one chunk are neighbours in a dialogue; mixing many chunks decorrelates a batch.
    """

    def __init__(self, capacity_tokens: int, batch_size: int, generator: torch.Generator):
        self.capacity = max(capacity_tokens, 2 * batch_size)
        self.batch_size = batch_size
        self.generator = generator
        self.parts: list[torch.Tensor] = []
        self.size = 0

    def add(self, rows_ND: torch.Tensor) -> Iterator[torch.Tensor]:
        """Take rows in; yield batches whenever the buffer is full."""
        self.parts.append(rows_ND)
        self.size += len(rows_ND)
        while self.size >= self.capacity:
            # whole batches only, so every batch but an epoch's last is full
            yield from self._hand_out(self.size // 2 // self.batch_size * self.batch_size)

    def flush(self) -> Iterator[torch.Tensor]:
        """Everything left, shuffled; the last batch may be short so each token is seen once per epoch."""
        if self.size:
            yield from self._hand_out(self.size)

    def _hand_out(self, n_out: int) -> Iterator[torch.Tensor]:
        pool_ND = torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0]
        order = torch.randperm(len(pool_ND), generator=self.generator)
        self.parts = [pool_ND[order[n_out:]]] if n_out < len(pool_ND) else []
        self.size = len(pool_ND) - n_out
        # Each batch is gathered into its own small tensor: SAE steps on slices of one big shuffled pool
        # ran measurably slower on CPU (bench/train_stream.py).
        for start in range(0, n_out, self.batch_size):
            yield pool_ND[order[start:min(start + self.batch_size, n_out)]]


def prefetch_depth(buffer_tokens: int, chunk_tokens: int) -> int:
    """Chunks to read ahead: half a buffer, what the next refill takes."""
    return max(2, -(-buffer_tokens // 2 // max(chunk_tokens, 1)))


def iter_epochs(read_chunk: Callable[[int], torch.Tensor], orders: Iterable[np.ndarray], batch_size: int,
                buffer_tokens: int, generator: torch.Generator, prefetch_chunks: int) -> Iterator[torch.Tensor]:
    """Batches for each epoch's chunk order in turn; the buffer is emptied at each epoch's end, so every row
    is handed out once per epoch.

    Chunks are read ahead across epoch boundaries, up to `prefetch_chunks` of them (0: no reader thread):
    half a buffer ahead, the next refill is read while the SAE trains on the batches handed out.
    """
    chunks = ((epoch, read_chunk(int(index))) for epoch, order in enumerate(orders) for index in order)
    buffer, current = MixingBuffer(buffer_tokens, batch_size, generator), 0
    for epoch, rows_ND in prefetch(chunks, depth=prefetch_chunks):
        if epoch != current:
            yield from buffer.flush()
            current = epoch
        yield from buffer.add(rows_ND)
    yield from buffer.flush()


def iter_batches(read_chunk: Callable[[int], torch.Tensor], chunk_ids: list[int] | np.ndarray, batch_size: int,
                 buffer_tokens: int, seed: int, max_tokens: int | None = None,
                 prefetch_chunks: int = 2) -> Iterator[torch.Tensor]:
    """Batches over as many epochs as max_tokens needs (one epoch when None); full batches except at the end."""
    chunk_ids = np.asarray(chunk_ids)
    if len(chunk_ids) == 0:
        return
    generator = torch.Generator().manual_seed(seed)
    n_epochs = 1 if max_tokens is None else None  # None: as many as max_tokens needs
    epoch_numbers = range(n_epochs) if n_epochs else itertools.count()
    orders = (chunk_ids[chunk_order(len(chunk_ids), seed, epoch)] for epoch in epoch_numbers)
    seen = 0
    for batch_ND in iter_epochs(read_chunk, orders, batch_size, buffer_tokens, generator, prefetch_chunks):
        if max_tokens is not None:
            batch_ND = batch_ND[: max_tokens - seen]
        seen += len(batch_ND)
        yield batch_ND
        if max_tokens is not None and seen >= max_tokens:
            return
