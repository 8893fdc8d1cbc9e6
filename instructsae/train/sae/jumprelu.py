"""JumpReLU SAE trained with an L0 penalty through straight-through estimators (Gemma Scope recipe).

latent_f = pre_f · H(pre_f − θ_f). The step H has no useful gradient, so θ gets a pseudo-derivative from a
rectangle kernel K of width ε (the bandwidth): d/dθ JumpReLU = −(θ/ε) K((pre−θ)/ε) and d/dθ H = −(1/ε) K(·).
θ itself is the parameter: a log-threshold initialised at 0.001 barely moves under Adam, so L0 refuses to fall.
"""

import torch
from torch import nn

from instructsae.train.sae.base import LossOutput, SparseAutoencoder


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_BF, threshold_F, bandwidth):
        ctx.save_for_backward(pre_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return pre_BF * (pre_BF > threshold_F).to(pre_BF.dtype)

    @staticmethod
    def backward(ctx, grad_BF):
        pre_BF, threshold_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_BF * (pre_BF > threshold_F).to(pre_BF.dtype)
        grad_threshold = (grad_BF * -(threshold_F / eps) * rectangle((pre_BF - threshold_F) / eps)).sum(dim=0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_BF, threshold_F, bandwidth):
        ctx.save_for_backward(pre_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return (pre_BF > threshold_F).to(pre_BF.dtype)

    @staticmethod
    def backward(ctx, grad_BF):
        pre_BF, threshold_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = (grad_BF * -(1.0 / eps) * rectangle((pre_BF - threshold_F) / eps)).sum(dim=0)
        return torch.zeros_like(pre_BF), grad_threshold, None


class JumpReLUSAE(SparseAutoencoder):
    architecture = "jumprelu"
    unit_norm_decoder = True
    extra_parameters = ("threshold",)

    def __init__(self, d_in: int, d_sae: int, bandwidth: float = 1e-3, init_threshold: float = 1e-3):
        super().__init__(d_in, d_sae)
        self.bandwidth = bandwidth
        self.threshold = nn.Parameter(torch.full((d_sae,), init_threshold))

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        # relu first: a negative threshold must never let negative pre-activations through
        return _JumpReLU.apply(torch.relu(self.pre_activations(x_BD)), self.threshold, self.bandwidth)

    def training_loss(self, x_BD: torch.Tensor, sparsity_coeff: float) -> LossOutput:
        pre_BF = torch.relu(self.pre_activations(x_BD))
        latents_BF = _JumpReLU.apply(pre_BF, self.threshold, self.bandwidth)
        recon_BD = self.decode(latents_BF)
        mse = self.squared_error(x_BD, recon_BD)
        l0 = _Step.apply(pre_BF, self.threshold, self.bandwidth).sum(dim=-1).mean()
        return LossOutput(mse + sparsity_coeff * l0, mse, l0, latents_BF, recon_BD)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=1e-6)
