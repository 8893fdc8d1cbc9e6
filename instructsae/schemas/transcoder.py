"""Transcoders: a dictionary that reads one hook site (the MLP's input) and reconstructs another (its output)."""

from typing import Literal

from pydantic import Field, model_validator

from instructsae.schemas.width import SAEWidth

ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk")
# Each activation's penalty coefficient when none is given: the SAE defaults (ReLU's L1, JumpReLU's L0).
DEFAULT_COEFF = {"relu": 0.2, "jumprelu": 1e-3}
DEFAULT_K = 32
# How fast a target-L0 JumpReLU steers its penalty's centre (measured: bench/jumprelu_target_l0.py, BENCHMARKS.md)
TARGET_L0_GAIN = 0.01


class TranscoderConfig(SAEWidth):
    """Transcoder (Dunefsky et al. 2024; Gemma Scope's are JumpReLU): sparse latents of the MLP's input
    (mlp_in, after its norm) that reconstruct the MLP's output (mlp_out); any of the SAEs' activation functions."""

    arch: Literal["transcoder"] = "transcoder"
    k: int | None = Field(None, gt=0, description="topk/batchtopk: active latents per token (given alone, it picks "
                          f"topk; default {DEFAULT_K})")
    activation: Literal["relu", "jumprelu", "topk", "batchtopk"] = Field(
        default_factory=lambda data: "topk" if data.get("k") else "relu",
        description="relu (L1 penalty, as a standard SAE), jumprelu (L0), topk or batchtopk (default: topk when "
        "k is given, else relu)")
    sparsity_coeff: float = Field(
        default_factory=lambda data: DEFAULT_COEFF.get(data.get("activation"), 0.0), ge=0,
        description="relu: L1 coefficient (default 0.2); jumprelu: L0 coefficient (default 1e-3); unused by topk")
    bandwidth: float = Field(1e-3, gt=0, description="jumprelu: width of the rectangle kernel of the estimator")
    init_threshold: float = Field(1e-3, gt=0, description="jumprelu: initial threshold of every feature")
    target_l0: float | None = Field(None, gt=0, description="jumprelu: aim L0 at this target, as a JumpReLU SAE's "
                                    "target_l0 (None: no target)")
    target_l0_gain: float = Field(TARGET_L0_GAIN, ge=0, description="jumprelu with target_l0: how fast the "
                                  "penalty's centre is steered to land L0 on the target (0: no steering)")
    aux_k: int | None = Field(None, gt=0, description="topk/batchtopk: latents of AuxK (None: d_model // 2)")
    aux_coeff: float = Field(1 / 32, ge=0, description="topk/batchtopk: coefficient of the AuxK loss")

    @model_validator(mode="after")
    def _k_only_where_it_counts(self):
        if self.k is not None and self.activation in ("relu", "jumprelu"):
            raise ValueError(f"k is set but activation {self.activation} has no k (topk or batchtopk do)")
        if self.target_l0 is not None and self.activation != "jumprelu":
            raise ValueError(f"target_l0 is set but activation {self.activation} has no L0 penalty (jumprelu has)")
        return self

    @property
    def architecture(self) -> str:
        """Its class's name: jumprelu_transcoder, topk_skip_transcoder, ... (relu: plain transcoder)."""
        prefix = "" if self.activation == "relu" else f"{self.activation}_"
        return f"{prefix}{self.arch}"

    def constructor_settings(self) -> dict:
        """The activation's own settings, as its SAE class takes them."""
        if self.activation in ("topk", "batchtopk"):
            return {"k": self.k or DEFAULT_K, "aux_k": self.aux_k, "aux_coeff": self.aux_coeff}
        if self.activation == "jumprelu":
            return {"bandwidth": self.bandwidth, "init_threshold": self.init_threshold, "target_l0": self.target_l0,
                    "target_l0_gain": self.target_l0_gain}
        return {}


class SkipTranscoderConfig(TranscoderConfig):
    """Skip transcoder (Paulo et al. 2025): a transcoder plus a learned linear map from input to output, W_skip."""

    arch: Literal["skip_transcoder"] = "skip_transcoder"
