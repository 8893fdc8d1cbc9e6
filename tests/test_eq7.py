"""The FAST paper's Eq. 7 MSE / MSE_st and the per-role figures against a direct computation on a hand-built stream."""

import math

import numpy as np
import pytest
import torch

from instructsae.evaluate.breakdown import SequenceRoleSums, per_sequence_mse
from instructsae.schemas.manifest import ROLE_CODE

T, U, A = ROLE_CODE["template"], ROLE_CODE["user"], ROLE_CODE["assistant"]


def test_per_sequence_mean_weights_sequences_equally():
    # sequence 0: 1 token with squared error 8 (over H=2); sequence 1: 3 tokens totalling 6; sequence 2: unseen
    mse, n = per_sequence_mse(np.array([8.0, 6.0, 0.0]), np.array([1, 3, 0]), d_model=2)
    assert n == 2
    assert mse == pytest.approx(((8 / 1) + (6 / 3)) / 2 / 2)  # 2.5, where a token-weighted mean gives 1.75


def test_streamed_sums_match_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    instance = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])  # sequence 1 has no template token
    role = np.array([T, U, A, U, A, T, T, U, A], dtype=np.uint8)
    x_ND = torch.randn(9, 4, generator=generator)
    recon_ND = x_ND + 0.3 * torch.randn(9, 4, generator=generator)
    latents_NF = torch.relu(torch.randn(9, 6, generator=generator))
    sums = SequenceRoleSums(n_instances=3, d_model=4)
    for part in (slice(0, 4), slice(4, 9)):  # streamed in two batches that split sequence 1
        sums.add(x_ND[part], recon_ND[part], latents_NF[part], instance[part], role[part])

    err_N = (recon_ND - x_ND).double().pow(2).sum(dim=1).numpy()
    direct_mse = np.mean([err_N[instance == i].mean() for i in range(3)]) / 4
    direct_st = np.mean([err_N[(instance == i) & (role == T)].mean() for i in (0, 2)]) / 4
    eq7 = sums.eq7()
    assert eq7["mse"] == pytest.approx(direct_mse) and eq7["mse_st"] == pytest.approx(direct_st)
    assert eq7["log2_mse"] == pytest.approx(math.log2(direct_mse))
    assert eq7["log2_mse_st"] == pytest.approx(math.log2(direct_st))
    assert (eq7["n_sequences"], eq7["n_sequences_st"]) == (3, 2)

    per_role = sums.per_role()
    assert set(per_role) == {"template", "user", "assistant"}
    for name, code in (("template", T), ("user", U), ("assistant", A)):
        mine = role == code
        assert per_role[name]["n_tokens"] == mine.sum()
        assert per_role[name]["nmse"] == pytest.approx(err_N[mine].sum() / x_ND[mine].double().pow(2).sum().item())
        assert per_role[name]["l0"] == pytest.approx((latents_NF[mine] > 0).sum(dim=1).double().mean().item())


def test_no_template_token_gives_no_mse_st():
    sums = SequenceRoleSums(n_instances=1, d_model=2)
    x_ND = torch.ones(2, 2)
    sums.add(x_ND, 2 * x_ND, x_ND, np.array([0, 0]), np.array([U, A], dtype=np.uint8))
    eq7 = sums.eq7()
    assert eq7["mse"] == pytest.approx(1.0) and eq7["log2_mse"] == pytest.approx(0.0)
    assert eq7["mse_st"] is None and eq7["log2_mse_st"] is None and eq7["n_sequences_st"] == 0
