"""A local --model path is recorded absolute with its digest, so later commands find it from anywhere and notice
when it changed. (The whole round trip, extract with a relative path then evaluate and steer from another directory,
runs for every family in test_families.py.)"""

import os
import shutil

import pytest

from instructsae.errors import UserError
from instructsae.evaluate.run import refuse_a_changed_model
from instructsae.extract.run import identity_from_arguments, refuse_another_config, resolved
from instructsae.lm.models import model_location, model_sha256
from instructsae.schemas import ExtractConfig, StoreIdentity, StoreManifest


def identity_of(model: str, digest: str | None) -> StoreIdentity:
    return StoreIdentity(model=model, tokenizer=model, model_sha256=digest, chat_template_sha256=None, dataset="d",
                         dataset_sha256="0", split="train", mode="fast", max_len=8, block_len=8, max_instances=None,
                         skip_instances=0, max_tokens=None, keep_first_token=False, layers=(0,), d_model=64,
                         dtype="float32", model_dtype="float32", chunk_tokens=64, shard_tokens=64)


def test_local_paths_become_absolute_and_names_stay(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    assert model_location(tiny_model_dir.name) == os.path.abspath(tiny_model_dir)
    assert model_location("./missing") == os.path.abspath("missing")  # a path, though loading it will fail
    assert model_location("m.gguf") == os.path.abspath("m.gguf")
    for name in ("smollm2", "someone/some-model"):  # the embedded model and a hub id are names, not paths
        assert model_location(name) == name
    cfg = resolved(ExtractConfig(model=tiny_model_dir.name, out="store", device="cpu"))
    assert cfg.model == os.path.abspath(tiny_model_dir)


def test_a_store_that_recorded_a_relative_path_is_still_the_same_config(tiny_model_dir, monkeypatch):
    """Stores made before paths were recorded absolute are continued, not refused, from the same directory."""
    monkeypatch.chdir(tiny_model_dir.parent)
    cfg = resolved(ExtractConfig(model=tiny_model_dir.name, dataset="d", layers=(0,), max_len=8, block_len=8,
                                 out="store", device="cpu", dtype="float32"))
    old = identity_of(tiny_model_dir.name, None)
    existing = StoreManifest(tool_version="0", identity=old, fingerprint=old.fingerprint())
    refuse_another_config(cfg, existing, identity_from_arguments(cfg))  # no refusal
    other = cfg.model_copy(update={"model": "someone/other"})
    with pytest.raises(UserError, match="model: .* -> someone/other"):
        refuse_another_config(other, existing, identity_from_arguments(other))


def test_the_lm_view_refuses_a_model_folder_that_changed(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    identity = identity_of(str(folder), model_sha256(str(folder)))
    refuse_a_changed_model(identity)  # unchanged: no refusal
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("}", ', "note": 1}', 1))
    with pytest.raises(UserError, match="has changed since the store was extracted"):
        refuse_a_changed_model(identity)
    shutil.rmtree(folder)
    with pytest.raises(UserError, match="not a model folder"):
        refuse_a_changed_model(identity)


def test_a_resume_with_another_attention_implementation_records_both(tiny_model_dir, dialogues_jsonl, tmp_path,
                                                                     monkeypatch):
    from helpers import interrupt_extraction_at

    from instructsae.extract import run as extract_run
    from instructsae.extract.run import run_extract
    from instructsae.schemas.manifest import attn_implementations
    from instructsae.store.reader import open_store

    assert [attn_implementations(*pair) for pair in [(None, "sdpa"), ("sdpa", "sdpa"), ("sdpa", "eager"),
                                                      ("sdpa,eager", "sdpa"), (None, None)]] == \
        ["sdpa", "sdpa", "sdpa,eager", "sdpa,eager", None]
    cfg = ExtractConfig(model=str(tiny_model_dir), dataset=str(dialogues_jsonl), out=str(tmp_path / "store"),
                        layers=(0,), dtype="float32", model_dtype="float32", chunk_tokens=32, batch_tokens=64,
                        shard_mb=0.001)
    real_forward = interrupt_extraction_at(monkeypatch, 4)  # a kill after some shards were committed
    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg, show_progress=False)
    assert open_store(cfg.out).manifest.attn_implementation == "sdpa"
    monkeypatch.setattr(extract_run, "forward_group", real_forward)
    run_extract(cfg.model_copy(update={"attn_implementation": "eager"}), show_progress=False)
    manifest = open_store(cfg.out).manifest
    assert manifest.complete and manifest.attn_implementation == "sdpa,eager"
