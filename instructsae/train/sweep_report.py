"""A sweep's results: results.csv, results.md and the sparsity–fidelity frontier, over every finished SAE.

SAEs that differ only in their seed (a seed axis) are also aggregated: results-over-seeds.csv and a second table
in results.md give each setting's mean and spread (sample standard deviation) over its seeds. Only SAEs whose
full config (runtime knobs aside) differs by the seed alone are grouped: the same grid run at another token
count into the same folder is another setting, not another seed.
"""

import csv
import hashlib
import io
import json
import statistics
from pathlib import Path

from pydantic import TypeAdapter

from instructsae.charts import plot_frontier
from instructsae.fileio import write_text_atomically
from instructsae.run_folder import SUMMARY_FILE, RunPaths, is_building_folder
from instructsae.sae import config_class
from instructsae.sae.folder import provenance
from instructsae.schemas.train import DEFAULT_EXPANSION, SAEConfig
from instructsae.train.run import RUNTIME_FIELDS

SAE_SETTINGS = TypeAdapter(SAEConfig)
SEED_FIELDS = {"seed", "sae_seed"}

COLUMNS = ("name", "setting", "seed", "arch", "layer", "expansion", "d_sae", "sparsity", "lr", "nmse",
           "explained_variance", "l0", "dead_fraction", "tokens", "held_out")
AGGREGATED = ("nmse", "explained_variance", "l0", "dead_fraction")
SEED_COLUMNS = ("setting", "arch", "layer", "expansion", "d_sae", "sparsity", "lr", "n_seeds", "seeds",
                *(f"{name}_{part}" for name in AGGREGATED for part in ("mean", "std")))


def collect_rows(sweep_dir: Path, store_fingerprint: str) -> list[dict]:
    """One row per finished SAE folder trained on this store (grid points of earlier runs included)."""
    rows = []
    for summary_file in sorted(sweep_dir.glob(f"*/{SUMMARY_FILE}")):
        folder = summary_file.parent
        if is_building_folder(folder):
            continue  # an SAE still being built (or a killed build)
        try:
            cfg = json.loads(RunPaths(folder).cfg.read_text())
            summary = json.loads(summary_file.read_text())
        except (OSError, ValueError):
            continue  # not a finished SAE of ours (a folder the user put there, or one a kill cut short)
        if provenance(cfg).get("store_fingerprint") != store_fingerprint:
            continue
        train = provenance(cfg)["train_config"]  # the settings the run followed (fitted ones included)
        sae = train["sae"]
        rows.append({
            "name": folder.name, "setting": setting_name(train), "seed": _sae_seed(train),
            "arch": summary.get("architecture", sae["arch"]),  # a transcoder's class: jumprelu_transcoder, ...
            "seed_group": seed_group(train),
            "layer": summary["layer"], "expansion": _expansion(summary, sae),
            "d_sae": summary["d_sae"],
            "sparsity": sparsity_label(sae),
            "lr": train["optim"]["lr"], "nmse": summary["nmse"], "explained_variance": summary["explained_variance"],
            "l0": summary["l0"], "dead_fraction": summary["dead_fraction_heldout"], "tokens": summary["tokens_seen"],
            # summaries older than the flag said it only in words
            "held_out": summary.get("held_out", summary.get("evaluated_on", "held-out").startswith("held-out")),
        })
    return rows


def _expansion(summary: dict, sae: dict) -> int | float:
    """d_sae / d_model, also for an SAE sized by d_sae (its config has no expansion)."""
    if sae.get("d_sae") is None:
        return sae.get("expansion") or DEFAULT_EXPANSION
    return round(summary["d_sae"] / summary["d_in"], 3)


def sparsity_label(sae: dict) -> str:
    """The sparsity setting as the architecture's class names it (k32, c0.001, c0.01-t32, ...)."""
    cfg = SAE_SETTINGS.validate_python(sae)
    return config_class(cfg).sweep_label(cfg)


def measured_on(rows: list[dict]) -> str:
    """Where the figures come from: 'held out' only when every SAE had held-out chunks to be measured on."""
    held = {row["held_out"] for row in rows}
    if held == {False}:
        return "training chunks: nothing was held out"
    return "held out" if held <= {True} else "held out where the store allowed, else training chunks"


def _sae_seed(train: dict) -> int:
    return train["seed"] if train.get("sae_seed") is None else train["sae_seed"]


def setting_name(train: dict) -> str:
    """What SAEs of one setting share whatever their seed: architecture, width, sparsity, lr, layer."""
    sae = SAE_SETTINGS.validate_python(train["sae"])
    sparsity = config_class(sae).sweep_label(sae)  # a transcoder's names its activation first (jumprelu-c0.001)
    layer = "" if train.get("layer") is None else f"-l{train['layer']}"
    return f"{sae.arch}-{sae.width_label()}-{sparsity}-lr{train['optim']['lr']:g}{layer}"


def seed_group(train: dict) -> str:
    """The full config of an SAE but its seed and the runtime knobs, as a short digest: SAEs with the same one
    differ by their seed alone."""
    settings = {name: value for name, value in train.items() if name not in RUNTIME_FIELDS | SEED_FIELDS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def over_seeds(rows: list[dict]) -> list[dict]:
    """One row per setting (a full config but the seed): mean and sample standard deviation (0 with one seed) of
    each metric over its seeds. Settings whose readable names coincide (they differ in what the name leaves out,
    such as tokens) are told apart by their config digest."""
    settings: dict[str, list[dict]] = {}
    for row in rows:
        settings.setdefault(row["seed_group"], []).append(row)
    names = [members[0]["setting"] for members in settings.values()]
    aggregated = []
    for group, members in settings.items():
        first = members[0]
        row = {name: first[name] for name in ("setting", "arch", "layer", "expansion", "d_sae", "sparsity", "lr")}
        if names.count(first["setting"]) > 1:
            row["setting"] = f"{first['setting']}-{group}"
        row["n_seeds"] = len(members)
        row["seeds"] = " ".join(str(seed) for seed in sorted(m["seed"] for m in members))
        for name in AGGREGATED:
            values = [m[name] for m in members]
            row[f"{name}_mean"] = statistics.fmean(values)
            row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        aggregated.append(row)
    return sorted(aggregated, key=lambda r: (r["arch"], r["layer"], r["l0_mean"]))


def seeds_table(aggregated: list[dict]) -> str:
    lines = ["| setting | seeds | NMSE | explained var | L0 | dead frac |", "|---|---:|---:|---:|---:|---:|"]
    for r in aggregated:
        lines.append(f"| {r['setting']} | {r['n_seeds']} | {r['nmse_mean']:.4f} ± {r['nmse_std']:.4f} | "
                     f"{r['explained_variance_mean']:.4f} ± {r['explained_variance_std']:.4f} | "
                     f"{r['l0_mean']:.1f} ± {r['l0_std']:.1f} | "
                     f"{r['dead_fraction_mean']:.3f} ± {r['dead_fraction_std']:.3f} |")
    return "\n".join(lines)


def _csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def markdown_table(rows: list[dict]) -> str:
    lines = ["| SAE | arch | layer | d_sae | sparsity | lr | NMSE | explained var | L0 | dead frac | tokens |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['arch']} | {r['layer']} | {r['d_sae']} | {r['sparsity']} | {r['lr']:g} | "
                     f"{r['nmse']:.4f} | {r['explained_variance']:.4f} | {r['l0']:.1f} | {r['dead_fraction']:.3f} | "
                     f"{r['tokens']:,} |")
    return "\n".join(lines)


def write_sweep_report(sweep_dir: Path, store_fingerprint: str) -> list[dict]:
    rows = sorted(collect_rows(sweep_dir, store_fingerprint), key=lambda r: (r["arch"], r["layer"], r["l0"]))
    aggregated = over_seeds(rows)
    write_text_atomically(sweep_dir / "results.csv", _csv(rows, COLUMNS))
    write_text_atomically(sweep_dir / "results-over-seeds.csv", _csv(aggregated, SEED_COLUMNS))
    table = markdown_table(rows)
    where = measured_on(rows)
    heading = f"Sweep {sweep_dir.name}: " + ("held-out chunks of the store" if where == "held out" else where)
    seeds = (f"\n\nOver seeds (mean ± sample standard deviation):\n\n{seeds_table(aggregated)}"
             if any(r["n_seeds"] > 1 for r in aggregated) else "")
    write_text_atomically(sweep_dir / "results.md", f"{heading}\n\n{table}{seeds}\n")
    if rows:
        layers = sorted({r["layer"] for r in rows})
        for r in rows:
            r["group"] = r["arch"] if len(layers) == 1 else f"{r['arch']} L{r['layer']}"
        plot_frontier(rows, "group", sweep_dir / "frontier.png", f"Sparsity–fidelity frontier ({sweep_dir.name})",
                      measured_on=where)
        for r in rows:
            del r["group"]
    print(table + seeds)
    return rows
