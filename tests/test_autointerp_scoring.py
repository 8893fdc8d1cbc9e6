"""The pieces of delphi-style scoring: marks, samples, label parsing, balanced accuracy, quantile draws; and the
contexts read from a real store through a trained SAE, checked against a direct computation."""

import json
import random

import numpy as np
import pytest
import torch
from helpers import NUMBERED_STORIES, run_cli, write_dialogues
from test_autointerp import serving, url

from instructsae.evaluate.context_sampler import firing_sample, quantile_picks
from instructsae.evaluate.scorers import (balanced_accuracy, firing_tokens, fuzzing_samples, marked_text,
                                          parse_labels)
from instructsae.extract.run import run_extract
from instructsae.schemas import ExtractConfig, OptimConfig, StandardConfig, TrainConfig
from instructsae.sae.export import load_sae
from instructsae.store.reader import open_complete_store
from instructsae.train.run import run_training


def test_runs_of_marked_tokens_share_one_mark_and_newlines_stay_on_the_line():
    tokens = ["A", " big", " red", "\n", "dog"]
    assert marked_text(tokens, [1, 2, 4]) == "A« big red»\\n«dog»"
    assert marked_text(tokens, []) == "A big red\\ndog"


def test_firing_tokens_are_those_at_or_above_the_share_of_the_peak():
    context = {"tokens": list("abcde"), "acts": [0.0, 1.0, 3.0, 0.9, 0.0], "focus": 2}
    assert firing_tokens(context, 0.3) == [1, 2, 3] and firing_tokens(context, 0.5) == [2]
    assert firing_tokens({"tokens": list("abc"), "focus": 1}, 0.3) == [1], "no per-token acts: the focus"


def test_fuzzing_marks_right_tokens_once_and_as_many_wrong_ones_once():
    contexts = [{"tokens": list("abcdefgh"), "acts": [0, 2.0, 1.0, 0, 0, 0, 0.1, 0], "focus": 1, "instance": i,
                 "position": 5} for i in range(20)]
    contexts.append({"tokens": list("ab"), "acts": [1.0, 1.0], "focus": 0, "instance": 99, "position": 0})
    samples = fuzzing_samples(contexts, 0.3, random.Random(0))
    right = [s for s in samples if s["truth"]]
    wrong = [s for s in samples if not s["truth"]]
    assert len(right) == 21 and len(wrong) == 20, "a context that fires everywhere has nothing to mark wrongly"
    assert all(s["marked"] == [1, 2] for s in right[:20]) and right[20]["marked"] == [0, 1]
    assert all(len(s["marked"]) == 2 and not {1, 2} & set(s["marked"]) for s in wrong)
    assert len({tuple(s["marked"]) for s in wrong}) > 1, "the wrong marks are drawn at random"


def test_labels_are_read_from_the_last_list_of_the_right_length():
    assert parse_labels("[1,0,1]", 3) == [True, False, True]
    assert parse_labels("Example format [1,0]. Answer: [0, 1, '1']", 3) == [False, True, True]
    assert parse_labels("[1,0]", 3) is None and parse_labels("[1,2,0]", 3) is None and parse_labels("yes", 1) is None


def test_balanced_accuracy_is_the_mean_of_the_two_rates_over_answered_examples():
    truth = [True] * 4 + [False] * 6
    prediction = [True, True, True, False] + [False, False, True, None, None, False]
    result = balanced_accuracy([{"truth": t, "prediction": p} for t, p in zip(truth, prediction)])
    assert result["true_positive_rate"] == 0.75 and result["true_negative_rate"] == 0.75
    assert result["balanced_accuracy"] == 0.75
    assert (result["n_positive"], result["n_negative"], result["n_unanswered"]) == (4, 4, 2)
    # the class mix does not move it: always answering 1 is chance whatever the shares
    assert balanced_accuracy([{"truth": t, "prediction": True} for t in truth])["balanced_accuracy"] == 0.5
    assert balanced_accuracy([{"truth": True, "prediction": True}])["balanced_accuracy"] is None


def test_quantile_draws_take_one_per_bin_in_turn():
    acts = np.arange(100, dtype=float)[::-1].copy()  # any order in, bins by value
    where = [(i, 0) for i in range(100)]  # one instance each: no two overlap
    picks = quantile_picks(acts, where, 5, set(), 3, 100, np.random.default_rng(0))
    assert len(picks) == 100 and sorted(i for i, _ in picks) == list(range(100))
    for start in range(0, 100, 5):
        chunk = picks[start:start + 5]
        assert [q for _, q in chunk] == [1, 2, 3, 4, 5]
        assert all(20 * (q - 1) <= acts[i] < 20 * q for i, q in chunk), "bin q holds the q-th fifth by value"


def test_picked_windows_do_not_overlap_each_other_or_those_taken():
    acts = np.arange(8.0)
    where = [(0, 10), (0, 12), (1, 10), (5, 0), (0, 14), (2, 50), (3, 0), (4, 4)]  # bins: first four, last four
    for seed in range(10):
        picks = quantile_picks(acts, where, 2, {(1, 16)}, 3, 10, np.random.default_rng(seed))
        chosen = [where[i] for i, _ in picks]
        assert (1, 10) not in chosen, "within 2 x 3 tokens of a taken one"
        assert sum(place in chosen for place in [(0, 10), (0, 12), (0, 14)]) == 1, "these three overlap"
        assert {(5, 0), (2, 50), (3, 0), (4, 4)} <= set(chosen) and len(chosen) == 5
        bins = [q for _, q in picks]
        assert bins[:2] == [1, 2] and all(q == (1 if acts[i] < 4 else 2) for i, q in picks)
    assert len(quantile_picks(acts, where, 2, set(), 3, 2, np.random.default_rng(0))) == 2, "at most n"


# --- contexts read from a store through a trained SAE ---------------------------------------------------------

@pytest.fixture(scope="module")
def features_on_store(tiny_model_dir, tmp_path_factory):
    """A FAST store of 12 tiny-model dialogues, a Standard SAE trained a few steps on it, and its features.json."""
    folder = tmp_path_factory.mktemp("scoring")
    write_dialogues(folder / "dialogues.jsonl", **NUMBERED_STORIES)
    store, sae, features = folder / "store", folder / "sae", folder / "features"
    run_extract(ExtractConfig(model=str(tiny_model_dir), dataset=str(folder / "dialogues.jsonl"), layers=(1,),
                              out=str(store), chunk_tokens=64, dtype="float32"), show_progress=False)
    optim = OptimConfig(lr=3e-3, lr_warmup_steps=5, sparsity_warmup_steps=20)
    run_training(TrainConfig(store=str(store), out=str(sae), sae=StandardConfig(expansion=2), optim=optim,
                             batch_size=32, tokens=1500, buffer_tokens=256, geometric_median_tokens=64))
    with pytest.MonkeyPatch.context() as monkeypatch:
        from instructsae.cli import main
        monkeypatch.setattr("sys.argv", ["instructsae", "features", "--sae", str(sae), "--store", str(store),
                                         "--out", str(features), "--top", "4", "--context", "3"])
        main()
    return store, sae, features


def direct_latents(store, sae_dir) -> torch.Tensor:
    sae, _ = load_sae(sae_dir)
    reader = open_complete_store(store)
    with torch.no_grad():
        return sae.encode(reader.read_acts(1, 0, reader.n_tokens))


def test_a_reservoir_as_large_as_the_store_holds_every_firing_row(features_on_store):
    store, sae_dir, _ = features_on_store
    sae, _ = load_sae(sae_dir)
    reader = open_complete_store(store)
    latents_NF = direct_latents(store, sae_dir)
    ids = np.array([f for f in range(sae.d_sae) if (latents_NF[:, f] > 0).sum() > 3][:6])
    rows_KS, acts_KS = firing_sample(sae, reader, 1, ids, reader.n_tokens, reader.n_tokens, seed=0)
    small_rows_KS, _ = firing_sample(sae, reader, 1, ids, 3, reader.n_tokens, seed=0)
    for k, f in enumerate(ids):
        firing = torch.nonzero(latents_NF[:, f] > 0).flatten().numpy()
        kept = rows_KS[k][rows_KS[k] >= 0]
        assert sorted(kept.tolist()) == firing.tolist()
        assert np.allclose(acts_KS[k][rows_KS[k] >= 0], latents_NF[kept, f].numpy(), atol=1e-5)
        assert len(set(small_rows_KS[k].tolist())) == 3 and set(small_rows_KS[k].tolist()) <= set(firing.tolist())


def test_scored_contexts_match_a_direct_computation(features_on_store, monkeypatch, capsys):
    store, sae_dir, features = features_on_store
    monkeypatch.setattr("instructsae.evaluate.chat_client.BACKOFF_S", 0.001)
    out = features / "scored.json"
    with serving("yes") as server:  # answers 1 for every example: balanced accuracy exactly 0.5
        code, stdout, err = run_cli(monkeypatch, capsys, "autointerp", "--features", str(features),
                                    "--endpoint", url(server), "--model", "judge", "--n-features", "5",
                                    "--n-test", "6", "--explain-sampled", "4", "--n-quantiles", "2",
                                    "--context", "3", "--out", str(out))
    assert code == 0, err
    report = json.loads(out.read_text())
    reader = open_complete_store(store)
    latents_NF = direct_latents(store, sae_dir).numpy()
    row_of = {(i, p): r for r, (i, p) in enumerate(zip(reader.read_column("instance").tolist(),
                                                       reader.read_column("position").tolist()))}
    starts, lengths = reader.read_column("instance_start"), reader.read_column("instance_length")
    for feature in report["features"]:
        f = feature["id"]

        def window(sample):  # the feature's activations over the sample's window, computed directly
            row = row_of[(sample["instance"], sample["position"])]
            first, end = starts[sample["instance"]], starts[sample["instance"]] + lengths[sample["instance"]]
            return latents_NF[max(row - 3, first):min(row + 4, end), f], row - max(row - 3, first)

        for sample in feature["detection"]["samples"]:
            acts, focus = window(sample)
            assert (acts[focus] > 0 if sample["truth"] else acts.max() <= 0), (f, sample)
            assert sample["truth"] == ("quantile" in sample) and sample.get("quantile", 1) in (1, 2)
        for sample in feature["fuzzing"]["samples"]:
            acts, _ = window(sample)
            firing = [i for i, a in enumerate(acts) if a > 0 and a >= 0.3 * acts.max() - 1e-6]
            if sample["truth"]:
                assert sample["marked"] == firing, (f, sample)
            else:
                assert len(sample["marked"]) == len(firing) and not set(sample["marked"]) & set(firing)
        for scorer in ("detection", "fuzzing"):
            result = feature[scorer]
            if result["n_positive"] and result["n_negative"]:
                assert result["balanced_accuracy"] == 0.5 and result["true_positive_rate"] == 1.0
        assert feature["detection"]["n_positive"] <= 6 and feature["detection"]["n_negative"] <= 6
    assert any(f["detection"]["balanced_accuracy"] == 0.5 for f in report["features"])
    assert "detection: mean balanced accuracy 0.500" in stdout


def test_the_same_seed_draws_the_same_contexts(features_on_store, tiny_tokenizer):
    from instructsae.evaluate.context_sampler import sample_contexts

    store, sae_dir, _ = features_on_store
    sae, _ = load_sae(sae_dir)
    reader = open_complete_store(store)
    latents_NF = direct_latents(store, sae_dir)
    ids = [f for f in range(sae.d_sae) if (latents_NF[:, f] > 0).sum() > 3][:4]

    def draw(seed):
        return sample_contexts(sae, reader, 1, tiny_tokenizer, ids, 6, 4, 2, 2, None, seed, [set() for _ in ids])

    first = draw(0)
    assert first == draw(0) and first != draw(1)
    for feature in first:
        assert feature["activating"] and all(c["activation"] > 0 for c in feature["activating"])
        assert all(max(c["acts"]) <= 0 for c in feature["non_activating"])


def test_backoff_doubles_with_jitter_and_follows_retry_after_within_the_cap():
    from instructsae.evaluate.chat_client import BACKOFF_S, MAX_BACKOFF_S, backoff_s

    for attempt in range(4):
        waits = [backoff_s(attempt) for _ in range(50)]
        assert all(BACKOFF_S * 2 ** attempt <= w <= 1.5 * BACKOFF_S * 2 ** attempt for w in waits)
        assert len(set(waits)) > 1, "jittered"
    assert backoff_s(20) == MAX_BACKOFF_S
    assert backoff_s(0, "3") == 3 and backoff_s(0, "3600") == MAX_BACKOFF_S
    assert BACKOFF_S <= backoff_s(0, "Wed, 21 Oct 2015 07:28:00 GMT") <= 1.5 * BACKOFF_S, "a date: our own wait"


def test_the_explainer_marks_every_firing_token_of_contexts_that_carry_per_token_acts():
    from instructsae.evaluate.scorers import explainer_prompt

    top = [{"tokens": ["a", " robot", " and", " robots"], "acts": [0, 4.0, 0.5, 2.0], "focus": 1, "activation": 4.0},
           {"tokens": ["the", " dog"], "focus": 1, "activation": 3.0}]  # no per-token acts: its focus
    sampled = [{"tokens": ["x", " bot", "y"], "acts": [0, 0.2, 0], "focus": 1, "activation": 0.2}]
    prompt = explainer_prompt(top, sampled, 0.3)
    assert "Activation: 4 | Context: a« robot» and« robots»" in prompt
    assert "Activation: 3 | Context: the« dog»" in prompt
    assert prompt.index("Its strongest contexts:") < prompt.index("the« dog»") < prompt.index("x« bot»y")
