"""Can the store feed the SAE? Reader throughput against SAE training, side by side in one run.

    .venv/bin/python bench/train_stream.py --store runs/demo/stores/fast-train [--layer 15] [--steps 30] [--rounds 2]

Prints tokens/s of: reading + mixing alone (reads on a pool of reader threads, then on the calling thread);
and JumpReLU training at d_sae 16 × 576, batch 4096, on batches already in RAM against the same training fed
from the store through the mixing buffer as `train` feeds it (rows in the store's dtype, each batch made
float32 and scaled in the training loop), reading on the training thread (what `train` does on a CPU) and on
the reader threads (what it does with an accelerator).
All trainings start from the same weights, thresholds set so ~32 latents fire per token
(the sparse steady state: the slower dense start would only dilute the comparison), and run the same steps.
"""

import argparse
import copy
import time

import torch

from instructsae.store.reader import open_store
from instructsae.schemas import JumpReLUConfig, OptimConfig
from instructsae.train import stream
from instructsae.train.dead import DeadFeatureTracker
from instructsae.sae import build_sae
from instructsae.train.trainer import Trainee, train
from sae_step import set_sparsity

BUFFER_TOKENS = 262_144  # the train default


def rate(label: str, fn, results: dict) -> None:
    start = time.perf_counter()
    n_tokens = fn()
    results[label] = n_tokens / (time.perf_counter() - start)
    print(f"{label:<44} {results[label]:10.0f} tok/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="training steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--read-threads", type=int, default=4, help="reader threads of the pooled variants")
    args = parser.parse_args()

    reader = open_store(args.store)
    chunks = list(range(reader.n_chunks))
    scale = 1.0 / reader.manifest.layer_stats[str(args.layer)].mean_sq_norm ** 0.5
    depth = stream.prefetch_depth(BUFFER_TOKENS, reader.chunk_tokens)
    read = lambda index: reader.read_acts_chunk_as_stored(args.layer, index)  # noqa: E731
    print(f"store {args.store}: {reader.n_tokens:,} tokens in {reader.n_chunks} chunks, d_model {reader.d_model}, "
          f"{torch.get_num_threads()} threads; batch {args.batch_size}, d_sae {args.expansion} x {reader.d_model}")

    def batches_from_store(seed: int, prefetch_chunks: int, max_tokens: int | None = None):
        return stream.ShuffledStream(read, chunks, reader.chunk_tokens, args.batch_size, BUFFER_TOKENS, seed,
                                     max_tokens, prefetch_chunks, read_threads=args.read_threads)

    def as_training_input(batches):
        return (batch.float() * scale for batch in batches)  # what StoreView.on_device does on a CPU

    def drain(batches) -> int:
        return sum(len(batch) for batch in batches)

    results: dict[str, float] = {}
    rate("read + mix, reader threads", lambda: drain(batches_from_store(0, depth)), results)
    rate("read + mix, no prefetch", lambda: drain(batches_from_store(0, 0)), results)

    torch.manual_seed(0)
    start_sae = build_sae(JumpReLUConfig(expansion=args.expansion), reader.d_model)
    n_tokens = args.steps * args.batch_size
    in_ram = list(as_training_input(batches_from_store(1, 0, n_tokens)))
    set_sparsity(start_sae, in_ram[0], latents_per_token=32)
    optim = OptimConfig(lr=1e-4, lr_warmup_steps=0, sparsity_warmup_steps=0)

    def training(batches) -> int:
        sae = copy.deepcopy(start_sae)
        trainee = Trainee(sae, optim, 1e-3, DeadFeatureTracker(sae.d_sae), lambda _: None)
        stats = train([trainee], iter(batches), args.steps, log_every=10_000)
        return stats["tokens_seen"]

    variants = {
        "JumpReLU training, batches in RAM": lambda: in_ram,
        "JumpReLU training, fed from the store (ours)": lambda: as_training_input(batches_from_store(1, 0, n_tokens)),
        "JumpReLU training, fed from the store, threads": lambda: as_training_input(
            batches_from_store(1, depth, n_tokens)),
    }
    # alternated and repeated, the best of each kept (as timeit does): this shared machine drifts
    for round_index in range(args.rounds):
        for label, batches in variants.items():
            rate(f"{label} #{round_index + 1}", lambda: training(batches()), results)
    for label in variants:
        results[label] = max(rate_ for name, rate_ in results.items() if name.startswith(f"{label} #"))

    in_ram_rate = results["JumpReLU training, batches in RAM"]
    print(f"\nratios (training: best of {args.rounds} rounds):")
    print(f"  reader / training:                   {results['read + mix, reader threads'] / in_ram_rate:.1f}x")
    print(f"  fed from the store / from RAM:       "
          f"{results['JumpReLU training, fed from the store (ours)'] / in_ram_rate:.2f}  (goal >= 0.95)")
    print(f"  the same with reader threads / RAM:  "
          f"{results['JumpReLU training, fed from the store, threads'] / in_ram_rate:.2f}")
    print(f"  reader threads / none (reader):      "
          f"{results['read + mix, reader threads'] / results['read + mix, no prefetch']:.2f}x")


if __name__ == "__main__":
    main()
