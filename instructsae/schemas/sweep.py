"""What `instructsae sweep` does: a grid of SAE configs, all trained in one pass over one store."""

from typing import Any

from pydantic import Field, model_validator

from instructsae.schemas.base import FrozenModel


class SweepGrid(FrozenModel):
    """Axes of the grid; every combination is one SAE. A list in an `sae` entry is an axis too."""

    sae: list[dict[str, Any]] = Field(
        ..., min_length=1,
        description="one entry per architecture, e.g. {arch: jumprelu, sparsity_coeff: [1e-3, 3e-3]} or "
                    "{arch: topk, k: [16, 32]}; any field of that architecture, lists are axes")
    expansion: list[int] | None = Field(None, min_length=1,
                                        description="d_sae / d_model values (default: the base's)")
    lr: list[float] | None = Field(None, min_length=1, description="peak learning rates (default: the base's)")
    layer: list[int] | None = Field(None, min_length=1,
                                    description="layers of the store (default: the base's / the first)")
    seed: list[int] | None = Field(None, min_length=1,
                                   description="SAE seeds (each SAE's initial weights, its sae_seed); every seed "
                                               "trains in the same one pass: the stream follows the base's seed")
    seeds: int | None = Field(None, gt=0, description="shorthand for seed: [0, 1, ..., seeds - 1]")

    @model_validator(mode="after")
    def _one_way_to_give_seeds(self):
        if self.seed is not None and self.seeds is not None:
            raise ValueError("give grid.seed (a list) or grid.seeds (a count), not both")
        return self

    def seed_values(self) -> list[int] | None:
        return list(range(self.seeds)) if self.seeds is not None else self.seed


class SweepConfig(FrozenModel):
    store: str = Field(..., description="activation store written by `instructsae extract`")
    out: str = Field(..., description="sweep folder: one SAE folder per grid point, results.csv/.md, frontier.png")
    preset: str | None = Field(None, description="train defaults to start from (gemma-scope, fast-paper)")
    base: dict[str, Any] = Field(default_factory=dict,
                                 description="train settings shared by every SAE (tokens, batch_size, optim: ...)")
    grid: SweepGrid
