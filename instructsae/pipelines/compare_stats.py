"""FAST − BT(F) and FAST − BT(P) at matched L0, with bootstrap confidence intervals over seeds and sequences.

Every figure of an SAE is a ratio of sums over held-out sequences, so a resample of sequences (weights: how
often each is drawn) gives each figure again without touching the store. One bootstrap replicate:

- draws the held-out sequences with replacement, the same draw for every SAE: all SAEs are measured on one
  held-out set, so a hard dialogue counts against every method alike and the difference keeps its pairing;
- draws each grid point's seeds with replacement, independently per method and grid point (a seed of one
  store's sweep has nothing in common with the same seed number on another store);
- averages each grid point over its drawn seeds (L0 in log), interpolates each method's frontier in log L0,
  and takes the difference at L0 values fixed by the point estimate, averaged over the common L0 range.

Why both: the seeds carry the training noise (an SAE's initial weights; the stream order is the sweep's and
shared by its seeds, so it is not resampled), the sequences the evaluation noise (which dialogues were held
out). A verdict must survive both to mean that the method, not the draw, made the difference.
"""

import math
from dataclasses import dataclass

import numpy as np

from instructsae.evaluate.matched import (
    OutsideFrontier, common_l0_range, interpolate, l0_range, matched_l0_points, percentile_interval, seed_draws,
    sequence_weights, verdict,
)
from instructsae.schemas.manifest import ROLE_CODE, ROLES

TEMPLATE = ROLE_CODE["template"]
CE = {"ce_clean": 0, "ce_spliced": 1, "ce_ablated": 2}  # their places in splice.QUANTITIES


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool


def metrics_for(roles: list[str], with_lm: bool) -> list[Metric]:
    """The compared figures: overall, then per token role."""
    metrics = [Metric("nmse", "NMSE", False), Metric("explained_variance", "explained variance", True),
               Metric("log2_eq7", "log2 MSE (Eq. 7)", False), Metric("log2_mse_st", "log2 MSE_st", False)]
    if with_lm:
        metrics.append(Metric("ce_recovered", "CE recovered", True))
    for role in roles:
        metrics.append(Metric(f"nmse:{role}", f"NMSE, {role} tokens", False))
        if with_lm:
            metrics.append(Metric(f"ce_recovered:{role}", f"CE recovered, {role} tokens", True))
    return metrics


def _ratio(numerator_B: np.ndarray, denominator_B: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator_B != 0, numerator_B / np.where(denominator_B != 0, denominator_B, 1), np.nan)


def _log2_per_sequence(W_BI: np.ndarray, sq_err_I: np.ndarray, count_I: np.ndarray, d_model: int) -> np.ndarray:
    """log2 of Eq. 7: each sequence's mean error, averaged over the (drawn) sequences that have tokens."""
    seen_I = count_I > 0
    per_sequence_I = np.where(seen_I, sq_err_I / np.where(seen_I, count_I, 1), 0.0)
    mse_B = _ratio(W_BI @ per_sequence_I, W_BI @ seen_I.astype(float)) / d_model
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mse_B > 0, np.log2(mse_B), np.nan)


def _recovered(W_BI: np.ndarray, ce_IQ: np.ndarray) -> np.ndarray:
    clean_B, spliced_B, ablated_B = (W_BI @ ce_IQ[:, CE[name]] for name in ("ce_clean", "ce_spliced", "ce_ablated"))
    return _ratio(ablated_B - spliced_B, ablated_B - clean_B)


def sae_figures(W_BI: np.ndarray, sequences: dict, sum_x_BD: np.ndarray, d_model: int,
                metrics: list[Metric]) -> dict[str, np.ndarray]:
    """Every metric (and L0) of one SAE under each row of sequence weights W_BI.

    `sequences`: the per-sequence sums of evaluate (sq_err_IR, sq_IR, l0_IR, count_IR) and, for the LM view,
    ce_IQR (CE sums per sequence, quantity and role, zero for sequences the LM view did not run);
    sum_x_BD: W_BI @ (each sequence's sum of x), shared by all SAEs, for the explained variance."""
    sq_err_IR, sq_IR, l0_IR, count_IR = (sequences[name] for name in ("sq_err_IR", "sq_IR", "l0_IR", "count_IR"))
    tokens_B = W_BI @ count_IR.sum(axis=1)
    sq_err_B, sq_B = W_BI @ sq_err_IR.sum(axis=1), W_BI @ sq_IR.sum(axis=1)
    variance_B = sq_B - (sum_x_BD ** 2).sum(axis=1) / np.maximum(tokens_B, 1)
    figures = {"l0": _ratio(W_BI @ l0_IR.sum(axis=1), tokens_B), "nmse": _ratio(sq_err_B, sq_B),
               "explained_variance": 1 - _ratio(sq_err_B, variance_B),
               "log2_eq7": _log2_per_sequence(W_BI, sq_err_IR.sum(axis=1), count_IR.sum(axis=1), d_model),
               "log2_mse_st": _log2_per_sequence(W_BI, sq_err_IR[:, TEMPLATE], count_IR[:, TEMPLATE], d_model)}
    ce_IQR = sequences.get("ce_IQR")
    for metric in metrics:
        if metric.key.startswith("nmse:"):
            code = ROLE_CODE[metric.key.split(":")[1]]
            figures[metric.key] = _ratio(W_BI @ sq_err_IR[:, code], W_BI @ sq_IR[:, code])
        elif metric.key == "ce_recovered" and ce_IQR is not None:
            figures[metric.key] = _recovered(W_BI, ce_IQR.sum(axis=2))
        elif metric.key.startswith("ce_recovered:") and ce_IQR is not None:
            figures[metric.key] = _recovered(W_BI, ce_IQR[:, :, ROLE_CODE[metric.key.split(":")[1]]])
    return figures


def _method_frontier(sae_figures_by_point: list[list[dict]], draws_by_point: list[np.ndarray], key: str):
    """[B+1, points] mean L0 (geometric, over drawn seeds) and mean metric per grid point of one method."""
    l0_columns, value_columns = [], []
    for seeds, draws_BS in zip(sae_figures_by_point, draws_by_point):
        log_l0_SB = np.stack([np.log(figures["l0"]) for figures in seeds])
        value_SB = np.stack([figures[key] for figures in seeds])
        columns = np.arange(log_l0_SB.shape[1])[:, None]
        l0_columns.append(np.exp(log_l0_SB[draws_BS, columns].mean(axis=1)))
        value_columns.append(value_SB[draws_BS, columns].mean(axis=1))
    return np.stack(l0_columns, axis=1), np.stack(value_columns, axis=1)


def frontier_replicates(l0_BP: np.ndarray, value_BP: np.ndarray, at_l0_M: np.ndarray, name: str) -> np.ndarray:
    """[B+1, M]: row 0 (the data) refused outside its measured range; replicates continue their end segments."""
    rows = [interpolate(l0_BP[0], value_BP[0], at_l0_M, name)]
    rows += [interpolate(l0_P, value_P, at_l0_M, extrapolate=True) for l0_P, value_P in zip(l0_BP[1:], value_BP[1:])]
    return np.stack(rows)


def compare_methods(saes: list[dict], sum_x_ID: np.ndarray, d_model: int, first: str, others: list[str],
                    n_replicates: int = 1000, level: float = 0.95, seed: int = 0, points: int = 5,
                    labels: dict[str, str] | None = None) -> dict:
    """first − each of `others` per architecture and metric, at matched L0, with intervals and verdicts.

    `saes`: one dict per SAE with method, arch, setting, seed and `sequences` (as for sae_figures). Returns
    {"rows": [...], "frontiers": {(method, arch): {l0, value bands ...}}} (see the keys below)."""
    rng = np.random.default_rng(seed)
    n_sequences = sum_x_ID.shape[0]
    W_BI = sequence_weights(n_sequences, n_replicates, rng)
    sum_x_BD = W_BI @ sum_x_ID
    with_lm = all("ce_IQR" in sae["sequences"] for sae in saes)
    count_R = sum(sae["sequences"]["count_IR"].sum(axis=0) for sae in saes[:1])
    roles = [role for code, role in enumerate(ROLES) if count_R[code] > 0]
    metrics = metrics_for(roles, with_lm)
    figures = [sae_figures(W_BI, sae["sequences"], sum_x_BD, d_model, metrics) for sae in saes]

    grouped: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for sae, sae_figs in zip(saes, figures):
        grouped.setdefault((sae["method"], sae["arch"]), {}).setdefault(sae["setting"], []).append(sae_figs)
    draws = {group: [seed_draws(len(seeds), n_replicates, rng) for seeds in settings.values()]
             for group, settings in grouped.items()}

    rows, frontiers = [], {}
    for arch in sorted({arch for _, arch in grouped}):
        for metric in metrics:
            curves = {}
            for method in [first, *others]:
                if (method, arch) in grouped:
                    settings = list(grouped[(method, arch)].values())
                    curves[method] = _method_frontier(settings, draws[(method, arch)], metric.key)
            if metric.key == "nmse":
                frontiers.update({(method, arch): _bands(l0_BP, value_BP, level)
                                  for method, (l0_BP, value_BP) in curves.items()})
            for other in others:
                if first in curves and other in curves:
                    rows.append(_difference(curves[first], curves[other], first, other, arch, metric, level, points,
                                            labels or {}))
    return {"rows": rows, "frontiers": frontiers, "n_sequences": n_sequences, "n_replicates": n_replicates,
            "level": level, "seeds": {f"{m} {a}": [len(s) for s in settings.values()]
                                      for (m, a), settings in grouped.items()}}


def _difference(first_curve, other_curve, first: str, other: str, arch: str, metric: Metric, level: float,
                points: int, labels: dict[str, str]) -> dict:
    row = {"arch": arch, "metric": metric.key, "label": metric.label, "first": first, "other": other,
           "higher_is_better": metric.higher_is_better}
    (first_l0, first_value), (other_l0, other_value) = first_curve, other_curve
    if not (np.isfinite(first_value[0]).all() and np.isfinite(other_value[0]).all()):
        return {**row, "refused": "the figure is missing for some SAE (no such tokens, or no LM view)"}
    try:
        first_name, other_name = labels.get(first, first), labels.get(other, other)
        low, high = common_l0_range({first_name: l0_range(first_l0[0]), other_name: l0_range(other_l0[0])})
        at_l0_M = matched_l0_points(low, high, points)
        delta_BM = (frontier_replicates(first_l0, first_value, at_l0_M, first_name)
                    - frontier_replicates(other_l0, other_value, at_l0_M, other_name))
    except OutsideFrontier as error:
        return {**row, "refused": str(error)}
    mean_B = delta_BM.mean(axis=1)  # averaged over the common range, evenly in log L0
    interval = percentile_interval(mean_B[1:], level)
    per_point = [{"l0": float(l0), "delta": float(delta_BM[0, m]),
                  "interval": percentile_interval(delta_BM[1:, m], level)} for m, l0 in enumerate(at_l0_M)]
    return {**row, "l0_low": low, "l0_high": high, "delta": float(mean_B[0]), "interval": interval,
            "verdict": verdict(interval, metric.higher_is_better), "per_point": per_point}


def _bands(l0_BP: np.ndarray, value_BP: np.ndarray, level: float, n: int = 25) -> dict:
    """A method's frontier over its own measured L0 range, with the pointwise interval of its replicates."""
    low, high = l0_range(l0_BP[0])
    at_l0_M = matched_l0_points(low, high, n)
    curve_BM = frontier_replicates(l0_BP, value_BP, at_l0_M, "frontier")
    bands = [percentile_interval(curve_BM[1:, m], level) for m in range(len(at_l0_M))]
    return {"l0": at_l0_M.tolist(), "value": curve_BM[0].tolist(), "low": [b[0] for b in bands],
            "high": [b[1] for b in bands], "points_l0": l0_BP[0].tolist(), "points_value": value_BP[0].tolist()}


def format_interval(value: float, interval: tuple[float, float], digits: int) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{value:+.{digits}f} [{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}]"
