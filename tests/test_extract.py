"""End-to-end extraction on a tiny random llama model: FAST isolation, BT blocks, budget, refusals.

Resuming after a kill is tested once per store location in test_store_locations.py."""

import numpy as np
import pytest
import torch

from helpers import interrupt_extraction_at

from instructsae.extract import run as extract_run
from instructsae.extract.run import run_extract
from instructsae.lm.hooks import residuals_at_layers
from instructsae.lm.models import load_model
from instructsae.store.reader import open_store
from instructsae.schemas import ExtractConfig


# shards of two 32-token chunks (d_model 64, float32): every test store has several, committed one by one
SHARD_MB = 0.02


def config(model_dir, dataset, out, **overrides) -> ExtractConfig:
    values = dict(model=str(model_dir), dataset=str(dataset), out=str(out), layers=(0, 1),
                  dtype="float32", model_dtype="float32", chunk_tokens=32, batch_tokens=256,
                  shard_mb=SHARD_MB)
    values.update(overrides)
    return ExtractConfig(**values)


def test_fast_instances_match_running_each_alone(tiny_model_dir, dialogues_jsonl, tmp_path, monkeypatch):
    cfg = config(tiny_model_dir, dialogues_jsonl, tmp_path / "store", keep_first_token=True)
    padded_batch, mixed_lengths = extract_run.padded_batch, []

    def spy(group, batch, pad_id):
        mixed_lengths.append(len({len(group[index].token_ids) for index in batch}) > 1)
        return padded_batch(group, batch, pad_id)

    monkeypatch.setattr(extract_run, "padded_batch", spy)
    run_extract(cfg, show_progress=False)
    assert any(mixed_lengths), "some batch must hold padded dialogues of different lengths"
    reader = open_store(cfg.out)
    lm = load_model(str(tiny_model_dir), "float32")
    starts, lengths = reader.read_column("instance_start"), reader.read_column("instance_length")
    assert reader.n_instances == 12
    for index in range(reader.n_instances):
        rows = slice(int(starts[index]), int(starts[index] + lengths[index]))
        assert (reader.read_column("instance")[rows] == index).all()
        token_ids = torch.from_numpy(reader.read_column("token_id")[rows].astype(np.int64))[None]
        assert (reader.read_column("position")[rows] == np.arange(lengths[index])).all()
        alone = residuals_at_layers(lm.model, (0, 1), token_ids, torch.ones_like(token_ids))
        for layer in (0, 1):
            stored = reader.read_acts(layer, rows.start, rows.stop)
            torch.testing.assert_close(stored, alone[layer][0].float(), atol=1e-4, rtol=1e-4)


def test_first_token_dropped_by_default(tiny_model_dir, dialogues_jsonl, tmp_path):
    cfg = config(tiny_model_dir, dialogues_jsonl, tmp_path / "store")
    run_extract(cfg, show_progress=False)
    reader = open_store(cfg.out)
    positions = reader.read_column("position")
    assert positions.min() == 1
    assert (positions[reader.read_column("instance_start")] == 1).all()


def test_bt_blocks_have_the_fixed_length(tiny_model_dir, dialogues_jsonl, tmp_path):
    cfg = config(tiny_model_dir, dialogues_jsonl, tmp_path / "store", mode="bt", block_len=16,
                 keep_first_token=True)
    run_extract(cfg, show_progress=False)
    reader = open_store(cfg.out)
    assert reader.n_instances >= 3
    assert (reader.read_column("instance_length") == 16).all()
    assert reader.n_tokens == 16 * reader.n_instances


def test_max_tokens_is_exact(tiny_model_dir, dialogues_jsonl, tmp_path):
    cfg = config(tiny_model_dir, dialogues_jsonl, tmp_path / "store", max_tokens=100)
    manifest = run_extract(cfg, show_progress=False)
    assert manifest.n_tokens == 100 and manifest.complete
    assert open_store(cfg.out).read_acts(0, 0, 1000).shape == (100, 64)


def test_rerun_of_a_finished_store_does_nothing(tiny_model_dir, dialogues_jsonl, tmp_path, monkeypatch):
    cfg = config(tiny_model_dir, dialogues_jsonl, tmp_path / "store")
    run_extract(cfg, show_progress=False)
    monkeypatch.setattr(extract_run, "forward_group", lambda *a, **k: pytest.fail("recomputed"))
    assert run_extract(cfg, show_progress=False).complete


def test_bf16_store_round_trips(tiny_model_dir, dialogues_jsonl, tmp_path):
    cfg = config(tiny_model_dir, dialogues_jsonl, tmp_path / "store", dtype="bfloat16", max_tokens=64)
    run_extract(cfg, show_progress=False)
    reader = open_store(cfg.out)
    acts = reader.read_acts(1, 0, 64)
    assert acts.dtype == torch.float32 and torch.equal(acts, acts.to(torch.bfloat16).float())
    assert reader.manifest.layer_stats["1"].count == 64


def test_a_store_made_with_another_config_is_refused(tiny_model_dir, dialogues_jsonl, tmp_path):
    from instructsae.errors import UserError

    cfg = config(tiny_model_dir, dialogues_jsonl, tmp_path / "store", max_tokens=50)
    run_extract(cfg, show_progress=False)
    changed = cfg.model_copy(update={"max_tokens": 60})
    with pytest.raises(UserError, match="made with another config"):
        run_extract(changed, show_progress=False)
    assert open_store(cfg.out).n_tokens == 50  # untouched
    # runtime knobs are not part of a store's identity
    assert run_extract(cfg.model_copy(update={"batch_tokens": 64}), show_progress=False).n_tokens == 50
    assert run_extract(changed.model_copy(update={"overwrite": True}), show_progress=False).n_tokens == 60


def test_a_resumed_extraction_does_not_check_the_rows_again(tiny_model_dir, dialogues_jsonl, tmp_path, monkeypatch):
    """The first run reads every row it will use before writing; a resume over the same bytes skips that pass."""
    checks, real_check = [], extract_run.check_rows_used
    monkeypatch.setattr(extract_run, "check_rows_used", lambda *a, **k: checks.append(1) or real_check(*a, **k))
    cfg = config(tiny_model_dir, dialogues_jsonl, tmp_path / "store", batch_tokens=64, shard_mb=0.001)
    real_forward = interrupt_extraction_at(monkeypatch, 6)  # a kill after some shards were committed
    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg, show_progress=False)
    assert checks == [1] and open_store(cfg.out).n_tokens > 0
    monkeypatch.setattr(extract_run, "forward_group", real_forward)
    run_extract(cfg, show_progress=False)
    assert checks == [1] and open_store(cfg.out).manifest.complete
    run_extract(cfg.model_copy(update={"overwrite": True}), show_progress=False)
    assert checks == [1, 1]  # --overwrite starts afresh: the rows are checked again
