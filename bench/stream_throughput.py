"""Can the reader feed an accelerator? Disk, chunk reads and the shuffled stream side by side on a store larger than RAM.

    .venv/bin/python bench/stream_throughput.py [--dir /tmp/instructsae-stream-bench] [--gb 20] [--keep]
                                                [--like runs/demo/stores/fast-train] [--warm-gb 2]

Builds once, through the real store writer, a synthetic bf16 store of --gb GB (d_model 576, one layer, random
rows scaled to the norm statistics of the store --like when given), then prints side by side:
  - raw reads of the activation array's files (plain `readinto`, bytes/s),
  - the store's own chunk reads (each inner chunk of the zarr shards, crc32c-checked) in the stream's chunk order
    (tokens/s), on the stream's reader threads,
  - the shuffled stream through the mixing buffer, no SAE (tokens/s, GB/s), in the storage dtype as `train`
    runs it,
each cold (the page cache dropped first, where this process may) over the whole store and warm (over the first
--warm-gb GB, read once before), with each phase's peak RSS. The store is deleted at the end unless --keep; a
kept store is reused by the next run (same --gb and --dir).
"""

import argparse
import os
import resource
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch

from instructsae import __version__
from instructsae.store.layout import TokenBlock, default_shard_tokens
from instructsae.store.reader import StoreReader, is_store, open_store, read_manifest
from instructsae.store.writer import StoreWriter
from instructsae.schemas.manifest import LayerStats, StoreIdentity, StoreManifest
from instructsae.train.stream import ShuffledStream, prefetch_depth, read_ahead

LAYER = 15
BLOCK_TOKENS = 131_072  # written per append: whole chunks, ~150 MB of bf16 at d_model 576


def identity(d_model: int, gb: float, chunk_tokens: int) -> StoreIdentity:
    return StoreIdentity(model="synthetic", tokenizer="synthetic", chat_template_sha256=None,
                         dataset=f"random bf16, {gb} GB", dataset_sha256="0" * 64, split="train", mode="fast",
                         max_len=BLOCK_TOKENS, block_len=BLOCK_TOKENS, max_instances=None, skip_instances=0,
                         max_tokens=None, keep_first_token=True, layers=(LAYER,), d_model=d_model, dtype="bfloat16",
                         model_dtype="float32", chunk_tokens=chunk_tokens,
                         shard_tokens=default_shard_tokens(d_model, "bfloat16", chunk_tokens))


def random_rows(n: int, d_model: int, mean_sq_norm: float, seed: int) -> torch.Tensor:
    rows = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, d_model), dtype=np.float32))
    return (rows * (mean_sq_norm / d_model) ** 0.5).to(torch.bfloat16)


def block_of(rows_ND: torch.Tensor, first_row: int, first_instance: int) -> TokenBlock:
    """One instance per block (its rows stored as the writer stores them: bf16 as a uint16 view)."""
    n = len(rows_ND)
    return TokenBlock(acts={LAYER: rows_ND.view(torch.int16).numpy().view(np.uint16)},
                      token_id=np.zeros(n, np.int32), instance=np.full(n, first_instance, np.int32),
                      position=np.arange(n, dtype=np.int32), role=np.full(n, 3, np.uint8),
                      instance_start=np.array([first_row], np.int64), instance_length=np.array([n], np.int32),
                      instance_source=np.array([first_instance], np.int64))


def build_store(path: Path, gb: float, d_model: int, mean_sq_norm: float) -> dict:
    """Write the store with StoreWriter; the writer's MB/s (rows already in memory) and a raw write's, same bytes."""
    n_blocks = max(1, round(gb * 1e9 / (BLOCK_TOKENS * d_model * 2)))
    ident = identity(d_model, gb, chunk_tokens=2048)
    manifest = StoreManifest(tool_version=__version__, identity=ident, fingerprint=ident.fingerprint())
    writer = StoreWriter.create(path, manifest)
    pool = [random_rows(BLOCK_TOKENS, d_model, mean_sq_norm, seed) for seed in range(4)]
    rng, writing = np.random.default_rng(0), 0.0
    for index in range(n_blocks):
        # a few random blocks, rolled: random enough for a reader (the rows are stored raw, not compressed)
        rows = torch.roll(pool[index % len(pool)], int(rng.integers(BLOCK_TOKENS)), dims=0)
        squared = rows.float().pow(2).sum(-1, dtype=torch.float64)
        stats = LayerStats().add(len(rows), float(squared.sum()), float(squared.sqrt().sum()))
        old = manifest.layer_stats.get(str(LAYER), LayerStats())
        manifest = manifest.model_copy(update={
            "n_tokens": manifest.n_tokens + len(rows), "n_instances": manifest.n_instances + 1,
            "layer_stats": {str(LAYER): old.add(stats.count, stats.sum_sq_norm, stats.sum_norm)}})
        block = block_of(rows, index * BLOCK_TOKENS, index)
        started = time.perf_counter()
        writer.append(block, manifest)
        writing += time.perf_counter() - started
        if index % 16 == 0:
            print(f"  writing {index + 1}/{n_blocks} blocks", flush=True)
    writer.finish(manifest.model_copy(update={"complete": True}))  # writes the last, partial shards too
    n_bytes = n_blocks * BLOCK_TOKENS * d_model * 2
    return {"writer_MBps": n_bytes / writing / 1e6, "raw_write_MBps": raw_write_rate(path, min(n_bytes, 2 * 10**9))}


def raw_write_rate(folder: Path, n_bytes: int) -> float:
    """A dd-like sequential write of n_bytes in 16 MB pieces, fsynced, on the same disk."""
    piece = np.random.default_rng(1).integers(0, 255, 16 * 2**20, dtype=np.uint8).tobytes()
    target = folder / "raw-write.tmp"
    started = time.perf_counter()
    with open(target, "wb", buffering=0) as out:
        for _ in range(max(1, n_bytes // len(piece))):
            out.write(piece)
        os.fsync(out.fileno())
    seconds = time.perf_counter() - started
    target.unlink()
    return max(1, n_bytes // len(piece)) * len(piece) / seconds / 1e6


def drop_page_cache() -> bool:
    """Drop the page cache (Linux, root); False where this process may not."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("3\n")
        return True
    except OSError:
        return False


def reset_peak_rss() -> bool:
    """Linux resets VmHWM when 5 is written to clear_refs, so each phase's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as control:
            control.write("5\n")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def array_files(store: Path, first_rows: int, shard_rows: int) -> list[Path]:
    """The activation array's shard files holding rows below first_rows."""
    folder = store / "acts" / f"layer_{LAYER}" / "c"
    files = []
    for path in folder.rglob("*"):
        if path.is_file():
            first_coordinate = int(path.relative_to(folder).parts[0])
            if first_coordinate * shard_rows < first_rows:
                files.append(path)
    return sorted(files)


RAW_PIECE = 16 * 2**20


def raw_read(files: list[Path], threads: int) -> int:
    """Read every file in 16 MB pieces into one reused buffer per thread, on `threads` threads: the disk's (or
    the page cache's) ceiling. (A fresh 512 MB buffer per file, as before, measured the kernel zeroing it.)"""
    local = threading.local()

    def read(path: Path) -> int:
        if not hasattr(local, "buffer"):
            local.buffer = bytearray(RAW_PIECE)
        n_read = 0
        with open(path, "rb", buffering=0) as source:
            while got := source.readinto(local.buffer):
                n_read += got
        return n_read
    return sum(read_ahead(read, files, threads, 2 * threads))


def measure(label: str, fn, n_bytes_per_token: int, results: dict) -> None:
    reset_peak_rss()
    started, cpu_started = time.perf_counter(), sum(os.times()[:2])
    n_bytes = fn()
    seconds, cpu_seconds = time.perf_counter() - started, sum(os.times()[:2]) - cpu_started
    tokens = n_bytes / n_bytes_per_token
    results[label] = tokens / seconds
    print(f"{label:<40} {tokens / seconds / 1e6:7.3f} M tok/s  {n_bytes / seconds / 1e9:6.2f} GB/s  "
          f"{seconds:7.1f} s  CPU {cpu_seconds / seconds:4.2f} cores  peak RSS {peak_rss_gb():5.2f} GB", flush=True)


def run_phase(name: str, reader: StoreReader, store: Path, n_chunks: int, args, cold: bool) -> dict:
    bytes_per_token = reader.d_model * 2
    chunks = list(range(n_chunks))
    rows = min(n_chunks * reader.chunk_tokens, reader.n_tokens)
    files = array_files(store, rows, reader.manifest.identity.shard_tokens)
    depth = prefetch_depth(args.buffer_tokens, reader.chunk_tokens)
    order = [chunks[i] for i in np.random.default_rng(0).permutation(len(chunks))]

    def chunk_reads() -> int:
        return sum(chunk.numel() * 2 for chunk in read_ahead(lambda i: reader.read_acts_chunk_as_stored(LAYER, i), order,
                                                             args.threads, depth))

    def shuffled() -> int:
        stream = ShuffledStream(lambda i: reader.read_acts_chunk_as_stored(LAYER, i), chunks, reader.chunk_tokens,
                                args.batch_size, args.buffer_tokens, seed=0, prefetch_chunks=depth,
                                read_threads=args.threads)
        return sum(batch.numel() * 2 for batch in stream)

    variants = {"raw file reads": lambda: raw_read(files, args.threads), "chunk reads (crc-checked)": chunk_reads,
                "shuffled stream (no SAE)": shuffled}
    print(f"\n{name}: {rows * bytes_per_token / 1e9:.1f} GB, {len(files)} files, {len(chunks)} chunks")
    results: dict[str, float] = {}
    if not cold:
        raw_read(files, args.threads)  # into the page cache
    for label, fn in variants.items():
        if cold and not drop_page_cache():
            print("  (the page cache could not be dropped: not root, or not Linux; these reads may be warm)")
        measure(f"  {label}", fn, bytes_per_token, results)
    stream_rate, chunk_rate, raw_rate = (results[f"  {label}"] for label in
                                         ("shuffled stream (no SAE)", "chunk reads (crc-checked)", "raw file reads"))
    print(f"  stream / chunk reads: {stream_rate / chunk_rate:.2f}  (goal >= 0.8)   "
          f"stream / raw reads: {stream_rate / raw_rate:.2f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/instructsae-stream-bench", help="where the synthetic store lives")
    parser.add_argument("--gb", type=float, default=20.0, help="store size on disk")
    parser.add_argument("--warm-gb", type=float, default=2.0, help="the part of the store read warm")
    parser.add_argument("--like", help="a store whose layer norm statistics the random rows take")
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--buffer-tokens", type=int, default=262_144, help="the train default")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=4, help="reader threads (the train default on an accelerator)")
    parser.add_argument("--keep", action="store_true", help="keep the store for the next run")
    parser.add_argument("--build-only", action="store_true", help="build (or find) the store, keep it, measure nothing")
    args = parser.parse_args()

    store = Path(args.dir) / f"store-{args.gb:g}gb"
    if is_store(store) and read_manifest(store).complete:
        print(f"reusing {store}")
    else:
        shutil.rmtree(store, ignore_errors=True)
        mean_sq_norm = read_manifest(args.like).layer_stats[str(LAYER)].mean_sq_norm if args.like else 1.0
        print(f"building {store} ({args.gb} GB, mean squared norm {mean_sq_norm:.4g})", flush=True)
        rates = build_store(store, args.gb, args.d_model, mean_sq_norm)
        print(f"store writer {rates['writer_MBps']:.0f} MB/s, raw sequential write {rates['raw_write_MBps']:.0f} "
              f"MB/s: {rates['writer_MBps'] / rates['raw_write_MBps']:.2f} of raw (goal >= 0.5)")
    if args.build_only:
        return
    try:
        reader = open_store(store)
        n_files = sum(1 for path in store.rglob("*") if path.is_file())
        print(f"store {store}: {reader.n_tokens:,} tokens, {reader.n_chunks} chunks of {reader.chunk_tokens}, "
              f"{n_files} files; buffer {args.buffer_tokens:,} tokens "
              f"({args.buffer_tokens * reader.d_model * 2 / 1e9:.2f} GB bf16), batch {args.batch_size}, "
              f"{args.threads} reader threads, {os.cpu_count()} CPUs")
        warm_chunks = max(1, int(args.warm_gb * 1e9 / (reader.chunk_tokens * reader.d_model * 2)))
        run_phase("cold, whole store", reader, store, reader.n_chunks, args, cold=True)
        run_phase("warm", reader, store, min(warm_chunks, reader.n_chunks), args, cold=False)
    finally:
        if not args.keep:
            shutil.rmtree(store)
            print(f"deleted {store} (--keep keeps it)")


if __name__ == "__main__":
    main()
