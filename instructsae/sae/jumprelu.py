"""JumpReLU SAE trained with an L0 penalty through straight-through estimators (Gemma Scope recipe).

latent_f = pre_f · H(pre_f − θ_f). The step H has no useful gradient, so θ gets a pseudo-derivative from a
rectangle kernel K of width ε (the bandwidth): d/dθ JumpReLU = −(θ/ε) K((pre−θ)/ε) and d/dθ H = −(1/ε) K(·).
θ itself is the parameter: a log-threshold initialised at 0.001 barely moves under Adam, so L0 refuses to fall.

Two penalties on each token's L0 (the count of its firing latents), as the batch mean:
- without a target, L0 itself (Gemma Scope): the coefficient sets where L0 ends, found by sweeping it;
- with `target_l0` T, (2/T)·(L0 − A)² (Gemma Scope 2, SAELens's "quadratic" mode, where A = T): the penalty
  pulls each token's L0 towards A from either side, and a token far from it pays more than one near it.

In target mode a gentle coefficient reconstructs best (by default 0.03/T, a penalty of 0.06·((L0 − A)/T)²): it
leaves each token free to take the latents it needs. But the batch's mean L0 then settles well above T (37 for
T = 30 at coefficient 0.001 on the demo store), so the aim A is steered: after each step A moves by
`target_l0_gain` · (T − the batch's mean L0), which lands the mean on T whatever the coefficient (gain 0 keeps
A = T, Gemma Scope 2's form). The quadratic pulls from below too, so target mode needs no sparsity warm-up (the
linear penalty's warm-up keeps latents from dying early; here it cost 3% held-out NMSE). Measured in
bench/jumprelu_target_l0.py (BENCHMARKS.md).
"""

import torch
from torch import nn

from instructsae.errors import UserError
from instructsae.sae import sparse_products
from instructsae.sae.base import LossOutput, SparseAutoencoder
from instructsae.sae.jumprelu_sparse import SparseJumpReLUStep, near_threshold

# With a target T and neither given (measured on the demo store: BENCHMARKS.md, bench/jumprelu_target_l0.py):
# the coefficient TARGET_L0_COEFF_TIMES_T / T, and the bandwidth
TARGET_L0_COEFF_TIMES_T = 0.03
TARGET_L0_BANDWIDTH = 0.005


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
    in_latent_units = ("threshold",)
    exported_settings = ("bandwidth", "target_l0")

    @classmethod
    def check_config(cls, cfg, d_in: int) -> None:
        if cfg.target_l0 is not None and cfg.target_l0 > cfg.width(d_in):
            raise UserError(f"target_l0 {cfg.target_l0:g} exceeds {cfg.describe_width(d_in)}")

    @classmethod
    def fitted_settings(cls, cfg, settings: dict) -> dict:
        """With a target and no bandwidth given, a wider kernel: more tokens inform each threshold."""
        if cfg.target_l0 is not None and "bandwidth" not in cfg.model_fields_set:
            return {**settings, "bandwidth": TARGET_L0_BANDWIDTH}
        return settings

    @classmethod
    def needs_sparsity_warmup(cls, cfg) -> bool:
        return cfg.target_l0 is None  # the quadratic pulls L0 up as well as down: nothing to protect early

    @classmethod
    def penalty_coeff(cls, cfg) -> float:
        """With a target T and no coefficient given, 0.03/T: the penalty is then 0.06·((L0 − A)/T)², the same
        pull on a relative miss whatever the target (fixed coefficients that suited L0 30 were 1-2% worse than
        TopK at L0 20 here, and the fit of one at 20 was worse at 30)."""
        if cfg.target_l0 is not None and "sparsity_coeff" not in cfg.model_fields_set:
            return TARGET_L0_COEFF_TIMES_T / cfg.target_l0
        return cfg.sparsity_coeff

    @classmethod
    def sweep_label(cls, cfg) -> str:
        target = "" if cfg.target_l0 is None else f"-t{cfg.target_l0:g}"
        return f"c{cls.penalty_coeff(cfg):g}{target}"

    def __init__(self, d_in: int, d_sae: int, bandwidth: float = 1e-3, init_threshold: float = 1e-3,
                 target_l0: float | None = None, target_l0_gain: float = 0.0):
        super().__init__(d_in, d_sae)
        self.bandwidth, self.target_l0, self.target_l0_gain = bandwidth, target_l0, target_l0_gain
        self.aim = target_l0  # the quadratic's centre, steered so the mean L0 lands on target_l0
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
        if self.sparse_step_pays(x_BD):  # an SAE's encoder reads x − b_dec, a transcoder's x itself
            recon_BD, l0_B, latents_BF = SparseJumpReLUStep.apply(
                x_BD, self.W_enc, self.b_enc, self.b_dec, self.threshold, self.W_dec, self.bandwidth,
                not self.transcoder)
        else:
            latents_BF, l0_B = _JumpReLUWithL0.apply(self.pre_activations(x_BD), self.threshold, self.bandwidth)
            recon_BD = self.decode(latents_BF)
        self.last_density = float(l0_B.detach().mean()) / self.d_sae
        mse = self.squared_error(x_BD if target_BD is None else target_BD, recon_BD)
        penalty = self.l0_penalty(l0_B)
        return LossOutput(mse + sparsity_coeff * penalty, mse, penalty, latents_BF, recon_BD)

    def l0_penalty(self, l0_B: torch.Tensor) -> torch.Tensor:
        """The batch mean of L0, or with a target T and aim A of (2/T)·(L0 − A)², per token."""
        if self.target_l0 is None:
            return l0_B.mean()
        return (2 / self.target_l0 * (l0_B - self.aim).pow(2)).mean()

    def observe_batch_l0(self, mean_l0: float) -> None:
        """Steer the aim by the whole batch's mean L0 (every rank sees the same, so their aims agree)."""
        if self.target_l0 is None or not self.target_l0_gain:
            return
        error = self.target_l0 - mean_l0
        # Far from the target (the first steps start near d_sae/2) the quadratic alone pulls hard; steering
        # there would wind the aim far down and overshoot below the target once L0 arrives.
        if abs(error) < self.target_l0 / 2:
            self.aim = min(max(self.aim + self.target_l0_gain * error, 1.0), float(self.d_sae))

    def training_metrics(self) -> dict:
        return {} if self.target_l0 is None else {"l0_aim": self.aim}

    def training_state(self) -> dict:
        # last_density picks the dense or sparse step, aim is the steered centre: a resumed run must agree on both
        return {"last_density": self.last_density, "aim": self.aim}

    def load_training_state(self, state: dict) -> None:
        self.last_density = float(state["last_density"])
        self.aim = state.get("aim", self.target_l0)  # checkpoints from before steering: the aim was the target

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=1e-6)
