"""Shuffled activations from a store: chunk order, prefetching, and the FAST mixing buffer. Model-free."""

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
    """Produce items on a background thread (disk reads release the GIL), so the consumer never waits."""
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
        pool_ND = pool_ND[torch.randperm(len(pool_ND), generator=self.generator)]
        for start in range(0, n_out, self.batch_size):
            yield pool_ND[start:min(start + self.batch_size, n_out)]
        self.parts = [pool_ND[n_out:]] if n_out < len(pool_ND) else []
        self.size = len(pool_ND) - n_out


def iter_epoch(read_chunk: Callable[[int], torch.Tensor], chunk_ids: np.ndarray, batch_size: int,
               buffer_tokens: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One pass: every row of every listed chunk exactly once, in mixed batches."""
    buffer = MixingBuffer(buffer_tokens, batch_size, generator)
    for rows_ND in prefetch(read_chunk(int(index)) for index in chunk_ids):
        yield from buffer.add(rows_ND)
    yield from buffer.flush()


def iter_batches(read_chunk: Callable[[int], torch.Tensor], chunk_ids: list[int] | np.ndarray, batch_size: int,
                 buffer_tokens: int, seed: int, max_tokens: int | None = None) -> Iterator[torch.Tensor]:
    """Batches over as many epochs as max_tokens needs (one epoch when None); full batches except at the end."""
    chunk_ids = np.asarray(chunk_ids)
    generator = torch.Generator().manual_seed(seed)
    seen, epoch = 0, 0
    while True:
        order = chunk_ids[chunk_order(len(chunk_ids), seed, epoch)]
        for batch_ND in iter_epoch(read_chunk, order, batch_size, buffer_tokens, generator):
            if max_tokens is not None:
                batch_ND = batch_ND[: max_tokens - seen]
            seen += len(batch_ND)
            yield batch_ND
            if max_tokens is not None and seen >= max_tokens:
                return
        epoch += 1
        if max_tokens is None or len(chunk_ids) == 0:
            return
