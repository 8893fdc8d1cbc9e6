"""Datasets -> Records: every row format, the embedded corpora, a cut-off JSON array, dataset hashes."""

import itertools
import json
import socket
from pathlib import Path

import pytest

from instructsae.errors import UserError
from instructsae.extract.data import (
    DatasetReader, Message, Record, TruncatedTail, dataset_sha256, iter_json_array, shakespeare_files,
)
from instructsae.extract.rows import RowFormat, Skip, detect_column, normalize_row as normalize_with


def normalize_row(row, index):
    """A row read as its own one-row dataset: the column detected from its keys."""
    return normalize_with(row, index, RowFormat(detect_column(row.keys(), None, "dataset")))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_openai_messages():
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]  # OpenAI content parts
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": parts}]}
    assert normalize_row(row, 4) == Record(4, messages=(
        Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello")))


@pytest.mark.parametrize("speaker, role", [
    ("human", "user"), ("user", "user"), ("gpt", "assistant"), ("chatgpt", "assistant"), ("bing", "assistant"),
    ("bard", "assistant"), ("model", "assistant"), ("assistant", "assistant"), ("system", "system"),
    ("GPT", "assistant"),
])
def test_sharegpt_speakers_map_to_roles(speaker, role):
    record = normalize_row({"id": "x", "conversations": [{"from": speaker, "value": "some words"}]}, 0)
    assert record.messages == (Message(role, "some words"),)


def test_alpaca_with_and_without_input():
    with_input = normalize_row({"instruction": "Translate.", "input": "chat", "output": "cat"}, 1)
    assert with_input.messages == (Message("user", "Translate.\n\nchat"), Message("assistant", "cat"))
    without = normalize_row({"instruction": "Say hi.", "input": "", "output": "hi"}, 2)
    assert without.messages == (Message("user", "Say hi."), Message("assistant", "hi"))


def test_plain_text():
    assert normalize_row({"text": "Once upon a time.", "meta": 1}, 9) == Record(9, text="Once upon a time.")


@pytest.mark.parametrize("row, reason", [
    ({"conversations": []}, "empty"),
    ({"messages": None}, "empty"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": ""}]}, "empty"),
    ({"messages": [{"role": "narrator", "content": "42"}, {"role": "user", "content": "ok"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "no text"),
    ({"messages": 7}, "malformed"),
    ({"messages": [{"role": "user", "content": 5}]}, "malformed"),
    ({"messages": [{"content": "no speaker"}]}, "malformed"),
    ({"messages": ["not a turn"]}, "malformed"),
    ({"instruction": "Do it.", "output": ""}, "empty"),
    ({"text": "\n"}, "empty"),
])
def test_unusable_rows_say_why(row, reason):
    assert normalize_row(row, 0).reason == reason


def test_reader_skips_and_counts_unusable_rows_by_reason(tmp_path):
    user = {"role": "user", "content": "b"}
    rows = [{"messages": [user]}, {"messages": []}, {"messages": [{"role": "narrator", "content": "x"}]},
            {"messages": [user, {"role": "assistant", "content": [{"type": "image_url"}]}]},
            {"messages": [{"role": "narrator", "content": "y"}]}, {"messages": [user]}, {"messages": [["bad"]]}]
    reader = DatasetReader(str(write_jsonl(tmp_path / "mixed.jsonl", rows)))
    records = list(reader)
    assert [record.source_row for record in records] == [0, 5]
    assert (reader.rows_used, reader.rows_skipped, reader.truncated_tail) == (2, 5, False)
    assert dict(reader.skipped) == {"empty": 1, "unknown role": 2, "no text": 1, "malformed": 1}
    assert reader.skip_report() == ("5 of 7 dataset rows skipped: 2 unknown role ('narrator' 2), 1 empty, "
                                    "1 no text, 1 malformed")
    assert list(reader) == records and reader.rows_used == 2  # a second pass starts over


def test_dataset_in_no_format_names_its_columns(tmp_path):
    rows = [{"prompt": "p", "answer": "a"}, {"prompt": "q"}]
    reader = DatasetReader(str(write_jsonl(tmp_path / "data.jsonl", rows)))
    with pytest.raises(UserError, match=r"dataset data\.jsonl has no 'messages'.*\(columns: prompt, answer\); "
                                        "name one with --column"):
        list(reader)
    with pytest.raises(UserError, match=r"--column dialog: dataset data\.jsonl has no such column"):
        list(DatasetReader(str(tmp_path / "data.jsonl"), column="dialog"))


def test_missing_file_and_unknown_name(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not found"):
        list(DatasetReader(str(tmp_path / "nope.jsonl")))
    with pytest.raises(UserError, match="not found"):
        dataset_sha256(str(tmp_path / "nope.parquet"))
    connections = []  # offline, an unknown name fails at once: not one connection attempt, so no retry storm
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: connections.append(address))
    with pytest.raises(UserError, match="sharegtp"):  # offline, an unknown name is not a hub dataset either
        list(DatasetReader("sharegtp"))
    with pytest.raises(UserError, match="sharegtp"):
        dataset_sha256("sharegtp")
    assert connections == []


ROWS = [{"id": i, "conversations": [{"from": "human", "value": f"question {i} \u00e9\u4e2d \"q\" \\ {{}}"},
                                    {"from": "gpt", "value": "answer [" * i}]} for i in range(6)]


@pytest.mark.parametrize("block_chars", [1, 7, 64, 1 << 20])
def test_json_array_stream_matches_json_load(tmp_path, block_chars):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS, indent=2, ensure_ascii=False), encoding="utf-8")
    assert list(iter_json_array(path, block_chars=block_chars)) == ROWS


@pytest.mark.parametrize("block_chars", [5, 1 << 20])
def test_truncated_json_array_keeps_complete_rows(tmp_path, block_chars):
    text = json.dumps(ROWS[:4], indent=2)
    cut = text.rindex('"answer')  # inside the last row, as the embedded ShareGPT file is cut
    path = tmp_path / "cut.json"
    path.write_text(text[:cut])
    rows = list(iter_json_array(path, block_chars=block_chars))
    assert rows[:-1] == ROWS[:3] and isinstance(rows[-1], TruncatedTail) and rows[-1].partial_chars > 0


def test_embedded_sharegpt_cut_off_keeps_complete_rows(tmp_path, monkeypatch):
    """Only the embedded ShareGPT file is read by iter_json_array; its cut-off last row is counted as 'cut off'."""
    import instructsae.extract.sources as sources

    text = json.dumps(ROWS[:4], indent=2)
    path = tmp_path / "cut.json"
    path.write_text(text[:text.rindex('"answer')])
    monkeypatch.setattr(sources, "sharegpt_file", lambda: path)
    reader = DatasetReader("sharegpt")
    assert [record.source_row for record in reader] == [0, 1, 2]
    assert (reader.rows_used, reader.rows_skipped, reader.truncated_tail) == (3, 1, True)
    assert reader.skip_report() == "1 of 4 dataset rows skipped: 1 cut off"
    path.write_text(json.dumps(ROWS[:2])[:-1] + ",\n")  # cut between rows: the closing bracket never came
    assert len(list(reader)) == 2 and (reader.rows_skipped, reader.truncated_tail) == (0, True)


def test_json_syntax_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    text = json.dumps(ROWS[:2], indent=1).replace("},\n {", "}\n {", 1)  # a missing comma between rows
    path.write_text(text)
    line = text[:text.index("}\n {")].count("\n") + 2  # the line where the next row starts
    with pytest.raises(UserError, match=rf"bad\.json: line {line} is not valid JSON \(Expecting ',' delimiter"):
        list(DatasetReader(str(path)))
    lines = [json.dumps(row) for row in ROWS]
    lines[4] = lines[4][:-3]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl: line 5 is not valid JSON"):
        list(DatasetReader(str(tmp_path / "bad.jsonl")))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "one"}, {"text": ""}, {"text": "three"}]), tmp_path / "t.parquet")
    reader = DatasetReader(str(tmp_path / "t.parquet"))
    assert [(r.source_row, r.text) for r in reader] == [(0, "one"), (2, "three")]
    assert reader.rows_skipped == 1


def bytes_read_by_this_process() -> int:
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's per-process I/O counters")
def test_sharegpt_streams_its_first_rows_without_reading_the_file_whole():
    before = bytes_read_by_this_process()
    reader = DatasetReader("sharegpt")
    records = list(itertools.islice(reader, 50))
    assert bytes_read_by_this_process() - before < 40e6  # the embedded file is 125 MB
    assert len(records) == 50 and reader.rows_used == 50
    assert [r.source_row for r in records] == sorted({r.source_row for r in records})
    assert all(m.role in ("system", "user", "assistant") for r in records for m in r.messages)
    assert any(m.role == "user" for m in records[0].messages)


def test_chatterbot_alternates_user_and_assistant():
    reader = DatasetReader("chatterbot")
    records = list(reader)
    assert reader.rows_used > 1000 and reader.rows_skipped == 0
    longest = max(records, key=lambda r: len(r.messages))
    assert [m.role for m in longest.messages[:4]] == ["user", "assistant", "user", "assistant"]


def test_shakespeare_is_plain_text_without_folio_duplicates():
    files = shakespeare_files()
    assert files and not any(f.name.endswith("_gut_f.txt") for f in files)
    records = list(DatasetReader("shakespeare"))
    assert len(records) == len(files)
    assert all(r.messages is None and len(r.text) > 1000 for r in records)
    assert any("Hamlet" in r.text or "HAMLET" in r.text for r in records)


def test_dataset_sha256_is_stable_and_follows_the_bytes(tmp_path, dialogues_jsonl):
    first = dataset_sha256(str(dialogues_jsonl))
    assert first == dataset_sha256(str(dialogues_jsonl)) and len(first) == 64
    dialogues_jsonl.write_text(dialogues_jsonl.read_text().replace("robot", "robots", 1))
    assert dataset_sha256(str(dialogues_jsonl)) != first
    assert dataset_sha256("chatterbot") == dataset_sha256("chatterbot") != dataset_sha256("shakespeare")


def test_hub_hash_uses_the_builder_hash(monkeypatch):
    import types

    import datasets

    def fake_builder(name):
        return types.SimpleNamespace(config=types.SimpleNamespace(name="default"), hash=hashes[name])

    hashes = {"org/set": "abc"}
    monkeypatch.setattr(datasets, "load_dataset_builder", fake_builder)
    first = dataset_sha256("org/set", "train")
    assert first == dataset_sha256("org/set", "train") != dataset_sha256("org/set", "test")
    hashes["org/set"] = "abd"  # a new revision of the data
    assert dataset_sha256("org/set", "train") != first
