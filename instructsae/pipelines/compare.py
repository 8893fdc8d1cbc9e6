"""`make compare`: block training on pretraining text (BT(P)), on SFT dialogues (BT(F)) and FAST, side by side.

Three training stores with the same token budget, the same grid of SAEs trained on each (one sweep per store),
all evaluated on one held-out FAST store of dialogues none of them saw: the instruct model's real operating
distribution. Writes report.md with the tables and the L0–NMSE frontier of each method.
"""

import json
import shlex
import sys
from pathlib import Path

from instructsae.charts import plot_frontier
from instructsae.cli_options import build
from instructsae.evaluate.run import evaluate_saes_on_store, format_optional
from instructsae.extract.heldout import heldout_skip
from instructsae.extract.run import run_extract
from instructsae.fileio import write_text_atomically
from instructsae.schemas import ExtractConfig
from instructsae.schemas.compare import CompareConfig
from instructsae.schemas.evaluate import LMViewConfig
from instructsae.schemas.sweep import SweepConfig
from instructsae.train.sae_folder import provenance
from instructsae.train.sweep import expand_sweep, resolve_grid, run_sweep

METHODS = ("bt-p", "bt-f", "fast")
LABELS = {"bt-p": "BT(P)", "bt-f": "BT(F)", "fast": "FAST"}


def method_extract_configs(cfg: CompareConfig, stores: Path) -> dict[str, ExtractConfig]:
    common = dict(model=cfg.model, layers=(cfg.layer,), max_tokens=cfg.tokens, block_len=cfg.block_len,
                  device=cfg.device)
    return {
        "bt-p": ExtractConfig(**common, dataset=cfg.pretraining_text, mode="bt", out=str(stores / "bt-p")),
        "bt-f": ExtractConfig(**common, dataset=cfg.dialogues, mode="bt", out=str(stores / "bt-f")),
        "fast": ExtractConfig(**common, dataset=cfg.dialogues, mode="fast", out=str(stores / "fast")),
    }


def method_sweeps(cfg: CompareConfig, root: Path) -> dict[str, SweepConfig]:
    """The same grid on each method's store; every grid point checked before anything runs."""
    base = {**cfg.train, "layer": cfg.layer, "tokens": cfg.train_tokens, "device": cfg.device}
    sweeps = {method: build(SweepConfig, {"store": str(root / "stores" / method), "out": str(root / "saes" / method),
                                          "base": base, "grid": cfg.grid})
              for method in METHODS}
    resolve_grid(sweeps["fast"])  # the grid and base are the same for all three
    return sweeps


def run_compare(cfg: CompareConfig) -> str:
    root = Path(cfg.out)
    stores = root / "stores"
    sweeps = method_sweeps(cfg, root)
    manifests = {}
    for step, (method, extract_cfg) in enumerate(method_extract_configs(cfg, stores).items(), start=1):
        print(f"[{step}/6] extracting {LABELS[method]} -> {extract_cfg.out}")
        manifests[method] = run_extract(extract_cfg)
    # dialogues after every one that BT(F) or FAST read, from the next whole conversation: the SAEs never saw them
    seen = max(manifests["bt-f"].rows_used, manifests["fast"].rows_used)
    skip = heldout_skip(cfg.dialogues, manifests["fast"].identity.split, seen)
    heldout = stores / "heldout-fast"
    print(f"[4/6] extracting held-out FAST dialogues (after the first {skip:,} rows) -> {heldout}")
    run_extract(ExtractConfig(model=cfg.model, dataset=cfg.dialogues, mode="fast", layers=(cfg.layer,),
                              max_tokens=cfg.heldout_tokens, skip_instances=skip, out=str(heldout),
                              device=cfg.device))

    print("[5/6] training the same SAE grid on each store (one pass per store)")
    sae_dirs = {}
    for method, sweep in sweeps.items():
        run_sweep(sweep)
        # this grid's SAEs only: the folder may also hold those of an earlier run with other settings
        sae_dirs[method] = [Path(point.out) for point in expand_sweep(sweep)]

    print(f"[6/6] evaluating every SAE on {heldout}")
    lm = LMViewConfig(lm_tokens=cfg.lm_tokens, device=cfg.device)
    # one call: the model runs clean and ablated once for all SAEs
    all_dirs = [(method, str(sae_dir)) for method in METHODS for sae_dir in sae_dirs[method]]
    evaluated = evaluate_saes_on_store([sae_dir for _, sae_dir in all_dirs], str(heldout), lm=lm)
    results = [{**result, "method": method} for (method, _), result in zip(all_dirs, evaluated)]
    write_text_atomically(root / "results.json", json.dumps(results, indent=2))
    report = write_report(root, cfg, results)
    print(report)
    return report


def _sparsity(result: dict) -> str:
    cfg = provenance(json.loads((Path(result["sae"]) / "cfg.json").read_text()))["train_config"]["sae"]
    return f"k={cfg['k']}" if "k" in cfg else f"{cfg['sparsity_coeff']:g}"


def results_table(results: list[dict]) -> str:
    lines = ["| method | arch | sparsity coeff | L0 | NMSE | explained var | dead frac | log2 MSE (Eq.7) | "
             "log2 MSE_st | CE recovered | KL |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["architecture"], METHODS.index(r["method"]), r["l0"])):
        lm = r.get("lm") or {}
        lines.append(f"| {LABELS[r['method']]} | {r['architecture']} | {_sparsity(r)} | {r['l0']:.1f} | "
                     f"{r['nmse']:.4f} | {r['explained_variance']:.4f} | {r['dead_fraction']:.3f} | "
                     f"{format_optional(r['eq7']['log2_mse'], '.4f')} | "
                     f"{format_optional(r['eq7']['log2_mse_st'], '.4f')} | "
                     f"{format_optional(lm.get('ce_loss_recovered'), '.4f')} | "
                     f"{format_optional(lm.get('kl_spliced'), '.4f')} |")
    return "\n".join(lines)


def role_table(results: list[dict]) -> str:
    """NMSE (with L0) and CE recovered per token role, each method's SAEs averaged per architecture."""
    roles = sorted({role for r in results for role in r["per_role"]})
    lines = ["| method | arch | " + " | ".join(f"{role} NMSE (L0) | {role} CE rec." for role in roles) + " |",
             "|---|---|" + "---:|---:|" * len(roles)]
    for arch in sorted({r["architecture"] for r in results}):
        for method in METHODS:
            group = [r for r in results if r["method"] == method and r["architecture"] == arch]
            if not group:
                continue
            cells = []
            for role in roles:
                present = [r["per_role"][role] for r in group if role in r["per_role"]]
                nmse = sum(m["nmse"] for m in present) / len(present) if present else None
                l0 = sum(m["l0"] for m in present) / len(present) if present else None
                recovered = [((r.get("lm") or {}).get("per_role") or {}).get(role, {}).get("ce_loss_recovered")
                             for r in group]
                recovered = [value for value in recovered if value is not None]
                cells.append(f"{format_optional(nmse, '.4f')} ({format_optional(l0, '.1f')}) | "
                             f"{format_optional(sum(recovered) / len(recovered) if recovered else None, '.3f')}")
            lines.append(f"| {LABELS[method]} | {arch} | " + " | ".join(cells) + " |")
    first = results[0]
    lm_roles = (first.get("lm") or {}).get("per_role") or {}
    in_lm = {role: figures.get("n_tokens", 0) for role, figures in lm_roles.items()}
    counts = ", ".join(f"{role} {first['per_role'][role]['n_tokens']:,} ({in_lm.get(role, 0):,})"
                       for role in roles if role in first["per_role"])
    lines.append(f"\nHeld-out tokens per role (in brackets: predicted in the LM view): {counts}.")
    return "\n".join(lines)


def write_report(root: Path, cfg: CompareConfig, results: list[dict]) -> str:
    points = [{"group": f"{LABELS[r['method']]} {r['architecture']}", "l0": r["l0"], "nmse": r["nmse"]}
              for r in results]
    plot_frontier(points, "group", root / "frontier.png",
                  f"{cfg.model} layer {cfg.layer}: held-out FAST dialogues")
    command = " ".join(shlex.quote(arg) for arg in ["instructsae", *sys.argv[1:]]) if sys.argv[1:] else "make compare"
    report = f"""# BT(P) vs BT(F) vs FAST

Command: `{command}`

Model `{cfg.model}`, layer {cfg.layer}. Three training stores of {cfg.tokens:,} tokens each:
BT(P) = `{cfg.pretraining_text}` joined and cut into {cfg.block_len}-token blocks, BT(F) = `{cfg.dialogues}`
dialogues chat-templated, joined and cut the same way, FAST = the same dialogues each run alone. Every SAE
trained for {cfg.train_tokens:,} tokens with the same settings, and evaluated on {cfg.heldout_tokens:,} tokens
of held-out FAST dialogues none of the stores contain (the spliced LM loss on the first {cfg.lm_tokens:,} of
them). NMSE and L0 are on the held-out store; log2 MSE is the FAST paper's Eq. 7 (per sequence, then over
sequences, per element) and MSE_st the same on template/special tokens; CE recovered = (CE zero-ablated − CE
with the SAE) / (CE zero-ablated − CE clean).

## All SAEs

{results_table(results)}

## Per token role (mean over each method's SAEs)

{role_table(results)}

## Sparsity–fidelity frontier

![L0 vs NMSE](frontier.png)
"""
    write_text_atomically(root / "report.md", report)
    return report
