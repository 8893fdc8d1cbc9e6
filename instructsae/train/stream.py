"""Shuffled activations from a store: chunk order, prefetching, and the FAST mixing buffer. Model-free.

Every row travels with its id (its index in the store), so the whole position of a stream (where the reader
is, what the buffer holds, what it is about to hand out) checkpoints as a few MB of ids instead of GBs of
activations, and a resumed stream hands out exactly the batches the uninterrupted one would have.
"""

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

T, R = TypeVar("T"), TypeVar("R")

def chunk_order(n_chunks: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded permutation: every chunk once per epoch, a new order each epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n_chunks)


def read_ahead(read: Callable[[T], R], items: Iterable[T], threads: int, depth: int) -> Iterator[R]:
    """read(item) for each item, in order, with up to `depth` reads in flight on a pool of `threads` threads.

    Disk reads and zarr's decoding release the GIL, so a few threads keep the disk busy while the consumer
    mixes. threads 0: no pool, each item is read on the consumer's thread when it asks. A read's error is
    raised to the consumer; closing the iterator early cancels the reads not started and waits for the others.
    """
    if threads == 0:
        yield from map(read, items)
        return
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="stream-read") as pool:
        try:
            for item in items:
                pending.append(pool.submit(read, item))
                if len(pending) > max(depth, 1):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def as_records(rows: torch.Tensor) -> np.ndarray:
    """A contiguous tensor as a numpy vector of its rows, each row one opaque record of bytes (same memory)."""
    n_bytes = rows[0].numel() * rows.element_size() if len(rows) else 1
    return rows.view(torch.uint8).reshape(len(rows), -1).numpy().view(np.dtype((np.void, n_bytes))).reshape(-1)


def hugepage_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in memory numpy allocated: numpy asks the kernel for transparent huge pages on
    large allocations, so random rows of a buffer of hundreds of MB miss the TLB far less. Measured on this
    project's CPU: scattering and gathering 1,152-byte rows took 1.3-1.6x less CPU (bench/stream_cpu.py)."""
    raw = np.empty(math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)


class MixingBuffer:
    """Fill to capacity, shuffle, hand out half as batches, refill (the FAST paper's mixing buffer).

    Tokens of one chunk are neighbours in a dialogue; mixing many chunks decorrelates a batch. Rows stay in
    whatever dtype they come in (the store's: bf16 is half the bytes to move). They are written once into slots
    of one storage tensor and gathered once into their batch: the mixing itself moves only slot numbers (an
    earlier version concatenated and re-gathered the whole buffer at each shuffle, into fresh memory: 4-5 copies
    of each row). A stream's reader threads `place` each chunk's rows into free slots as soon as they have read
    it, while its bytes are still in their CPU cache and beside the consumer's work; the consumer then only
    `add_placed`s their slots (the same batches as `add`). `reserve_tokens` is the storage kept beyond the
    capacity for rows placed and not yet added. With `pin_memory` each batch is gathered into page-locked memory,
    so its copy to a CUDA device can run without blocking.
    """

    def __init__(self, capacity_tokens: int, batch_size: int, generator: torch.Generator,
                 pin_memory: bool = False, reserve_tokens: int = 0):
        self.capacity = max(capacity_tokens, 2 * batch_size)
        self.batch_size = batch_size
        self.generator = generator
        self.pin_memory = pin_memory
        self.reserve = reserve_tokens
        self.rows: torch.Tensor | None = None  # [slots, ...] storage, made at the first rows
        self.ids = torch.empty(0, dtype=torch.long)  # the id of the row in each slot
        self.free = torch.empty(0, dtype=torch.long)  # slots holding no row
        self.freed: list[torch.Tensor] = []  # slots of the batches handed out since, to join `free`
        self.unadded: dict[int, torch.Tensor] = {}  # slots placed and not yet added, by id(slots)
        self.lock = threading.Condition()  # over the slot lists and the storage, against placing threads
        self.writers = 0  # threads writing rows into the storage now; it grows only when none is
        self.waiting: list[torch.Tensor] = []  # slots of the rows waiting to be mixed, in order
        self.size = 0
        # slots set aside by the last shuffle, handed out batch by batch: out[cursor:]
        self.out, self.cursor = torch.empty(0, dtype=torch.long), 0

    def add(self, rows_N: torch.Tensor, ids_N: torch.Tensor) -> None:
        self.add_placed(self.place(rows_N), ids_N)

    def place(self, rows_N: torch.Tensor) -> torch.Tensor:
        """Write rows into free slots (any thread); the slots, for `add_placed` on the consumer's thread."""
        if len(rows_N) == 0:  # no storage made from an empty part: its shape may not be the rows'
            slots_N = torch.empty(0, dtype=torch.long)
            with self.lock:
                self.unadded[id(slots_N)] = slots_N
            return slots_N
        with self.lock:
            slots_N = self._free_slots(len(rows_N), rows_N)
            self.unadded[id(slots_N)] = slots_N  # so release_unadded frees them, written or not
            storage, self.writers = self.rows, self.writers + 1
        try:  # outside the lock: the consumer gathers and other readers write while this one writes
            # numpy writes each row as one block of bytes; torch's index_copy_ ran ~3x (one thread) to ~30x
            # (two threads on a busy machine) slower on bf16 rows
            as_records(storage)[slots_N.numpy()] = as_records(rows_N.contiguous())
        finally:
            with self.lock:
                self.writers -= 1
                self.lock.notify_all()
        return slots_N

    def add_placed(self, slots_N: torch.Tensor, ids_N: torch.Tensor) -> None:
        with self.lock:
            del self.unadded[id(slots_N)]
            self.ids[slots_N] = ids_N
        if len(slots_N):
            self.waiting.append(slots_N)
            self.size += len(slots_N)

    def release_unadded(self) -> None:
        """Free the slots of rows placed and never added (a stream closed with reads in flight)."""
        with self.lock:
            self.freed.extend(self.unadded.values())
            self.unadded.clear()

    def _free_slots(self, n: int, like_N: torch.Tensor) -> torch.Tensor:
        if self.freed:
            self.free, self.freed = torch.cat([self.free, *self.freed]), []
        if self.rows is None:
            self.rows = hugepage_empty((self.capacity + max(self.reserve, n), *like_N.shape[1:]), like_N.dtype)
            self.ids = torch.empty(len(self.rows), dtype=torch.long)
            self.free = torch.arange(len(self.rows))
        if len(self.free) < n:  # a restore, or more rows in flight than reserved: grow (rare)
            self.lock.wait_for(lambda: self.writers == 0)  # a row written into the old storage would be lost
            grown = hugepage_empty((len(self.rows) + n, *self.rows.shape[1:]), self.rows.dtype)
            grown[:len(self.rows)] = self.rows
            self.free = torch.cat([self.free, torch.arange(len(self.rows), len(grown))])
            self.ids = torch.cat([self.ids, torch.empty(n, dtype=torch.long)])
            self.rows = grown
        slots_N, self.free = self.free[:n], self.free[n:]
        return slots_N

    def is_full(self) -> bool:
        return self.size >= self.capacity

    def shuffle_out(self, everything: bool = False) -> None:
        """Mix all rows and set aside half of them (whole batches), or all of them at an epoch's end."""
        waiting = torch.cat(self.waiting) if len(self.waiting) > 1 else self.waiting[0]
        order = torch.randperm(len(waiting), generator=self.generator)
        n_out = len(waiting) if everything else len(waiting) // 2 // self.batch_size * self.batch_size
        self.out, self.cursor = waiting[order[:n_out]], 0
        kept = waiting[order[n_out:]]
        self.waiting = [kept] if len(kept) else []
        self.size = len(kept)

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The next batch of shuffled rows (short only at an epoch's end), or None when none is set aside."""
        if self.cursor >= len(self.out):
            return None
        # Each batch is gathered into its own tensor: SAE steps on slices of one big shuffled pool ran
        # measurably slower on CPU (bench/train_stream.py), and the consumer may keep it.
        slots = self.out[self.cursor:self.cursor + self.batch_size]
        self.cursor += len(slots)
        if self.pin_memory:
            batch = torch.empty((len(slots), *self.rows.shape[1:]), dtype=self.rows.dtype, pin_memory=True)
            torch.index_select(self.rows, 0, slots, out=batch)
        else:  # numpy gathers whole rows on one thread: steadier than torch's threads on a busy CPU
            gathered = as_records(self.rows)[slots.numpy()]
            batch = torch.from_numpy(gathered.view(np.uint8)).view(self.rows.dtype).view(-1, *self.rows.shape[1:])
        with self.lock:
            self.freed.append(slots)  # the batch is a copy: its slots may take new rows
        return batch, self.ids[slots]

    def state_ids(self) -> dict:
        waiting = torch.cat(self.waiting) if self.waiting else torch.empty(0, dtype=torch.long)
        return {"waiting_ids": self.ids[waiting], "pending_ids": self.ids[self.out[self.cursor:]],
                "generator": self.generator.get_state()}

    def restore(self, waiting: tuple[torch.Tensor, torch.Tensor], pending: tuple[torch.Tensor, torch.Tensor],
                generator_state: torch.Tensor) -> None:
        self.rows, self.waiting, self.size, self.freed, self.unadded = None, [], 0, [], {}
        self.out, self.cursor = torch.empty(0, dtype=torch.long), 0
        if len(pending[0]):
            self.add(*pending)  # into the first slots, then set aside as the last shuffle would have
            self.out, self.waiting, self.size = self.waiting[0], [], 0
        self.add(*waiting)
        self.generator.set_state(generator_state)


def prefetch_depth(buffer_tokens: int, chunk_tokens: int) -> int:
    """Chunks to read ahead: half a buffer, what the next refill takes."""
    return max(2, -(-buffer_tokens // 2 // max(chunk_tokens, 1)))


class ShuffledStream:
    """Batches of shuffled rows over as many epochs as `max_tokens` needs (one epoch when None).

    Each epoch reads every chunk once in a seeded order, mixes the rows in the buffer and empties the buffer
    at its end, so every row is handed out once per epoch. Rows are `read_chunk(i)[j]` with id
    i·chunk_tokens + j, handed out in the dtype read_chunk gives them (the consumer converts them on its
    device). Chunks are read ahead up to `prefetch_chunks`, across epochs, on `read_threads` threads (either 0:
    each chunk is read on the consumer's thread when the buffer needs it); the batches are the same either way.
    """

    def __init__(self, read_chunk: Callable[[int], torch.Tensor], chunk_ids: Iterable[int], chunk_tokens: int,
                 batch_size: int, buffer_tokens: int, seed: int, max_tokens: int | None = None,
                 prefetch_chunks: int = 2, read_threads: int = 4, pin_memory: bool = False):
        self.read_chunk, self.chunk_ids, self.chunk_tokens = read_chunk, np.asarray(chunk_ids), chunk_tokens
        self.seed, self.max_tokens, self.prefetch_chunks = seed, max_tokens, prefetch_chunks
        self.read_threads = read_threads if prefetch_chunks else 0
        # rows placed and not yet added: the reads ahead (read_ahead submits one beyond its depth) and the one
        # chunk the consumer holds
        in_flight = (max(self.prefetch_chunks, 1) + 2) * chunk_tokens
        self.buffer = MixingBuffer(buffer_tokens, batch_size, torch.Generator().manual_seed(seed), pin_memory,
                                   reserve_tokens=in_flight)
        self.epoch, self.cursor, self.tokens_seen = 0, 0, 0  # cursor: chunks of this epoch taken in
        self.seconds = 0.0  # spent reading and shuffling, for the benchmarks
        self._chunks: Iterator | None = None

    def _chunk_plan(self, first_epoch: int, first_cursor: int) -> Iterator[tuple[int, int | None, int | None]]:
        """(epoch, cursor after it, chunk index) per chunk to read, and (epoch, None, None) at each epoch's end."""
        epochs = itertools.count(first_epoch) if self.max_tokens is not None else range(first_epoch, 1)
        for epoch in epochs:
            order = self.chunk_ids[chunk_order(len(self.chunk_ids), self.seed, epoch)]
            for cursor in range(first_cursor if epoch == first_epoch else 0, len(order)):
                yield epoch, cursor + 1, int(order[cursor])
            yield epoch, None, None

    def _read(self, planned: tuple[int, int | None, int | None]) -> tuple:
        """(epoch, cursor after it, slots, ids) for a chunk read and placed in the buffer, (epoch, None, None,
        None) at an epoch's end."""
        epoch, cursor, index = planned
        if index is None:
            return epoch, None, None, None
        slots = self.buffer.place(self.read_chunk(index))
        return epoch, cursor, slots, torch.arange(len(slots)) + index * self.chunk_tokens

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
            self._chunks = read_ahead(self._read, self._chunk_plan(self.epoch, self.cursor), self.read_threads,
                                      self.prefetch_chunks)
        while (taken := self.buffer.take()) is None:
            if self.buffer.is_full():
                self.buffer.shuffle_out()
                continue
            item = next(self._chunks, None)
            if item is None:  # the one epoch is over
                return None
            epoch, cursor, slots, ids = item
            if slots is None:  # an epoch's end: hand out what is left, then go on to the next epoch
                self.epoch, self.cursor = epoch + 1, 0
                if self.buffer.size:
                    self.buffer.shuffle_out(everything=True)
                continue
            self.epoch, self.cursor = epoch, cursor
            self.buffer.add_placed(slots, ids)
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
            self._chunks.close()  # cancels the reads not started, waits for those under way
            self._chunks = None
            self.buffer.release_unadded()

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
            return torch.empty(0), ids_N  # an empty part: its dtype never meets a batch
        chunk_N = ids_N // self.chunk_tokens
        rows = None
        for index in torch.unique(chunk_N).tolist():
            mask_N = chunk_N == index
            chunk = self.read_chunk(index)
            if rows is None:
                rows = chunk.new_empty((len(ids_N), *chunk.shape[1:]))
            rows[mask_N] = chunk[ids_N[mask_N] - index * self.chunk_tokens]
        return rows, ids_N
