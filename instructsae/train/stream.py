"""Shuffled activations from a store: chunk order, prefetching, and the FAST mixing buffer. Model-free.

Every row travels with its id (its index in the store), so the whole position of a stream (where the reader
is, what the buffer holds, what it is about to hand out) checkpoints as a few MB of ids instead of GBs of
activations, and a resumed stream hands out exactly the batches the uninterrupted one would have.
"""

import itertools
import time
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
    """Fill to capacity, shuffle, hand out half as batches, refill (the FAST paper's mixing buffer).

    Tokens of one chunk are neighbours in a dialogue; mixing many chunks decorrelates a batch.
    """

    def __init__(self, capacity_tokens: int, batch_size: int, generator: torch.Generator):
        self.capacity = max(capacity_tokens, 2 * batch_size)
        self.batch_size = batch_size
        self.generator = generator
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, ids) waiting to be mixed
        self.size = 0
        # rows already shuffled out, handed out batch by batch: pool[order[cursor:]]
        self.pool, self.pool_ids = torch.empty(0), torch.empty(0, dtype=torch.long)
        self.order, self.cursor = torch.empty(0, dtype=torch.long), 0

    def add(self, rows_N: torch.Tensor, ids_N: torch.Tensor) -> None:
        self.parts.append((rows_N, ids_N))
        self.size += len(rows_N)

    def is_full(self) -> bool:
        return self.size >= self.capacity

    def shuffle_out(self, everything: bool = False) -> None:
        """Mix all rows and set aside half of them (whole batches), or all of them at an epoch's end."""
        pool = torch.cat([rows for rows, _ in self.parts]) if len(self.parts) > 1 else self.parts[0][0]
        pool_ids = torch.cat([ids for _, ids in self.parts]) if len(self.parts) > 1 else self.parts[0][1]
        order = torch.randperm(len(pool), generator=self.generator)
        n_out = len(pool) if everything else len(pool) // 2 // self.batch_size * self.batch_size
        kept = order[n_out:]
        self.parts = [(pool[kept], pool_ids[kept])] if len(kept) else []
        self.size = len(kept)
        self.pool, self.pool_ids, self.order, self.cursor = pool, pool_ids, order[:n_out], 0

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The next batch of shuffled rows (short only at an epoch's end), or None when none is set aside."""
        if self.cursor >= len(self.order):
            return None
        # Each batch is gathered into its own small tensor: SAE steps on slices of one big shuffled pool
        # ran measurably slower on CPU (bench/train_stream.py).
        picked = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += len(picked)
        return self.pool[picked], self.pool_ids[picked]

    def state_ids(self) -> dict:
        waiting = torch.cat([ids for _, ids in self.parts]) if self.parts else torch.empty(0, dtype=torch.long)
        return {"waiting_ids": waiting, "pending_ids": self.pool_ids[self.order[self.cursor:]],
                "generator": self.generator.get_state()}

    def restore(self, waiting: tuple[torch.Tensor, torch.Tensor], pending: tuple[torch.Tensor, torch.Tensor],
                generator_state: torch.Tensor) -> None:
        self.parts = [waiting] if len(waiting[0]) else []
        self.size = len(waiting[0])
        self.pool, self.pool_ids = pending
        self.order, self.cursor = torch.arange(len(pending[0])), 0
        self.generator.set_state(generator_state)


def prefetch_depth(buffer_tokens: int, chunk_tokens: int) -> int:
    """Chunks to read ahead: half a buffer, what the next refill takes."""
    return max(2, -(-buffer_tokens // 2 // max(chunk_tokens, 1)))


class ShuffledStream:
    """Batches of shuffled rows over as many epochs as `max_tokens` needs (one epoch when None).

    Each epoch reads every chunk once in a seeded order, mixes the rows in the buffer and empties the buffer
    at its end, so every row is handed out once per epoch. Rows are `read_chunk(i)[j]` with id
    i·chunk_tokens + j. Chunks are read ahead up to `prefetch_chunks` (0: no reader thread), across epochs.
    """

    def __init__(self, read_chunk: Callable[[int], torch.Tensor], chunk_ids: Iterable[int], chunk_tokens: int,
                 batch_size: int, buffer_tokens: int, seed: int, max_tokens: int | None = None,
                 prefetch_chunks: int = 2):
        self.read_chunk, self.chunk_ids, self.chunk_tokens = read_chunk, np.asarray(chunk_ids), chunk_tokens
        self.seed, self.max_tokens, self.prefetch_chunks = seed, max_tokens, prefetch_chunks
        self.buffer = MixingBuffer(buffer_tokens, batch_size, torch.Generator().manual_seed(seed))
        self.epoch, self.cursor, self.tokens_seen = 0, 0, 0  # cursor: chunks of this epoch taken in
        self.seconds = 0.0  # spent reading and shuffling, for the benchmarks
        self._chunks: Iterator | None = None

    def _chunk_source(self, first_epoch: int, first_cursor: int) -> Iterator:
        """(epoch, cursor after it, rows, ids) per chunk, and (epoch, None, None, None) at each epoch's end."""
        epochs = itertools.count(first_epoch) if self.max_tokens is not None else range(first_epoch, 1)
        for epoch in epochs:
            order = self.chunk_ids[chunk_order(len(self.chunk_ids), self.seed, epoch)]
            for cursor in range(first_cursor if epoch == first_epoch else 0, len(order)):
                index = int(order[cursor])
                rows = self.read_chunk(index)
                yield epoch, cursor + 1, rows, torch.arange(len(rows)) + index * self.chunk_tokens
            yield epoch, None, None, None

    def next_batch(self) -> torch.Tensor | None:
        """The next batch, or None when the budget (or the one epoch) is spent."""
        started = time.perf_counter()
        try:
            return self._next_batch()
        finally:
            self.seconds += time.perf_counter() - started

    def _next_batch(self) -> torch.Tensor | None:
        if self.max_tokens is not None and self.tokens_seen >= self.max_tokens or len(self.chunk_ids) == 0:
            return None
        if self._chunks is None:
            self._chunks = prefetch(self._chunk_source(self.epoch, self.cursor), depth=self.prefetch_chunks)
        while (taken := self.buffer.take()) is None:
            if self.buffer.is_full():
                self.buffer.shuffle_out()
                continue
            item = next(self._chunks, None)
            if item is None:  # the one epoch is over
                return None
            epoch, cursor, rows, ids = item
            if rows is None:  # an epoch's end: hand out what is left, then go on to the next epoch
                self.epoch, self.cursor = epoch + 1, 0
                if self.buffer.size:
                    self.buffer.shuffle_out(everything=True)
                continue
            self.epoch, self.cursor = epoch, cursor
            self.buffer.add(rows, ids)
        batch = taken[0]
        if self.max_tokens is not None:
            batch = batch[: self.max_tokens - self.tokens_seen]
        self.tokens_seen += len(batch)
        return batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        try:
            while (batch := self.next_batch()) is not None:
                yield batch
        finally:
            self.close()

    def close(self) -> None:
        if self._chunks is not None:
            self._chunks.close()  # stops the reader thread
            self._chunks = None

    def state_dict(self) -> dict:
        """Where the stream is, as ids: enough to hand out exactly the same batches after a restart."""
        return {"epoch": self.epoch, "cursor": self.cursor, "tokens_seen": self.tokens_seen,
                **self.buffer.state_ids()}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.epoch, self.cursor, self.tokens_seen = state["epoch"], state["cursor"], state["tokens_seen"]
        self.buffer.restore(self.rows_for(state["waiting_ids"]), self.rows_for(state["pending_ids"]),
                            state["generator"])

    def rows_for(self, ids_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows with these ids, in this order, read chunk by chunk."""
        if len(ids_N) == 0:
            return torch.empty(0), ids_N
        chunk_N = ids_N // self.chunk_tokens
        rows = None
        for index in torch.unique(chunk_N).tolist():
            mask_N = chunk_N == index
            chunk = self.read_chunk(index)
            if rows is None:
                rows = chunk.new_empty((len(ids_N), *chunk.shape[1:]))
            rows[mask_N] = chunk[ids_N[mask_N] - index * self.chunk_tokens]
        return rows, ids_N
