"""What `instructsae features` does: which SAE on which store, how many contexts, what the page shows."""

from pydantic import Field

from instructsae.schemas.base import FrozenModel


class FeaturesConfig(FrozenModel):
    sae: str = Field(..., description="SAE folder (SAELens layout)")
    store: str = Field(..., description="store whose tokens the features are measured on")
    out: str = Field(..., description="folder for features.json/.parquet, special_token_features.json, dashboard.html")
    top: int = Field(10, gt=0, description="top-activating tokens kept per feature")
    max_tokens: int | None = Field(None, gt=0, description="read at most this many tokens of the store")
    context: int = Field(12, ge=0, description="tokens of context on each side of a top token (within its instance)")
    special_threshold: float = Field(
        0.5, gt=0, le=1, description="a special-token feature has at least this share of its activation mass on "
        "template and special tokens")
    dashboard_features: int = Field(5000, gt=0, description="features embedded in dashboard.html (all go to the JSON)")
    dashboard_contexts: int = Field(5, gt=0, description="top contexts per feature shown in dashboard.html")
    logits: int = Field(10, ge=0, description="tokens each feature's decoder row promotes and suppresses most "
                        "through the model's unembedding (0: none, and the model is not loaded)")
