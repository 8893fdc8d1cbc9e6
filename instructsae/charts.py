"""PNG charts: training curves of one SAE, and the sparsity–fidelity frontier of many. No screen needed."""

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from instructsae.fileio import write_atomically  # noqa: E402

MARKERS = "osD^v<>P*X"


def _save(fig, path: Path) -> None:
    write_atomically(Path(path), lambda partial: fig.savefig(partial, format="png", dpi=110))
    plt.close(fig)


def plot_training_curves(records: list[dict], path: Path, title: str) -> None:
    """Loss terms, NMSE, L0 and dead fraction against training tokens, from metrics.jsonl records."""
    if not records:
        return
    tokens = [r["tokens"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels: list[tuple[str, list[tuple[str, Callable[[dict], float]]], bool]] = [
        ("loss terms", [("loss", lambda r: r["loss"]), ("mse", lambda r: r["mse"]),
                        ("coeff × sparsity", lambda r: r["sparsity_coeff"] * r["sparsity"])], True),
        ("NMSE (batch)", [("nmse", lambda r: r["nmse"])], True),
        ("L0 (active latents per token)", [("l0", lambda r: r["l0"])], True),
        ("dead fraction (window)", [("dead", lambda r: r["dead_fraction"])], False),
    ]
    for ax, (name, series, log_scale) in zip(axes.flat, panels):
        for label, value in series:
            values = [value(r) for r in records]
            ax.plot(tokens, values, label=label)
        if log_scale and all(v > 0 for label, value in series for v in (value(r) for r in records)):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("training tokens")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_frontier(points: list[dict], group_by: str, path: Path, title: str, measured_on: str = "held out") -> None:
    """L0 against NMSE, one marker and line per group (architecture, or extraction method); lower-left is better.
    `measured_on` says where the points were measured ("held out", or the training chunks when none were)."""
    fig, ax = plt.subplots(figsize=(7, 5))
    groups = sorted({p[group_by] for p in points})
    for index, group in enumerate(groups):
        members = sorted((p for p in points if p[group_by] == group), key=lambda p: p["l0"])
        ax.plot([p["l0"] for p in members], [p["nmse"] for p in members], marker=MARKERS[index % len(MARKERS)],
                label=str(group))
    ax.set_xscale("log")
    ax.set_xlabel(f"L0 (active latents per token, {measured_on})")
    ax.set_ylabel(f"NMSE ({measured_on})")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_frontier_bands(panels: dict[tuple[str, str], dict[str, dict]], path: Path, ylabel: str, title: str) -> None:
    """One panel per (held-out set, architecture): each method's frontier (seed means, linear in log L0), its
    pointwise confidence band, and its measured points. panels[(row, column)][method] = {l0, value, low, high,
    points_l0, points_value}."""
    rows = sorted({row for row, _ in panels})
    columns = sorted({column for _, column in panels})
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(5.5 * len(columns), 4.2 * len(rows)), squeeze=False)
    for (row, column), methods in panels.items():
        ax = axes[rows.index(row)][columns.index(column)]
        for index, (method, band) in enumerate(methods.items()):
            line, = ax.plot(band["l0"], band["value"], label=method)
            ax.fill_between(band["l0"], band["low"], band["high"], color=line.get_color(), alpha=0.2)
            ax.scatter(band["points_l0"], band["points_value"], color=line.get_color(),
                       marker=MARKERS[index % len(MARKERS)], s=18)
        ax.set_xscale("log")
        ax.set_title(f"{column}, held out: {row}", fontsize=10)
        ax.set_xlabel("L0 (active latents per token, held out)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
