"""How wide an SAE or transcoder is (its own module: the transcoder configs share it with the SAEs')."""

from pydantic import AliasChoices, Field, model_validator

from instructsae.schemas.base import FrozenModel

DEFAULT_EXPANSION = 16


class SAEWidth(FrozenModel):
    """How wide an SAE is: expansion or d_sae, not both (neither: expansion 16)."""

    expansion: int | None = Field(None, gt=0, validation_alias=AliasChoices("expansion", "expansion_factor"),
                                  description=f"d_sae = expansion * d_model [default: {DEFAULT_EXPANSION} unless "
                                  "d_sae is given]")
    d_sae: int | None = Field(None, gt=0, description="latents, instead of expansion (e.g. 16384 at d_model 2304)")

    @model_validator(mode="after")
    def _one_width(self):
        if self.expansion is not None and self.d_sae is not None:
            raise ValueError(f"give expansion ({self.expansion}) or d_sae ({self.d_sae}), not both")
        return self

    def width(self, d_model: int) -> int:
        """d_sae for a model of width d_model."""
        return self.d_sae if self.d_sae is not None else (self.expansion or DEFAULT_EXPANSION) * d_model

    def width_label(self) -> str:
        """'d4608' or 'x8', as sweep folders and settings are named."""
        return f"d{self.d_sae}" if self.d_sae is not None else f"x{self.expansion or DEFAULT_EXPANSION}"

    def describe_width(self, d_in: int) -> str:
        """'d_sae 4608 (expansion 8 × d_in 576)', for messages that name the width."""
        how = "as given" if self.d_sae is not None else f"expansion {self.expansion or DEFAULT_EXPANSION} × d_in {d_in}"
        return f"d_sae {self.width(d_in)} ({how})"
