"""What `instructsae autointerp` does: which features, which scorers, which OpenAI-compatible endpoint, where the
report goes."""

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from instructsae.schemas.base import FrozenModel


class AutointerpConfig(FrozenModel):
    features: str = Field(..., description="folder written by `instructsae features` (reads its features.json)")
    endpoint: str | None = Field(
        None, description="base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 "
        "(POST {endpoint}/chat/completions)",
    )
    model: str | None = Field(None, description="model name the endpoint serves, e.g. gpt-4o (the FAST paper's judge)")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (none: no key sent)")
    n_features: int = Field(128, gt=0, description="live features sampled (the FAST paper samples 128 per SAE)")
    n_contexts: int = Field(20, gt=0, description="top contexts shown per feature, strongest first (rubric)")
    seed: int = Field(0, description="seeds which features are sampled, and the contexts and their order (detection, "
                      "fuzzing)")
    scorers: tuple[Literal["detection", "fuzzing", "rubric"], ...] = Field(
        ("detection", "fuzzing", "rubric"), description="comma-separated: detection and fuzzing (delphi's, balanced "
        "accuracy of a judge predicting from the explanation), rubric (the FAST paper's 1-5 self-rated score)",
    )
    sae: str | None = Field(None, description="SAE folder the contexts for detection and fuzzing are read with "
                            "(default: the one features.json names)")
    store: str | None = Field(None, description="store those contexts are read from (default: the one features.json "
                              "names)")
    explain_top: int = Field(10, ge=0, description="top contexts (from features.json) shown to the explainer")
    explain_sampled: int = Field(10, ge=0, description="contexts sampled across the activation quantiles shown to the "
                                 "explainer")
    n_test: int = Field(10, gt=0, description="held-out activating contexts scored per feature, across quantiles; "
                        "detection adds as many non-activating ones, fuzzing marks each twice (right, random)")
    n_quantiles: int = Field(5, gt=0, description="equal-count activation bins the sampled contexts are drawn from "
                             "in turn")
    context: int = Field(12, ge=0, description="tokens of context on each side of a sampled token (within its "
                         "dialogue)")
    fuzz_threshold: float = Field(0.3, gt=0, le=1, description="a token fires at >= this share of its context's peak "
                                  "(delphi's 0.3): these are marked")
    batch_size: int = Field(5, gt=0, description="examples per detection/fuzzing request")
    max_tokens: int | None = Field(None, gt=0, description="read at most this many tokens of the store")
    concurrency: int = Field(4, gt=0, description="features scored at once (each one's requests in turn)")
    out: str | None = Field(None, description="report JSON (default: FEATURES/autointerp.json; a .md beside it)")
    timeout_s: float = Field(60.0, gt=0, description="seconds to wait for one reply")
    retries: int = Field(3, ge=0, description="extra attempts after a timeout, a refused connection or HTTP 429/5xx, "
                         "with exponential backoff")

    @field_validator("scorers")
    @classmethod
    def _distinct(cls, scorers: tuple[str, ...]) -> tuple[str, ...]:
        if not scorers or len(set(scorers)) != len(scorers):
            raise ValueError(f"name each scorer once, at least one of detection, fuzzing, rubric (got {scorers})")
        return scorers

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, endpoint: str | None) -> str | None:
        if endpoint is None:
            return None
        try:
            parts = urlsplit(endpoint)
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError as error:
            raise ValueError(f"{endpoint!r} is not a URL ({error})") from None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{endpoint!r} is not an http(s) URL, e.g. http://127.0.0.1:8000/v1")
        return endpoint
