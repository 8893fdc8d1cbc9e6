"""A store never silently wrong: damaged chunks are named by `verify` and stop every reader with one line.

One tiny bf16 store (shards of two 32-token chunks) is extracted once; each test damages its own copy."""

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from helpers import assert_one_line_error, run_cli

from instructsae.errors import UserError
from instructsae.extract.run import run_extract
from instructsae.schemas import ExtractConfig, OptimConfig, StandardConfig, TrainConfig
from instructsae.store.reader import StoreReader, open_complete_store, open_store
from instructsae.store.verify import verify_report
from instructsae.train.run import run_training

LAYER = 1
ACTS = f"acts/layer_{LAYER}"
SHARD_MB = 0.008  # d_model 64 in bf16: 4 KB chunks of 32 tokens, two to a shard


def store_config(model_dir, dataset, out, **overrides) -> ExtractConfig:
    values = dict(model=str(model_dir), dataset=str(dataset), out=str(out), layers=(LAYER,), dtype="bfloat16",
                  chunk_tokens=32, batch_tokens=256, shard_mb=SHARD_MB)
    return ExtractConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def pristine(tiny_model_dir, tmp_path_factory):
    """(store, SAE folder trained on it, the extraction config)."""
    folder = tmp_path_factory.mktemp("pristine")
    dataset = folder / "dialogues.jsonl"
    dataset.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question {i}: what does a robot dream of?"},
        {"role": "assistant", "content": "It dreams of electric sheep and quiet rooms. " * (1 + i % 3)},
    ]}) for i in range(10)) + "\n")
    cfg = store_config(tiny_model_dir, dataset, folder / "store")
    run_extract(cfg, show_progress=False)
    sae = folder / "sae"
    run_training(TrainConfig(store=cfg.out, out=str(sae), layer=LAYER, sae=StandardConfig(expansion=2),
                             batch_size=32, tokens=256, buffer_tokens=128, optim=OptimConfig(lr=3e-3)))
    return folder / "store", sae, cfg


@pytest.fixture
def store(pristine, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(pristine[0], copy)
    return copy


def chunk_span(store, name: str, chunk: int) -> tuple[str, int, int]:
    """(shard file, offset, length) of an inner chunk's bytes."""
    array = StoreReader(store).arrays[name]
    shard, local = divmod(chunk, array.chunks_per_shard)
    offset, length = array._shard_index(shard, chunk)[local]
    return array.shard_path(shard), int(offset), int(length)


def flip_byte(store, name: str = ACTS, chunk: int = 3) -> None:
    path, offset, length = chunk_span(store, name, chunk)
    with open(path, "r+b") as file:
        file.seek(offset + length // 2)
        byte = file.read(1)[0]
        file.seek(offset + length // 2)
        file.write(bytes([byte ^ 0x10]))


def delete_shard(store, name: str = ACTS, chunk: int = 3) -> None:
    path, _, _ = chunk_span(store, name, chunk)
    import os
    os.remove(path)


def truncate_shard(store, name: str = ACTS, chunk: int = 3) -> None:
    path, _, _ = chunk_span(store, name, chunk)
    with open(path, "r+b") as file:
        file.truncate(file.seek(0, 2) - 100)


def append_rows(store, name: str = ACTS) -> None:
    """What a second writer did before locks: rows beyond the count the manifest commits."""
    array = zarr.open_array(f"{store}/{name}", mode="r+")
    length = array.shape[0]
    array.resize((length + 40, *array.shape[1:]))
    array[length:] = 7


DAMAGE = {
    "checksum": (flip_byte, "chunk 3 (rows 96-128)"),
    "missing": (delete_shard, "chunks 2-3 (rows 64-128)"),
    "truncated": (truncate_shard, "chunks 2-3 (rows 64-128)"),
    "rows beyond the committed count": (append_rows, "rows"),
}


def test_a_sound_store_verifies(store):
    report = verify_report(str(store), show_progress=False)
    assert report["ok"] and report["problems"] == [], report
    reader = open_store(store)
    assert report["chunks"] == sum(array.n_chunks for array in reader.arrays.values())


@pytest.mark.parametrize("what", sorted(DAMAGE))
def test_verify_names_each_kind_of_damage(store, what, monkeypatch, capsys):
    damage, where = DAMAGE[what]
    damage(store)
    code, out, _ = run_cli(monkeypatch, capsys, "verify", str(store))
    assert code == 1
    # rows appended by plain zarr rewrote the last shard without place tags: that is named as well
    rewritten = [line for line in out.splitlines() if "has no place tags" in line]
    assert len(rewritten) == (what == "rows beyond the committed count"), out
    problems = [line for line in out.splitlines() if line.startswith(ACTS) and line not in rewritten]
    assert len(problems) == 1, out
    assert f": {what}: " in problems[0] and where in problems[0], problems[0]
    code, out, _ = run_cli(monkeypatch, capsys, "verify", str(store), "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert [(p["array"], p["what"]) for p in report["problems"] if "no place tags" not in p["detail"]] == [(ACTS, what)]


@pytest.mark.parametrize("what", sorted(DAMAGE))
def test_train_refuses_each_kind_of_damage_with_one_line(store, what, tmp_path, monkeypatch, capsys):
    DAMAGE[what][0](store)
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", str(store), "--out", str(tmp_path / "run"),
                           "--layer", str(LAYER), "--sae", "standard", "--expansion", "2", "--batch-size", "32",
                           "--tokens", "256", "--buffer-tokens", "128")
    assert_one_line_error(code, err, str(store), ACTS)


def test_every_reading_command_stops_at_a_flipped_byte(store, pristine, tmp_path, monkeypatch, capsys):
    flip_byte(store)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {{layer: {LAYER}, tokens: 256, batch_size: 32, buffer_tokens: 128}}\n"
                     "grid: {sae: [{arch: standard, sparsity_coeff: [1.0, 2.0]}], expansion: [2]}\n")
    commands = {
        "sweep": ["sweep", "--config", str(sweep), "--store", str(store), "--out", str(tmp_path / "sweep")],
        "evaluate": ["evaluate", "--sae", str(pristine[1]), "--store", str(store)],
        "features": ["features", "--sae", str(pristine[1]), "--store", str(store), "--out", str(tmp_path / "f")],
    }
    for command, args in commands.items():
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert_one_line_error(code, err, ACTS, "chunk 3", "checksum")


@pytest.mark.parametrize("name", [ACTS, "token_id"])
def test_a_truncated_array_description_is_one_line_everywhere(store, pristine, name, tmp_path, monkeypatch, capsys):
    description = store / name / "zarr.json"
    description.write_bytes(description.read_bytes()[:40])
    code, out, _ = run_cli(monkeypatch, capsys, "verify", str(store))
    problems = [line for line in out.splitlines() if line.startswith(name)]
    assert code == 1 and len(problems) == 1 and ": damaged: " in problems[0] and "zarr.json" in problems[0], out
    commands = {
        "inspect": ["inspect", str(store)],
        "train": ["train", "--store", str(store), "--out", str(tmp_path / "run"), "--layer", str(LAYER), "--sae",
                  "standard", "--expansion", "2", "--batch-size", "32", "--tokens", "256", "--buffer-tokens", "128"],
        "evaluate": ["evaluate", "--sae", str(pristine[1]), "--store", str(store)],
    }
    for command, args in commands.items():
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert_one_line_error(code, err, str(store), name, "zarr.json")


def test_a_flipped_byte_in_a_token_column_is_caught_too(store):
    flip_byte(store, "token_id", 0)
    reader = open_store(store)
    with pytest.raises(UserError, match="token_id chunk 0 .* is checksum"):
        reader.read_column("token_id")


def test_a_plain_zarr_read_gives_the_stored_bf16_values(store):
    reader = open_store(store)
    array = zarr.open_group(str(store), mode="r")[ACTS]  # what the README shows
    assert array.attrs["dtype"] == "bfloat16" and array.attrs["layer"] == LAYER
    assert array.attrs["d_model"] == reader.d_model and array.attrs["hook_site"] == "resid_post"
    acts = torch.from_numpy(array[:].view(np.int16)).view(torch.bfloat16)
    assert acts.shape == (reader.n_tokens, reader.d_model)
    torch.testing.assert_close(acts.float(), reader.read_acts(LAYER, 0, reader.n_tokens), rtol=0, atol=0)


def test_shards_hold_whole_chunks_and_any_shard_size_stores_the_same(store, pristine, tmp_path):
    reader = open_store(store)
    shard_files = sorted((store / ACTS / "c").iterdir())
    assert reader.n_chunks > 4 and len(shard_files) == -(-reader.n_chunks // 2)
    one_shard = tmp_path / "one-shard"
    run_extract(pristine[2].model_copy(update={"out": str(one_shard), "shard_mb": 512.0}), show_progress=False)
    assert len(list((one_shard / ACTS / "c").iterdir())) == 1
    other = open_store(one_shard)
    torch.testing.assert_close(other.read_acts(LAYER, 0, other.n_tokens), reader.read_acts(LAYER, 0, reader.n_tokens))
    for name in ("token_id", "role", "instance_start", "instance_length"):
        np.testing.assert_array_equal(other.read_column(name), reader.read_column(name))


def test_an_old_format_store_names_convert(store, monkeypatch, capsys):
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["instructsae"] = {**group.attrs["instructsae"], "format_version": 1}
    code, _, err = run_cli(monkeypatch, capsys, "inspect", str(store))
    assert_one_line_error(code, err, "store format 1", "instructsae convert")


def test_nonfinite_activations_stop_the_extraction_unless_kept(pristine, tmp_path, monkeypatch):
    import instructsae.extract.run as extract_run
    real = extract_run.forward_group

    def poisoned(lm, group, cfg):
        acts = real(lm, group, cfg)
        acts.acts[(LAYER, "resid_post")][0][1, 5] = float("nan")  # as it leaves the device, in the store dtype
        return acts

    monkeypatch.setattr(extract_run, "forward_group", poisoned)
    cfg = pristine[2].model_copy(update={"out": str(tmp_path / "nan")})
    with pytest.raises(UserError, match=rf"at layer {LAYER} \(resid_post\) are NaN or inf.*--keep-nonfinite"):
        run_extract(cfg, show_progress=False)
    kept = run_extract(cfg.model_copy(update={"keep_nonfinite": True}), show_progress=False)
    assert kept.complete and kept.layer_stats[str(LAYER)].nonfinite > 0
    with pytest.raises(UserError, match="NaN/inf activations"):
        open_complete_store(cfg.out)
    report = verify_report(cfg.out, show_progress=False)
    assert {p["what"] for p in report["problems"]} == {"NaN/inf"}


def test_an_sae_with_nan_weights_is_refused_with_one_line(pristine, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    sae = tmp_path / "sae"
    shutil.copytree(pristine[1], sae)
    tensors = load_file(str(sae / "sae_weights.safetensors"))
    tensors["W_dec"][0, 0] = float("nan")
    save_file(tensors, str(sae / "sae_weights.safetensors"))
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--sae", str(sae), "--store", str(pristine[0]))
    assert_one_line_error(code, err, str(sae), "NaN/inf", "W_dec")


def write_format_1(store, old) -> None:
    """The same rows as a store of format 1 wrote them: a plain chunked array each, no checksums."""
    reader = open_store(store)
    group = zarr.open_group(str(old), mode="w", zarr_format=3)
    for name, spec in reader.specs.items():
        values = reader.read_raw(name)
        chunks = spec.chunk_rows if spec.per == "token" else 65536
        group.create_array(name, data=values, chunks=(chunks, *spec.row_shape), fill_value=0)
    manifest = reader.manifest.model_dump(mode="json")
    del manifest["identity"]["shard_tokens"]
    for stats in manifest["layer_stats"].values():
        del stats["nonfinite"]
    group.attrs["instructsae"] = {**manifest, "format_version": 1}


def test_convert_rewrites_a_format_1_store(store, tmp_path, monkeypatch, capsys):
    old, new = tmp_path / "old", tmp_path / "new"
    write_format_1(store, old)
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", str(old), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "store format 1", f"instructsae convert {old}")
    code, out, err = run_cli(monkeypatch, capsys, "convert", str(old), "--out", str(new), "--shard-mb", "0.008")
    assert code == 0, err
    assert verify_report(str(new), show_progress=False)["ok"]
    a, b = open_store(store), open_store(new)
    assert a.manifest.fingerprint == b.manifest.fingerprint and b.manifest.complete
    for name in a.specs:
        np.testing.assert_array_equal(a.read_raw(name), b.read_raw(name))
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(old), "--out", str(new))
    assert_one_line_error(code, err, "exists")
