"""Dialogues given in Python (a list of message lists, a `datasets.Dataset`, any iterable of rows) read the way
a dataset file is read: the same row formats, the same skipping of unusable rows, the same counts.

The store records them as dataset `in-memory:<sha256 prefix>` with the sha256 of their canonical JSON, so equal
dialogues make equal stores. Evaluate's LM view replays a store's dataset to restore each sequence's dropped
first token: for these stores pass `--dataset` a file with the same dialogues, or extract with
keep_first_token.
"""

import hashlib
import json
from collections.abc import Iterable, Iterator

from instructsae.errors import UserError
from instructsae.extract.data import Record, normalize_row


def _row(item, index: int) -> dict:
    """A message list becomes a `messages` row; a mapping (a dataset row) stays as it is."""
    if isinstance(item, list):
        return {"messages": item}
    if isinstance(item, dict):
        return item
    raise UserError(f"dialogues: item {index} is a {type(item).__name__}, not a list of messages or a row (dict)")


class InMemoryDialogues:
    """Iterates usable Records like extract's DatasetReader, with its rows_used / rows_skipped counts."""

    def __init__(self, dialogues: Iterable):
        self.rows = [_row(dict(item) if _is_mapping(item) else item, index) for index, item in enumerate(dialogues)]
        if not self.rows:
            raise UserError("dialogues: the list is empty")
        blob = json.dumps(self.rows, sort_keys=True, default=str).encode()
        self.sha256 = hashlib.sha256(blob).hexdigest()
        self.name = f"in-memory:{self.sha256[:12]}"
        self.rows_used = self.rows_skipped = 0

    def __iter__(self) -> Iterator[Record]:
        self.rows_used = self.rows_skipped = 0
        for index, row in enumerate(self.rows):
            record = normalize_row(row, index, "dialogues")
            if record is None:
                self.rows_skipped += 1
                continue
            self.rows_used += 1
            yield record


def _is_mapping(item) -> bool:
    # datasets.Dataset rows are dicts already; other mappings (LazyRow and the like) become plain dicts
    return not isinstance(item, (dict, list)) and hasattr(item, "keys") and hasattr(item, "__getitem__")
