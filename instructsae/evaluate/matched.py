"""Comparing two sparsity–fidelity frontiers at matched L0, with bootstrap confidence intervals. Pure functions.

A method's frontier is its SAEs' (L0, metric) points, one per sparsity setting. Between measured points the
frontier is linear in log L0 (L0 spans decades, and a sparsity coefficient moves L0 by factors). Two methods
are compared only at L0 values both frontiers cover: outside a method's measured range its frontier is unknown,
and asking for it is refused with a message naming both ranges.
"""

import math

import numpy as np

from instructsae.errors import UserError


class OutsideFrontier(UserError):
    """An L0 outside the range a frontier measured, or two frontiers with no common L0 range."""


def l0_range(l0_P: np.ndarray) -> tuple[float, float]:
    return float(np.min(l0_P)), float(np.max(l0_P))


def common_l0_range(ranges: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """The L0 values every named frontier covers; refused, naming each range, when there are none."""
    low = max(lo for lo, _ in ranges.values())
    high = min(hi for _, hi in ranges.values())
    if low > high:
        covered = ", ".join(f"{name} covers L0 {lo:.3g}–{hi:.3g}" for name, (lo, hi) in ranges.items())
        raise OutsideFrontier(f"no common L0 range ({covered}): these frontiers cannot be compared at matched L0; "
                              "widen the sparsity grid")
    return low, high


def matched_l0_points(low: float, high: float, n: int = 5) -> np.ndarray:
    """n L0 values spread evenly in log L0 over [low, high] (one value when the range is a single point)."""
    if high <= low:
        return np.array([low])
    return np.geomspace(low, high, n)


def interpolate(l0_P: np.ndarray, value_P: np.ndarray, at_l0_M: np.ndarray, name: str = "frontier",
                extrapolate: bool = False) -> np.ndarray:
    """The frontier's value at each L0 of at_l0_M, linear in log L0 between its measured points.

    Outside the measured range: refused (OutsideFrontier, saying where the frontier ends), or with
    `extrapolate` continued along its end segments (used only for bootstrap replicates, whose measured L0
    values move a little around the point estimate's)."""
    l0_P, value_P, at_l0_M = (np.asarray(a, dtype=float) for a in (l0_P, value_P, at_l0_M))
    order = np.argsort(l0_P, kind="stable")
    x_P, y_P, x_M = np.log(l0_P[order]), value_P[order], np.log(at_l0_M)
    if not extrapolate:
        low, high = x_P[0], x_P[-1]
        outside = (x_M < low - 1e-12) | (x_M > high + 1e-12)
        if outside.any():
            raise OutsideFrontier(f"L0 {float(np.exp(x_M[outside][0])):.3g} is outside the L0 range {name} measured "
                                  f"({math.exp(low):.3g}–{math.exp(high):.3g}): refusing to extrapolate")
    if len(x_P) == 1:
        return np.full(len(x_M), y_P[0])
    inside = np.interp(x_M, x_P, y_P)
    if not extrapolate:
        return inside
    left = y_P[0] + (x_M - x_P[0]) * (y_P[1] - y_P[0]) / max(x_P[1] - x_P[0], 1e-12)
    right = y_P[-1] + (x_M - x_P[-1]) * (y_P[-1] - y_P[-2]) / max(x_P[-1] - x_P[-2], 1e-12)
    return np.where(x_M < x_P[0], left, np.where(x_M > x_P[-1], right, inside))


def percentile_interval(replicates_B: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of bootstrap replicates (the percentile bootstrap); NaN replicates dropped."""
    finite = np.asarray(replicates_B, dtype=float)
    finite = finite[np.isfinite(finite)]
    if len(finite) == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def verdict(interval: tuple[float, float], higher_is_better: bool) -> str:
    """'better' / 'worse' for the first method when the interval of (first − second) excludes 0, else
    'indistinguishable'."""
    low, high = interval
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 <= high:
        return "indistinguishable"
    first_higher = low > 0
    return "better" if first_higher == higher_is_better else "worse"


def sequence_weights(n_sequences: int, n_replicates: int, rng: np.random.Generator) -> np.ndarray:
    """[n_replicates + 1, n_sequences]: how often each sequence is drawn; row 0 is the data itself (all ones)."""
    drawn = rng.multinomial(n_sequences, np.full(n_sequences, 1 / n_sequences), size=n_replicates)
    return np.vstack([np.ones((1, n_sequences)), drawn]).astype(float)


def seed_draws(n_seeds: int, n_replicates: int, rng: np.random.Generator) -> np.ndarray:
    """[n_replicates + 1, n_seeds]: seed indices of each replicate, drawn with replacement; row 0 is every seed."""
    return np.vstack([np.arange(n_seeds)[None], rng.integers(0, n_seeds, size=(n_replicates, n_seeds))])
