"""Datasets -> Records: one dialogue (messages) or one plain text per usable row, read as a stream.

Rows are numbered from 0 in source order; that number is a Record's `source_row` and the store keeps it per
instance, so any activation can be traced back to the row it came from. Where rows come from: sources.py; how a
row becomes a Record: rows.py; duplicates: dedup.py.
"""

import itertools
from collections import Counter
from collections.abc import Iterator

from instructsae.errors import UserError
from instructsae.extract.data_checks import check_files, explain_read_error
from instructsae.extract.dedup import DuplicateFilter, record_text
from instructsae.extract.json_array import TruncatedTail, iter_json_array  # noqa: F401 (re-exported)
from instructsae.extract.rows import (  # noqa: F401 (re-exported)
    PAIR, Message, Record, RowFormat, Skip, check_columns, detect_column, normalize_row,
)
from instructsae.extract.sources import (  # noqa: F401 (re-exported)
    Source, open_source, shakespeare_files, sharegpt_file, source_rows, source_sha256,
)
from instructsae.schemas.dataset import DatasetOptions, DedupSettings


class DatasetReader:
    """Iterates usable Records in source order; its counts can be read while iterating and after.

    rows_used counts the rows read so far that gave a Record; `skipped` counts the others by reason (a
    truncated last row counts as 'cut off'); truncated_tail says the file ended before its JSON array closed.
    With `dedup`, rows that repeat an earlier kept row are skipped as 'duplicate' or 'near duplicate'.
    Iterating again starts over and resets the skip counts; each row's duplicate verdict is computed once per
    reader (extract's pre-check and the extraction itself read the same rows in the same order, and a row's
    verdict depends only on the rows before it), so `duplicates.counts` counts each row checked once. Errors of
    the files (not UTF-8, not JSON, not parquet) are one UserError naming the file and line.
    """

    def __init__(self, dataset: str, split: str | None = None, column: str | None = None,
                 role_key: str | None = None, content_key: str | None = None, dedup: DedupSettings | None = None,
                 system_column: str | None = None, prompt_column: str | None = None,
                 response_column: str | None = None):
        self.source: Source = open_source(dataset, split)
        self.dataset = dataset
        self.split = self.source.split
        self._columns(column, role_key, content_key, system_column, prompt_column, response_column)
        self._start_dedup(dedup)
        self._reset()

    def _start_dedup(self, dedup: DedupSettings | None) -> None:
        self.dedup = dedup
        self.duplicates = DuplicateFilter(dedup) if dedup else None
        self._checked_through = -1  # rows up to this index have their duplicate verdict
        self._duplicate_rows: dict[int, str] = {}  # index: verdict, for the rows found to be duplicates

    def _columns(self, column, role_key, content_key, system_column, prompt_column, response_column) -> None:
        self.column, self.role_key, self.content_key = column, role_key, content_key
        self.system_column, self.prompt_column, self.response_column = system_column, prompt_column, response_column
        self.format: RowFormat | None = None
        self.unused_columns: list[str] = []  # columns that look like dialogue content but are not read

    @classmethod
    def from_options(cls, options: DatasetOptions, dedup: DedupSettings | None = None) -> "DatasetReader":
        return cls(options.dataset, options.split, options.column, options.role_key, options.content_key, dedup,
                   options.system_column, options.prompt_column, options.response_column)

    def _reset(self) -> None:
        self.rows_used = 0
        self.skipped: Counter = Counter()
        self.unknown_roles: Counter = Counter()
        self.truncated_tail = False

    def sha256(self) -> str:
        """What identifies the rows read (the store records it): the source's bytes, or a hub snapshot's."""
        return source_sha256(self.source)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def _rows(self) -> Iterator[dict | TruncatedTail]:
        """Raw rows; a reader error becomes one line naming the file and line."""
        check_files(self.source)
        read = 0
        try:
            for row in source_rows(self.source):
                yield row
                read += 1
        except UserError:
            raise
        except Exception as error:  # datasets and pyarrow raise many types; the user needs the file and line
            raise explain_read_error(self.source, read, error) from None

    def _format(self, first) -> RowFormat:
        keys = list(first.keys()) if isinstance(first, dict) else []
        where = f"dataset {self.source.where}"
        check_columns(keys, {"--system-column": self.system_column, "--prompt-column": self.prompt_column,
                             "--response-column": self.response_column}, where)
        column = PAIR if self.prompt_column is not None else detect_column(keys, self.column, where)
        fmt = RowFormat(column, self.role_key, self.content_key, self.system_column, self.prompt_column,
                        self.response_column)
        self.unused_columns = fmt.unused_columns(keys)
        return fmt

    def __iter__(self) -> Iterator[Record]:
        self._reset()
        rows = self._rows()
        first = next(rows, None)
        if first is None:
            return
        if not isinstance(first, TruncatedTail):
            self.format = self._format(first)
        for index, row in enumerate(itertools.chain([first], rows)):
            if isinstance(row, TruncatedTail):
                self.truncated_tail = True
                if row.partial_chars:
                    self.skipped["cut off"] += 1
                return
            record = normalize_row(row, index, self.format)
            if isinstance(record, Skip):
                self.skipped[record.reason] += 1
                if record.detail is not None:
                    self.unknown_roles[record.detail] += 1
                continue
            if self.duplicates is not None:
                verdict = self._duplicate_verdict(index, record)
                if verdict is not None:
                    self.skipped[verdict] += 1
                    continue
            self.rows_used += 1
            yield record

    def _duplicate_verdict(self, index: int, record: Record) -> str | None:
        """The filter's verdict on this row, computed at its first reading; rows arrive in ascending order, so a
        row not checked yet comes after every row the filter has seen."""
        if index <= self._checked_through:
            return self._duplicate_rows.get(index)
        verdict = self.duplicates.check(index, record_text(record))
        self._checked_through = index
        if verdict is not None:
            self._duplicate_rows[index] = verdict
        return verdict

    def skip_report(self) -> str | None:
        """One line: how many rows were skipped and why (None when none were)."""
        if not self.skipped:
            return None
        reasons = []
        for reason, count in self.skipped.most_common():
            if reason == "unknown role":
                names = ", ".join(f"{name!r} {n}" for name, n in self.unknown_roles.most_common(3))
                reason += f" ({names}{', ...' if len(self.unknown_roles) > 3 else ''})"
            reasons.append(f"{count:,} {reason}")
        return f"{self.rows_skipped:,} of {self.rows_used + self.rows_skipped:,} dataset rows skipped: " \
               + ", ".join(reasons)


def dataset_sha256(dataset: str, split: str | None = None) -> str:
    """sha256 of the bytes behind a dataset (embedded or local files), or what identifies a hub dataset."""
    return source_sha256(open_source(dataset, split))
