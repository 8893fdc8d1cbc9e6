"""How a dataset is read (shared by extract and dedup) and how near-duplicates are found."""

from pydantic import Field, model_validator

from instructsae.schemas.base import FrozenModel


class DatasetOptions(FrozenModel):
    dataset: str = Field(
        "sharegpt",
        description="'sharegpt' (embedded ShareGPT V3), 'chatterbot', 'shakespeare' (plain text), a local "
        "json/jsonl/parquet/csv/arrow file (json, jsonl, csv also .gz/.zst/.bz2/.xz), a folder of such files "
        "(hub layout), a save_to_disk folder, or a HF dataset id from the local cache",
    )
    split: str | None = Field(
        None,
        description="split of a save_to_disk DatasetDict, a hub-layout folder or a hub dataset [default: train]",
    )
    column: str | None = Field(
        None,
        description="column holding the dialogue or text, e.g. rejected for the other half of preference data "
        "[default: the first of messages, conversations, chosen, instruction/input/output, text]",
    )
    role_key: str | None = Field(None, description="key of a turn's speaker [default: role or from]")
    content_key: str | None = Field(None, description="key of a turn's text [default: content or value]")
    system_column: str | None = Field(
        None, description="column holding each row's system prompt: it becomes the dialogue's first turn, in place "
        "of a system turn the dialogue has (an empty value leaves the row as it is)")
    prompt_column: str | None = Field(
        None, description="column holding each row's prompt (text, or a list of turns); with --response-column the "
        "pair becomes a user/assistant dialogue")
    response_column: str | None = Field(
        None, description="column holding each row's response (text, or a list of turns), with --prompt-column")

    @model_validator(mode="after")
    def _pair_of_columns(self):
        if (self.prompt_column is None) != (self.response_column is None):
            raise ValueError("--prompt-column and --response-column go together: name both")
        if self.prompt_column is not None and self.column is not None:
            raise ValueError("--column and --prompt-column/--response-column name the dialogue two ways: use one")
        return self


class DedupSettings(FrozenModel):
    """Near-duplicates: rows whose word n-gram sets have an estimated Jaccard similarity of at least threshold."""

    ngram: int = Field(20, gt=0, description="words per shingle (the FAST paper deduplicates on 20-grams)")
    threshold: float = Field(0.8, gt=0, le=1, description="MinHash Jaccard similarity from which rows are near-duplicates")
    seed: int = Field(0, ge=0, description="seed of the MinHash permutations (the result is deterministic for a seed)")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (signature length)")


class DedupConfig(DedupSettings, DatasetOptions):
    """What `instructsae dedup` does: read a dataset, drop exact and near-duplicate rows, write the rest."""

    out: str = Field(..., description="parquet file to write the kept rows to, in the `messages` format")
    overwrite: bool = Field(False, description="replace an existing --out file")
