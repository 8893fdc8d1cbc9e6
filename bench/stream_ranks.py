"""Every rank of a sweep needs the same shuffled batches: does each rank read the store itself, or does rank 0 read
and broadcast? Both, side by side in one run, under torchrun:

    .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 bench/stream_ranks.py \
        [--store STORE --layer 15] [--tokens 524288] [--rounds 2]

Without --store, rank 0 first writes a synthetic store (random bf16 rows, d_model 576 like SmolLM2's, the demo's
chunk size) under /tmp/stream-ranks-store through the real writer. Each round times, for the same batches
(batch 4096, the train default's mixing buffer): one rank reading alone (the others wait), every rank reading its
own stream at once, and rank 0 reading and broadcasting each batch (gloo) to the others. Times are wall clock
until the last rank has its last batch.
"""

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from instructsae.store.layout import TokenBlock, default_shard_tokens
from instructsae.store.reader import open_store
from instructsae.store.writer import StoreWriter
from instructsae.schemas import LayerStats, StoreIdentity, StoreManifest
from instructsae.train.stream import ShuffledStream

BUFFER_TOKENS = 262_144
SYNTHETIC = Path("/tmp/stream-ranks-store")


def synthetic_store(n_tokens: int, d_model: int = 576) -> str:
    shutil.rmtree(SYNTHETIC, ignore_errors=True)
    identity = StoreIdentity(model="synthetic", tokenizer="synthetic", chat_template_sha256=None, dataset="random",
                             dataset_sha256="0", split="train", mode="fast", max_len=8192, block_len=2048,
                             max_instances=None, skip_instances=0, max_tokens=n_tokens, keep_first_token=False,
                             layers=(15,), d_model=d_model, dtype="bfloat16", model_dtype="float32",
                             chunk_tokens=4096, shard_tokens=default_shard_tokens(d_model, "bfloat16", 4096))
    manifest = StoreManifest(tool_version="bench", identity=identity, fingerprint=identity.fingerprint())
    writer = StoreWriter.create(str(SYNTHETIC), manifest)
    generator = torch.Generator().manual_seed(0)
    block_tokens, written = 65536, 0
    while written < n_tokens:
        n = min(block_tokens, n_tokens - written)
        acts = torch.randn(n, d_model, generator=generator).to(torch.bfloat16).view(torch.int16).numpy()
        zeros = np.zeros(n, dtype=np.int32)
        block = TokenBlock(acts={15: acts.view(np.uint16)}, token_id=zeros, instance=zeros, position=zeros,
                           role=zeros.astype(np.uint8), instance_start=np.array([written], dtype=np.int64),
                           instance_length=np.array([n], dtype=np.int32), instance_source=np.zeros(1, np.int64))
        written += n
        manifest = manifest.model_copy(update={
            "n_tokens": written, "n_instances": manifest.n_instances + 1,
            "layer_stats": {"15": LayerStats(count=written, sum_sq_norm=float(d_model * written))}})
        writer.append(block, manifest)
    writer.finish(manifest.model_copy(update={"complete": True}))
    return str(SYNTHETIC)


def batches(store: str, layer: int, tokens: int):
    reader = open_store(store)
    return ShuffledStream(lambda index: reader.read_acts_chunk(layer, index), range(reader.n_chunks),
                          reader.chunk_tokens, 4096, BUFFER_TOKENS, 0, tokens, 0)


def each_reads(store: str, layer: int, tokens: int, readers: set[int]) -> int:
    seen = sum(len(batch) for batch in batches(store, layer, tokens)) if dist.get_rank() in readers else 0
    dist.barrier()
    return seen


def rank0_broadcasts(store: str, layer: int, tokens: int, d_model: int) -> int:
    """Rank 0 sends each batch's length, then the batch; the others receive into a buffer of that shape."""
    seen, size = 0, torch.zeros(1, dtype=torch.long)
    source = iter(batches(store, layer, tokens)) if dist.get_rank() == 0 else None
    while True:
        batch = next(source, None) if source is not None else None
        size[0] = 0 if (dist.get_rank() == 0 and batch is None) else (len(batch) if batch is not None else 0)
        dist.broadcast(size, 0)
        if size.item() == 0:
            break
        if batch is None:
            batch = torch.empty(int(size.item()), d_model)
        dist.broadcast(batch.contiguous(), 0)
        seen += len(batch)
    dist.barrier()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=524_288, help="tokens each variant streams")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    store = args.store
    if store is None:
        if rank == 0:
            synthetic_store(args.tokens)
        dist.barrier()
        store = str(SYNTHETIC)
    reader = open_store(store)
    if rank == 0:
        print(f"store {store}: {reader.n_tokens:,} tokens, d_model {reader.d_model}, chunks of "
              f"{reader.chunk_tokens}; {world} ranks, {torch.get_num_threads()} thread(s) each", flush=True)
    variants = {
        "one rank reads alone": lambda: each_reads(store, args.layer, args.tokens, {0}),
        "every rank reads its own stream": lambda: each_reads(store, args.layer, args.tokens, set(range(world))),
        "rank 0 reads and broadcasts": lambda: rank0_broadcasts(store, args.layer, args.tokens, reader.d_model),
    }
    for round_ in range(args.rounds):
        for label, run in variants.items():
            dist.barrier()
            started = time.perf_counter()
            run()
            seconds = time.perf_counter() - started
            if rank == 0:
                print(f"round {round_ + 1}  {label:<34} {args.tokens / seconds:10.0f} tok/s per rank "
                      f"({seconds:.2f} s)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
