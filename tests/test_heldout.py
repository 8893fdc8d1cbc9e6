"""A held-out store starts after every row training read and never inside one of its conversations."""

import itertools
import json

import pytest

from instructsae.extract.data import DatasetReader
from instructsae.extract.heldout import heldout_skip


def sharegpt_row(row_id: str) -> dict:
    return {"id": row_id, "conversations": [{"from": "human", "value": f"question {row_id}"},
                                            {"from": "gpt", "value": f"answer {row_id}"}]}


@pytest.fixture
def split_conversations(tmp_path):
    """ShareGPT's cleaned split: long conversations cut into consecutive rows <id>_<part>."""
    path = tmp_path / "sharegpt.json"
    ids = ["a_0", "a_2", "b_0", "b_1", "b_5", "c_0", "d_0", "d_3"]
    path.write_text(json.dumps([sharegpt_row(row_id) for row_id in ids]))
    return str(path)


@pytest.mark.parametrize("rows_seen, expected", [(0, 0), (1, 2), (2, 2), (3, 5), (4, 5), (5, 5), (6, 6),
                                                 (7, 8), (8, 8)])
def test_the_held_out_rows_start_a_conversation_training_never_read(split_conversations, rows_seen, expected):
    skip = heldout_skip(split_conversations, "train", rows_seen)
    assert skip == expected
    records = list(DatasetReader(split_conversations))
    read = {record.conversation for record in records[:rows_seen]}
    assert not read & {record.conversation for record in records[skip:]}


def test_rows_without_conversation_ids_are_each_their_own(dialogues_jsonl):
    assert heldout_skip(str(dialogues_jsonl), "train", 3) == 3


def test_the_embedded_sharegpt_continues_conversations_across_rows():
    records = list(itertools.islice(DatasetReader("sharegpt"), 60))
    assert records[48].conversation == records[49].conversation  # one conversation, two rows
    assert heldout_skip("sharegpt", "train", 49) == 50
