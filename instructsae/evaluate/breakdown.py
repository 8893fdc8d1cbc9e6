"""Reconstruction error per sequence (the FAST paper's Eq. 7) and per token role, streamed with the store's ids.

Eq. 7 of the FAST paper averages the squared error over the tokens of each sequence, then over sequences, then
over the H elements of a vector: MSE = (1/(N·H)) Σ_i (1/L_i) Σ_j Σ_k (y−ŷ)². MSE_st is the same over the
special/template tokens only (role 'template'); sequences with none of them are left out of its mean.
Only per-instance sums are kept, so a store larger than memory streams through. They are also handed out per
sequence and role (`per_sequence`), so a bootstrap over held-out sequences can recompute every figure on a
resample of sequences without another pass over the store.
"""

import math

import numpy as np
import torch

from instructsae.schemas.manifest import ROLE_CODE, ROLES

TEMPLATE = ROLE_CODE["template"]


def per_sequence_mse(sq_err_I: np.ndarray, count_I: np.ndarray, d_model: int) -> tuple[float, int]:
    """(Eq. 7 MSE over the sequences with at least one token, how many sequences that is)."""
    seen_I = count_I > 0
    n_sequences = int(seen_I.sum())
    if n_sequences == 0:
        return math.nan, 0
    return float((sq_err_I[seen_I] / count_I[seen_I]).mean()) / d_model, n_sequences


def _log2(value: float) -> float | None:
    return math.log2(value) if value > 0 and math.isfinite(value) else None


class SequenceRoleSums:
    """Squared-error sums per instance (all tokens and template tokens) and error/L0 sums per role."""

    def __init__(self, n_instances: int, d_model: int):
        self.d_model = d_model
        self.sq_err_I = np.zeros(n_instances)
        self.count_I = np.zeros(n_instances, dtype=np.int64)
        self.st_sq_err_I = np.zeros(n_instances)
        self.st_count_I = np.zeros(n_instances, dtype=np.int64)
        self.sq_err_R = np.zeros(len(ROLES))
        self.sq_R = np.zeros(len(ROLES))
        self.l0_R = np.zeros(len(ROLES))
        self.count_R = np.zeros(len(ROLES), dtype=np.int64)
        self.sq_err_IR = np.zeros((n_instances, len(ROLES)))
        self.sq_IR = np.zeros((n_instances, len(ROLES)))
        self.l0_IR = np.zeros((n_instances, len(ROLES)))
        self.count_IR = np.zeros((n_instances, len(ROLES)), dtype=np.int64)

    def add(self, x_BD: torch.Tensor, recon_BD: torch.Tensor, latents_BF: torch.Tensor,
            instance_B: np.ndarray, role_B: np.ndarray) -> None:
        sq_err_B = (recon_BD.double() - x_BD.double()).pow(2).sum(dim=-1).cpu().numpy()
        sq_B = x_BD.double().pow(2).sum(dim=-1).cpu().numpy()
        l0_B = (latents_BF > 0).sum(dim=-1).cpu().numpy()
        size_I, size_R = len(self.count_I), len(ROLES)
        self.sq_err_I += np.bincount(instance_B, weights=sq_err_B, minlength=size_I)
        self.count_I += np.bincount(instance_B, minlength=size_I)
        template_B = role_B == TEMPLATE
        self.st_sq_err_I += np.bincount(instance_B[template_B], weights=sq_err_B[template_B], minlength=size_I)
        self.st_count_I += np.bincount(instance_B[template_B], minlength=size_I)
        self.sq_err_R += np.bincount(role_B, weights=sq_err_B, minlength=size_R)
        self.sq_R += np.bincount(role_B, weights=sq_B, minlength=size_R)
        self.l0_R += np.bincount(role_B, weights=l0_B, minlength=size_R)
        self.count_R += np.bincount(role_B, minlength=size_R)
        cell_B = instance_B.astype(np.int64) * size_R + role_B  # (instance, role) flattened
        for total_IR, weights_B in ((self.sq_err_IR, sq_err_B), (self.sq_IR, sq_B), (self.l0_IR, l0_B)):
            total_IR += np.bincount(cell_B, weights=weights_B, minlength=size_I * size_R).reshape(size_I, size_R)
        self.count_IR += np.bincount(cell_B, minlength=size_I * size_R).reshape(size_I, size_R)

    def eq7(self) -> dict:
        mse, n_sequences = per_sequence_mse(self.sq_err_I, self.count_I, self.d_model)
        mse_st, n_sequences_st = per_sequence_mse(self.st_sq_err_I, self.st_count_I, self.d_model)
        return {"mse": mse, "mse_st": None if n_sequences_st == 0 else mse_st,
                "log2_mse": _log2(mse), "log2_mse_st": _log2(mse_st),
                "n_sequences": n_sequences, "n_sequences_st": n_sequences_st}

    def per_role(self) -> dict:
        """{role: nmse, mse (per element), l0, n_tokens} for the roles that occur."""
        return {
            name: {"nmse": self.sq_err_R[code] / self.sq_R[code],
                   "mse": self.sq_err_R[code] / (self.count_R[code] * self.d_model),
                   "l0": self.l0_R[code] / self.count_R[code], "n_tokens": int(self.count_R[code])}
            for code, name in enumerate(ROLES) if self.count_R[code] > 0
        }

    def per_sequence(self) -> dict[str, np.ndarray]:
        """[n_instances, n_roles] sums: squared error, squared norm, active latents, tokens (roles as in ROLES)."""
        return {"sq_err_IR": self.sq_err_IR, "sq_IR": self.sq_IR, "l0_IR": self.l0_IR, "count_IR": self.count_IR}
