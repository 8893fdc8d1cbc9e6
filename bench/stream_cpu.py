"""Where the shuffled stream's CPU goes, in CPU seconds of one thread (time.thread_time), side by side in one run.

    PYTHONPATH=. .venv/bin/python bench/stream_cpu.py --store /tmp/instructsae-stream-bench/store-1gb

Run it on a store in the page cache (it reads the store once first), e.g. one built by
`bench/stream_throughput.py --gb 1 --build-only`. Prints:
  - a chunk read as fsspec's cat_file + a slice + the copy torch needs, against the store's own read (one
    readinto into writable memory), in GB per CPU second;
  - the stream on one thread (no reader pool), split into reading, adding rows to the mixing buffer, gathering
    batches and shuffling, in CPU seconds per GB handed out;
  - random-row scatter and gather into a 262,144-row buffer allocated by torch and by numpy (huge pages).
CPU time, not wall time, so the figures hold on a busy machine better than rates do (cache sharing aside).
"""

import argparse
import collections
import time

import numpy as np
import torch

from instructsae.store.chunks import CRC_BYTES, crc32c_ok
from instructsae.store.reader import open_store
from instructsae.train import stream

LAYER = 15


def cpu_seconds(fn, repeat: int = 1) -> float:
    started = time.thread_time()
    for _ in range(repeat):
        fn()
    return (time.thread_time() - started) / repeat


def old_read(reader, chunk: int) -> torch.Tensor:
    """The read path before 2026-12-02: cat_file, the checksum's slice, and a copy for writable memory."""
    array = reader.arrays[f"acts/layer_{LAYER}"]
    shard, local = divmod(chunk, array.chunks_per_shard)
    offset, length = array._shard_index(shard, chunk)[local]
    payload = array.fs.cat_file(array.shard_path(shard), start=int(offset), end=int(offset + length))
    assert crc32c_ok(payload)
    values = np.frombuffer(payload[:-CRC_BYTES], dtype="<u2").copy()
    return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)


def reads(reader, n_chunks: int) -> None:
    chunk_bytes = reader.arrays[f"acts/layer_{LAYER}"].chunk_bytes
    def each_chunk(read) -> None:
        for chunk in range(n_chunks):
            read(chunk)  # dropped at once, as the stream drops a chunk once its rows are in the buffer

    old = cpu_seconds(lambda: each_chunk(lambda c: old_read(reader, c)))
    new = cpu_seconds(lambda: each_chunk(lambda c: reader.read_acts_chunk_as_stored(LAYER, c)))
    gb = n_chunks * chunk_bytes / 1e9
    print(f"chunk reads: cat_file + slice + copy {gb / old:5.2f} GB/CPU-s, store's read {gb / new:5.2f} GB/CPU-s "
          f"({old / new:.1f}x less CPU)")


def stream_parts(reader) -> None:
    spent: collections.Counter = collections.Counter()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            started = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.thread_time() - started
        return wrapper

    buffer_class = stream.MixingBuffer
    originals = {name: getattr(buffer_class, name) for name in ("place", "add_placed", "take", "shuffle_out")}
    for name, fn in originals.items():
        setattr(buffer_class, name, timed(name, fn))
    try:
        for round_ in (1, 2):  # the first round pays for faulting the buffer in
            spent.clear()
            shuffled = stream.ShuffledStream(timed("read", lambda i: reader.read_acts_chunk_as_stored(LAYER, i)),
                                             range(reader.n_chunks), reader.chunk_tokens, 4096, 262_144, seed=0,
                                             prefetch_chunks=0, read_threads=0)
            gb = sum(batch.numel() * 2 for batch in shuffled) / 1e9
            print(f"stream, one thread, round {round_}: CPU s per GB handed out: " +
                  ", ".join(f"{name} {seconds / gb:.2f}" for name, seconds in spent.items()) +
                  f"; total {sum(spent.values()) / gb:.2f}")
    finally:
        for name, fn in originals.items():
            setattr(buffer_class, name, fn)


def buffer_copies(d_model: int) -> None:
    rng = np.random.default_rng(0)
    n = 262_144
    buffers = {"torch": torch.empty(n, d_model, dtype=torch.bfloat16),
               "numpy (huge pages)": stream.hugepage_empty((n, d_model), torch.bfloat16)}
    chunk = stream.as_records(torch.randn(2048, d_model).to(torch.bfloat16))
    scatter_slots = [rng.permutation(n)[:2048] for _ in range(20)]
    gather_slots = [rng.permutation(n)[:4096] for _ in range(20)]
    for label, rows in buffers.items():
        rows.view(torch.int16).random_()  # touch every page
        records = stream.as_records(rows)
        turn = iter(range(10**9))
        scatter = cpu_seconds(lambda: records.__setitem__(scatter_slots[next(turn) % 20], chunk), 100)
        gather = cpu_seconds(lambda: records[gather_slots[next(turn) % 20]], 100)
        row_bytes = d_model * 2
        print(f"buffer allocated by {label:<20} scatter {2048 * row_bytes / scatter / 1e9:5.2f} GB/CPU-s, "
              f"gather {4096 * row_bytes / gather / 1e9:5.2f} GB/CPU-s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--chunks", type=int, default=200, help="chunks read by the read comparison")
    args = parser.parse_args()
    reader = open_store(args.store)
    for chunk in range(reader.n_chunks):  # into the page cache
        reader.read_acts_chunk_as_stored(LAYER, chunk)
    reads(reader, min(args.chunks, reader.n_chunks))
    stream_parts(reader)
    buffer_copies(reader.d_model)


if __name__ == "__main__":
    main()
