"""Dialogues given in Python (a list of message lists, a `datasets.Dataset`, any iterable of rows) read the way
a dataset file is read: the same row formats (rows.py), the same column detection and --column/--role-key/
--content-key, the same skipping of unusable rows and its counts, the same dedup.

The store records them as dataset `in-memory:<sha256 prefix>` with the sha256 of their canonical JSON, so equal
dialogues make equal stores. Evaluate's LM view replays a store's dataset to restore each sequence's dropped
first token: for these stores pass `--dataset` a file with the same dialogues, or extract with
keep_first_token.
"""

import hashlib
import json
from collections.abc import Iterable, Iterator

from instructsae.errors import UserError
from instructsae.extract.data import DatasetReader
from instructsae.extract.sources import Source
from instructsae.schemas.dataset import DatasetOptions, DedupSettings

PREFIX = "in-memory:"


def _row(item, index: int) -> dict:
    """A message list becomes a `messages` row; a mapping (a dataset row) stays as it is."""
    if isinstance(item, list):
        return {"messages": item}
    if isinstance(item, dict):
        return item
    if hasattr(item, "keys") and hasattr(item, "__getitem__"):  # LazyRow and other mappings
        return dict(item)
    raise UserError(f"dialogues: item {index} is a {type(item).__name__}, not a list of messages or a row (dict)")


class InMemoryDialogues:
    """The rows, held once; `reader` reads them as extract's DatasetReader reads a file."""

    def __init__(self, dialogues: Iterable):
        if isinstance(dialogues, (str, bytes)) or not isinstance(dialogues, Iterable):
            raise UserError(f"dialogues: expected a list of message lists or of rows, not a "
                            f"{type(dialogues).__name__}")
        self.rows = [_row(item, index) for index, item in enumerate(dialogues)]
        if not self.rows:
            raise UserError("dialogues: the list is empty")
        blob = json.dumps(self.rows, sort_keys=True, default=str).encode()
        self.sha256 = hashlib.sha256(blob).hexdigest()
        self.name = f"{PREFIX}{self.sha256[:12]}"

    def reader(self, options: DatasetOptions, dedup: DedupSettings | None = None) -> "InMemoryReader":
        return InMemoryReader(self, options, dedup)


class InMemoryReader(DatasetReader):
    """A DatasetReader whose raw rows are the in-memory ones (no files: nothing to check or to hash)."""

    def __init__(self, dialogues: InMemoryDialogues, options: DatasetOptions, dedup: DedupSettings | None = None):
        if options.split not in (None, "train"):
            raise UserError(f"--split {options.split}: dialogues given in Python have no splits")
        self.dialogues = dialogues
        self.source = Source(dialogues.name, "memory", "train")
        self.dataset = dialogues.name
        self.split = "train"
        self._columns(options.column, options.role_key, options.content_key, options.system_column,
                      options.prompt_column, options.response_column)
        self._start_dedup(dedup)
        self._reset()

    def sha256(self) -> str:
        return self.dialogues.sha256

    def _rows(self) -> Iterator[dict]:
        yield from self.dialogues.rows
