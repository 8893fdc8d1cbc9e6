"""What `instructsae pipeline compare` does: BT(P) vs BT(F) vs FAST at the same budget, on held-out dialogues."""

from typing import Any

from pydantic import Field, field_validator

from instructsae.schemas.base import FrozenModel, split_list
from instructsae.schemas.sites import Site

# Sized for a 2-core CPU with the embedded model: 3 seeds x 6 grid points x 3 stores = 54 SAEs, each evaluated on
# two held-out stores; on a GPU raise --tokens, --train-tokens and --lm-tokens freely.
DEFAULT_GRID: dict[str, Any] = {
    "sae": [{"arch": "standard", "sparsity_coeff": [0.08, 0.15, 0.3]},
            {"arch": "jumprelu", "sparsity_coeff": [0.001, 0.003, 0.01]}],
    "expansion": [8],
}
DEFAULT_TRAIN: dict[str, Any] = {
    "batch_size": 1024, "buffer_tokens": 65536,
    "optim": {"lr": 0.001, "lr_warmup_steps": 20, "beta1": 0.9, "sparsity_warmup_steps": 60},
}


class CompareConfig(FrozenModel):
    out: str = Field("runs/compare", description="folder for the stores, the SAEs, report.md and the charts")
    model: str = Field("smollm2", description="instruct LM (as for extract)")
    dialogues: str = Field("sharegpt",
                           description="SFT dialogues: BT(F) and FAST train on them, all SAEs are tested on them")
    pretraining_text: str = Field("shakespeare", description="plain text for BT(P)")
    layer: int = Field(15, ge=0, description="decoder layer whose output the SAEs read")
    sites: tuple[Site, ...] = Field(("resid_post",), description="hook sites every store holds at the layer (a grid "
                                    "of transcoders needs mlp_in,mlp_out)")
    tokens: int = Field(60_000, gt=0, description="tokens in each of the three training stores (the same budget)")
    heldout_tokens: int = Field(15_000, gt=0, description="tokens of each held-out FAST store to evaluate on")
    train_tokens: int = Field(60_000, gt=0, description="training tokens per SAE (epochs over its store)")
    block_len: int = Field(2048, gt=1, description="BT block length")
    lm_tokens: int = Field(3_000, ge=0, description="held-out tokens for the spliced LM loss of each SAE (0: skip)")
    seeds: int = Field(3, ge=1, description="training seeds per grid point (each SAE's initial weights); every seed "
                                            "of a store trains in its one sweep pass (a grid's own seed axis wins)")
    heldout: tuple[str, ...] = Field(
        ("chatterbot",),
        description="dialogue sets the SAEs never train on, evaluated besides later dialogues of --dialogues "
                    "(embedded names or files, as for extract; repeat --heldout for several)")
    @field_validator("sites", mode="before")
    @classmethod
    def _sites_list(cls, sites):
        """"mlp_in,mlp_out" (a flag's text) is a list."""
        return split_list(sites)

    bootstrap: int = Field(1000, ge=10, description="bootstrap replicates for the confidence intervals")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the confidence intervals")
    device: str = Field(
        "auto", description="torch device, a runtime knob (auto: this rank's GPU when CUDA is present, else the CPU)")
    grid: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_GRID),
                                 description="sweep grid trained on each store (see instructsae sweep)")
    train: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_TRAIN),
                                  description="train settings shared by every SAE (see instructsae train)")
