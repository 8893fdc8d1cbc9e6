"""Reconstruction and sparsity metrics, accumulated in float64 over a stream of batches."""

from collections.abc import Iterable

import torch

from instructsae.train.sae import SparseAutoencoder


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, batches: Iterable[torch.Tensor]) -> dict:
    """mse (per element), nmse (Σ‖x−x̂‖² / Σ‖x‖²), explained variance (1 − Σ‖x−x̂‖² / Σ‖x−x̄‖²),
    l0 (active latents per token), dead_fraction (features that never fire), n_tokens."""
    n_tokens, sum_sq_err, sum_sq, l0_sum = 0, 0.0, 0.0, 0.0
    sum_x_D = None
    fired_F = torch.zeros(sae.d_sae, dtype=torch.bool)
    for x_BD in batches:
        latents_BF = sae.encode(x_BD)
        recon_BD = sae.decode(latents_BF)
        x64_BD = x_BD.double()
        sum_sq_err += float((recon_BD.double() - x64_BD).pow(2).sum())
        sum_sq += float(x64_BD.pow(2).sum())
        sum_x_D = x64_BD.sum(dim=0) if sum_x_D is None else sum_x_D + x64_BD.sum(dim=0)
        active_BF = latents_BF > 0
        l0_sum += float(active_BF.sum())
        fired_F |= active_BF.any(dim=0).cpu()
        n_tokens += len(x_BD)
    if n_tokens == 0:
        raise ValueError("no tokens to evaluate on")
    # Σ‖x − x̄‖² = Σ‖x‖² − N‖x̄‖², so the variance needs no second pass
    total_variance = sum_sq - float(sum_x_D.pow(2).sum()) / n_tokens
    return {
        "mse": sum_sq_err / (n_tokens * sae.d_in),
        "nmse": sum_sq_err / sum_sq,
        "explained_variance": 1.0 - sum_sq_err / total_variance,
        "l0": l0_sum / n_tokens,
        "dead_fraction": float((~fired_F).float().mean()),
        "n_tokens": n_tokens,
    }
