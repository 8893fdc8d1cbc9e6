"""What `instructsae evaluate` runs beside the reconstruction metrics: the language-model view."""

from pydantic import Field

from instructsae.schemas.base import FrozenModel
from instructsae.schemas.extract import AttnImplementation


class LMViewConfig(FrozenModel):
    model: str | None = Field(
        None, description="LM to splice the SAE into (default: the model named in the store's manifest)")
    dataset: str | None = Field(
        None, description="dataset the store was made from, re-read to recover each sequence's dropped first "
        "token (default: the manifest's)")
    lm_tokens: int = Field(
        20_000, ge=0, description="stored tokens of the store's first sequences to run the LM view on (0: skip it)")
    batch_tokens: int | None = Field(
        None, gt=0, description="padded tokens per forward pass, a runtime knob (default: 1024 on CPU, 16384 on GPU)")
    device: str = Field(
        "auto", description="torch device for the LM and the SAE in the LM view (auto: CUDA when present, else CPU)")
    attn_implementation: AttnImplementation = "auto"
