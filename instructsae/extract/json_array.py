"""A top-level JSON array read one row at a time, tolerating a file cut off inside its last row.

The embedded ShareGPT file (125 MB) is such an array, cut inside its last record: it is the one source read
here rather than through HF `datasets`, which loads a JSON array whole and refuses a cut-off one.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from instructsae.errors import UserError


@dataclass(frozen=True)
class TruncatedTail:
    """Yielded last by iter_json_array when the array is never closed (the file was cut off)."""

    partial_chars: int  # characters of an incomplete last row (0: cut exactly between rows)


def _needs_more_text(error: json.JSONDecodeError, buffer: str) -> bool:
    """Did decoding fail because the buffer ends inside the row (rather than a syntax error)?"""
    # An open string reports where it starts; a cut literal, number or escape fails a few characters from the end.
    return error.msg.startswith("Unterminated string") or error.pos >= len(buffer) - 12


def iter_json_array(path: Path, block_chars: int = 1 << 20) -> Iterator[dict | TruncatedTail]:
    """Rows of a top-level JSON array, decoded one at a time from blocks (memory stays near one block).

    A file cut off before the array closes (the embedded ShareGPT file is cut inside its last row) ends
    with a TruncatedTail instead of an error, so every complete row is kept. A syntax error elsewhere is
    a UserError naming the character offset.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as file:
        buffer = file.read(block_chars)
        position = len(buffer) - len(buffer.lstrip())
        if not buffer[position:position + 1] == "[":
            raise UserError(f"{path} is not a JSON array of rows (for one JSON object per line, name it .jsonl)")
        position += 1
        consumed = 0  # characters dropped from the front of the buffer, for error offsets
        eof = False
        while True:
            while position < len(buffer) and buffer[position] in " \t\r\n,":
                position += 1
            if buffer.startswith("]", position):
                return
            try:
                row, end = decoder.raw_decode(buffer, position)
            except json.JSONDecodeError as error:
                if not _needs_more_text(error, buffer):
                    raise UserError(f"{path} is not valid JSON near character {consumed + error.pos}: "
                                    f"{error.msg}") from None
                if eof:
                    yield TruncatedTail(len(buffer) - position)
                    return
                more = file.read(block_chars)
                eof = not more
                consumed += position
                buffer, position = buffer[position:] + more, 0
                continue
            yield row
            position = end
            if position > block_chars:  # drop the decoded text so the buffer stays about one block long
                consumed += position
                buffer, position = buffer[position:], 0
