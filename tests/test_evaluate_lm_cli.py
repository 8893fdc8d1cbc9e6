"""`instructsae evaluate` with the LM view, end to end through the CLI on a tiny store and a tiny trained SAE."""

import json

import numpy as np
import pytest
from helpers import assert_one_line_error, run_cli, write_dialogues

from instructsae.errors import UserError
from instructsae.evaluate.dialogues import stored_sequences
from instructsae.extract.run import run_extract
from instructsae.lm.models import load_model
from instructsae.store.reader import StoreReader, open_complete_store
from instructsae.schemas import ExtractConfig, OptimConfig, StandardConfig, TrainConfig
from instructsae.train.run import run_training

LM_TOKENS = 300


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """A store of 8 dialogues (first tokens dropped, as by default) and a Standard SAE trained on it briefly."""
    folder = tmp_path_factory.mktemp("lm-cli")
    dataset = write_dialogues(folder / "dialogues.jsonl", 8)
    store, sae = folder / "store", folder / "sae"
    run_extract(ExtractConfig(model=str(tiny_model_dir), dataset=str(dataset), layers=(1,), chunk_tokens=64,
                              dtype="float32", out=str(store)), show_progress=False)
    run_training(TrainConfig(store=str(store), out=str(sae), sae=StandardConfig(expansion=2), batch_size=32,
                             tokens=1000, buffer_tokens=128, optim=OptimConfig(lr=3e-3, lr_warmup_steps=2)))
    return store, sae, dataset


def test_evaluate_with_the_lm_view(tiny_run, tiny_model_dir, monkeypatch, capsys, tmp_path):
    store, sae, _ = tiny_run
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", "--sae", str(sae), "--store", str(store),
                             "--lm-tokens", str(LM_TOKENS), "--json", "--out", str(tmp_path / "result.json"))
    assert code == 0, err
    result = json.loads(out)
    assert result == json.loads((tmp_path / "result.json").read_text())
    assert not (sae / "eval").exists()  # the SAE folder is only read
    eq7 = result["eq7"]
    assert eq7["n_sequences"] == 8 and eq7["mse"] > 0 and eq7["log2_mse"] == pytest.approx(np.log2(eq7["mse"]))
    assert sum(role["n_tokens"] for role in result["per_role"].values()) == result["n_tokens"]
    lm = result["lm"]
    n_sequences = lm["n_sequences"]
    assert lm["model"] == str(tiny_model_dir)  # the manifest's model, by default
    assert lm["n_tokens"] == LM_TOKENS - n_sequences  # each sequence's first stored token is not predicted
    assert sum(role["n_tokens"] for role in lm["per_role"].values()) == lm["n_tokens"]
    assert lm["kl_spliced"] >= 0 and lm["kl_ablated"] >= 0
    assert lm["ce_loss_recovered"] == pytest.approx(
        (lm["ce_ablated"] - lm["ce_spliced"]) / (lm["ce_ablated"] - lm["ce_clean"]))

    code, out, err = run_cli(monkeypatch, capsys, "evaluate", "--sae", str(sae), "--store", str(store),
                             "--lm-tokens", "50")
    assert code == 0, err
    assert "CE recovered" in out and "log2 MSE (Eq.7)" in out
    assert "| assistant |" in out and "| template |" in out  # the per-role table


def test_lm_tokens_zero_skips_the_lm_view(tiny_run, monkeypatch, capsys):
    store, sae, _ = tiny_run
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", "--sae", str(sae), "--store", str(store),
                             "--lm-tokens", "0", "--json")
    assert code == 0, err
    assert "lm" not in json.loads(out) and "eq7" in json.loads(out)


def test_the_dropped_first_token_comes_back_from_the_dataset(tiny_run, tiny_model_dir, tiny_tokenizer):
    store, _, _ = tiny_run
    reader = open_complete_store(store)
    sequences = stored_sequences(reader, load_model(str(tiny_model_dir)), max_tokens=10_000)
    assert len(sequences) == reader.n_instances
    start_id = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")  # ChatML renders it first
    for sequence, start, length in zip(sequences, reader.read_column("instance_start"),
                                       reader.read_column("instance_length")):
        assert sequence.token_ids[0] == start_id
        assert np.array_equal(sequence.token_ids[1:], reader.read_column("token_id", start, start + length))


def test_another_dataset_is_refused(tiny_run, tiny_model_dir, tmp_path):
    store, _, _ = tiny_run
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"messages": [{"role": "user", "content": "Something else entirely."}]}) + "\n")
    with pytest.raises(UserError, match="instance 0 re-made from dataset"):
        stored_sequences(open_complete_store(store), load_model(str(tiny_model_dir)), 100, dataset=str(other))


def test_a_bad_model_gives_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    store, sae, _ = tiny_run
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--sae", str(sae), "--store", str(store),
                           "--model", str(tmp_path / "no-such-model"))
    assert_one_line_error(code, err, "no-such-model")


def test_several_saes_in_one_evaluate(tiny_run, tmp_path, monkeypatch, capsys):
    store, sae, _ = tiny_run
    other = tmp_path / "other"
    run_training(TrainConfig(store=str(store), out=str(other), sae=StandardConfig(expansion=2, sparsity_coeff=1.0),
                             batch_size=32, tokens=1000, buffer_tokens=128, optim=OptimConfig(lr=3e-3)))
    reads = []
    read_acts = StoreReader.read_acts
    monkeypatch.setattr(StoreReader, "read_acts", lambda self, *args: reads.append(args) or read_acts(self, *args))
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", "--sae", str(sae), "--sae", str(other), "--store",
                             str(store), "--lm-tokens", "100", "--json")
    assert code == 0, err
    assert len(reads) == len(set(reads)) > 0  # both SAEs measured from one read of the store
    together = json.loads(out)
    assert [r["sae"] for r in together] == [str(sae), str(other)]
    assert together[0]["lm"]["ce_clean"] == together[1]["lm"]["ce_clean"]  # one clean run, shared
    assert together[0]["lm"]["ce_spliced"] != together[1]["lm"]["ce_spliced"]
    code, out, _ = run_cli(monkeypatch, capsys, "evaluate", "--sae", str(other), "--store", str(store),
                           "--lm-tokens", "100", "--json")
    assert json.loads(out) == together[1]  # the same figures as evaluated alone


def snapshot(folder) -> dict:
    return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()} | {
            str(path.relative_to(folder)): None for path in folder.rglob("*") if path.is_dir()}


def test_evaluate_leaves_a_read_only_sae_folder_unchanged(tiny_run, monkeypatch, capsys, tmp_path):
    store, trained, _ = tiny_run
    import shutil

    sae = tmp_path / "read-only-sae"
    shutil.copytree(trained, sae)
    before = snapshot(sae)
    for path in [sae, *sae.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        code, out, err = run_cli(monkeypatch, capsys, "evaluate", "--sae", str(sae), "--store", str(store),
                                 "--lm-tokens", "0", "--json")
    finally:
        for path in [sae, *sae.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert code == 0, err
    assert json.loads(out)["n_tokens"] > 0
    assert snapshot(sae) == before  # no eval/ folder, no file touched (root ignores the modes: compared anyway)
