"""The reader: every token exactly once per epoch, seeded orders, mixing, budgets, reads on a thread pool."""

import random
import threading
import time

import numpy as np
import pytest
import torch

from instructsae.extract.run import run_extract
from instructsae.store.reader import open_store
from instructsae.schemas import ExtractConfig
from instructsae.train.stream import MixingBuffer, ShuffledStream, chunk_order, read_ahead

CHUNK = 50


def labelled_chunks(n_chunks: int, last: int = 17):
    """Chunks whose rows carry a unique id in column 0 (the last chunk is short, like a store's)."""
    sizes = [CHUNK] * (n_chunks - 1) + [last]
    starts = np.cumsum([0] + sizes[:-1])

    def read_chunk(index: int) -> torch.Tensor:
        ids = torch.arange(starts[index], starts[index] + sizes[index], dtype=torch.float32)
        return torch.stack([ids, torch.zeros_like(ids)], dim=1)

    return read_chunk, sum(sizes)


def iter_batches(read_chunk, chunk_ids, batch_size, buffer_tokens, seed, max_tokens=None, **options):
    return ShuffledStream(read_chunk, chunk_ids, CHUNK, batch_size, buffer_tokens, seed, max_tokens, **options)


def test_every_token_once_per_epoch():
    read_chunk, n_tokens = labelled_chunks(9)
    ids = torch.cat([batch[:, 0] for batch in iter_batches(read_chunk, range(9), 32, 120, seed=3)])
    assert sorted(ids.long().tolist()) == list(range(n_tokens))


def test_two_epochs_see_each_token_twice_in_new_orders():
    read_chunk, n_tokens = labelled_chunks(6)
    batches = list(iter_batches(read_chunk, range(6), 16, 64, seed=0, max_tokens=2 * n_tokens))
    ids = torch.cat([batch[:, 0] for batch in batches]).long()
    assert len(ids) == 2 * n_tokens
    assert (torch.bincount(ids[:n_tokens]) == 1).all() and (torch.bincount(ids) == 2).all()
    assert not torch.equal(ids[:n_tokens], ids[n_tokens:])


def test_batches_are_mixed_across_chunks():
    read_chunk, _ = labelled_chunks(10, last=CHUNK)
    first = next(iter(iter_batches(read_chunk, range(10), 64, 400, seed=1)))
    chunks_in_batch = set((first[:, 0] // CHUNK).long().tolist())
    assert len(chunks_in_batch) >= 4


def test_max_tokens_and_seeds():
    read_chunk, _ = labelled_chunks(8)
    batches = list(iter_batches(read_chunk, range(8), 32, 128, seed=0, max_tokens=100))
    assert sum(len(batch) for batch in batches) == 100
    assert not np.array_equal(chunk_order(50, 0, 0), chunk_order(50, 1, 0))
    assert not np.array_equal(chunk_order(50, 0, 0), chunk_order(50, 0, 1))
    np.testing.assert_array_equal(np.sort(chunk_order(50, 0, 0)), np.arange(50))


def test_mixing_buffer_hands_out_half_when_full():
    buffer = MixingBuffer(capacity_tokens=100, batch_size=10, generator=torch.Generator().manual_seed(0))
    buffer.add(torch.zeros(60, 2), torch.arange(60))
    assert not buffer.is_full() and buffer.take() is None
    buffer.add(torch.ones(60, 2), torch.arange(60, 120))
    assert buffer.is_full()
    buffer.shuffle_out()
    out = []
    while (taken := buffer.take()) is not None:
        out.append(taken)
    assert [len(rows) for rows, _ in out] == [10] * 6 and buffer.size == 60
    for rows, ids in out:  # rows keep their ids through the shuffle
        torch.testing.assert_close(rows[:, 0], (ids >= 60).float())


class ConcatenatingBuffer:
    """The mixing buffer as first written (concatenate all rows, permute, keep half as a new tensor): the
    reference the slot-based buffer must hand out the same batches as."""

    def __init__(self, capacity: int, batch_size: int, generator: torch.Generator):
        self.capacity, self.batch_size, self.generator = capacity, batch_size, generator
        self.rows, self.ids, self.pending = None, None, []

    def is_full(self) -> bool:
        return self.rows is not None and len(self.rows) >= self.capacity

    def add(self, rows, ids):
        self.rows = rows if self.rows is None else torch.cat([self.rows, rows])
        self.ids = ids if self.ids is None else torch.cat([self.ids, ids])

    def shuffle_out(self, everything=False):
        order = torch.randperm(len(self.rows), generator=self.generator)
        n_out = len(order) if everything else len(order) // 2 // self.batch_size * self.batch_size
        out = order[:n_out]
        self.pending = [(self.rows[out[i:i + self.batch_size]], self.ids[out[i:i + self.batch_size]])
                        for i in range(0, n_out, self.batch_size)]
        self.rows, self.ids = self.rows[order[n_out:]], self.ids[order[n_out:]]

    def take(self):
        return self.pending.pop(0) if self.pending else None


@pytest.mark.parametrize("batch_size, capacity, sizes", [(16, 100, [50] * 9 + [17]), (8, 64, [30, 7, 50, 1, 64] * 4),
                                                        (32, 64, [40] * 6)])
def test_the_slot_buffer_hands_out_the_batches_of_the_concatenating_one(batch_size, capacity, sizes):
    values = torch.randn(sum(sizes), 2, 3).to(torch.bfloat16)  # several layers, bf16
    buffers = [MixingBuffer(capacity, batch_size, torch.Generator().manual_seed(4)),
               ConcatenatingBuffer(max(capacity, 2 * batch_size), batch_size, torch.Generator().manual_seed(4))]
    handed = [[], []]
    for buffer, out in zip(buffers, handed):
        start = 0
        for size in sizes:
            while (taken := buffer.take()) is not None:
                out.append(taken)
            if buffer.is_full():
                buffer.shuffle_out()
                while (taken := buffer.take()) is not None:
                    out.append(taken)
            buffer.add(values[start:start + size], torch.arange(start, start + size))
            start += size
        buffer.shuffle_out(everything=True)
        while (taken := buffer.take()) is not None:
            out.append(taken)
    assert len(handed[0]) == len(handed[1])
    for (rows, ids), (expected_rows, expected_ids) in zip(*handed):
        assert torch.equal(ids, expected_ids) and torch.equal(rows, expected_rows)
    assert sorted(torch.cat([ids for _, ids in handed[0]]).tolist()) == list(range(sum(sizes)))


@pytest.mark.parametrize("prefetch_chunks", [0, 2])
def test_a_restored_stream_hands_out_the_same_batches(prefetch_chunks):
    read_chunk, n_tokens = labelled_chunks(7)
    settings = dict(batch_size=16, buffer_tokens=64, seed=5, max_tokens=3 * n_tokens + 40,
                    prefetch_chunks=prefetch_chunks, read_threads=3)
    whole = list(iter_batches(read_chunk, range(7), **settings))
    for stop_after in (1, 5, len(whole) // 3, len(whole) // 2 + 3, len(whole) - 1):  # across epoch ends too
        first = iter_batches(read_chunk, range(7), **settings)
        for _ in range(stop_after):
            first.next_batch()
        state = first.state_dict()
        first.close()
        second = iter_batches(read_chunk, range(7), **settings)
        second.load_state_dict(state)
        rest = list(second)
        assert len(rest) == len(whole) - stop_after
        for expected, got in zip(whole[stop_after:], rest):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def slow_in_random_order(read_chunk, seed: int = 0):
    """read_chunk whose reads take random times, so a pool's reads finish out of order."""
    delays = random.Random(seed)

    def read(index: int) -> torch.Tensor:
        time.sleep(delays.random() * 0.003)
        return read_chunk(index)
    return read


@pytest.mark.parametrize("threads, depth", [(1, 1), (3, 4), (4, 64)])
def test_reads_on_a_pool_give_the_batches_of_reads_on_the_training_thread(threads, depth):
    read_chunk, n_tokens = labelled_chunks(23)
    settings = dict(batch_size=16, buffer_tokens=96, seed=2, max_tokens=2 * n_tokens + 8)
    alone = list(iter_batches(read_chunk, range(23), **settings, prefetch_chunks=0))
    pooled = list(iter_batches(slow_in_random_order(read_chunk), range(23), **settings, prefetch_chunks=depth,
                               read_threads=threads))
    assert len(pooled) == len(alone)
    for expected, got in zip(alone, pooled):
        assert torch.equal(got, expected)


def test_read_ahead_keeps_the_order_and_passes_errors_through():
    def read(item: int) -> int:
        time.sleep(random.random() * 0.002)
        if item == 7:
            raise RuntimeError("disk gone")
        return item * 10

    assert list(read_ahead(read, range(7), threads=3, depth=4)) == [item * 10 for item in range(7)]
    got = []
    with pytest.raises(RuntimeError, match="disk gone"):
        for value in read_ahead(read, range(12), threads=3, depth=4):
            got.append(value)
    assert got == [item * 10 for item in range(7)]


def test_storage_dtype_travels_through_the_stream_unchanged():
    values = torch.randn(7 * CHUNK, 3).to(torch.bfloat16)
    stream = ShuffledStream(lambda i: values[i * CHUNK:(i + 1) * CHUNK], range(7), CHUNK, 32, 128, seed=0)
    streamed = torch.cat(list(stream))
    assert streamed.dtype == torch.bfloat16
    np.testing.assert_array_equal(sorted_rows(streamed), sorted_rows(values))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches_equal_unpinned_ones():
    read_chunk, n_tokens = labelled_chunks(9)
    settings = dict(batch_size=16, buffer_tokens=64, seed=1, max_tokens=n_tokens + 20)
    plain = list(iter_batches(read_chunk, range(9), **settings))
    pinned = list(iter_batches(read_chunk, range(9), **settings, pin_memory=True))
    assert all(batch.is_pinned() for batch in pinned)
    for expected, got in zip(plain, pinned):
        assert torch.equal(got, expected)


def sorted_rows(rows_ND: torch.Tensor) -> np.ndarray:
    values = rows_ND.float().numpy()
    return values[np.lexsort(values.T[::-1])]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_real_store_rows_come_out_once_in_the_store_dtype(dtype, tiny_model_dir, dialogues_jsonl, tmp_path):
    cfg = ExtractConfig(model=str(tiny_model_dir), dataset=str(dialogues_jsonl), out=str(tmp_path / "s"),
                        layers=(1,), dtype=dtype, chunk_tokens=40)
    run_extract(cfg, show_progress=False)
    reader = open_store(cfg.out)
    stream = ShuffledStream(lambda i: reader.read_acts_chunk_as_stored(1, i), range(reader.n_chunks),
                            reader.chunk_tokens, 32, 128, seed=0, read_threads=2)
    streamed = torch.cat(list(stream))
    stored = reader.read_acts_as_stored(1, 0, reader.n_tokens)
    assert streamed.dtype == stored.dtype == getattr(torch, dtype)
    assert streamed.shape == stored.shape
    np.testing.assert_array_equal(sorted_rows(streamed), sorted_rows(stored))
    assert torch.equal(stored.float(), reader.read_acts(1, 0, reader.n_tokens))


def test_reader_threads_end_when_the_consumer_stops_early():
    def reader_threads() -> int:
        return sum(thread.name.startswith("stream-read") for thread in threading.enumerate())

    before = reader_threads()
    read_chunk, _ = labelled_chunks(40)
    stream = ShuffledStream(read_chunk, range(40), CHUNK, 16, 64, seed=0, max_tokens=10**6, prefetch_chunks=8,
                            read_threads=3)
    stream.next_batch()
    assert reader_threads() > before
    time.sleep(0.05)  # let the pool run ahead
    stream.close()  # what a run does when it stops early
    assert reader_threads() == before, "a reader thread outlived its stream"


def test_a_stream_closed_with_reads_in_flight_goes_on_with_the_same_batches_in_the_same_storage():
    read_chunk, n_tokens = labelled_chunks(23)
    settings = dict(batch_size=16, buffer_tokens=96, seed=2, max_tokens=2 * n_tokens + 8, prefetch_chunks=4,
                    read_threads=3)
    whole = list(iter_batches(slow_in_random_order(read_chunk), range(23), **settings))
    stream = iter_batches(slow_in_random_order(read_chunk, seed=1), range(23), **settings)
    got = [stream.next_batch() for _ in range(5)]
    for _ in range(3):  # each close drops the reads ahead; their slots must come back, or the storage grows
        stream.close()
        got += [stream.next_batch() for _ in range(5)]
    storage_rows = len(stream.buffer.rows)
    got += list(stream)
    assert len(got) == len(whole)
    for expected, batch in zip(whole, got):
        assert torch.equal(batch, expected)
    assert len(stream.buffer.rows) == storage_rows == 96 + (4 + 2) * CHUNK, "rows in flight outgrew the reserve"
