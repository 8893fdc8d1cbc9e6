"""Dataset errors as one line naming the file and the row: a garbage .parquet, a file that is not UTF-8 text, a
line that is not JSON.

`check_files` runs before any row is read (cheap: a parquet file's magic bytes at both ends). A reader error
met while reading rows is explained by `explain_read_error`, which finds the first bad line of the local
text files itself, because pyarrow's own message counts rows from the start of an internal block.
"""

import json
import lzma
import zlib
from pathlib import Path

from instructsae.errors import UserError, first_line
from instructsae.extract.sources import Source, data_format

PARQUET_MAGIC = b"PAR1"
DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)  # gzip.BadGzipFile is an OSError


def check_parquet_magic(path: Path) -> None:
    """A parquet file starts and ends with PAR1."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(4)
        file.seek(max(size - 4, 0))
        tail = file.read(4)
    if size < 12 or head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        raise UserError(f"dataset file {path} is not a parquet file (no PAR1 magic bytes at its start and end)")


def check_files(source: Source) -> None:
    for path in source.files:
        if data_format(path) == ".parquet":
            check_parquet_magic(path)


def _open_text(path: Path):
    """A binary file object of the decompressed bytes (compression from the suffix)."""
    import fsspec

    return fsspec.open(str(path), "rb", compression="infer").open()


def _not_utf8(number: int, raw: bytes, error: UnicodeDecodeError) -> str:
    return f"line {number} is not UTF-8 text (byte 0x{raw[error.start]:02x})"


def first_bad_line(path: Path) -> str | None:
    """'line N is not UTF-8 text (...)' / 'line N is not valid JSON (...)' for the first bad line, 'cannot be
    decompressed (...)' for a damaged .gz/.zst/.bz2/.xz, else None."""
    try:
        return _first_bad_line(path)
    except Exception as error:  # noqa: BLE001 - gzip, bz2, lzma and zstandard each raise their own types
        if not isinstance(error, DECOMPRESSION_ERRORS) and type(error).__name__ != "ZstdError":
            raise
        return f"cannot be decompressed ({first_line(error)})"


def _first_bad_line(path: Path) -> str | None:
    kind = data_format(path)
    if kind not in (".json", ".jsonl", ".csv"):
        return None
    with _open_text(path) as file:
        if kind == ".json":  # one document: datasets reads it whole too
            data = file.read()
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as error:
                return _not_utf8(data.count(b"\n", 0, error.start) + 1, data, error)
            try:
                json.loads(text)
            except json.JSONDecodeError as error:
                return f"line {error.lineno} is not valid JSON ({error.msg}, column {error.colno})"
            return None
        for number, raw in enumerate(file, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                return _not_utf8(number, raw, error)
            if kind == ".jsonl" and line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as error:
                    return f"line {number} is not valid JSON ({error.msg}, column {error.colno})"
    return None


def explain_read_error(source: Source, rows_read: int, error: Exception) -> UserError:
    """One line for an error the reader raised after `rows_read` rows: the first bad line of a local file if there
    is one, else the reader's own first line."""
    for path in source.files:
        if data_format(path) == ".parquet":
            try:
                check_parquet_magic(path)
            except UserError as bad:
                return bad
        else:
            bad_line = first_bad_line(path)
            if bad_line is not None:
                return UserError(f"dataset file {path}: {bad_line}")
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return UserError(f"cannot read dataset {source.name} after row {rows_read}: {reason}")
