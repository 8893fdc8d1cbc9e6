"""How to batch FAST dialogues on this CPU: extraction throughput of batching variants, side by side in one run.

    .venv/bin/python bench/extract_batching.py [--dialogues 32] [--max-len 512] [--layer 15]

Prints real (unpadded) tokens per second for: one dialogue per forward pass; dialogues batched in
dataset order and padded to the longest; length-bucketed batches at several token budgets; and the whole
`run_extract` (model load and store writes included) with the background writer versus writing synchronously.
"""

import argparse
import itertools
import shutil
import tempfile
import time

import numpy as np
import torch

from instructsae.extract import run as extract_run
from instructsae.extract.data import DatasetReader
from instructsae.extract.instances import fast_instances
from instructsae.lm.batches import length_batches
from instructsae.lm.hooks import residuals_at_layers
from instructsae.lm.models import load_model
from instructsae.schemas import ExtractConfig


def forward_batches(lm, instances, batches, layer) -> None:
    for batch in batches:
        width = max(len(instances[i].token_ids) for i in batch)
        ids = torch.full((len(batch), width), lm.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, index in enumerate(batch):
            n = len(instances[index].token_ids)
            ids[row, :n] = torch.from_numpy(instances[index].token_ids.astype(np.int64))
            mask[row, :n] = 1
        residuals_at_layers(lm.model, (layer,), ids, mask)


def timed(label, n_tokens, fn, results) -> None:
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    results[label] = n_tokens / seconds
    print(f"{label:<44} {n_tokens / seconds:8.0f} tok/s  ({seconds:.1f} s)", flush=True)


class SynchronousWriter:
    """Drop-in for BackgroundWriter that writes on the calling thread."""

    def __init__(self, writer):
        self.writer = writer

    def submit(self, block, manifest):
        self.writer.append(block, manifest)

    def close(self):
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dialogues", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch-tokens", type=int, default=8192, help="largest bucketing budget tried")
    parser.add_argument("--run-batch-tokens", type=int, default=None, help="budget of the run_extract rows "
                        "(default: the extract default)")
    args = parser.parse_args()

    lm = load_model("smollm2", "float32")
    torch.set_num_threads(torch.get_num_threads())
    records = itertools.islice(iter(DatasetReader("sharegpt", "train")), args.dialogues)
    instances = list(fast_instances(records, lm.tokenizer, args.max_len))
    n_tokens = sum(len(instance.token_ids) for instance in instances)
    lengths = [len(instance.token_ids) for instance in instances]
    print(f"{len(instances)} ShareGPT dialogues, {n_tokens} tokens (max_len {args.max_len}), layer {args.layer}, "
          f"{torch.get_num_threads()} threads")
    forward_batches(lm, instances, [[0]], args.layer)  # warm-up

    results: dict[str, float] = {}
    one_each = [[i] for i in range(len(instances))]
    per_batch = max(1, args.batch_tokens // args.max_len)
    in_order = [list(range(i, min(i + per_batch, len(instances)))) for i in range(0, len(instances), per_batch)]
    timed("one dialogue per forward", n_tokens, lambda: forward_batches(lm, instances, one_each, args.layer), results)
    timed(f"dataset order, {per_batch} per batch, padded", n_tokens,
          lambda: forward_batches(lm, instances, in_order, args.layer), results)
    for budget in (1024, 2048, args.batch_tokens):
        timed(f"length-bucketed, batch_tokens {budget}", n_tokens,
              lambda: forward_batches(lm, instances, length_batches(lengths, budget), args.layer), results)

    # bf16 compute on the first 8 dialogues only: it is slow on CPUs without bf16 units
    few = instances[:8]
    few_tokens = sum(len(instance.token_ids) for instance in few)
    timed("8 dialogues, one per forward, fp32", few_tokens,
          lambda: forward_batches(lm, few, [[i] for i in range(len(few))], args.layer), results)
    lm_bf16 = load_model("smollm2", "bfloat16")
    timed("8 dialogues, one per forward, bf16", few_tokens,
          lambda: forward_batches(lm_bf16, few, [[i] for i in range(len(few))], args.layer), results)
    del lm_bf16

    folder = tempfile.mkdtemp()
    cfg = ExtractConfig(out=f"{folder}/a", layers=(args.layer,), max_instances=args.dialogues, max_len=args.max_len,
                        batch_tokens=args.run_batch_tokens, chunk_tokens=1024)
    stored = n_tokens - len(instances)
    timed("run_extract, background writer (ours)", stored,
          lambda: extract_run.run_extract(cfg, show_progress=False), results)
    real_writer = extract_run.BackgroundWriter
    extract_run.BackgroundWriter = SynchronousWriter
    try:
        timed("run_extract, synchronous writes", stored,
              lambda: extract_run.run_extract(cfg.model_copy(update={"out": f"{folder}/b"}), show_progress=False),
              results)
    finally:
        extract_run.BackgroundWriter = real_writer
        shutil.rmtree(folder, ignore_errors=True)

    base = results["one dialogue per forward"]
    print("\nratios (tokens/s over one dialogue per forward):")
    for label, rate in results.items():
        if not label.startswith("8 dialogues"):
            print(f"  {label:<44} {rate / base:5.2f}x")
    print(f"bf16 / fp32 compute: {results['8 dialogues, one per forward, bf16'] / results['8 dialogues, one per forward, fp32']:.2f}x")
    print(f"background / synchronous writer: "
          f"{results['run_extract, background writer (ours)'] / results['run_extract, synchronous writes']:.2f}x")


if __name__ == "__main__":
    main()
