"""Exact and near-duplicate removal (word n-gram MinHash LSH): planted copies go, everything else stays."""

import itertools
import json
import random

import pyarrow.parquet as pq
import pytest

from helpers import assert_one_line_error, run_cli
from instructsae.extract.data import DatasetReader
from instructsae.extract.dedup import DuplicateFilter, shingle_hashes
from instructsae.extract.dedup_run import format_report, run_dedup
from instructsae.schemas.dataset import DedupConfig, DedupSettings

WORDS = ("robot sea book small read liked time upon once there was a who about the quick brown fox jumps over lazy "
         "dog hello how are you today fine thank name story tell me numbers river mountain green blue light").split()


def essay(rng: random.Random, n_words: int = 120) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def planted_rows(seed: int = 0):
    """40 distinct dialogues, then 5 exact copies and 5 near copies of earlier ones (one word of 400 changed, three
    appended: a 20-gram Jaccard similarity of about 0.89)."""
    rng = random.Random(seed)
    originals = [essay(rng, 400) for _ in range(40)]
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": text}]}
            for i, text in enumerate(originals)]
    for i in (3, 7, 11, 20, 33):
        rows.append(json.loads(json.dumps(rows[i])))
    for i in (1, 5, 9, 25, 38):
        words = originals[i].split()
        words[200] = "CHANGED"
        words += ["and", "that", "is"]
        rows.append({"messages": [{"role": "user", "content": f"Question {i}?"},
                                  {"role": "assistant", "content": " ".join(words)}]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def kept_rows(path, **settings) -> tuple[list[int], DatasetReader]:
    reader = DatasetReader(str(path), dedup=DedupSettings(**settings))
    return [record.source_row for record in reader], reader


def test_planted_duplicates_and_near_duplicates_go_the_rest_stays(tmp_path):
    kept, reader = kept_rows(write_jsonl(tmp_path / "d.jsonl", planted_rows()))
    assert kept == list(range(40))
    counts = reader.duplicates.counts
    assert (counts.duplicates, counts.near_duplicates, counts.clusters) == (5, 5, 10)
    assert dict(reader.skipped) == {"duplicate": 5, "near duplicate": 5}


def test_different_texts_sharing_phrases_are_kept(tmp_path):
    rng = random.Random(1)
    base = essay(rng, 200).split()
    # each row shares 100 of its 200 words (in place) with the first: Jaccard of 20-grams far below 0.8
    rows = [{"text": " ".join(base)}] + [
        {"text": " ".join(base[:100] + essay(random.Random(seed), 100).split())} for seed in range(2, 12)]
    kept, reader = kept_rows(write_jsonl(tmp_path / "t.jsonl", rows))
    assert kept == list(range(11)) and reader.duplicates.counts.clusters == 0


def test_deterministic_for_a_seed_and_threshold_matters(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", planted_rows())
    assert kept_rows(path, seed=3)[0] == kept_rows(path, seed=3)[0]
    filter_ = DuplicateFilter(DedupSettings(seed=3))
    text = essay(random.Random(5))
    assert (filter_.signature(text).hashvalues == DuplicateFilter(DedupSettings(seed=3)).signature(text).hashvalues).all()
    assert not (filter_.signature(text).hashvalues == DuplicateFilter(DedupSettings(seed=4)).signature(text).hashvalues).all()
    kept, _ = kept_rows(path, threshold=1.0)  # only identical shingle sets count: near copies stay
    assert len(kept) == 45


def test_shingles_are_word_ngrams():
    coefficients = DuplicateFilter(DedupSettings(ngram=3))._coefficients
    hashes = shingle_hashes("a b c d a b c", 3, coefficients)
    assert len(hashes) == 5 and hashes[0] == hashes[4] and len(set(hashes.tolist())) == 4
    assert shingle_hashes("A  b\nc", 3, coefficients).tolist() == shingle_hashes("a b c", 3, coefficients).tolist()
    assert len(shingle_hashes("two words", 20, coefficients)) == 1  # shorter than an n-gram: one shingle
    assert len(shingle_hashes("   ", 20, coefficients)) == 0


def test_dedup_command_writes_messages_parquet_that_extract_reads(monkeypatch, capsys, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", planted_rows() + [{"messages": []}])
    out = tmp_path / "deduped.parquet"
    code, stdout, err = run_cli(monkeypatch, capsys, "dedup", "--dataset", str(data), "--out", str(out))
    assert code == 0, err
    assert "51 rows in, 40 out; removed 5 exact and 5 near duplicates in 10 clusters, skipped 1 unusable (1 empty)" \
        in stdout
    table = pq.read_table(out).to_pylist()
    assert [row["source_row"] for row in table] == list(range(40))
    assert [{"role": turn["role"], "content": turn["content"]} for turn in table[0]["messages"]] == \
        planted_rows()[0]["messages"]
    assert [r.source_row for r in DatasetReader(str(out))] == list(range(40))  # read back as any dataset
    code, _, err = run_cli(monkeypatch, capsys, "dedup", "--dataset", str(data), "--out", str(out))
    assert_one_line_error(code, err, "exists")
    code, _, err = run_cli(monkeypatch, capsys, "dedup", "--dataset", str(data), "--out", str(tmp_path / "x.jsonl"))
    assert_one_line_error(code, err, ".parquet")
    assert not list(tmp_path.glob("*.partial"))


def test_extract_dedup_matches_extract_of_the_deduplicated_file(monkeypatch, capsys, tmp_path, tiny_model_dir):
    from instructsae.store.reader import StoreReader

    data = write_jsonl(tmp_path / "d.jsonl", planted_rows())
    common = ["--model", str(tiny_model_dir), "--layers", "1", "--max-tokens", "3000"]
    code, _, err = run_cli(monkeypatch, capsys, "dedup", "--dataset", str(data), "--out", str(tmp_path / "k.parquet"))
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "extract", *common, "--dataset", str(data), "--dedup",
                             "--out", str(tmp_path / "a"))
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "extract", *common, "--dataset", str(tmp_path / "k.parquet"),
                           "--out", str(tmp_path / "b"))
    assert code == 0, err
    a, b = StoreReader(str(tmp_path / "a")), StoreReader(str(tmp_path / "b"))
    assert (a.read_column("token_id") == b.read_column("token_id")).all()
    assert a.manifest.identity.dedup == DedupSettings()
    assert a.manifest.identity.fingerprint() != b.manifest.identity.fingerprint()


@pytest.mark.parametrize("flag", ["--threshold", "--ngram"])
def test_bad_settings_are_one_line(monkeypatch, capsys, tmp_path, flag):
    code, _, err = run_cli(monkeypatch, capsys, "dedup", "--out", str(tmp_path / "o.parquet"), flag, "0")
    assert_one_line_error(code, err, flag.strip("-"))


def test_a_second_pass_reuses_each_rows_verdict(tmp_path, monkeypatch):
    """extract reads the rows twice (the pre-check, then the extraction): the filter sees each row once, and the
    second pass keeps and skips exactly the rows the first did."""
    reader = DatasetReader(str(write_jsonl(tmp_path / "d.jsonl", planted_rows())), dedup=DedupSettings())
    checked = []
    original = DuplicateFilter.check
    monkeypatch.setattr(DuplicateFilter, "check",
                        lambda self, index, text: checked.append(index) or original(self, index, text))
    first = [record.source_row for record in itertools.islice(reader, 25)]  # a pass that stops early
    second = [record.source_row for record in reader]
    assert first == list(range(25)) and second == list(range(40))
    assert sorted(checked) == sorted(set(checked))  # no row checked twice
    assert dict(reader.skipped) == {"duplicate": 5, "near duplicate": 5}
    counts = reader.duplicates.counts
    assert (counts.duplicates, counts.near_duplicates, counts.clusters) == (5, 5, 10)


def test_dedup_keeps_tool_calls_reasoning_and_tools(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": [1, 2]}}}
    row = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
           "messages": [{"role": "user", "content": "Call f"},
                        {"role": "assistant", "content": "", "reasoning_content": "f it is.", "tool_calls": [call]},
                        {"role": "tool", "content": "ok", "name": "f", "tool_call_id": "c1"}]}
    data = write_jsonl(tmp_path / "d.jsonl", [row, {"messages": [{"role": "user", "content": "Hello"}]}])
    out = tmp_path / "deduped.parquet"
    report = run_dedup(DedupConfig(dataset=str(data), out=str(out)), show_progress=False)
    assert report["unused_columns"] == []  # tools are kept
    before, after = list(DatasetReader(str(data))), list(DatasetReader(str(out)))
    assert after == before and after[0].messages[1].tool_calls == (call,) and after[0].tools is not None


def test_dedup_names_the_columns_it_does_not_write(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"chosen": [{"role": "user", "content": "Hi"}], "rejected": "Bye",
                                               "prompt": "Hi"}])
    report = run_dedup(DedupConfig(dataset=str(data), out=str(tmp_path / "o.parquet")), show_progress=False)
    assert report["unused_columns"] == ["rejected", "prompt"]
    assert format_report(report).endswith("\nnote: columns rejected, prompt of the dataset not written (see --column, "
                                          "--system-column, --prompt-column, --response-column)")
