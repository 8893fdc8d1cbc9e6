"""Reconstruction and sparsity metrics, accumulated in float64 over a stream of batches.

On the floor beneath the stages: training's held-out summary and evaluate both use these sums.
"""

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # only for the annotation: the floor does not import a stage
    from instructsae.sae import SparseAutoencoder


class ReconstructionSums:
    """Running sums over batches of (x, x̂, latents); `result` turns them into the metrics."""

    def __init__(self, d_in: int, d_sae: int):
        self.d_in = d_in
        self.n_tokens, self.sum_sq_err, self.sum_sq, self.l0_sum = 0, 0.0, 0.0, 0.0
        self.sum_x_D = torch.zeros(d_in, dtype=torch.float64)
        self.fired_F = torch.zeros(d_sae, dtype=torch.bool)

    def add(self, x_BD: torch.Tensor, recon_BD: torch.Tensor, latents_BF: torch.Tensor) -> None:
        x64_BD = x_BD.double()
        self.sum_sq_err += float((recon_BD.double() - x64_BD).pow(2).sum())
        self.sum_sq += float(x64_BD.pow(2).sum())
        self.sum_x_D += x64_BD.sum(dim=0).cpu()
        active_BF = latents_BF > 0
        self.l0_sum += float(active_BF.sum())
        self.fired_F |= active_BF.any(dim=0).cpu()
        self.n_tokens += len(x_BD)

    def result(self) -> dict:
        """mse (per element), nmse (Σ‖x−x̂‖² / Σ‖x‖²), explained variance (1 − Σ‖x−x̂‖² / Σ‖x−x̄‖²),
        l0 (active latents per token), dead_fraction (features that never fire), n_tokens."""
        if self.n_tokens == 0:
            raise ValueError("no tokens to evaluate on")
        # Σ‖x − x̄‖² = Σ‖x‖² − N‖x̄‖², so the variance needs no second pass
        total_variance = self.sum_sq - float(self.sum_x_D.pow(2).sum()) / self.n_tokens
        return {
            "mse": self.sum_sq_err / (self.n_tokens * self.d_in),
            "nmse": self.sum_sq_err / self.sum_sq,
            "explained_variance": 1.0 - self.sum_sq_err / total_variance,
            "l0": self.l0_sum / self.n_tokens,
            "dead_fraction": float((~self.fired_F).float().mean()),
            "n_tokens": self.n_tokens,
        }


@torch.no_grad()
def reconstruction_metrics(sae: "SparseAutoencoder", batches: Iterable[torch.Tensor]) -> dict:
    """ReconstructionSums.result over a stream of activation batches."""
    sums = ReconstructionSums(sae.d_in, sae.d_sae)
    for x_BD in batches:
        latents_BF = sae.encode(x_BD)
        sums.add(x_BD, sae.decode(latents_BF), latents_BF)
    return sums.result()
