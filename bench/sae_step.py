"""JumpReLU training speed at d_sae = 16 × 576, batch 4096: plain autograd against ours, side by side in one run.

    .venv/bin/python bench/sae_step.py [--store runs/demo/stores/fast-train] [--steps 3] [--train-steps 150]

Part 1 times one full optimiser step (forward, backward, Adam, decoder renormalisation) on real layer-15
activations at three sparsity states: fresh weights (about half the latents fire) and thresholds set so that
~64 and ~16 latents fire per token, as after training. "plain autograd" is the loss as Gemma Scope's
pseudo-code writes it (tests/reference_jumprelu.py); "ours" is JumpReLUSAE.training_loss.
Part 2 trains a fresh SAE for real (`instructsae train` code path, the demo's settings at expansion 16 and
batch 4096) and reports its tokens/s over the whole run and after the sparsity warm-up.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from instructsae.store.reader import open_store
from instructsae.schemas import JumpReLUConfig, OptimConfig, TrainConfig
from instructsae.sae import build_sae
from instructsae.train.run import run_training

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the reference lives with the tests
from reference_jumprelu import reference_jumprelu_loss  # noqa: E402

D_MODEL, EXPANSION, BATCH = 576, 16, 4096


def real_batch(store: str, layer: int) -> torch.Tensor:
    reader = open_store(store)
    parts, n = [], 0
    for index in range(reader.n_chunks):
        parts.append(reader.read_acts_chunk(layer, index))
        n += len(parts[-1])
        if n >= BATCH:
            break
    x_BD = torch.cat(parts)[:BATCH]
    return x_BD / x_BD.pow(2).sum(-1).mean().sqrt()  # unit mean squared norm, as training sees it


def set_sparsity(sae, x_BD: torch.Tensor, latents_per_token: int) -> None:
    """Per-feature thresholds at the quantile that lets about `latents_per_token` latents fire per token."""
    with torch.no_grad():
        pre_BF = torch.relu(sae.pre_activations(x_BD))
        keep = max(1, round(len(x_BD) * latents_per_token / sae.d_sae))
        sae.threshold.copy_(pre_BF.kthvalue(len(x_BD) - keep, dim=0).values.clamp_min(1e-6))


def seconds_per_step(sae, x_BD: torch.Tensor, loss_fn, n_steps: int) -> tuple[float, float]:
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-5)  # small: the sparsity state barely moves

    def step():
        loss = loss_fn(x_BD)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()

    step()  # warm-up (and, for ours, lets the SAE see its own density)
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    with torch.no_grad():
        l0 = float((sae.encode(x_BD) > 0).float().sum(-1).mean())
    return (time.perf_counter() - start) / n_steps, l0


def part_one(x_BD: torch.Tensor, n_steps: int) -> None:
    print(f"\n1. one optimiser step, d_sae {EXPANSION} x {D_MODEL}, batch {BATCH}, {torch.get_num_threads()} threads")
    print(f"{'sparsity state':<28} {'plain autograd':>16} {'ours':>16} {'ours / plain':>13}")
    for label, target in (("fresh weights", None), ("~64 latents per token", 64), ("~16 latents per token", 16)):
        rates = {}
        for variant in ("plain autograd", "ours"):
            torch.manual_seed(0)
            sae = build_sae(JumpReLUConfig(expansion=EXPANSION), D_MODEL)
            if target is not None:
                set_sparsity(sae, x_BD, target)
            if variant == "ours":
                loss_fn = lambda x: sae.training_loss(x, 1e-3).loss  # noqa: E731
            else:
                loss_fn = lambda x: reference_jumprelu_loss(sae, x, 1e-3)  # noqa: E731
            seconds, l0 = seconds_per_step(sae, x_BD, loss_fn, n_steps)
            rates[variant] = BATCH / seconds
        print(f"{label + f' (L0 {l0:.0f})':<28} {rates['plain autograd']:12.0f} tok/s {rates['ours']:10.0f} tok/s "
              f"{rates['ours'] / rates['plain autograd']:12.2f}x", flush=True)


def part_two(store: str, layer: int, n_steps: int) -> None:
    optim = OptimConfig(lr=1e-3, lr_warmup_steps=20, beta1=0.9, sparsity_warmup_steps=100)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(store=store, out=out, layer=layer, batch_size=BATCH, tokens=BATCH * n_steps, optim=optim,
                          sae=JumpReLUConfig(expansion=EXPANSION, sparsity_coeff=0.003), buffer_tokens=65_536,
                          log_every=10)
        summary = run_training(cfg)
        records = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    after = [r for r in records if r["step"] >= optim.sparsity_warmup_steps]
    print(f"\n2. a real training run from fresh weights ({n_steps} steps of {BATCH}, the demo's JumpReLU settings at "
          f"expansion {EXPANSION})")
    print(f"   whole run: {summary['tokens_per_s']:.0f} tok/s (held-out NMSE {summary['nmse']:.3f}, "
          f"L0 {summary['l0']:.1f})")
    for record in records[:: max(1, len(records) // 6)] + records[-1:]:
        print(f"   step {record['step']:>4}: L0 {record['l0']:8.1f}, elapsed {record['elapsed_s']:6.1f} s")
    if len(after) >= 2:
        tokens = after[-1]["tokens"] - after[0]["tokens"]
        seconds = after[-1]["elapsed_s"] - after[0]["elapsed_s"]
        steps = f"steps {after[0]['step']}-{after[-1]['step']}"
        print(f"   after the sparsity warm-up ({steps}): {tokens / seconds:.0f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", default="runs/demo/stores/fast-train")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant in part 1")
    parser.add_argument("--train-steps", type=int, default=150, help="steps of the real run in part 2 (0: skip)")
    args = parser.parse_args()
    part_one(real_batch(args.store, args.layer), args.steps)
    if args.train_steps:
        part_two(args.store, args.layer, args.train_steps)


if __name__ == "__main__":
    main()
