"""The one small interface every SAE architecture implements, and the pieces they share.

Weights use SAELens names and shapes: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from instructsae.sae import sparse_products


@dataclass
class LossOutput:
    loss: torch.Tensor
    mse: torch.Tensor  # squared error summed over d_in, mean over the batch
    sparsity: torch.Tensor  # the architecture's penalty before its coefficient
    latents_BF: torch.Tensor
    recon_BD: torch.Tensor


class SparseAutoencoder(nn.Module):
    # The architecture's facts, asked of its class by the rest of the code (never by its name):
    architecture: ClassVar[str]  # the config's `arch` tag and our name for it
    saelens_architecture: ClassVar[str]  # what SAELens runs at inference for it (cfg.json's `architecture`)
    has_sparsity_penalty: ClassVar[bool] = True  # a coefficient with a warm-up (TopK-style SAEs have k instead)
    batch_split_refusal: ClassVar[str | None] = None  # why data-parallel training cannot split its batch, if so
    unit_norm_decoder: ClassVar[bool] = False
    extra_parameters: ClassVar[tuple[str, ...]] = ()  # exported beside the four shared tensors
    exported_settings: ClassVar[tuple[str, ...]] = ()  # constructor arguments cfg.json carries to rebuild it
    in_latent_units: ClassVar[tuple[str, ...]] = ()  # exported tensors scaled with the latents (thresholds)
    selects_by_rank: ClassVar[bool] = False  # keeps the largest latents: the export folds one common norm
    transcoder: ClassVar[bool] = False  # reconstructs another site than it reads (sae/transcoder.py)

    def __init__(self, d_in: int, d_sae: int):
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        W_dec_FD = torch.randn(d_sae, d_in)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_FD)
        self.W_enc = nn.Parameter(W_dec_FD.T.clone())  # tied at init, as Anthropic and Gemma Scope do
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @property
    def dtype(self) -> torch.dtype:
        """SAEBench's custom-SAE contract asks for .dtype and .device."""
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @classmethod
    def check_config(cls, cfg, d_in: int) -> None:
        """What the schema cannot check alone: settings that depend on the model's width (UserError)."""

    @classmethod
    def fitted_settings(cls, cfg, settings: dict) -> dict:
        """The constructor's settings from its config's: where a setting left unset has a better default in some
        mode of the architecture, that default (none by default)."""
        return settings

    @classmethod
    def needs_sparsity_warmup(cls, cfg) -> bool:
        """Whether a run left to fit its schedule ramps the penalty up (only a penalty that cannot pull L0 back
        up needs one: latents that die before they form stay dead)."""
        return cls.has_sparsity_penalty

    @classmethod
    def penalty_coeff(cls, cfg) -> float:
        """The sparsity penalty's final coefficient (after its warm-up); 0 for architectures without one."""
        return cfg.sparsity_coeff if cls.has_sparsity_penalty else 0.0

    @classmethod
    def sweep_label(cls, cfg) -> str:
        """Its sparsity setting as a sweep folder's name shows it."""
        return f"c{cfg.sparsity_coeff:g}"

    @classmethod
    def decoder_rows_per_token(cls, cfg, d_sae: int) -> int:
        """Decoder rows one token's step touches (a sweep's FLOPs estimate): all, unless few latents are chosen."""
        return d_sae

    def saelens_fields(self) -> dict:
        """cfg.json fields SAELens reads for this architecture beyond the shared ones."""
        return {}

    def encoder_input(self, x_BD: torch.Tensor) -> torch.Tensor:
        """What the encoder multiplies: an SAE centres its input on b_dec (a transcoder's b_dec is an output's)."""
        return x_BD - self.b_dec

    def pre_activations(self, x_BD: torch.Tensor) -> torch.Tensor:
        return sparse_products.encode(self.encoder_input(x_BD), self.W_enc, self.b_enc)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents_BF: torch.Tensor) -> torch.Tensor:
        return sparse_products.decode(latents_BF, self.W_dec) + self.b_dec

    def reconstruct(self, x_BD: torch.Tensor, latents_BF: torch.Tensor) -> torch.Tensor:
        """The output for input x and its latents (a skip transcoder adds a term of x itself)."""
        return self.decode(latents_BF)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x_BD, self.encode(x_BD))

    def training_loss(self, x_BD: torch.Tensor, sparsity_coeff: float, dead_F: torch.Tensor | None = None,
                      target_BD: torch.Tensor | None = None) -> LossOutput:
        """Loss of one batch. dead_F marks the features the trainer counts as dead (TopK's AuxK uses it);
        target_BD is what to reconstruct when it is not x itself (a transcoder's)."""
        raise NotImplementedError

    def observe_batch_l0(self, mean_l0: float) -> None:
        """After each optimiser step, the whole batch's mean L0 (across data-parallel ranks); unused by default."""

    def training_metrics(self) -> dict:
        """Figures of its own for each metrics.jsonl record (none by default)."""
        return {}

    def training_state(self) -> dict:
        """Non-parameter state a checkpoint must keep so a resumed run continues exactly (none by default)."""
        return {}

    def load_training_state(self, state: dict) -> None:
        pass

    @staticmethod
    def squared_error(x_BD: torch.Tensor, recon_BD: torch.Tensor) -> torch.Tensor:
        return (recon_BD - x_BD).pow(2).sum(dim=-1).mean()

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """With unit-norm decoder rows, drop the gradient part that would only change a row's norm."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            parallel_F = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= parallel_F * self.W_dec

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def export_tensors(self, input_scale: float, output_scale: float | None = None) -> dict[str, torch.Tensor]:
        """Weights acting on raw activations, for a model trained on x_train = input_scale * x_raw (and, for a
        transcoder, y_train = output_scale * y_raw; an SAE's output is its input).

        encode: (s·x − b_dec) W_enc = (x − b_dec/s)(s·W_enc), so latents are unchanged;
        decode: recon_raw = recon_train / s, so W_dec and b_dec are divided by s.
        """
        output_scale = input_scale if output_scale is None else output_scale
        tensors = {
            "W_enc": self.W_enc * input_scale,
            "b_enc": self.b_enc.clone(),
            "W_dec": self.W_dec / output_scale,
            "b_dec": self.b_dec / output_scale,
        }
        for name in self.extra_parameters:
            tensors[name] = getattr(self, name).detach().clone()
        return {name: tensor.detach().float().contiguous() for name, tensor in tensors.items()}
