"""What `instructsae autointerp` does: which features, which OpenAI-compatible endpoint, where the report goes."""

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
    n_contexts: int = Field(20, gt=0, description="top contexts shown per feature, strongest first")
    seed: int = Field(0, description="seeds which features are sampled")
    out: str | None = Field(None, description="report JSON (default: FEATURES/autointerp.json; a .md beside it)")
    timeout_s: float = Field(60.0, gt=0, description="seconds to wait for one reply")
    retries: int = Field(2, ge=0, description="extra attempts after a timeout, a refused connection or HTTP 429/5xx")

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
