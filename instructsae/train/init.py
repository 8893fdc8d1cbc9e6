"""Geometric median for the b_dec initialisation (robust to the odd huge-norm token, unlike the mean)."""

import torch


@torch.no_grad()
def geometric_median(points_ND: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm: repeatedly re-weight points by the inverse of their distance to the estimate."""
    points_ND = points_ND.double()
    median_D = points_ND.mean(dim=0)
    for _ in range(max_iter):
        distances_N = (points_ND - median_D).norm(dim=1).clamp_min(1e-12)
        weights_N = 1.0 / distances_N
        updated_D = (weights_N[:, None] * points_ND).sum(dim=0) / weights_N.sum()
        moved = (updated_D - median_D).norm()
        median_D = updated_D
        if moved <= tol * median_D.norm().clamp_min(1e-12):
            break
    return median_D.float()
