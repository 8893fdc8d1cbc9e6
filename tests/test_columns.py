"""Columns as datasets have them: a system-prompt column, prompt/response pairs, `rejected` of preference data,
tool calls and tools lists in rows, and the content-like columns a reading leaves unused."""

import json

import pytest

from helpers import assert_one_line_error, run_cli
from instructsae.errors import UserError
from instructsae.extract.data import DatasetReader
from instructsae.extract.rows import PAIR, Message, RowFormat, Skip, normalize_row
from instructsae.schemas.dataset import DatasetOptions

TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def read(path, **options) -> tuple[list, DatasetReader]:
    reader = DatasetReader.from_options(DatasetOptions(dataset=path, **options))
    return list(reader), reader


def test_system_column_becomes_the_first_turn(tmp_path):
    rows = [{"system": "Be brief.", "messages": TURNS},
            {"system": "Be kind.", "messages": [{"role": "system", "content": "Own prompt."}, *TURNS]},
            {"system": "", "messages": TURNS}]
    records, reader = read(write_jsonl(tmp_path / "d.jsonl", rows), system_column="system")
    assert records[0].messages == (Message("system", "Be brief."), Message("user", "Hi"),
                                   Message("assistant", "Hello!"))
    # the column's prompt replaces the dialogue's own; an empty one leaves the row as it is
    assert records[1].messages[0] == Message("system", "Be kind.") and len(records[1].messages) == 3
    assert records[2].messages == (Message("user", "Hi"), Message("assistant", "Hello!"))
    assert reader.unused_columns == []
    # without the option the column is named as unused
    assert read(str(tmp_path / "d.jsonl"))[1].unused_columns == ["system"]


def test_prompt_and_response_columns_make_a_dialogue(tmp_path):
    rows = [{"question": "What is 2+2?", "answer": "4", "system": "Be exact."},
            {"question": [{"role": "user", "content": "Name a colour."}], "answer": "Red."},
            {"question": "Unanswered", "answer": ""}]
    records, reader = read(write_jsonl(tmp_path / "qa.jsonl", rows), prompt_column="question",
                           response_column="answer", system_column="system")
    assert [record.messages for record in records] == [
        (Message("system", "Be exact."), Message("user", "What is 2+2?"), Message("assistant", "4")),
        (Message("user", "Name a colour."), Message("assistant", "Red.")),
    ]
    assert reader.skipped == {"empty": 1} and reader.unused_columns == []
    assert reader.format.column == PAIR


def test_column_rejected_reads_the_other_half_of_preference_data(tmp_path):
    transcript = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    listed = {"prompt": "Hi", "chosen": TURNS, "rejected": [TURNS[0], {"role": "assistant", "content": "No."}]}
    for row, rejected in ((transcript, "Go away."), (listed, "No.")):
        path = write_jsonl(tmp_path / "pref.jsonl", [row])
        records, reader = read(path, column="rejected")
        assert records[0].messages == (Message("user", "Hi"), Message("assistant", rejected))
        assert reader.unused_columns == [name for name in row if name != "rejected"]
        records, reader = read(path)  # chosen by default; rejected (and a prompt column) named as unused
        assert records[0].messages[-1] == Message("assistant", "Hello!")
        assert "rejected" in reader.unused_columns


def test_tool_calls_and_tools_in_rows():
    row = {"tools": json.dumps([{"type": "function", "function": {"name": "f"}}]),  # JSON text, as many datasets
           "messages": [{"role": "user", "content": "Call f"},
                        {"role": "assistant", "content": None, "reasoning_content": "I should call f.",
                         "tool_calls": [{"id": "c1", "type": "function",
                                         "function": {"name": "f", "arguments": "{\"x\": 1}"}},
                                        {"name": "g", "arguments": {"y": 2}}]},
                        {"role": "tool", "content": "done", "name": "f", "tool_call_id": "c1"}]}
    record = normalize_row(row, 0, RowFormat("messages"))
    assert record.tools == ({"type": "function", "function": {"name": "f"}},)
    assistant, tool = record.messages[1], record.messages[2]
    assert assistant.reasoning == "I should call f." and assistant.content == ""
    assert assistant.tool_calls == ({"type": "function", "function": {"name": "f", "arguments": {"x": 1}}, "id": "c1"},
                                    {"type": "function", "function": {"name": "g", "arguments": {"y": 2}}})
    assert (tool.name, tool.tool_call_id) == ("f", "c1")
    # an assistant turn holding only calls is not empty; a call without a name is malformed
    only_calls = {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"name": "g"}]}]}
    assert normalize_row(only_calls, 1, RowFormat("messages")).messages[0].tool_calls
    nameless = {"messages": [TURNS[0], {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}]}
    assert normalize_row(nameless, 2, RowFormat("messages")) == Skip("malformed")


def test_column_options_that_name_no_column_or_contradict(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": TURNS}])
    with pytest.raises(UserError, match="--system-column sys: dataset d.jsonl has no such column"):
        read(path, system_column="sys")
    with pytest.raises(UserError, match="--prompt-column q: dataset d.jsonl has no such column"):
        read(path, prompt_column="q", response_column="messages")


@pytest.mark.parametrize("flags, expected", [
    (["--prompt-column", "q"], "--prompt-column and --response-column go together"),
    (["--column", "messages", "--prompt-column", "q", "--response-column", "a"], "name the dialogue two ways"),
])
def test_column_option_errors_are_one_line(monkeypatch, capsys, tmp_path, flags, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": TURNS}])
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--dataset", path, "--out", str(tmp_path / "s"), *flags)
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / "s").exists()


def test_trl_preference_rows_pair_a_prompt_with_either_answer(tmp_path):
    """TRL's conversational preference format: prompt, chosen and rejected each a list of turns."""
    row = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "assistant", "content": "Go away."}]}
    path = write_jsonl(tmp_path / "trl.jsonl", [row])
    for answer, said in (("chosen", "Hello!"), ("rejected", "Go away.")):
        records, reader = read(path, prompt_column="prompt", response_column=answer)
        assert records[0].messages == (Message("user", "Hi"), Message("assistant", said))
        assert reader.unused_columns == ["rejected" if answer == "chosen" else "chosen"]
