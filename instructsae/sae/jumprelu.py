"""JumpReLU SAE trained with an L0 penalty through straight-through estimators (Gemma Scope recipe).

latent_f = pre_f · H(pre_f − θ_f). The step H has no useful gradient, so θ gets a pseudo-derivative from a
rectangle kernel K of width ε (the bandwidth): d/dθ JumpReLU = −(θ/ε) K((pre−θ)/ε) and d/dθ H = −(1/ε) K(·).
θ itself is the parameter: a log-threshold initialised at 0.001 barely moves under Adam, so L0 refuses to fall.
"""

import torch
from torch import nn

from instructsae.sae import sparse_products
from instructsae.sae.base import LossOutput, SparseAutoencoder
from instructsae.sae.jumprelu_sparse import SparseJumpReLUStep, near_threshold


class _JumpReLUWithL0(torch.autograd.Function):
    """latents = relu(pre)·H(relu(pre) − θ) and the batch-mean L0 = Σ H(·) / batch, with their estimators.

    One function for both, written as a handful of passes over [batch, d_sae]: as separate autograd ops
    they took a dozen passes and most of a CPU training step (bench/sae_step.py).
    """

    @staticmethod
    def forward(ctx, pre_BF, threshold_F, bandwidth):
        # θ < 0 must not let negative pre-activations through: relu first, as Gemma Scope does
        active_BF = pre_BF > threshold_F.clamp_min(0)
        latents_BF = torch.where(active_BF, pre_BF, 0.0)
        l0 = active_BF.sum(dtype=pre_BF.dtype) / pre_BF.shape[0]
        ctx.save_for_backward(pre_BF, threshold_F, active_BF)
        ctx.bandwidth = bandwidth
        return latents_BF, l0

    @staticmethod
    def backward(ctx, grad_latents_BF, grad_l0):
        pre_BF, threshold_F, active_BF = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = None
        if ctx.needs_input_grad[0] and grad_latents_BF is not None:
            grad_pre = torch.where(active_BF, grad_latents_BF, 0.0)
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            rows, cols = near_threshold(pre_BF, threshold_F, eps)
            # d latent/dθ = −(θ/ε)·K and dH/dθ = −(1/ε)·K, summed over the batch where K is not zero
            per_entry = pre_BF.new_zeros(len(cols))
            if grad_latents_BF is not None:
                per_entry += threshold_F[cols] * grad_latents_BF[rows, cols]
            if grad_l0 is not None:
                per_entry += grad_l0 / pre_BF.shape[0]
            grad_threshold = torch.zeros_like(threshold_F).index_add_(0, cols, per_entry) * (-1.0 / eps)
        return grad_pre, grad_threshold, None


class JumpReLUSAE(SparseAutoencoder):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"
    unit_norm_decoder = True
    extra_parameters = ("threshold",)
    exported_settings = ("bandwidth",)

    def __init__(self, d_in: int, d_sae: int, bandwidth: float = 1e-3, init_threshold: float = 1e-3):
        super().__init__(d_in, d_sae)
        self.bandwidth = bandwidth
        self.threshold = nn.Parameter(torch.full((d_sae,), init_threshold))
        self.last_density = 1.0  # share of latents that fired in the last training step

    def sparse_step_pays(self, x_BD: torch.Tensor) -> bool:
        """The hand-written sparse step wins once latents are sparse; measured on CPUs only."""
        return (x_BD.device.type == "cpu" and x_BD.dtype == torch.float32
                and self.last_density < sparse_products.SPARSE_BELOW)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return _JumpReLUWithL0.apply(self.pre_activations(x_BD), self.threshold, self.bandwidth)[0]

    def training_loss(self, x_BD: torch.Tensor, sparsity_coeff: float, dead_F: torch.Tensor | None = None,
                      target_BD: torch.Tensor | None = None) -> LossOutput:
        # the fused sparse step centres on b_dec and reconstructs x itself: an SAE's step only
        if target_BD is None and not self.transcoder and self.sparse_step_pays(x_BD):
            recon_BD, l0, latents_BF = SparseJumpReLUStep.apply(
                x_BD, self.W_enc, self.b_enc, self.b_dec, self.threshold, self.W_dec, self.bandwidth)
        else:
            latents_BF, l0 = _JumpReLUWithL0.apply(self.pre_activations(x_BD), self.threshold, self.bandwidth)
            recon_BD = self.decode(latents_BF)
        self.last_density = float(l0.detach()) / self.d_sae
        mse = self.squared_error(x_BD if target_BD is None else target_BD, recon_BD)
        return LossOutput(mse + sparsity_coeff * l0, mse, l0, latents_BF, recon_BD)

    def training_state(self) -> dict:
        return {"last_density": self.last_density}  # picks the dense or sparse step: a resumed run must agree

    def load_training_state(self, state: dict) -> None:
        self.last_density = float(state["last_density"])

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=1e-6)
