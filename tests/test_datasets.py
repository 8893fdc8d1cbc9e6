"""Every dataset shape read through HF `datasets` gives the tokens the same dialogues give as `messages` JSONL."""

import bz2
import gzip
import json
import lzma
import time

import numpy as np
import pytest

from instructsae.errors import UserError
from instructsae.extract.data import DatasetReader
from instructsae.extract.plan import planned_instances
from instructsae.schemas.extract import ExtractConfig
from instructsae.schemas.manifest import ROLE_CODE

DIALOGUES = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you today?"},
     {"role": "assistant", "content": "I am fine, thank you."}],
    [{"role": "user", "content": "Tell me a story about a robot."},
     {"role": "assistant", "content": "Once upon a time there was a small robot."},
     {"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "The quick brown fox."}],
    [{"role": "user", "content": "Numbers: 0 1 2 3?"}, {"role": "assistant", "content": ""},
     {"role": "tool", "content": "4 5 6 7"}, {"role": "assistant", "content": "8 9."}],
]
SPEAKERS = {"system": "system", "user": "human", "assistant": "gpt", "tool": "function"}


def tokens(tokenizer, dataset: str, **options) -> list[tuple[list[int], list[int]]]:
    cfg = ExtractConfig(dataset=dataset, out="unused", **options)
    reader = DatasetReader.from_options(cfg)
    return [(i.token_ids.tolist(), i.roles.tolist()) for i in planned_instances(cfg, tokenizer, reader)]


def jsonl_text(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture
def reference(tmp_path, tiny_tokenizer):
    path = tmp_path / "reference.jsonl"
    path.write_text(jsonl_text({"messages": dialogue} for dialogue in DIALOGUES))
    expected = tokens(tiny_tokenizer, str(path))
    assert len(expected) == len(DIALOGUES)
    assert ROLE_CODE["tool"] in expected[2][1]  # the tool turn keeps its own role code
    return expected


def write(path, text: str, opener=open):
    with opener(path, "wt", encoding="utf-8") as file:
        file.write(text)
    return path


def messages_rows():
    return [{"messages": dialogue} for dialogue in DIALOGUES]


@pytest.mark.parametrize("suffix, opener", [(".jsonl", open), (".jsonl.gz", gzip.open), (".jsonl.bz2", bz2.open),
                                            (".jsonl.xz", lzma.open), (".jsonl.zst", None), (".json", open)])
def test_local_and_compressed_files(tmp_path, tiny_tokenizer, reference, suffix, opener):
    text = jsonl_text(messages_rows()) if suffix != ".json" else json.dumps(messages_rows())
    path = tmp_path / f"data{suffix}"
    if opener is None:
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    else:
        write(path, text, opener)
    assert tokens(tiny_tokenizer, str(path)) == reference


def test_parquet_file_and_hub_layout_folder(tmp_path, tiny_tokenizer, reference):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(messages_rows()), tmp_path / "data.parquet")
    assert tokens(tiny_tokenizer, str(tmp_path / "data.parquet")) == reference
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(messages_rows()[:2]), data / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(messages_rows()[2:]), data / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(messages_rows()[:1]), data / "test-00000-of-00001.parquet")
    assert tokens(tiny_tokenizer, str(tmp_path / "hub")) == reference
    assert tokens(tiny_tokenizer, str(tmp_path / "hub"), split="test") == reference[:1]
    with pytest.raises(UserError, match="validation"):
        tokens(tiny_tokenizer, str(tmp_path / "hub"), split="validation")


def test_save_to_disk_dataset_and_datasetdict(tmp_path, tiny_tokenizer, reference):
    import datasets

    rows = datasets.Dataset.from_list(messages_rows())
    rows.save_to_disk(str(tmp_path / "one"))
    assert tokens(tiny_tokenizer, str(tmp_path / "one")) == reference
    datasets.DatasetDict({"train": rows.select([0]), "test": rows}).save_to_disk(str(tmp_path / "dict"))
    assert tokens(tiny_tokenizer, str(tmp_path / "dict"), split="test") == reference
    assert tokens(tiny_tokenizer, str(tmp_path / "dict")) == reference[:1]  # train by default
    with pytest.raises(UserError, match="splits train, test: no split 'dev'"):
        tokens(tiny_tokenizer, str(tmp_path / "dict"), split="dev")
    with pytest.raises(UserError, match="--split test: .* has no splits"):
        tokens(tiny_tokenizer, str(tmp_path / "one"), split="test")


def test_split_on_a_local_file_is_refused(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "d.jsonl", jsonl_text(messages_rows()))
    with pytest.raises(UserError, match=r"--split test: a single file \(d\.jsonl\) has no splits"):
        DatasetReader(str(path), "test")
    with pytest.raises(UserError, match="--split validation"):
        DatasetReader("sharegpt", "validation")


@pytest.mark.parametrize("shape", ["from/value", "conversations role/content", "chosen", "forced keys", "parts",
                                   "tool aliases"])
def test_columns_and_turn_keys(tmp_path, tiny_tokenizer, reference, shape):
    def turns(role_key="role", content_key="content", speakers=None, parts=False):
        return [[{role_key: (speakers or {}).get(t["role"], t["role"]),
                  content_key: [{"type": "text", "text": t["content"][:3]}, {"type": "image_url", "image_url": "u"},
                                {"type": "text", "text": t["content"][3:]}] if parts else t["content"]}
                 for t in dialogue] for dialogue in DIALOGUES]

    options = {}
    if shape == "from/value":
        rows = [{"messages": d} for d in turns("from", "value", SPEAKERS)]
    elif shape == "conversations role/content":
        rows = [{"id": str(i), "conversations": d} for i, d in enumerate(turns())]
    elif shape == "chosen":
        rows = [{"prompt": "p", "chosen": d, "rejected": d[:1]} for d in turns()]
    elif shape == "forced keys":
        rows = [{"dialog": d} for d in turns("speaker", "text")]
        options = {"column": "dialog", "role_key": "speaker", "content_key": "text"}
    elif shape == "parts":
        rows = [{"messages": d} for d in turns(parts=True)]
    else:
        rows = [{"messages": [{**t, "role": {"tool": "ipython"}.get(t["role"], t["role"])} for t in d]}
                for d in turns()]
    path = write(tmp_path / "d.jsonl", jsonl_text(rows))
    assert tokens(tiny_tokenizer, str(path), **options) == reference


def test_alpaca_csv_and_hh_transcripts(tmp_path, tiny_tokenizer):
    import csv

    with open(tmp_path / "a.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerow({"instruction": "Tell me a story.", "input": "", "output": "Once upon a time."})
    pairs = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time."}]
    write(tmp_path / "m.jsonl", jsonl_text([{"messages": pairs}]))
    assert tokens(tiny_tokenizer, str(tmp_path / "a.csv")) == tokens(tiny_tokenizer, str(tmp_path / "m.jsonl"))
    hh = "\n\nHuman: Tell me a story.\n\nAssistant: Once upon a time."
    write(tmp_path / "hh.jsonl", jsonl_text([{"chosen": hh, "rejected": hh + " No."}]))
    assert tokens(tiny_tokenizer, str(tmp_path / "hh.jsonl")) == tokens(tiny_tokenizer, str(tmp_path / "m.jsonl"))


def test_hub_id_from_the_local_cache(tmp_path, monkeypatch, tiny_tokenizer, reference):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "datasets--org--chat"
    blob = repo / "blobs" / ("b" * 64)
    blob.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(messages_rows()), blob)
    snapshot = repo / "snapshots" / ("c" * 40) / "data"
    snapshot.mkdir(parents=True)
    (snapshot / "train-00000-of-00001.parquet").symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert tokens(tiny_tokenizer, "org/chat") == reference
    reader = DatasetReader("org/chat")
    assert reader.source.revision == "c" * 40 and reader.source.hub_blobs


def test_uncached_hub_id_fails_fast_when_the_hub_cannot_be_reached(monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as a user without the variable set
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens: unreachable at once
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # restored after the test (go_offline sets it)
    started = time.perf_counter()
    with pytest.raises(UserError, match="'someorg/noset' is not an embedded name.*hub dataset in the local cache"):
        list(DatasetReader("someorg/noset"))
    assert time.perf_counter() - started < 5  # datasets alone retries for 30-50 s
    assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE


def test_reader_errors_name_the_file_and_line(tmp_path):
    rows = [json.dumps(row) for row in messages_rows()]
    (tmp_path / "latin.jsonl").write_bytes("\n".join(rows).encode() + "\n{\"text\": \"caf\xe9\"}\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.jsonl: line 4 is not UTF-8 text \(byte 0xe9\)"):
        list(DatasetReader(str(tmp_path / "latin.jsonl")))
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all" * 10)
    with pytest.raises(UserError, match=r"garbage\.parquet is not a parquet file"):
        list(DatasetReader(str(tmp_path / "garbage.parquet")))
    with gzip.open(tmp_path / "bad.jsonl.gz", "wt") as file:
        file.write("\n".join(rows[:2] + ["{oops"]) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl\.gz: line 3 is not valid JSON"):
        list(DatasetReader(str(tmp_path / "bad.jsonl.gz")))


def test_skip_reasons_of_a_messy_dataset(tmp_path):
    user = {"role": "user", "content": "hi"}
    rows = [{"messages": [user]}, {"messages": [{"role": "narrator", "content": "x"}]},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]},
            {"messages": []}, {"messages": [{"role": "user", "content": "   "}]}]
    reader = DatasetReader(str(write(tmp_path / "m.jsonl", jsonl_text(rows))))
    assert len(list(reader)) == 1
    assert reader.skip_report() == "4 of 5 dataset rows skipped: 2 empty, 1 unknown role ('narrator' 1), 1 no text"
    assert np.isclose(reader.rows_used, 1)
