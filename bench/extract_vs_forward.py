"""What extraction costs beyond the model's forward pass, and FAST against BT, side by side in one run.

    .venv/bin/python bench/extract_vs_forward.py [--dialogues 40] [--layer 15]

On the first N ShareGPT dialogues (chat template, max_len 8192), SmolLM2 in fp32, layer 15, bf16 store:
- bare forward: the model cut after layer 15 (no hook, no store, no LM head) over exactly the batches
  `run_extract` makes, with and without an attention mask for the right padding;
- `run_extract` FAST, timed whole (model load from the cache, chat template, tokenizing, hooks, bf16
  conversion, store writes): its wall time over the bare forward's;
- FAST one dialogue per forward pass (the naive way), and BT(F) on the same dialogues (concatenated and cut
  into 2048-token blocks): FAST tokens/s over BT tokens/s.
"""

import argparse
import contextlib
import shutil
import tempfile
import time

import torch

from instructsae.extract import run as extract_run
from instructsae.extract.data import DatasetReader
from instructsae.extract.plan import grouped, planned_instances
from instructsae.lm.batches import batch_budget, length_batches, padded_batch
from instructsae.lm.models import load_model
from instructsae.store.layout import default_chunk_tokens
from instructsae.schemas import ExtractConfig


@contextlib.contextmanager
def cut_after(model, layer: int):
    """The decoder with only layers 0..layer (llama-style `base_model.layers`)."""
    base = model.base_model
    all_layers = base.layers
    base.layers = torch.nn.ModuleList(list(all_layers)[: layer + 1])
    try:
        yield base
    finally:
        base.layers = all_layers


@torch.no_grad()
def bare_forward(lm, cfg: ExtractConfig, with_mask: bool) -> int:
    """The forward passes `run_extract` makes, and nothing else; returns the tokens it stores."""
    dataset = DatasetReader(cfg.dataset, cfg.split)
    instances = list(planned_instances(cfg, lm.tokenizer, dataset))
    chunk_tokens = cfg.chunk_tokens or default_chunk_tokens(lm.d_model, cfg.dtype)
    pad_id = lm.tokenizer.pad_token_id or 0
    start = time.perf_counter()
    with cut_after(lm.model, max(cfg.layers)) as truncated:
        for group in grouped(instances, extract_run.group_tokens(cfg, chunk_tokens)):
            lengths = [len(instance.token_ids) for instance in group]
            for batch in length_batches(lengths, batch_budget(cfg.batch_tokens, cfg.device)):
                input_ids_BS = padded_batch(group, batch, pad_id)
                mask_BS = None
                if with_mask:
                    mask_BS = (torch.arange(input_ids_BS.shape[1]) < torch.tensor([lengths[i] for i in batch])[:, None])
                truncated(input_ids=input_ids_BS, attention_mask=mask_BS, use_cache=False)
    seconds = time.perf_counter() - start
    return sum(len(instance.token_ids) - 1 for instance in instances), seconds


def timed_extract(cfg: ExtractConfig) -> tuple[int, float]:
    start = time.perf_counter()
    manifest = extract_run.run_extract(cfg, show_progress=False)
    return manifest.n_tokens, time.perf_counter() - start


def report(label: str, n_tokens: int, seconds: float, results: dict) -> None:
    results[label] = (n_tokens, seconds)
    print(f"{label:<52} {n_tokens:>7} tok {seconds:7.1f} s {n_tokens / seconds:7.0f} tok/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dialogues", type=int, default=40)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of bare forward and run_extract")
    args = parser.parse_args()

    folder = tempfile.mkdtemp()
    # fp32, as run_extract resolves `auto` on a CPU; the bare forward and the extraction compute alike
    fast = ExtractConfig(out=f"{folder}/fast", layers=(args.layer,), max_instances=args.dialogues,
                         model_dtype="float32", device="cpu")
    lm = load_model(fast.model, fast.model_dtype)
    print(f"first {args.dialogues} ShareGPT dialogues, layer {args.layer}, {torch.get_num_threads()} threads, "
          f"batches of {batch_budget(fast.batch_tokens, fast.device)} padded tokens")
    results: dict[str, tuple[int, float]] = {}
    try:
        # alternated and repeated: this shared machine drifts by several percent over minutes
        for round_index in range(args.rounds):
            report(f"bare forward, same batches, no attention mask #{round_index + 1}",
                   *bare_forward(lm, fast, with_mask=False), results)
            report(f"run_extract FAST (ours), whole command #{round_index + 1}",
                   *timed_extract(fast.model_copy(update={"out": f"{folder}/fast{round_index}"})), results)
        report("bare forward, same batches, attention mask", *bare_forward(lm, fast, with_mask=True), results)
        naive = fast.model_copy(update={"out": f"{folder}/naive", "batch_tokens": 1})
        report("run_extract FAST, one dialogue per forward pass", *timed_extract(naive), results)
        bt = fast.model_copy(update={"out": f"{folder}/bt", "mode": "bt"})
        report("run_extract BT(F), 2048-token blocks, same dialogues", *timed_extract(bt), results)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def best(prefix):  # the fastest of the rounds, as timeit does: noise only ever adds time
        return min((value for label, value in results.items() if label.startswith(prefix)), key=lambda v: v[1])

    results["bare forward, same batches, no attention mask"] = best("bare forward, same batches, no attention mask #")
    results["run_extract FAST (ours), whole command"] = best("run_extract FAST (ours), whole command #")

    def rate(label):
        n_tokens, seconds = results[label]
        return n_tokens / seconds

    bare = results["bare forward, same batches, no attention mask"][1]
    print(f"\nratios (best of {args.rounds} rounds for the first two rows):")
    print(f"  extraction wall time / bare forward:          "
          f"{results['run_extract FAST (ours), whole command'][1] / bare:.2f}  (goal <= 1.10)")
    print(f"  bare forward with mask / without:             "
          f"{results['bare forward, same batches, attention mask'][1] / bare:.2f}  (time)")
    bt = rate("run_extract BT(F), 2048-token blocks, same dialogues")
    print(f"  FAST tok/s / BT(F) tok/s:                     "
          f"{rate('run_extract FAST (ours), whole command') / bt:.2f}  (goal >= 0.85)")
    print(f"  naive FAST tok/s / BT(F) tok/s:               "
          f"{rate('run_extract FAST, one dialogue per forward pass') / bt:.2f}")


if __name__ == "__main__":
    main()
