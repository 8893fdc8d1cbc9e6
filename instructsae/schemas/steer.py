"""What `instructsae steer` does: one greedy generation per steering strength α."""

from pydantic import Field, field_validator

from instructsae.schemas.base import FrozenModel
from instructsae.schemas.extract import AttnImplementation


class SteerConfig(FrozenModel):
    sae: str = Field(..., description="SAE folder (SAELens layout); its metadata names the layer and the model")
    feature: int = Field(..., ge=0, description="feature whose decoder direction is added")
    alpha: tuple[float, ...] = Field(
        (0.0, 15.0, 25.0, 50.0, 100.0, 150.0),
        description="steering strengths α, comma-separated; α × the feature's UNIT-NORM decoder direction is "
        "added, so α is in residual-stream units whatever scale the SAE was trained at",
    )
    prompt: str = Field(..., description="the user message (or raw text with --no-chat)")
    max_new_tokens: int = Field(40, gt=0, description="tokens generated per α")
    model: str | None = Field(None, description="LM to steer (default: the model the SAE's store was extracted from)")
    chat: bool = Field(True, description="wrap the prompt in the model's chat template as a user turn")
    out: str | None = Field(None, description="JSON file for the generations (the CLI's default: "
                            "steer-feature-F.json; from Python, nothing is written unless it is given)")
    device: str = Field("cpu", description="torch device, a runtime knob")
    attn_implementation: AttnImplementation = "auto"

    @field_validator("alpha")
    @classmethod
    def _alpha_given(cls, alpha: tuple[float, ...]) -> tuple[float, ...]:
        if not alpha:
            raise ValueError("give at least one α, e.g. 0,15,25,50,100,150")
        return alpha
