"""Small helpers shared by the end-to-end tests."""

import json
import sys
from pathlib import Path

import pytest

from instructsae.cli import main


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `instructsae ARGS` in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["instructsae", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    # progress bars redraw with carriage returns, and train states its schedule before it starts
    # ("schedule: ..."); the error itself is a plain line
    lines = [line for line in err.split("\n")
             if line.strip() and "\r" not in line and not line.startswith("schedule: ")]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]


def interrupt_extraction_at(monkeypatch, group: int):
    """Make extraction's forward pass raise KeyboardInterrupt (a kill between groups) at its `group`-th call;
    returns the real forward pass, for the test to put back before the rerun."""
    from instructsae.extract import run as extract_run

    real_forward, calls = extract_run.forward_group, []

    def dying_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == group:
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(extract_run, "forward_group", dying_forward)
    return real_forward


# conftest's dialogues_jsonl: 12 numbered stories of up to 4 sentences
NUMBERED_STORIES = {"n": 12, "lengths": 4, "prompt": "Tell me a story number {i} about a robot."}


def robot_dialogues(n: int, lengths: int = 3, prompt: str = "Tell me story {i} about a robot.") -> list[dict]:
    """n user/assistant rows in the messages format, the answers 1..lengths sentences long (the tests' usual data)."""
    answer = "Once upon a time there was a small robot. "
    return [{"messages": [{"role": "user", "content": prompt.format(i=i)},
                          {"role": "assistant", "content": answer * (1 + i % lengths)}]}
            for i in range(n)]


def write_dialogues(path: Path, n: int, **shape) -> Path:
    """robot_dialogues(n, **shape) as a JSON-lines file at path."""
    path.write_text("".join(json.dumps(row) + "\n" for row in robot_dialogues(n, **shape)))
    return path
