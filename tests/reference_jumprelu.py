"""The JumpReLU loss written plainly with dense autograd ops, as Gemma Scope's pseudo-code writes it.

Not used in training: it is the yardstick the fast paths are tested (tests/test_sae_sparse_step.py) and
benchmarked (bench/sae_step.py) against.
"""

import torch


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
        kernel_BF = rectangle((pre_BF - threshold_F) / ctx.bandwidth)
        grad_threshold = (grad_BF * -(threshold_F / ctx.bandwidth) * kernel_BF).sum(dim=0)
        return grad_BF * (pre_BF > threshold_F).to(pre_BF.dtype), grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_BF, threshold_F, bandwidth):
        ctx.save_for_backward(pre_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return (pre_BF > threshold_F).to(pre_BF.dtype)

    @staticmethod
    def backward(ctx, grad_BF):
        pre_BF, threshold_F = ctx.saved_tensors
        kernel_BF = rectangle((pre_BF - threshold_F) / ctx.bandwidth)
        return None, (grad_BF * -(1.0 / ctx.bandwidth) * kernel_BF).sum(dim=0), None


def reference_jumprelu_loss(sae, x_BD: torch.Tensor, sparsity_coeff: float,
                            target_l0: float | None = None) -> torch.Tensor:
    """MSE (summed over d_in, mean over the batch) + coefficient × mean L0, for a JumpReLUSAE's parameters; with a
    target T, the penalty is the mean over tokens of (2/T)·(L0 − T)² (SAELens's "quadratic" mode, Gemma Scope 2)."""
    pre_BF = torch.relu((x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc)
    latents_BF = _JumpReLU.apply(pre_BF, sae.threshold, sae.bandwidth)
    recon_BD = latents_BF @ sae.W_dec + sae.b_dec
    l0_B = _Step.apply(pre_BF, sae.threshold, sae.bandwidth).sum(dim=-1)
    penalty = l0_B.mean() if target_l0 is None else (2 / target_l0 * (l0_B - target_l0) ** 2).mean()
    return (recon_BD - x_BD).pow(2).sum(dim=-1).mean() + sparsity_coeff * penalty
