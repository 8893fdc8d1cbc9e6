"""What `instructsae export neuronpedia` does: which SAE on which store, and the names Neuronpedia files it under."""

from pydantic import Field

from instructsae.schemas.base import FrozenModel
from instructsae.schemas.features import FeaturesConfig

# The creator id SAEDashboard's exporter falls back on when none is given (neuronpedia_export.FALLBACK_CREATOR_ID)
SAEDASHBOARD_FALLBACK_CREATOR_ID = "clkht01d40000jv08hvalcvly"


class NeuronpediaExportConfig(FrozenModel):
    sae: str = Field(..., description="SAE folder (SAELens layout)")
    store: str = Field(..., description="store whose tokens give the activation records")
    out: str = Field(..., description="exports folder: the source is written to OUT/MODEL_ID/SOURCE_ID/")
    model_id: str | None = Field(None, description="Neuronpedia model id (default: the store's model, e.g. "
                                 "smollm2-135m-instruct)")
    source_set: str | None = Field(None, description="Neuronpedia source set (default: instructsae-ARCH-D_SAE); "
                                   "the source id is LAYER-SOURCE_SET, as SAEDashboard names it")
    release_id: str | None = Field(None, description="release name (default: the source set)")
    release_title: str | None = Field(None, description="release description (default: one naming the SAE and store)")
    creator_name: str = Field("instructsae", description="creator name on the release and source set")
    creator_id: str = Field(SAEDASHBOARD_FALLBACK_CREATOR_ID, description="Neuronpedia creator id (default: the one "
                            "SAEDashboard's exporter falls back on)")
    explanations: str | None = Field(None, description="an `instructsae autointerp` report JSON: its explanations "
                                     "go to explanations/")
    features_per_batch: int = Field(128, gt=0, description="features per batch-N.jsonl.gz file (SAEDashboard's "
                                    "default)")
    top: int = FeaturesConfig.model_fields["top"]
    context: int = FeaturesConfig.model_fields["context"]
    max_tokens: int | None = FeaturesConfig.model_fields["max_tokens"]
    logits: int = FeaturesConfig.model_fields["logits"]
