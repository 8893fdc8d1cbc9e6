"""Can the store feed the SAE? Reader throughput against SAE step throughput, side by side in one run.

    .venv/bin/python bench/train_stream.py --store runs/demo/stores/fast-train [--layer 15]

Prints tokens/s of: reading + mixing alone (prefetch thread on), the same without prefetch, SAE steps on
in-memory batches alone, and training fed by the store; then the ratios.
"""

import argparse
import time

import torch

from instructsae.extract.store import open_store
from instructsae.schemas import JumpReLUConfig, OptimConfig
from instructsae.train import stream
from instructsae.train.dead import DeadFeatureTracker
from instructsae.train.sae import build_sae
from instructsae.train.trainer import train


def rate(label: str, fn, results: dict) -> None:
    start = time.perf_counter()
    n_tokens = fn()
    results[label] = n_tokens / (time.perf_counter() - start)
    print(f"{label:<40} {results[label]:10.0f} tok/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--expansion", type=int, default=8)
    args = parser.parse_args()

    reader = open_store(args.store)
    chunks = list(range(reader.n_chunks))
    read = lambda index: reader.read_acts_chunk(args.layer, index)  # noqa: E731
    print(f"store {args.store}: {reader.n_tokens:,} tokens in {reader.n_chunks} chunks, d_model {reader.d_model}, "
          f"{torch.get_num_threads()} threads")

    def drain(batches) -> int:
        return sum(len(batch) for batch in batches)

    results: dict[str, float] = {}
    rate("read + mix, prefetch thread (ours)", lambda: drain(
        stream.iter_batches(read, chunks, args.batch_size, 65_536, seed=0)), results)
    real_prefetch = stream.prefetch
    stream.prefetch = lambda items, depth=2: iter(items)
    try:
        rate("read + mix, no prefetch", lambda: drain(
            stream.iter_batches(read, chunks, args.batch_size, 65_536, seed=0)), results)
    finally:
        stream.prefetch = real_prefetch

    sae = build_sae(JumpReLUConfig(expansion=args.expansion), reader.d_model)
    in_memory = [batch.clone() for batch in stream.iter_batches(read, chunks[:16], args.batch_size, 65_536, seed=1)]
    optim = OptimConfig(lr=1e-4)

    def steps(batches, n):
        stats = train(sae, iter(batches), optim, 1e-3, n, DeadFeatureTracker(sae.d_sae), lambda _: None, 10_000)
        return stats["tokens_seen"]

    rate(f"SAE steps alone (expansion {args.expansion})", lambda: steps(in_memory, len(in_memory)), results)
    n_fed = reader.n_tokens // args.batch_size
    rate("SAE steps fed from the store", lambda: steps(
        stream.iter_batches(read, chunks, args.batch_size, 65_536, seed=2), n_fed), results)

    print("\nratios:")
    print(f"  reader / SAE alone:                 {results['read + mix, prefetch thread (ours)'] / results[f'SAE steps alone (expansion {args.expansion})']:.1f}x")
    print(f"  fed from store / SAE alone:          {results['SAE steps fed from the store'] / results[f'SAE steps alone (expansion {args.expansion})']:.2f}x")
    print(f"  prefetch / no prefetch (reader):     {results['read + mix, prefetch thread (ours)'] / results['read + mix, no prefetch']:.2f}x")


if __name__ == "__main__":
    main()
