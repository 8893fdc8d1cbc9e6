"""A sweep's results: results.csv, results.md and the sparsity–fidelity frontier, over every finished SAE."""

import csv
import io
import json
from pathlib import Path

from instructsae.charts import plot_frontier
from instructsae.fileio import write_text_atomically
from instructsae.train.sae_folder import provenance

COLUMNS = ("name", "arch", "layer", "expansion", "d_sae", "sparsity", "lr", "nmse", "explained_variance", "l0",
           "dead_fraction", "tokens")


def collect_rows(sweep_dir: Path, store_fingerprint: str) -> list[dict]:
    """One row per finished SAE folder trained on this store (grid points of earlier runs included)."""
    rows = []
    for summary_file in sorted(sweep_dir.glob("*/summary.json")):
        folder = summary_file.parent
        try:
            cfg = json.loads((folder / "cfg.json").read_text())
            summary = json.loads(summary_file.read_text())
        except (OSError, ValueError):
            continue  # not a finished SAE of ours (a folder the user put there, or one a kill cut short)
        if provenance(cfg).get("store_fingerprint") != store_fingerprint:
            continue
        train = provenance(cfg)["train_config"]
        sae = train["sae"]
        rows.append({
            "name": folder.name, "arch": sae["arch"], "layer": summary["layer"], "expansion": sae["expansion"],
            "d_sae": summary["d_sae"],
            "sparsity": f"k={sae['k']}" if "k" in sae else f"coeff={sae['sparsity_coeff']:g}",
            "lr": train["optim"]["lr"], "nmse": summary["nmse"], "explained_variance": summary["explained_variance"],
            "l0": summary["l0"], "dead_fraction": summary["dead_fraction_heldout"], "tokens": summary["tokens_seen"],
        })
    return rows


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
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(sweep_dir / "results.csv", text.getvalue())
    table = markdown_table(rows)
    heading = f"Sweep {sweep_dir.name}: held-out chunks of the store"
    write_text_atomically(sweep_dir / "results.md", f"{heading}\n\n{table}\n")
    if rows:
        layers = sorted({r["layer"] for r in rows})
        for r in rows:
            r["group"] = r["arch"] if len(layers) == 1 else f"{r['arch']} L{r['layer']}"
        plot_frontier(rows, "group", sweep_dir / "frontier.png", f"Sparsity–fidelity frontier ({sweep_dir.name})")
        for r in rows:
            del r["group"]
    print(table)
    return rows
