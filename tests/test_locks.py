"""The writer lock: a second writer is refused naming the holder, a dead holder's lock is taken over with a
note, on the local disk and on an fsspec file system."""

import json
import os
import socket
import subprocess
import sys
import uuid

import pytest

from instructsae.errors import UserError, first_line
from instructsae.locks import check_writable, lock_location, writer_lock


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid  # reaped: no process has this pid now (pids are not reused this fast)


def stale_holder() -> dict:
    return {"host": socket.gethostname(), "pid": dead_pid(), "started": "2026-01-01 00:00:00 UTC",
            "command": "instructsae extract"}


def test_a_second_local_writer_is_refused_naming_the_holder(tmp_path):
    with writer_lock(tmp_path / "store", "store"):
        holder = json.loads(open(lock_location(tmp_path / "store")).read())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(UserError, match=rf"store .* is being written by pid {os.getpid()} on host .*started"):
            with writer_lock(tmp_path / "store", "store"):
                pass
    assert os.listdir(tmp_path) == []  # released: the lock file is gone
    with writer_lock(tmp_path / "store", "store"):  # and can be taken again
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path, capsys):
    holder = stale_holder()
    (tmp_path / "run.lock").write_text(json.dumps(holder))
    with writer_lock(tmp_path / "run", "run folder"):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"took over the lock {tmp_path / 'run.lock'}" in err and f"pid {holder['pid']}" in err


def test_a_killed_holder_never_blocks_the_next_writer(tmp_path):
    code = (f"from instructsae.locks import writer_lock\nimport os\n"
            f"with writer_lock({str(tmp_path / 'store')!r}, 'store'):\n    os.kill(os.getpid(), 9)")
    process = subprocess.run([sys.executable, "-c", code], env=os.environ.copy())
    assert process.returncode == -9 and (tmp_path / "store.lock").exists()
    with writer_lock(tmp_path / "store", "store"):
        pass


def test_fsspec_locks_are_exclusive_and_stale_ones_are_taken_over(capsys):
    import fsspec

    target = f"memory://locks-{uuid.uuid4().hex}/store"
    fs = fsspec.filesystem("memory")
    with writer_lock(target, "store"):
        assert fs.exists(target + ".lock")
        with pytest.raises(UserError, match=f"being written by pid {os.getpid()}"):
            with writer_lock(target, "store"):
                pass
    assert not fs.exists(target + ".lock")

    fs.pipe_file(target + ".lock", json.dumps(stale_holder()).encode())
    with writer_lock(target, "store"):
        pass
    assert "took over the lock" in capsys.readouterr().err

    elsewhere = {**stale_holder(), "host": "another-host"}  # a pid on another host cannot be checked from here
    fs.pipe_file(target + ".lock", json.dumps(elsewhere).encode())
    with pytest.raises(UserError, match=r"another-host.*delete memory://.*store\.lock"):
        with writer_lock(target, "store"):
            pass


def test_a_location_whose_package_is_missing_is_one_line():
    with pytest.raises(UserError, match="nosuchproto"):
        with writer_lock("nosuchproto://bucket/store", "store"):
            pass


def test_a_read_only_location_is_refused(read_only_dir):
    with pytest.raises(UserError, match="not writable"):
        check_writable(read_only_dir / "store", "store")


def test_first_line_of_any_message():
    assert first_line(ValueError("one\ntwo")) == "one"
    assert first_line(FileExistsError()) == "FileExistsError"
    assert first_line(OSError("\n  \n  spaced  \n")) == "spaced"
