"""`make compare`: block training on pretraining text (BT(P)), on SFT dialogues (BT(F)) and FAST, side by side.

Three training stores with the same token budget, the same grid of SAEs over several seeds trained on each (one
sweep per store, every seed in its one pass), all evaluated on held-out FAST stores of dialogues none of them
saw: later dialogues of the training source, and dialogue sets no store was made from. The methods are compared
at matched L0 with bootstrap confidence intervals (compare_stats.py); report.md holds the verdicts and tables,
frontier.png the frontiers with their bands.
"""

import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

from instructsae.charts import plot_frontier_bands
from instructsae.cli_options import build
from instructsae.errors import UserError
from instructsae.evaluate.run import without_per_sequence
from instructsae.extract.heldout import heldout_skip
from instructsae.extract.run import run_extract
from instructsae.fileio import write_text_atomically
from instructsae.pipelines.compare_eval import EVAL_CACHE, evaluate_cached, instance_sums
from instructsae.pipelines.compare_report import LABELS, METHODS, render_report
from instructsae.pipelines.compare_stats import compare_methods
from instructsae.run_folder import RunPaths
from instructsae.sae import config_class
from instructsae.schemas import ExtractConfig
from instructsae.schemas.compare import CompareConfig
from instructsae.schemas.evaluate import LMViewConfig
from instructsae.schemas.sweep import SweepConfig
from instructsae.train.sweep import expand_sweep, resolve_grid, run_sweep
from instructsae.train.sweep_report import setting_name


def method_extract_configs(cfg: CompareConfig, stores: Path) -> dict[str, ExtractConfig]:
    common = dict(model=cfg.model, layers=(cfg.layer,), sites=cfg.sites, max_tokens=cfg.tokens,
                  block_len=cfg.block_len, device=cfg.device)
    return {
        "bt-p": ExtractConfig(**common, dataset=cfg.pretraining_text, mode="bt", out=str(stores / "bt-p")),
        "bt-f": ExtractConfig(**common, dataset=cfg.dialogues, mode="bt", out=str(stores / "bt-f")),
        "fast": ExtractConfig(**common, dataset=cfg.dialogues, mode="fast", out=str(stores / "fast")),
    }


def method_sweeps(cfg: CompareConfig, root: Path) -> dict[str, SweepConfig]:
    """The same grid on each method's store; every grid point checked before anything runs."""
    base = {**cfg.train, "layer": cfg.layer, "tokens": cfg.train_tokens, "device": cfg.device}
    has_seeds = "seed" in cfg.grid or "seeds" in cfg.grid
    grid = cfg.grid if has_seeds else {**cfg.grid, "seeds": cfg.seeds}
    sweeps = {method: build(SweepConfig, {"store": str(root / "stores" / method), "out": str(root / "saes" / method),
                                          "base": base, "grid": grid})
              for method in METHODS}
    resolve_grid(sweeps["fast"])  # the grid and base are the same for all three
    return sweeps


def heldout_stores(cfg: CompareConfig, stores: Path, manifests: dict) -> dict[str, ExtractConfig]:
    """name -> extract config of each held-out FAST store: later dialogues of the training source (after every
    conversation BT(F) or FAST read: the SAEs never saw them), then each extra dialogue set."""
    seen = max(manifests["bt-f"].rows_used, manifests["fast"].rows_used)
    skip = heldout_skip(cfg.dialogues, manifests["fast"].identity.split, seen)
    common = dict(model=cfg.model, mode="fast", layers=(cfg.layer,), sites=cfg.sites, max_tokens=cfg.heldout_tokens,
                  device=cfg.device)
    configs = {f"later {cfg.dialogues}": ExtractConfig(**common, dataset=cfg.dialogues, skip_instances=skip,
                                                       out=str(stores / "heldout-fast"))}
    for index, dataset in enumerate(cfg.heldout):
        configs[dataset] = ExtractConfig(**common, dataset=dataset, out=str(stores / f"heldout-{index + 1}-{_slug(dataset)}"))
    return configs


def _slug(dataset: str) -> str:
    name = Path(dataset).stem if ("/" in dataset or "." in dataset) else dataset
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name)[:40] or "set"


def _check_heldout(cfg: CompareConfig) -> None:
    for dataset in cfg.heldout:
        if dataset in (cfg.dialogues, cfg.pretraining_text):
            raise UserError(f"--heldout {dataset}: the SAEs train on it; later dialogues of --dialogues are held out "
                            "already, give dialogue sets no store was extracted from")
    if len(set(cfg.heldout)) != len(cfg.heldout):
        raise UserError("--heldout names the same dialogue set twice")


def run_compare(cfg: CompareConfig) -> str:
    """Every stage resumes: finished stores, finished SAEs and cached evaluations are kept on a rerun."""
    root = Path(cfg.out)
    stores = root / "stores"
    _check_heldout(cfg)
    sweeps = method_sweeps(cfg, root)
    targets = {target_site(point) for _, point in resolve_grid(sweeps["fast"])}
    if len(targets) > 1:  # one explained-variance baseline per held-out store: one target site
        raise UserError(f"the grid's SAEs reconstruct different sites ({', '.join(sorted(targets))}): compare one "
                        "kind at a time (SAEs of one site, or transcoders)")
    target = targets.pop()
    manifests = {}
    for step, (method, extract_cfg) in enumerate(method_extract_configs(cfg, stores).items(), start=1):
        print(f"[{step}/6] extracting {LABELS[method]} -> {extract_cfg.out}")
        manifests[method] = run_extract(extract_cfg)
    heldouts = heldout_stores(cfg, stores, manifests)
    for name, extract_cfg in heldouts.items():
        print(f"[4/6] extracting the held-out FAST store of {name} -> {extract_cfg.out}")
        run_extract(extract_cfg)

    print("[5/6] training the same SAE grid, every seed, on each store (one pass per store)")
    saes = []
    for method, sweep in sweeps.items():
        # a sweep killed midway continues from its last checkpoint, if it wrote one
        run_sweep(sweep, resume=RunPaths(sweep.out).checkpoint.exists())
        # this grid's SAEs only: the folder may also hold those of an earlier run with other settings
        saes += [{"method": method, "dir": point.out, "arch": config_class(point.sae).architecture,
                  "seed": point.sae_seed, "setting": setting_name(point.model_dump(mode="json")),
                  "target": target} for point in expand_sweep(sweep)]

    print(f"[6/6] evaluating every SAE on {len(heldouts)} held-out stores, then comparing at matched L0")
    lm = LMViewConfig(lm_tokens=cfg.lm_tokens, device=cfg.device)
    results, analyses = [], {}
    for name, extract_cfg in heldouts.items():
        evaluated = evaluate_cached(saes, extract_cfg.out, lm, root / EVAL_CACHE)
        results += [{**without_per_sequence(result), "method": sae["method"], "seed": sae["seed"],
                     "setting": sae["setting"], "heldout": name} for sae, result in zip(saes, evaluated)]
        sum_x_ID, d_model = instance_sums(extract_cfg.out, cfg.layer, target)
        analyses[name] = compare_methods(
            [{**sae, "sequences": sequences_of(result)} for sae, result in zip(saes, evaluated)], sum_x_ID, d_model,
            "fast", ["bt-f", "bt-p"], cfg.bootstrap, cfg.confidence, labels=LABELS)
    write_text_atomically(root / "results.json", json.dumps(results, indent=2))
    write_text_atomically(root / "verdicts.json", json.dumps(
        {name: {"rows": a["rows"], "n_sequences": a["n_sequences"], "seeds": a["seeds"]}
         for name, a in analyses.items()}, indent=2))
    report = write_report(root, cfg, results, analyses)
    print(report)
    return report


def target_site(point) -> str:
    """The site an SAE of the grid reconstructs (train's rule: its own input, a transcoder's mlp_out)."""
    transcoder = config_class(point.sae).transcoder
    return point.target_site or ("mlp_out" if transcoder else point.site or "resid_post")


def sequences_of(result: dict) -> dict:
    """The per-sequence sums compare_stats reads, the LM view's placed at the store's instance numbers."""
    sequences = dict(result["per_sequence"])
    lm = (result.get("lm") or {}).get("per_sequence")
    if lm is not None:
        ce_IQR = np.zeros((len(sequences["count_IR"]), *lm["sums_IQR"].shape[1:]))
        ce_IQR[lm["instance_I"]] = lm["sums_IQR"]
        sequences["ce_IQR"] = ce_IQR
    return sequences


def write_report(root: Path, cfg: CompareConfig, results: list[dict], analyses: dict) -> str:
    panels = {(name, arch): {LABELS[method]: band for (method, band_arch), band in analysis["frontiers"].items()
                             if band_arch == arch}
              for name, analysis in analyses.items() for arch in {a for _, a in analysis["frontiers"]}}
    plot_frontier_bands(panels, root / "frontier.png", "NMSE (held out)",
                        f"{cfg.model} layer {cfg.layer}: seed means, {cfg.confidence:.0%} bands")
    command = " ".join(shlex.quote(arg) for arg in ["instructsae", *sys.argv[1:]]) if sys.argv[1:] else "make compare"
    report = render_report(cfg, command, results, analyses)
    write_text_atomically(root / "report.md", report)
    return report
