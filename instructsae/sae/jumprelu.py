"""JumpReLU SAE trained with an L0 penalty through straight-through estimators (Gemma Scope recipe).

latent_f = pre_f · H(pre_f − θ_f). The step H has no useful gradient, so θ gets a pseudo-derivative from a
rectangle kernel K of width ε (the bandwidth): d/dθ JumpReLU = −(θ/ε) K((pre−θ)/ε) and d/dθ H = −(1/ε) K(·).
θ itself is the parameter: a log-threshold initialised at 0.001 barely moves under Adam, so L0 refuses to fall.

Two penalties on each token's L0 (the count of its firing latents), as the batch mean:
- without a target, L0 itself (Gemma Scope): the coefficient sets where L0 ends, found by sweeping it;
- with `target_l0` T, (2/T)·(L0 − T)² (Gemma Scope 2, SAELens's "quadratic" mode): the penalty pulls each
  token's L0 towards T from either side, so a run ends near T, and a token far above it pays more than one
  near it, which spends latents where reconstruction needs them rather than evenly.
"""

import torch
from torch import nn

from instructsae.errors import UserError
from instructsae.sae import sparse_products
from instructsae.sae.base import LossOutput, SparseAutoencoder
from instructsae.sae.jumprelu_sparse import SparseJumpReLUStep, near_threshold

TARGET_L0_COEFF = 0.01  # measured on the demo store (BENCHMARKS.md, bench/jumprelu_target_l0.py)


class _JumpReLUWithL0(torch.autograd.Function):
    """latents = relu(pre)·H(relu(pre) − θ) and each token's L0 = Σ_f H(·), with their estimators.

    One function for both, written as a handful of passes over [batch, d_sae]: as separate autograd ops
    they took a dozen passes and most of a CPU training step (bench/sae_step.py).
    """

    @staticmethod
    def forward(ctx, pre_BF, threshold_F, bandwidth):
        # θ < 0 must not let negative pre-activations through: relu first, as Gemma Scope does
        active_BF = pre_BF > threshold_F.clamp_min(0)
        latents_BF = torch.where(active_BF, pre_BF, 0.0)
        l0_B = active_BF.sum(dim=1, dtype=pre_BF.dtype)
        ctx.save_for_backward(pre_BF, threshold_F, active_BF)
        ctx.bandwidth = bandwidth
        return latents_BF, l0_B

    @staticmethod
    def backward(ctx, grad_latents_BF, grad_l0_B):
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
            if grad_l0_B is not None:
                per_entry += grad_l0_B[rows]
            grad_threshold = torch.zeros_like(threshold_F).index_add_(0, cols, per_entry) * (-1.0 / eps)
        return grad_pre, grad_threshold, None


class JumpReLUSAE(SparseAutoencoder):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"
    unit_norm_decoder = True
    extra_parameters = ("threshold",)
    exported_settings = ("bandwidth", "target_l0")

    @classmethod
    def check_config(cls, cfg, d_in: int) -> None:
        if cfg.target_l0 is not None and cfg.target_l0 > cfg.expansion * d_in:
            raise UserError(f"target_l0 {cfg.target_l0:g} exceeds d_sae {cfg.expansion * d_in} "
                            f"(expansion {cfg.expansion} × d_in {d_in})")

    @classmethod
    def penalty_coeff(cls, cfg) -> float:
        """With a target and no coefficient given, the quadratic's own default (the linear one's is far too weak)."""
        if cfg.target_l0 is not None and "sparsity_coeff" not in cfg.model_fields_set:
            return TARGET_L0_COEFF
        return cfg.sparsity_coeff

    @classmethod
    def sweep_label(cls, cfg) -> str:
        target = "" if cfg.target_l0 is None else f"-t{cfg.target_l0:g}"
        return f"c{cls.penalty_coeff(cfg):g}{target}"

    def __init__(self, d_in: int, d_sae: int, bandwidth: float = 1e-3, init_threshold: float = 1e-3,
                 target_l0: float | None = None):
        super().__init__(d_in, d_sae)
        self.bandwidth, self.target_l0 = bandwidth, target_l0
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
            recon_BD, l0_B, latents_BF = SparseJumpReLUStep.apply(
                x_BD, self.W_enc, self.b_enc, self.b_dec, self.threshold, self.W_dec, self.bandwidth)
        else:
            latents_BF, l0_B = _JumpReLUWithL0.apply(self.pre_activations(x_BD), self.threshold, self.bandwidth)
            recon_BD = self.decode(latents_BF)
        self.last_density = float(l0_B.detach().mean()) / self.d_sae
        mse = self.squared_error(x_BD if target_BD is None else target_BD, recon_BD)
        penalty = self.l0_penalty(l0_B)
        return LossOutput(mse + sparsity_coeff * penalty, mse, penalty, latents_BF, recon_BD)

    def l0_penalty(self, l0_B: torch.Tensor) -> torch.Tensor:
        """The batch mean of L0, or with a target T of (2/T)·(L0 − T)², per token."""
        if self.target_l0 is None:
            return l0_B.mean()
        return (2 / self.target_l0 * (l0_B - self.target_l0).pow(2)).mean()

    def training_state(self) -> dict:
        return {"last_density": self.last_density}  # picks the dense or sparse step: a resumed run must agree

    def load_training_state(self, state: dict) -> None:
        self.last_density = float(state["last_density"])

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=1e-6)
