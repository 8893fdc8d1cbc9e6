"""Skip transcoders (Paulo et al. 2025): a transcoder plus a learned linear map of the input, W_skip [d_out, d_in].

output = decode(latents) + x W_skipᵀ. Training reconstructs target − x W_skipᵀ with the transcoder's own loss,
which is the same squared error and hands W_skip its gradient through that target. SAELens 6 names them
`skip_transcoder` and `jumprelu_skip_transcoder`; W_skip starts at zero there and here.
"""

import torch
from torch import nn

from instructsae.sae.base import LossOutput
from instructsae.sae.transcoder import BatchTopKTranscoder, JumpReLUTranscoder, TopKTranscoder, Transcoder


class SkipMixin:
    extra_parameters = ("W_skip",)

    def __init__(self, d_in: int, d_sae: int, **settings):
        super().__init__(d_in, d_sae, **settings)
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_in))

    def skip(self, x_BD: torch.Tensor) -> torch.Tensor:
        return x_BD @ self.W_skip.T

    def reconstruct(self, x_BD: torch.Tensor, latents_BF: torch.Tensor) -> torch.Tensor:
        return self.decode(latents_BF) + self.skip(x_BD)

    def training_loss(self, x_BD: torch.Tensor, sparsity_coeff: float, dead_F: torch.Tensor | None = None,
                      target_BD: torch.Tensor | None = None) -> LossOutput:
        skip_BD = self.skip(x_BD)
        target_BD = x_BD if target_BD is None else target_BD
        out = super().training_loss(x_BD, sparsity_coeff, dead_F, target_BD - skip_BD)
        return LossOutput(out.loss, out.mse, out.sparsity, out.latents_BF, out.recon_BD + skip_BD)

    @torch.no_grad()
    def export_tensors(self, input_scale: float, output_scale: float | None = None) -> dict[str, torch.Tensor]:
        """y_train = W_skip·(s_in·x), so raw y = (s_in / s_out)·W_skip·x."""
        tensors = super().export_tensors(input_scale, output_scale)
        output_scale = input_scale if output_scale is None else output_scale
        tensors["W_skip"] = (self.W_skip * (input_scale / output_scale)).float().contiguous()
        return tensors


class SkipTranscoder(SkipMixin, Transcoder):
    architecture = "skip_transcoder"
    saelens_architecture = "skip_transcoder"


class JumpReLUSkipTranscoder(SkipMixin, JumpReLUTranscoder):
    architecture = "jumprelu_skip_transcoder"
    saelens_architecture = "jumprelu_skip_transcoder"
    extra_parameters = ("threshold", "W_skip")


class TopKSkipTranscoder(SkipMixin, TopKTranscoder):
    architecture = "topk_skip_transcoder"
    saelens_architecture = "topk_skip_transcoder"  # no SAELens class: our loader only


class BatchTopKSkipTranscoder(SkipMixin, BatchTopKTranscoder):
    architecture = "batchtopk_skip_transcoder"
    saelens_architecture = "jumprelu_skip_transcoder"
    extra_parameters = ("threshold", "W_skip")


SKIP_TRANSCODERS = (SkipTranscoder, JumpReLUSkipTranscoder, TopKSkipTranscoder, BatchTopKSkipTranscoder)
