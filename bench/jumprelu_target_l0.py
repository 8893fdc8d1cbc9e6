"""JumpReLU towards a target L0 against today's JumpReLU and TopK at matched L0, side by side in one run, with a
Matryoshka BatchTopK riding on the same pass; or (--optimiser-check) TopK and BatchTopK under Adam β1 = 0 and 0.9,
with and without clipping, in one run.

    .venv/bin/python bench/jumprelu_target_l0.py --store runs/demo/stores/fast-train \
        --heldout runs/demo/stores/fast-heldout --out /tmp/bench-target-l0 [--tokens 300000] [--expansion 8] \
        [--seeds 2]
    .venv/bin/python bench/jumprelu_target_l0.py ... --out /tmp/bench-optimiser --optimiser-check

Every SAE trains in one pass over the store (the same batches, `instructsae sweep`'s code path) with the
schedule `instructsae train --tokens 300000` fits when nothing else is given (batch 1024, lr 1e-3, short
warm-ups, Adam β1 = 0, gradient norm clipped at 1), and is then measured on the held-out store. Target mode
runs at its defaults (`train --target-l0 T` and nothing else); beside it, one target without steering
(`--target-l0-gain 0`: Gemma Scope 2's quadratic centred on the target). Today's JumpReLU (an L0 penalty, one
coefficient per point) and TopK (one k per point, with points at the targets) each give a frontier of held-out
NMSE against L0; at the L0 each target-L0 SAE ended at, both frontiers are read off, linear in log L0 between
their points (instructsae.evaluate.matched), and the table says by how much the target-L0 SAE beats each. With
--seeds N every SAE trains N times (SAE seeds 0..N-1, the same batches), and each point is the seeds' mean.

The same pass also trains a Matryoshka BatchTopK at k = 30, and the table gives every SAE's training seconds per
step (the SAEs step one after another on each batch, so they share the machine's conditions); with --lm-tokens,
the LM view (CE loss recovered) of the SAEs near L0 30.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from instructsae.api import evaluate_sae
from instructsae.evaluate.matched import OutsideFrontier, interpolate
from instructsae.run_folder import RunPaths
from instructsae.schemas.train import TrainConfig
from instructsae.train.run import train_saes


def configs(args, root: Path) -> dict[str, list[TrainConfig]]:
    """The groups of SAEs, each over its settings and seeds; only what differs from the fitted defaults is set."""
    def config(name: str, sae: dict, optim: dict | None = None, seed: int = 0) -> TrainConfig:
        suffix = f"-s{seed}" if args.seeds > 1 else ""
        return TrainConfig(store=args.store, out=str(root / f"{name}{suffix}"), tokens=args.tokens,
                           buffer_tokens=65_536, sae={"expansion": args.expansion, **sae}, optim=optim or {},
                           sae_seed=seed)

    seeds = range(args.seeds)
    if args.optimiser_check:
        return {"optimiser": [config(f"{arch}32{name}", {"arch": arch, "k": 32}, optim)
                              for arch in ("topk", "batchtopk")
                              for name, optim in (("", {}), ("-beta0.9", {"beta1": 0.9}),
                                                  ("-noclip", {"grad_clip": None}))]}
    return {
        "target": [config(f"jumprelu-target{t:g}", {"arch": "jumprelu", "target_l0": t}, seed=seed)
                   for t in args.targets for seed in seeds],
        "unsteered": [config(f"jumprelu-target{args.targets[len(args.targets) // 2]:g}-gain0",
                             {"arch": "jumprelu", "target_l0": args.targets[len(args.targets) // 2],
                              "target_l0_gain": 0.0})],
        "jumprelu": [config(f"jumprelu-c{c:g}", {"arch": "jumprelu", "sparsity_coeff": c}, seed=seed)
                     for c in args.coeffs for seed in seeds],
        "topk": [config(f"topk{k}", {"arch": "topk", "k": k}, seed=seed) for k in args.ks for seed in seeds],
        "matryoshka": [config("matryoshka30", {"arch": "matryoshka_batchtopk", "k": 30})],
    }


def seed_means(results: list[dict], n_seeds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per setting (consecutive groups of n_seeds results): mean L0, mean NMSE, and NMSE's half-range over seeds."""
    l0 = np.array([r["l0"] for r in results]).reshape(-1, n_seeds)
    nmse = np.array([r["nmse"] for r in results]).reshape(-1, n_seeds)
    return l0.mean(axis=1), nmse.mean(axis=1), (nmse.max(axis=1) - nmse.min(axis=1)) / 2


def matched_table(args, results: dict) -> None:
    frontiers = {name: seed_means(results[name], args.seeds)[:2] for name in ("jumprelu", "topk")}
    spread = " (mean of the seeds ± half their range)" if args.seeds > 1 else ""
    print(f"\n| target L0 | L0 reached | NMSE{spread} | today's JumpReLU at that L0 | target-L0 better by | TopK at "
          "that L0 | target-L0 better by |\n|---|---|---|---|---|---|---|")
    for target, l0, nmse, half_range in zip(args.targets, *seed_means(results["target"], args.seeds)):
        cells = [f"{target:g}", f"{l0:.1f}", f"{nmse:.4f}" + (f" ± {half_range:.4f}" if args.seeds > 1 else "")]
        for name, (l0_P, nmse_P) in frontiers.items():
            try:
                at = float(interpolate(l0_P, nmse_P, np.array([l0]), name)[0])
                cells += [f"{at:.4f}", f"{1 - nmse / at:+.1%}"]
            except OutsideFrontier as error:
                cells += [f"outside ({error})", "-"]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--out", required=True, help="a new folder for the SAEs (kept, to evaluate further)")
    parser.add_argument("--tokens", type=int, default=300_000)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--targets", type=float, nargs="+", default=[20, 30, 42])
    parser.add_argument("--coeffs", type=float, nargs="+", default=[0.004, 0.0015, 0.0006])
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 20, 30, 42, 60])
    parser.add_argument("--seeds", type=int, default=1, help="train every SAE of the frontiers with this many seeds")
    parser.add_argument("--optimiser-check", action="store_true", help="train the optimiser check instead")
    parser.add_argument("--lm-tokens", type=int, default=0, help="held-out tokens for the LM view (0: skip it)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="measure the SAEs an earlier run of the same command left in --out (no training)")
    args = parser.parse_args()

    root = Path(args.out)
    groups = configs(args, root)
    every = [cfg for group in groups.values() for cfg in group]
    if args.evaluate_only:
        summaries = {cfg.out: json.loads(RunPaths(cfg.out).summary.read_text()) for cfg in every}
    else:
        summaries = dict(zip((cfg.out for cfg in every), train_saes(every, root / "checkpoint.pt")))
    results = {name: evaluate_sae([cfg.out for cfg in group], args.heldout) for name, group in groups.items()}

    print(f"\n{args.tokens:,} training tokens, d_sae {args.expansion} × d_model, held out: {args.heldout}\n")
    print("| SAE | L0 | NMSE | explained variance | dead | train s/step |\n|---|---|---|---|---|---|")
    for name, group in groups.items():
        for cfg, result in zip(group, results[name]):
            summary = summaries[cfg.out]
            print(f"| {Path(cfg.out).name} | {result['l0']:.1f} | {result['nmse']:.4f} | "
                  f"{result['explained_variance']:.4f} | {result['dead_fraction']:.3f} | "
                  f"{summary['sae_seconds'] / summary['n_steps']:.3f} |")
    if args.optimiser_check:
        return
    matched_table(args, results)
    if args.lm_tokens:
        suffix = "-s0" if args.seeds > 1 else ""
        chosen = [root / name for name in (f"jumprelu-c0.0015{suffix}", f"jumprelu-target30{suffix}", f"topk30{suffix}",
                                           f"matryoshka30{suffix}")]
        print("\n| SAE | L0 | NMSE | CE recovered |\n|---|---|---|---|")
        for folder, result in zip(chosen, evaluate_sae([str(f) for f in chosen], args.heldout,
                                                       lm_tokens=args.lm_tokens)):
            print(f"| {folder.name} | {result['l0']:.1f} | {result['nmse']:.4f} | "
                  f"{result['lm']['ce_loss_recovered']:.4f} |")


if __name__ == "__main__":
    main()
