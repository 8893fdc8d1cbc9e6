"""Matched-L0 comparison: interpolation on frontiers with a known answer, refusal outside the common L0 range, and
a bootstrap whose interval covers a known difference."""

import math

import numpy as np
import pytest

from instructsae.evaluate.matched import (
    OutsideFrontier, common_l0_range, interpolate, matched_l0_points, percentile_interval, seed_draws,
    sequence_weights, verdict,
)
from instructsae.pipelines.compare_stats import compare_methods
from instructsae.schemas.manifest import ROLE_CODE, ROLES


def test_interpolation_is_linear_in_log_l0():
    # a frontier exactly linear in log L0 is recovered anywhere between its points
    l0 = np.array([100.0, 10.0, 30.0])  # unsorted on purpose
    value = 0.5 - 0.1 * np.log(l0)
    at = np.array([10.0, 17.0, 55.0, 100.0])
    assert interpolate(l0, value, at) == pytest.approx(0.5 - 0.1 * np.log(at))
    # a bent frontier: halfway in log L0 between 10 (0.4) and 1000 (0.2) is L0 100, value 0.3
    assert interpolate([10, 1000], [0.4, 0.2], [100])[0] == pytest.approx(0.3)


def test_interpolation_refuses_outside_the_measured_range_and_says_where_it_ends():
    with pytest.raises(OutsideFrontier, match=r"L0 120 is outside the L0 range FAST measured \(10–100\)"):
        interpolate([10, 100], [0.3, 0.2], [50, 120], "FAST")
    # bootstrap replicates may continue the end segments instead
    assert interpolate([10, 100], [0.3, 0.2], [1000], extrapolate=True)[0] == pytest.approx(0.1)


def test_barely_overlapping_ranges_are_compared_only_where_both_are_measured():
    low, high = common_l0_range({"FAST": (10.0, 40.0), "BT(F)": (39.0, 120.0)})
    assert (low, high) == (39.0, 40.0)
    points = matched_l0_points(low, high, 5)
    assert points[0] == pytest.approx(39) and points[-1] == pytest.approx(40)
    fast = interpolate([10, 40], [0.5, 0.3], points, "FAST")
    bt = interpolate([39, 120], [0.32, 0.2], points, "BT(F)")
    assert np.all(np.isfinite(fast - bt))
    with pytest.raises(OutsideFrontier, match="outside the L0 range BT"):
        interpolate([39, 120], [0.32, 0.2], [20.0], "BT(F)")
    # ranges that touch at one L0 are compared there only
    assert matched_l0_points(*common_l0_range({"a": (5.0, 10.0), "b": (10.0, 20.0)})).tolist() == [10.0]


def test_ranges_that_do_not_overlap_are_refused_naming_both():
    with pytest.raises(OutsideFrontier) as error:
        common_l0_range({"FAST": (10.0, 30.0), "BT(P)": (31.0, 90.0)})
    message = str(error.value)
    assert "no common L0 range" in message and "FAST covers L0 10–30" in message and "BT(P) covers L0 31–90" in message


def test_percentile_interval_and_verdicts():
    assert percentile_interval(np.arange(1001.0), 0.9) == pytest.approx((50.0, 950.0))
    assert verdict((-0.3, -0.1), higher_is_better=False) == "better"
    assert verdict((-0.3, -0.1), higher_is_better=True) == "worse"
    assert verdict((-0.3, 0.1), higher_is_better=False) == "indistinguishable"
    assert verdict((math.nan, math.nan), higher_is_better=False) == "indistinguishable"
    rng = np.random.default_rng(0)
    weights = sequence_weights(7, 50, rng)
    assert weights.shape == (51, 7) and np.all(weights[0] == 1) and np.all(weights.sum(axis=1) == 7)
    draws = seed_draws(3, 20, rng)
    assert draws[0].tolist() == [0, 1, 2] and draws.max() < 3


N_SEQUENCES, D_MODEL = 60, 8
ASSISTANT, TEMPLATE = ROLE_CODE["assistant"], ROLE_CODE["template"]


def synthetic_sae(method: str, setting: int, seed: int, l0: float, nmse: float, difficulty_I, rng) -> dict:
    """An SAE whose per-sequence sums give NMSE ≈ nmse (times each sequence's difficulty) at L0 = l0."""
    count_IR = np.zeros((N_SEQUENCES, len(ROLES)), dtype=np.int64)
    count_IR[:, ASSISTANT] = 40 + np.arange(N_SEQUENCES) % 7
    count_IR[:, TEMPLATE] = 5
    sq_IR = count_IR * float(D_MODEL)
    seed_noise = 1 + 0.01 * rng.standard_normal()
    sq_err_IR = sq_IR * nmse * difficulty_I[:, None] * seed_noise
    l0_IR = count_IR * l0 * (1 + 0.01 * rng.standard_normal())
    return {"method": method, "arch": "jumprelu", "setting": f"c{setting}", "seed": seed,
            "sequences": {"sq_err_IR": sq_err_IR, "sq_IR": sq_IR, "l0_IR": l0_IR, "count_IR": count_IR}}


def synthetic_comparison(offset: float, rng) -> dict:
    """FAST and BT(F) frontiers parallel in log L0, FAST's NMSE lower by `offset`; BT(P) on disjoint L0."""
    difficulty_I = rng.lognormal(0, 0.2, N_SEQUENCES)  # the same dialogues are hard for every SAE
    saes = []
    for setting, l0 in enumerate((10.0, 30.0, 90.0)):
        frontier = 0.5 - 0.05 * math.log(l0)
        for seed in range(3):
            saes.append(synthetic_sae("fast", setting, seed, l0, frontier - offset, difficulty_I, rng))
            saes.append(synthetic_sae("bt-f", setting, seed, l0 * 1.1, frontier - 0.05 * math.log(1.1),
                                      difficulty_I, rng))
            saes.append(synthetic_sae("bt-p", setting, seed, l0 * 20, 0.2, difficulty_I, rng))
    tokens_I = saes[0]["sequences"]["count_IR"].sum(axis=1)
    mean_difficulty = float((difficulty_I * tokens_I).sum() / tokens_I.sum())
    result = compare_methods(saes, np.zeros((N_SEQUENCES, D_MODEL)), D_MODEL, "fast", ["bt-f", "bt-p"],
                             n_replicates=400, seed=1)
    return {**result, "mean_difficulty": mean_difficulty}


def test_the_interval_covers_a_known_difference_and_calls_it():
    result = synthetic_comparison(0.02, np.random.default_rng(3))
    row = next(r for r in result["rows"] if r["metric"] == "nmse" and r["other"] == "bt-f")
    truth = -0.02 * result["mean_difficulty"]  # NMSE pools the sequences: the offset times their mean difficulty
    low, high = row["interval"]
    assert low < truth < high and high < 0
    assert row["delta"] == pytest.approx(truth, abs=0.003)
    assert row["verdict"] == "better"
    # compared only where both frontiers are measured (L0 within 1% of 11 at the low end, of 90 at the high end)
    assert row["l0_low"] == pytest.approx(11, rel=0.03) and row["l0_high"] == pytest.approx(90, rel=0.03)
    ev = next(r for r in result["rows"] if r["metric"] == "explained_variance" and r["other"] == "bt-f")
    assert ev["verdict"] == "better"
    # BT(P)'s frontier starts at L0 200, FAST's ends at 90: refused, with both ranges named
    refused = next(r for r in result["rows"] if r["metric"] == "nmse" and r["other"] == "bt-p")
    assert "no common L0 range" in refused["refused"]


def test_no_difference_is_called_indistinguishable():
    result = synthetic_comparison(0.0, np.random.default_rng(4))
    row = next(r for r in result["rows"] if r["metric"] == "nmse" and r["other"] == "bt-f")
    assert row["interval"][0] < 0 < row["interval"][1]
    assert row["verdict"] == "indistinguishable"
