"""The reader: every token exactly once per epoch, seeded orders, mixing, budgets."""

import threading
import time

import numpy as np
import pytest
import torch

from instructsae.extract.run import run_extract
from instructsae.store.reader import open_store
from instructsae.schemas import ExtractConfig
from instructsae.train.stream import MixingBuffer, ShuffledStream, chunk_order, prefetch

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


@pytest.mark.parametrize("prefetch_chunks", [0, 2])
def test_a_restored_stream_hands_out_the_same_batches(prefetch_chunks):
    read_chunk, n_tokens = labelled_chunks(7)
    settings = dict(batch_size=16, buffer_tokens=64, seed=5, max_tokens=3 * n_tokens + 40,
                    prefetch_chunks=prefetch_chunks)
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


def test_prefetch_passes_errors_through():
    def broken():
        yield 1
        raise RuntimeError("disk gone")

    got = []
    try:
        for item in prefetch(broken()):
            got.append(item)
    except RuntimeError as error:
        assert "disk gone" in str(error)
    else:
        raise AssertionError("the error was swallowed")
    assert got == [1]


def test_real_store_rows_come_out_once(tiny_model_dir, dialogues_jsonl, tmp_path):
    cfg = ExtractConfig(model=str(tiny_model_dir), dataset=str(dialogues_jsonl), out=str(tmp_path / "s"),
                        layers=(1,), dtype="float32", chunk_tokens=40)
    run_extract(cfg, show_progress=False)
    reader = open_store(cfg.out)
    stream = ShuffledStream(lambda i: reader.read_acts_chunk(1, i), range(reader.n_chunks), reader.chunk_tokens,
                            32, 128, seed=0)
    streamed = torch.cat(list(stream))
    stored = reader.read_acts(1, 0, reader.n_tokens)
    assert streamed.shape == stored.shape
    key = lambda rows: rows[torch.argsort(rows[:, 0] * 1e3 + rows[:, 1])]  # noqa: E731
    torch.testing.assert_close(key(streamed), key(stored))


def test_prefetch_thread_ends_when_the_consumer_stops_early():
    def prefetch_threads() -> int:
        return sum(thread.name == "prefetch" for thread in threading.enumerate())

    before = prefetch_threads()
    stream = prefetch(iter(range(1000)), depth=1)
    assert next(stream) == 0
    time.sleep(0.05)  # let the producer fill the queue and wait on it
    stream.close()  # what ShuffledStream.close does when a run stops early
    deadline = time.monotonic() + 2.0
    while prefetch_threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert prefetch_threads() == before, "the producer is stuck on a full queue"
