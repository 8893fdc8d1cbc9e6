"""Transcoders: sparse latents of one site (the MLP's input) that reconstruct another (the MLP's output).

A transcoder is an SAE whose target is not its input, so each SAE architecture gives one: the same activation,
penalty and decoder constraint, trained against the target site. Two things differ, as SAELens and sparsify
have them: the encoder reads the input as it is (b_dec is the output's bias, not a centre of the input), and
exported weights fold two scales, the input site's and the target site's. SAELens 6 runs ReLU and JumpReLU
transcoders (`transcoder`, `jumprelu_transcoder`); BatchTopK's inference rule is a JumpReLU, so it is exported
as one; SAELens has no TopK transcoder, so a TopK one is written as `topk_transcoder`, which only we load.
"""

from typing import ClassVar

import torch

from instructsae.errors import UserError

from instructsae.sae.base import SparseAutoencoder
from instructsae.sae.batchtopk import BatchTopKSAE
from instructsae.sae.jumprelu import JumpReLUSAE
from instructsae.sae.standard import StandardSAE
from instructsae.sae.topk import TopKSAE


class TranscoderMixin(SparseAutoencoder):
    transcoder: ClassVar[bool] = True
    activation: ClassVar[str]  # the config's `activation` this class runs

    @classmethod
    def check_config(cls, cfg, d_in: int) -> None:
        k = cfg.constructor_settings().get("k")
        if k is None:
            return super().check_config(cfg, d_in)  # the SAE's own checks (JumpReLU's target_l0)
        if k > cfg.expansion * d_in:
            raise UserError(f"k {k} exceeds d_sae {cfg.expansion * d_in} (expansion {cfg.expansion} × d_in {d_in})")

    @classmethod
    def sweep_label(cls, cfg) -> str:
        k = cfg.constructor_settings().get("k")
        return f"{cfg.activation}-" + (super().sweep_label(cfg) if k is None else f"k{k}")

    @classmethod
    def decoder_rows_per_token(cls, cfg, d_sae: int) -> int:
        return min(cfg.constructor_settings().get("k", d_sae), d_sae)

    def encoder_input(self, x_BD: torch.Tensor) -> torch.Tensor:
        return x_BD

    def saelens_fields(self) -> dict:
        # SAELens refuses apply_b_dec_to_input for a transcoder: its b_dec has the output's meaning
        return {**super().saelens_fields(), "d_out": self.d_in, "apply_b_dec_to_input": False}


class Transcoder(TranscoderMixin, StandardSAE):
    architecture = "transcoder"
    saelens_architecture = "transcoder"
    activation = "relu"


class JumpReLUTranscoder(TranscoderMixin, JumpReLUSAE):
    architecture = "jumprelu_transcoder"
    saelens_architecture = "jumprelu_transcoder"
    activation = "jumprelu"


class TopKTranscoder(TranscoderMixin, TopKSAE):
    architecture = "topk_transcoder"
    saelens_architecture = "topk_transcoder"  # no SAELens class: our loader only
    activation = "topk"


class BatchTopKTranscoder(TranscoderMixin, BatchTopKSAE):
    architecture = "batchtopk_transcoder"
    saelens_architecture = "jumprelu_transcoder"  # its inference rule: every latent above one threshold
    activation = "batchtopk"


TRANSCODERS = (Transcoder, JumpReLUTranscoder, TopKTranscoder, BatchTopKTranscoder)
