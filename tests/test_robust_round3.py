"""Issue 23, one test per numbered item: nothing lost, nothing silently wrong (writers under one lock, chunks bound
to their place, seeds grouped by full config, symlinks, full disks, decode errors, signals, NaN settings, an
unreachable hub, leftovers). The torchrun refusal (item 12) is tested in test_distributed_extract.py."""

import csv
import errno
import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import assert_one_line_error, interrupt_extraction_at, run_cli
from test_sweep import BASE
from test_train_run import FakeReader, train_cfg, use_reader

from instructsae.errors import UserError
from instructsae.locks import lock_location, writer_lock
from instructsae.schemas.manifest import FORMAT_VERSION, StoreIdentity, StoreManifest
from instructsae.schemas.sweep import SweepConfig
from instructsae.store.layout import TokenBlock
from instructsae.store.reader import StoreReader
from instructsae.store.verify import verify_report
from instructsae.store.writer import StoreWriter
from instructsae.train import sweep as sweep_module
from instructsae.train.run import run_training
from instructsae.train.sweep import run_sweep

D = 8


# ---------------------------------------------------------------- 1. dedup takes the writer lock


def write_dialogues(path: Path, n: int = 30) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"question {i} about the sea"},
                          {"role": "assistant", "content": f"answer {i}: the sea is wide"}]} for i in range(n)]
    path.write_text("".join(__import__("json").dumps(row) + "\n" for row in rows))
    return path


def test_a_second_dedup_into_the_same_out_is_refused(tmp_path, monkeypatch, capsys):
    dataset, out = write_dialogues(tmp_path / "d.jsonl"), tmp_path / "c.parquet"
    with writer_lock(out, "dedup output", is_file=True):  # a first dedup still writing
        code, _, err = run_cli(monkeypatch, capsys, "dedup", "--dataset", str(dataset), "--out", str(out))
    assert_one_line_error(code, err, f"dedup output {out} is being written by pid {os.getpid()}")
    assert not out.exists() and not Path(f"{out}.partial").exists()
    code, _, err = run_cli(monkeypatch, capsys, "dedup", "--dataset", str(dataset), "--out", str(out))
    assert code == 0, err
    assert not Path(lock_location(out)).exists()  # released


def test_features_takes_the_writer_lock_of_its_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "features"
    with writer_lock(out, "features folder"):
        code, _, err = run_cli(monkeypatch, capsys, "features", "--sae", str(tmp_path / "sae"), "--store",
                               str(tmp_path / "store"), "--out", str(out))
    assert_one_line_error(code, err, f"features folder {out} is being written by pid {os.getpid()}")


def test_features_builds_aside_and_swaps_in(tmp_path):
    from instructsae.fileio import built_aside

    out = tmp_path / "features"
    out.mkdir()
    (out / "features.json").write_text("old")
    with pytest.raises(RuntimeError):
        with built_aside(out, lambda name: name == "features.json") as building:
            (building / "features.json").write_text("half")
            raise RuntimeError("killed midway")
    assert (out / "features.json").read_text() == "old" and not (tmp_path / "features.partial").exists()
    with built_aside(out, lambda name: name == "features.json") as building:
        (building / "features.json").write_text("new")
    assert (out / "features.json").read_text() == "new" and not (tmp_path / "features.partial").exists()


# ---------------------------------------------------------------- 2. a sweep and a train into one member


def test_a_train_into_a_member_of_a_running_sweep_is_refused(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    real_train_saes, refusals = sweep_module.train_saes, []

    def train_beside(configs, *args, **kwargs):  # while the sweep holds its locks, a train aims at a member
        try:
            run_training(train_cfg(configs[0].out))
        except UserError as error:
            refusals.append(str(error))
        return real_train_saes(configs, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "train_saes", train_beside)
    grid = {"sae": [{"arch": "standard", "expansion": 2, "sparsity_coeff": 0.05}], "layer": [3]}
    rows = run_sweep(SweepConfig(store="fake-store", out=str(tmp_path / "sweep"), base=BASE, grid=grid))
    assert len(refusals) == 1 and "run folder" in refusals[0] and "is being written by" in refusals[0]
    (member,) = [tmp_path / "sweep" / row["name"] for row in rows]
    assert (member / "metrics.jsonl").is_file() and (member / "training_curves.png").is_file()


def test_a_sweep_is_refused_while_a_train_writes_one_of_its_members(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    grid = {"sae": [{"arch": "standard", "expansion": 2, "sparsity_coeff": 0.05}], "layer": [3]}
    sweep = SweepConfig(store="fake-store", out=str(tmp_path / "sweep"), base=BASE, grid=grid)
    (member,) = sweep_module.expand_sweep(sweep)
    with writer_lock(member.out, "run folder"):
        with pytest.raises(UserError, match="run folder .* is being written by"):
            run_sweep(sweep)


# ---------------------------------------------------------------- 3. results over seeds


def test_results_over_seeds_never_average_different_grids(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    grid = {"sae": [{"arch": "standard", "expansion": 2, "sparsity_coeff": 0.05}], "layer": [3]}
    for tokens in (256, 128):  # the same grid at another token count, into the same folder
        run_sweep(SweepConfig(store="fake-store", out=str(tmp_path / "sweep"), base={**BASE, "tokens": tokens},
                              grid=grid))
    with open(tmp_path / "sweep" / "results-over-seeds.csv") as file:
        settings = list(csv.DictReader(file))
    assert len(settings) == 2 and [row["n_seeds"] for row in settings] == ["1", "1"]
    assert len({row["setting"] for row in settings}) == 2  # told apart, though their readable names coincide
    assert "Over seeds" not in (tmp_path / "sweep" / "results.md").read_text()


# ---------------------------------------------------------------- 4. the user's .partial files


def test_train_never_removes_the_users_partial_files(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    out = tmp_path / "R"
    (out / "photos.partial").mkdir(parents=True)
    (out / "notes.partial").write_text("x")
    with pytest.raises(UserError, match="notes.partial"):
        run_training(train_cfg(out))
    assert (out / "notes.partial").read_text() == "x" and (out / "photos.partial").is_dir()


# ---------------------------------------------------------------- 5. every chunk bound to its place


def tiny_store(out: Path, n_tokens: int = 256) -> Path:
    """A float32 store of one layer, chunks of 16 tokens, shards of 32: eight shards, written by StoreWriter."""
    identity = StoreIdentity(
        model="m", tokenizer="m", chat_template_sha256=None, dataset="d", dataset_sha256=str(out), split="",
        mode="fast", max_len=0, block_len=0, max_instances=None, skip_instances=0, max_tokens=None,
        keep_first_token=True, layers=(0,), d_model=D, dtype="float32", model_dtype="float32", chunk_tokens=16,
        shard_tokens=32)
    manifest = StoreManifest(tool_version="t", identity=identity, fingerprint=identity.fingerprint())
    writer = StoreWriter.create(out, manifest)
    generator = np.random.default_rng(len(str(out)))
    for first in range(0, n_tokens, 16):  # one instance of 16 tokens per block
        block = TokenBlock(
            acts={(0, "resid_post"): generator.standard_normal((16, D)).astype(np.float32)},
            token_id=np.arange(16, dtype=np.int32), instance=np.full(16, first // 16, dtype=np.int32),
            position=np.arange(16, dtype=np.int32), role=np.zeros(16, dtype=np.uint8),
            instance_start=np.array([first], dtype=np.int64), instance_length=np.array([16], dtype=np.int32),
            instance_source=np.array([first // 16], dtype=np.int64))
        manifest = manifest.model_copy(update={"n_tokens": first + 16, "n_instances": first // 16 + 1})
        writer.append(block, manifest)
    writer.finish(manifest.model_copy(update={"complete": True}))
    return out


def problems(store: Path) -> list[dict]:
    return verify_report(str(store), show_progress=False)["problems"]


def test_swapped_shards_are_named_by_verify_and_on_read(tmp_path):
    store = tiny_store(tmp_path / "store")
    assert problems(store) == []
    assert StoreReader(store).manifest.format_version == FORMAT_VERSION == 3
    one, two = store / "acts/layer_0/c/1/0", store / "acts/layer_0/c/2/0"
    swapped = tmp_path / "swap"
    os.replace(one, swapped), os.replace(two, one), os.replace(swapped, two)
    found = problems(store)
    assert {(p["array"], p["chunks"][0], p["what"]) for p in found} == {
        ("acts/layer_0", chunk, "misplaced") for chunk in (2, 3, 4, 5)}
    with pytest.raises(UserError, match=r"acts/layer_0 chunk 2 .* is misplaced"):
        StoreReader(store).read_acts(0, 32, 48)


def test_a_chunk_copied_from_another_store_is_named(tmp_path):
    store, other = tiny_store(tmp_path / "store"), tiny_store(tmp_path / "other")
    shutil.copyfile(other / "token_id/c/0", store / "token_id/c/0")  # the same bytes: only the place differs
    assert (other / "token_id/c/0").read_bytes() != (store / "acts/layer_0/c/0/0").read_bytes()
    found = problems(store)
    assert [(p["array"], p["what"]) for p in found] == [("token_id", "misplaced")]
    assert "another store" in found[0]["detail"]


def test_a_format_2_store_is_still_read(tmp_path, monkeypatch):
    """Format 2 shards carry no place tags: written as before, read as before (nothing to check their place by)."""
    import zarr

    from instructsae.store import shards, writer

    store = tmp_path / "store"
    monkeypatch.setattr(writer, "encode_shard", lambda spec, chunks, *place: shards.encode_shard(spec, chunks))
    tiny_store(store)
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["instructsae"] = {**group.attrs["instructsae"], "format_version": 2, "store_id": None}
    reader = StoreReader(store)
    assert reader.read_acts(0, 0, 256).shape == (256, D) and problems(store) == []


# ---------------------------------------------------------------- 6. symbolic links


def test_a_link_as_out_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    target, link = tmp_path / "target", tmp_path / "link"
    target.mkdir()
    link.symlink_to(target)
    with pytest.raises(UserError, match="is a symbolic link"):
        run_training(train_cfg(link))
    assert link.is_symlink() and list(target.iterdir()) == [] and not (tmp_path / "link.partial").exists()


def test_extract_overwrite_into_a_link_to_a_store_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    store = tiny_store(tmp_path / "store")
    link = tmp_path / "link"
    link.symlink_to(store)
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", str(tiny_model_dir), "--dataset", "chatterbot",
                           "--overwrite", "--out", str(link))
    assert_one_line_error(code, err, "is a symbolic link", str(store))
    assert link.is_symlink() and problems(store) == []


# ---------------------------------------------------------------- 7. a full disk


def test_a_full_disk_while_training_is_one_line_and_leaves_no_partial(tmp_path, monkeypatch, capsys):
    """The checkpoint's .partial is /dev/full: every write fails with ENOSPC, as on a full disk."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    use_reader(monkeypatch, FakeReader())
    from instructsae.train import checkpoint

    real_save = checkpoint.save

    def save_to_a_full_disk(path, state):
        Path(f"{path}.partial").symlink_to("/dev/full")
        real_save(path, state)

    monkeypatch.setattr(checkpoint, "save", save_to_a_full_disk)
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", "fake-store", "--out", str(tmp_path / "run"),
                           "--sae", "standard", "--expansion", "2", "--layer", "3", "--batch-size", "32",
                           "--buffer-tokens", "128", "--checkpoint-every", "32", "--tokens", "256")
    assert_one_line_error(code, err, "checkpoint.pt.partial", "No space left on device")
    assert not list(tmp_path.glob("**/*.partial"))


def test_a_full_disk_while_extracting_is_one_line(tmp_path, monkeypatch, capsys, tiny_model_dir):
    from instructsae.store import writer

    def no_space(fs, path, pieces):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{path}.partial")

    monkeypatch.setattr(writer, "put_shard", no_space)
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", str(tiny_model_dir), "--dataset",
                           "chatterbot", "--layers", "0", "--max-instances", "20", "--chunk-tokens", "32",
                           "--shard-mb", "0.01", "--out", str(tmp_path / "store"))
    assert_one_line_error(code, err, "No space left on device", str(tmp_path / "store"))
    assert not Path(lock_location(tmp_path / "store")).exists()


# ---------------------------------------------------------------- 8. decode errors and read-only outputs


@pytest.mark.parametrize("damage", ["overwritten", "cut short"])
def test_a_corrupt_gzip_dataset_is_one_line(damage, tmp_path, monkeypatch, capsys):
    dataset = tmp_path / "d.jsonl.gz"
    whole = gzip.compress(write_dialogues(tmp_path / "d.jsonl", 400).read_bytes())
    # zlib.error (a deflate block overwritten) and EOFError (a download cut short)
    damaged = whole[:20] + b"\xff" * 50 + whole[70:] if damage == "overwritten" else whole[: len(whole) // 2]
    dataset.write_bytes(damaged)
    code, _, err = run_cli(monkeypatch, capsys, "dedup", "--dataset", str(dataset), "--out",
                           str(tmp_path / "c.parquet"))
    assert_one_line_error(code, err, str(dataset), "cannot be decompressed")
    assert not list(tmp_path.glob("c.parquet*"))


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, monkeypatch, capsys):
    config = tmp_path / "extract.yaml"
    config.write_bytes("model: tiny\ndataset: caf\xe9\n".encode("latin-1"))
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--config", str(config), "--out", str(tmp_path / "s"))
    assert_one_line_error(code, err, str(config), "not UTF-8")


def test_dedup_into_a_read_only_folder_is_one_line(read_only_dir, tmp_path, monkeypatch, capsys):
    dataset = write_dialogues(tmp_path / "d.jsonl")
    code, _, err = run_cli(monkeypatch, capsys, "dedup", "--dataset", str(dataset), "--out",
                           str(read_only_dir / "c.parquet"))
    assert_one_line_error(code, err, str(read_only_dir), "not writable")


# ---------------------------------------------------------------- 9. signals


def test_ctrl_c_says_interrupted_not_aborted(tiny_model_dir, tmp_path, monkeypatch, capsys):
    interrupt_extraction_at(monkeypatch, 3)  # Ctrl-C between groups
    out = tmp_path / "store"
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", str(tiny_model_dir), "--dataset",
                           "chatterbot", "--layers", "0", "--max-instances", "40", "--chunk-tokens", "32",
                           "--batch-tokens", "64", "--out", str(out))
    assert code == 130 and "interrupted" in err and "rerun to resume" in err and "aborted" not in err, err
    assert not Path(lock_location(out)).exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_extraction_says_so_and_releases_its_lock(signum, tiny_model_dir, tmp_path):
    out = tmp_path / "store"
    process = subprocess.Popen(
        [sys.executable, "-m", "instructsae", "extract", "--model", str(tiny_model_dir), "--dataset", "chatterbot",
         "--layers", "0,1", "--max-instances", "3000", "--dtype", "float32", "--chunk-tokens", "32",
         "--batch-tokens", "64", "--shard-mb", "0.02", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "zarr.json").exists():  # writing: the lock is held
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted" in err and "rerun to resume" in err and "Traceback" not in err, err
    assert not Path(lock_location(out)).exists()


# ---------------------------------------------------------------- 10. settings that are not numbers


@pytest.mark.parametrize("alpha", ["nan", "0,inf", "-inf"])
def test_steering_alphas_that_are_not_numbers_are_refused(alpha, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "steer", "--sae", str(tmp_path), "--feature", "0", "--prompt",
                           "hi", "--alpha", alpha, "--out", str(tmp_path / "s.json"))
    assert_one_line_error(code, err, "alpha", "finite")


def test_an_infinite_learning_rate_is_refused_before_training(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", "fake-store", "--out", str(tmp_path / "run"),
                           "--lr", "inf")
    assert_one_line_error(code, err, "lr", "finite")
    assert not list(tmp_path.iterdir())


def test_a_string_in_the_messages_column_is_malformed_not_plain_text():
    from instructsae.extract.rows import RowFormat, Skip, normalize_row

    fmt = RowFormat("messages", None, None)
    assert normalize_row({"messages": "hello there"}, 0, fmt) == Skip("malformed")
    # the plain-text rows dedup writes beside dialogues (`messages` null, `text` set) are still text
    assert normalize_row({"messages": None, "text": "hello there"}, 1, fmt).text == "hello there"


# ---------------------------------------------------------------- 11. an unreachable hub


def test_an_uncached_model_id_with_the_hub_out_of_reach_fails_at_once(monkeypatch):
    from huggingface_hub import constants

    from instructsae.lm.models import load_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    with pytest.raises(UserError, match="cannot load model 'someone/uncached'.*cannot be reached"):
        load_model("someone/uncached")


# ---------------------------------------------------------------- 13. nothing left behind


def test_verify_names_a_half_written_file_left_inside_a_store(tmp_path):
    store = tiny_store(tmp_path / "store")
    (store / "zarr.1f2e3d.partial").write_text("{")
    found = problems(store)
    assert [p["what"] for p in found] == ["left over"] and "zarr.1f2e3d.partial" in found[0]["detail"]


def test_a_sweep_refused_for_memory_leaves_no_folder(tmp_path, monkeypatch, capsys):
    use_reader(monkeypatch, FakeReader())
    monkeypatch.setattr("instructsae.train.memory.free_bytes", lambda device: 10 * 2**20)  # 3 of 6 fit
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"base": {**BASE, "batch_size": 16}, "grid": {
        "sae": [{"arch": "standard", "expansion": 1024, "sparsity_coeff": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}]}}))
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--config", str(config), "--store", "fake-store",
                           "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "need")
    assert not (tmp_path / "out").exists()


def test_a_store_is_created_aside_so_a_killed_creation_leaves_no_half_store(tmp_path, monkeypatch):
    """A kill while zarr writes the new store's metadata leaves STORE.partial (cleared by the rerun), never a STORE
    that is neither a store nor empty."""
    from instructsae.store import writer

    real_skeleton, calls = writer._skeleton, []

    def killed_midway(location, manifest):
        calls.append(location)
        import zarr
        zarr.open_group(location, mode="w", zarr_format=3)  # the group's zarr.json, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_skeleton", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        tiny_store(tmp_path / "store")
    assert calls == [f"{tmp_path / 'store'}.partial"] and not (tmp_path / "store").exists()
    monkeypatch.setattr(writer, "_skeleton", real_skeleton)
    tiny_store(tmp_path / "store")
    assert problems(tmp_path / "store") == [] and sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_wandb_missing_leaves_no_run_partial(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(UserError, match="pip install"):
        run_training(train_cfg(tmp_path / "run", wandb=True))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 14. the README's torchrun claim


def test_the_readme_qualifies_torchrun_equality_by_thread_count():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    text = " ".join(readme.split())
    assert "equal bit for bit at equal thread counts only: torchrun sets `OMP_NUM_THREADS=1`" in text
    assert "extraction equal per instance to one process at equal thread counts" in text
