"""Does the store writer keep up with an accelerator? Its sustained MB/s beside a raw sequential write.

    .venv/bin/python bench/store_write.py [--dir /tmp/store-bench] [--gb 2] [--d-model 576] [--rounds 2]

Activations are already in memory (random bf16 bit patterns, SmolLM2's width by default) and handed to the
real StoreWriter in extraction-sized blocks of whole instances (~16k tokens, the GPU batch), token and
instance columns included; it writes 512 MB shards (the default) and commits after each. The raw variant
writes the same number of bytes to one file in 64 MB pieces. Both end with an fsync of every file written, so
the page cache does not flatter either, and both go to the same folder. Rounds alternate raw and store.
Goal (issue 9): store MB/s ÷ raw MB/s ≥ 0.5. `write_synthetic_store` is reused to build big test stores.
"""

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np

from instructsae import __version__
from instructsae.schemas.manifest import StoreIdentity, StoreManifest
from instructsae.store.layout import TokenBlock, default_chunk_tokens, default_shard_tokens
from instructsae.store.writer import StoreWriter

BLOCK_TOKENS = 16384  # what a GPU extraction hands the writer at a time (batch_budget on a GPU)
INSTANCE_TOKENS = 512


def synthetic_identity(d_model: int, layers: tuple[int, ...], shard_mb: float) -> StoreIdentity:
    chunk_tokens = default_chunk_tokens(d_model, "bfloat16")
    return StoreIdentity(
        model="synthetic", tokenizer="synthetic", chat_template_sha256=None, dataset="synthetic",
        dataset_sha256="0" * 64, split="train", mode="bt", max_len=INSTANCE_TOKENS, block_len=INSTANCE_TOKENS,
        max_instances=None, skip_instances=0, max_tokens=None, keep_first_token=True, layers=layers,
        d_model=d_model, dtype="bfloat16", model_dtype="float32", chunk_tokens=chunk_tokens,
        shard_tokens=default_shard_tokens(d_model, "bfloat16", chunk_tokens, shard_mb),
    )


def synthetic_block(first_token: int, first_instance: int, acts: dict[int, np.ndarray]) -> TokenBlock:
    """Whole instances of INSTANCE_TOKENS tokens with the given activations (rows a multiple of it)."""
    n = len(next(iter(acts.values())))
    n_instances = n // INSTANCE_TOKENS
    return TokenBlock(
        acts=acts, token_id=np.arange(n, dtype=np.int32) % 49152,
        instance=np.repeat(np.arange(first_instance, first_instance + n_instances, dtype=np.int32), INSTANCE_TOKENS),
        position=np.tile(np.arange(INSTANCE_TOKENS, dtype=np.int32), n_instances),
        role=np.full(n, 3, dtype=np.uint8),
        instance_start=first_token + np.arange(n_instances, dtype=np.int64) * INSTANCE_TOKENS,
        instance_length=np.full(n_instances, INSTANCE_TOKENS, dtype=np.int32),
        instance_source=np.arange(first_instance, first_instance + n_instances, dtype=np.int64),
    )


def write_synthetic_store(path: str, n_tokens: int, identity: StoreIdentity, make_acts) -> StoreManifest:
    """A complete store of `n_tokens` written through the real writer; make_acts(layer, start, n) gives the
    (n, d_model) uint16 bf16 bit patterns of rows start..start+n."""
    manifest = StoreManifest(tool_version=__version__, identity=identity, fingerprint=identity.fingerprint())
    writer = StoreWriter.create(path, manifest)
    for start in range(0, n_tokens, BLOCK_TOKENS):
        n = min(BLOCK_TOKENS, n_tokens - start) // INSTANCE_TOKENS * INSTANCE_TOKENS
        if n == 0:
            break
        block = synthetic_block(start, manifest.n_instances,
                                {layer: make_acts(layer, start, n) for layer in identity.layers})
        manifest = manifest.model_copy(update={"n_tokens": manifest.n_tokens + n,
                                               "n_instances": manifest.n_instances + n // INSTANCE_TOKENS})
        writer.append(block, manifest)
    manifest = manifest.model_copy(update={"complete": True})
    writer.finish(manifest)
    return manifest


def fsync_tree(folder: Path) -> tuple[int, int]:
    """fsync every file under `folder`; (files, bytes)."""
    files = size = 0
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            files, size = files + 1, size + path.stat().st_size
    return files, size


def raw_write(path: Path, data: np.ndarray, total_bytes: int) -> float:
    piece = memoryview(data.reshape(-1).view(np.uint8))[: 64 * 2**20]
    started = time.perf_counter()
    with open(path, "wb") as file:
        written = 0
        while written < total_bytes:
            written += file.write(piece[: total_bytes - written])
        file.flush()
        os.fsync(file.fileno())
    return time.perf_counter() - started


def store_write(path: Path, pool: np.ndarray, n_tokens: int, identity: StoreIdentity) -> tuple[float, int, int]:
    def acts(layer, start, n):  # rows cycled from the in-memory pool: no generation inside the timing
        first = start % (len(pool) - n + 1)
        return pool[first: first + n]

    started = time.perf_counter()
    write_synthetic_store(str(path), n_tokens, identity, acts)
    files, size = fsync_tree(path)
    return time.perf_counter() - started, files, size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/store-bench")
    parser.add_argument("--gb", type=float, default=2.0, help="activation bytes written per variant")
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--shard-mb", type=float, default=512.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    folder = Path(args.dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    identity = synthetic_identity(args.d_model, (15,), args.shard_mb)
    n_tokens = int(args.gb * 1e9) // (2 * args.d_model) // BLOCK_TOKENS * BLOCK_TOKENS
    rng = np.random.default_rng(0)
    # 1 GB of bf16 bit patterns in N(0, 1)-like range, reused cyclically
    pool = (rng.standard_normal((min(n_tokens, 2**30 // (2 * args.d_model)), args.d_model), dtype=np.float32)
            .view(np.uint32) >> 16).astype(np.uint16)
    print(f"{n_tokens:,} tokens x d_model {args.d_model} bf16 = {n_tokens * args.d_model * 2 / 1e9:.2f} GB of "
          f"activations; chunks of {identity.chunk_tokens} tokens, shards of {identity.shard_tokens} tokens "
          f"({identity.shard_tokens * args.d_model * 2 / 2**20:.0f} MB); folder {folder}", flush=True)
    ratios = []
    for round_ in range(args.rounds):
        store_path = folder / "store"
        raw_path = folder / "raw.bin"
        expected = n_tokens * args.d_model * 2
        if round_ % 2:  # alternate which goes first: the disk's state drifts
            raw_seconds = raw_write(raw_path, pool, expected)
            raw_path.unlink()
        seconds, files, size = store_write(store_path, pool, n_tokens, identity)
        shutil.rmtree(store_path)
        if not round_ % 2:
            raw_seconds = raw_write(raw_path, pool, expected)
            raw_path.unlink()
        raw_seconds *= size / expected  # the same bytes as the store holds (its columns and indexes too)
        store_rate, raw_rate = size / seconds / 1e6, size / raw_seconds / 1e6
        ratios.append(store_rate / raw_rate)
        print(f"round {round_ + 1}: store writer {store_rate:8.1f} MB/s ({files} files, {size / 1e9:.2f} GB in "
              f"{seconds:.1f} s)   raw sequential {raw_rate:8.1f} MB/s ({raw_seconds:.1f} s)   "
              f"ratio {ratios[-1]:.2f}", flush=True)
    print(f"store ÷ raw: {' '.join(f'{r:.2f}' for r in ratios)} (goal >= 0.5)")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
