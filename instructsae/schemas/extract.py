"""What `instructsae extract` does: which model, which data, which mode, which layers, where to."""

from typing import Annotated, Literal

from pydantic import Field, field_validator

from instructsae.schemas.base import split_list
from instructsae.schemas.dataset import DatasetOptions, DedupSettings
from instructsae.schemas.sites import Site, sites_in_order

StoreDtype = Literal["bfloat16", "float16", "float32"]
AttnImplementation = Annotated[
    Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"],
    Field(description="attention implementation transformers runs the LM with, a runtime knob (auto: PyTorch's "
          "SDPA where the model class supports it, else the model's own eager attention, as Gemma 2 needs)"),
]


class ExtractConfig(DatasetOptions):
    """The dataset fields (dataset, split, column, role_key, content_key) come from DatasetOptions."""

    model: str = Field(
        "smollm2",
        description="LM to run: 'smollm2' (embedded SmolLM2-135M-Instruct), a HF id, a local folder or a .gguf file",
    )
    dedup: bool = Field(False, description="drop exact and near-duplicate rows first (the FAST paper's 20-gram "
                        "dedup; see `instructsae dedup`)")
    dedup_ngram: int = Field(20, gt=0, description="with --dedup: words per shingle")
    dedup_threshold: float = Field(0.8, gt=0, le=1, description="with --dedup: MinHash Jaccard similarity threshold")
    dedup_seed: int = Field(0, ge=0, description="with --dedup: seed of the MinHash permutations")
    system_prompt: Literal["merge", "drop", "refuse"] = Field(
        "merge", description="a system prompt on a chat template without a system role (Gemma's, Mistral's): merge "
        "puts it at the head of the first user turn (its tokens keep the system role), drop leaves it out, refuse "
        "stops at the first such row; decided by rendering the template, not by the model's name")
    mode: Literal["fast", "bt"] = Field(
        "fast", description="fast: one chat-templated dialogue per sequence; bt: concatenate and cut fixed blocks"
    )
    layers: tuple[int, ...] = Field((15,), description="decoder layers whose output (residual stream) is stored")
    sites: tuple[Site, ...] = Field(
        ("resid_post",), description="hook sites stored at each layer: resid_post (the layer's output), resid_pre "
        "(its input), attn_out, mlp_in (the MLP's input, after its norm), mlp_out")
    out: str = Field(..., description="store folder to write (a zarr v3 group)")
    max_instances: int | None = Field(None, gt=0, description="use at most this many dataset rows")
    skip_instances: int = Field(0, ge=0, description="skip this many usable rows first (held-out stores)")
    max_tokens: int | None = Field(None, gt=0, description="stop after storing exactly this many tokens")
    max_len: int = Field(8192, gt=1, description="FAST: truncate each dialogue to this many tokens")
    block_len: int = Field(2048, gt=1, description="BT: length of each fixed block")
    dtype: StoreDtype = Field("bfloat16", description="dtype of the stored activations")
    model_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="dtype the LM computes in: auto is bf16 on a GPU and float32 on a CPU (where bf16 is ~5x "
        "slower without bf16 units); the store records the dtype used",
    )
    keep_first_token: bool = Field(
        False, description="store each sequence's first token (the attention sink, norm ~100x the rest)"
    )
    chunk_tokens: int | None = Field(None, gt=0, description="tokens per zarr chunk (default: ~4 MB chunks)")
    shard_mb: float = Field(
        512.0, gt=0,
        description="MB of activations per shard file (whole chunks; a shard is written, and committed, at once)",
    )
    # Runtime knobs below do not change the stored bytes, so they are not in the store fingerprint.
    batch_tokens: int | None = Field(
        None, gt=0,
        description="padded tokens per forward pass, a runtime knob (default: 1024 on CPU, where bigger "
        "batches measured slower, and 16384 on GPU)",
    )
    part_tokens: int | None = Field(
        None, gt=0,
        description="under torchrun: stored tokens per work unit shared out to the ranks (default: 64 chunks); a "
        "store keeps the value it was started with",
    )
    device: str = Field(
        "auto", description="torch device for the LM, a runtime knob (auto: this rank's GPU when CUDA is present, "
        "else the CPU)")
    attn_implementation: AttnImplementation = "auto"
    overwrite: bool = Field(False, description="replace an existing store made with another config")
    keep_nonfinite: bool = Field(
        False, description="store NaN/inf activations (counted in the manifest) instead of stopping at the first"
    )

    @field_validator("layers", mode="before")
    @classmethod
    def _one_layer_or_several(cls, layers):
        """`layers: 15` in YAML reads like `--layers 15`; "15,20" (a flag's text) is a list."""
        return (layers,) if isinstance(layers, int) else split_list(layers)

    @field_validator("layers")
    @classmethod
    def _layers_valid(cls, layers: tuple[int, ...]) -> tuple[int, ...]:
        if not layers:
            raise ValueError("at least one layer is needed")
        if any(layer < 0 for layer in layers):
            raise ValueError(f"layer indices must be >= 0, got {list(layers)}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers repeat: {list(layers)}")
        return tuple(sorted(layers))

    @field_validator("sites", mode="before")
    @classmethod
    def _sites_list(cls, sites):
        """"mlp_in,mlp_out" (a flag's text) is a list; `sites: mlp_out` in YAML one site."""
        return split_list(sites)

    @field_validator("sites")
    @classmethod
    def _sites_valid(cls, sites: tuple[str, ...]) -> tuple[str, ...]:
        if not sites:
            raise ValueError("at least one site is needed")
        return sites_in_order(sites)

    def dedup_settings(self) -> DedupSettings | None:
        if not self.dedup:
            return None
        return DedupSettings(ngram=self.dedup_ngram, threshold=self.dedup_threshold, seed=self.dedup_seed)
