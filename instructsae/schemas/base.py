"""Base for every config: frozen, no unknown fields, validators only check (they never do I/O)."""

from pydantic import BaseModel, ConfigDict


class FrozenModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
