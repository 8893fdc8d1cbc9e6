"""The manifest that travels with a store (in the zarr group attributes): enough to recompute anything."""

import hashlib
import json
from typing import Literal

from pydantic import ConfigDict, Field

from instructsae.schemas.base import FrozenModel
from instructsae.schemas.dataset import DedupSettings
from instructsae.schemas.extract import StoreDtype
from instructsae.schemas.sites import DEFAULT_SITE, Site

MANIFEST_KEY = "instructsae"
# 2: sharded arrays with a crc32c on every inner chunk (1: one file per chunk, no checksums)
FORMAT_VERSION = 3
# Format 3 binds every chunk to its place (store_id, array, chunk index: store/places.py); format 2 stores, whose
# chunks carry only their own crc32c, are still read (their chunks' places cannot be checked) and `convert`
# rewrites them in format 3.
READABLE_FORMATS = (2, 3)

# Role codes stored per token.
ROLES = ("template", "system", "user", "assistant", "text", "tool", "reasoning")  # append only: codes are stored
ROLE_CODE = {name: code for code, name in enumerate(ROLES)}

class LayerStats(FrozenModel):
    """Running sums over the stored tokens of one layer, in float64, so a resumed run can add to them."""

    model_config = ConfigDict(allow_inf_nan=True)  # measured, not set: --keep-nonfinite can make them inf

    count: int = 0
    sum_sq_norm: float = 0.0
    sum_norm: float = 0.0
    nonfinite: int = Field(0, description="NaN or inf activations among them (kept only by --keep-nonfinite)")

    @property
    def mean_sq_norm(self) -> float:
        return self.sum_sq_norm / max(self.count, 1)

    def add(self, count: int, sum_sq_norm: float, sum_norm: float, nonfinite: int = 0) -> "LayerStats":
        return LayerStats(
            count=self.count + count, sum_sq_norm=self.sum_sq_norm + sum_sq_norm, sum_norm=self.sum_norm + sum_norm,
            nonfinite=self.nonfinite + nonfinite,
        )


class StoreIdentity(FrozenModel):
    """Everything that changes the stored bytes. Two extractions with equal identities write equal stores."""

    model: str
    tokenizer: str
    chat_template_sha256: str | None
    dataset: str
    dataset_sha256: str
    split: str
    mode: Literal["fast", "bt"]
    max_len: int
    block_len: int
    max_instances: int | None
    skip_instances: int
    max_tokens: int | None
    keep_first_token: bool
    layers: tuple[int, ...]
    hook_site: Literal["resid_post"] = "resid_post"  # stores made before `sites`: their only site
    d_model: int
    dtype: StoreDtype
    model_dtype: str
    chunk_tokens: int
    shard_tokens: int = Field(description="rows of each shard file of every token-row array (whole chunks)")
    # Added later: left out of the fingerprint while None, so stores made before them keep their fingerprint.
    model_sha256: str | None = None  # a local model folder: digest of its config, weights and tokenizer files
    dataset_revision: str | None = None  # a hub dataset: the commit of the cached snapshot read
    column: str | None = None  # --column, --role-key, --content-key as given (None: detected)
    role_key: str | None = None
    content_key: str | None = None
    dedup: DedupSettings | None = None
    # --system-prompt, recorded only where the chat template has no system role (elsewhere it changes nothing)
    system_prompt: Literal["merge", "drop", "refuse"] | None = None
    system_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    sites: tuple[Site, ...] | None = Field(
        None, description="hook sites stored at each layer, in forward order (None: resid_post alone)")

    @property
    def stored_sites(self) -> tuple[str, ...]:
        return self.sites or (DEFAULT_SITE,)

    @property
    def acts_keys(self) -> list[tuple[int, str]]:
        """Every (layer, site) the store holds activations for, layer by layer in forward order."""
        return [(layer, site) for layer in self.layers for site in self.stored_sites]

    def fingerprint(self) -> str:
        fields = self.model_dump(mode="json")
        for name in ("model_sha256", "dataset_revision", "column", "role_key", "content_key", "dedup", "sites"):
            if fields[name] is None:
                del fields[name]
        for name in ("system_prompt", "system_column", "prompt_column", "response_column"):
            if fields[name] is None:
                del fields[name]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def attn_implementations(recorded: str | None, used: str | None) -> str | None:
    """The manifest's record once an extraction (or a part) run with `used` joins it: each implementation once,
    in order of first use."""
    names = [name for record in (recorded, used) for name in (record or "").split(",") if name]
    return ",".join(dict.fromkeys(names)) or None


class StorePart(FrozenModel):
    """One work unit of a multi-rank store: a sub-store under `parts/`, whole instances in the store's order."""

    name: str
    n_tokens: int
    n_instances: int


class StoreManifest(FrozenModel):
    format_version: int = FORMAT_VERSION
    store_id: str | None = Field(
        None, description="drawn at random when the store is created (format 3); every chunk's place tag names it, "
        "so a chunk copied from another store is told from this store's own")
    tool_version: str
    identity: StoreIdentity
    fingerprint: str
    chat_template: str | None = Field(None, description="the template text itself, for reproducibility")
    n_tokens: int = 0
    n_instances: int = 0
    rows_used: int = Field(0, description="usable dataset rows read, including those passed over by skip_instances")
    rows_skipped: int = Field(0, description="dataset rows skipped (unusable, or duplicates with --dedup)")
    rows_skipped_by_reason: dict[str, int] = Field(
        default_factory=dict,
        description="the same by reason: empty, unknown role, no text, malformed, cut off, duplicate, near duplicate",
    )
    n_truncated: int | None = Field(
        None, description="instances cut at max_len (None: a store from before they were counted)")
    tokens_truncated: int | None = Field(
        None, description="tokens those instances lost at max_len (None: a store from before they were counted)")
    rendering_changes: dict[str, int] = Field(
        default_factory=dict, description="what was adapted to the chat template in the stored instances, counted: "
        "system merged / system dropped (rows), tool calls as text (calls), tools not rendered (rows), reasoning as "
        "text (turns)")
    layer_stats: dict[str, LayerStats] = Field(default_factory=dict)
    complete: bool = False
    # Not in the identity: implementations compute the same function (transformers refuses one that cannot, such
    # as SDPA for Gemma 2's soft-capped attention) and differ in rounding only, as devices and batch sizes do.
    attn_implementation: str | None = Field(
        None, description="attention implementation the LM ran with (sdpa, eager, ...); 'sdpa,eager' when a "
        "resumed extraction used another")
    part_tokens: int | None = Field(
        None, description="a store written under torchrun: the stored tokens of each work unit, one sub-store per "
        "unit under parts/ (None: one store, written by one process)")
    parts: list[StorePart] = Field(
        default_factory=list, description="a multi-rank store, once complete: its work units in the store's order")
