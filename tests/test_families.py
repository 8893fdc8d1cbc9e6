"""Every model family (tests/families.py) through the whole pipeline, and padded FAST batches equal to each dialogue
run alone, sliding windows and soft-caps included."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from families import FAMILIES, FAMILY, build_family_model, build_family_tokenizer, save_family
from helpers import assert_one_line_error, run_cli

from instructsae.evaluate.splice import final_hidden
from instructsae.extract.instances import tokenize_dialogue
from instructsae.extract.rows import Message
from instructsae.extract.run import forward_group
from instructsae.lm.logits import head_mismatch
from instructsae.lm.models import decoder_layers, load_model
from instructsae.schemas import ExtractConfig

NAMES = [family.name for family in FAMILIES]
WINDOWED = [family.name for family in FAMILIES if "sliding_window" in family.config]
# the one family whose class has no SDPA path (its attention is soft-capped)
EAGER_ONLY = {"gemma2"}


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
    """name -> a saved tiny model of that family, built once per module on first use."""
    folders = {}

    def folder(name: str):
        if name not in folders:
            folders[name] = save_family(FAMILY[name], tmp_path_factory.mktemp(name) / name)
        return folders[name]

    return folder


def dialogue(i: int) -> list[Message]:
    return [Message("user", f"Tell me a story number {i} about a robot."),
            Message("assistant", "Once upon a time there was a small robot. " * (1 + i % 3))]


@pytest.mark.parametrize("name", NAMES)
def test_the_pipeline_runs_on_every_family(name, family_folder, dialogues_jsonl, tmp_path, monkeypatch, capsys):
    """extract FAST and BT (the model given by a path relative to the working directory), train, evaluate with
    the LM view, features and steer, the later steps from another directory."""
    folder = family_folder(name)
    fast, bt, run = tmp_path / "fast", tmp_path / "bt", tmp_path / "run"
    common = ["--dataset", str(dialogues_jsonl), "--layers", "0,1", "--chunk-tokens", "64", "--dtype", "float32",
              "--max-instances", "6"]
    monkeypatch.chdir(folder.parent)
    for out, mode in ((fast, ["--mode", "fast"]), (bt, ["--mode", "bt", "--block-len", "32"])):
        code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", folder.name, *common, *mode,
                               "--out", str(out))
        assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    code, out, _ = run_cli(monkeypatch, capsys, "inspect", str(bt), "--json")
    manifest = json.loads(out)["manifest"]
    assert manifest["identity"]["model"] == os.path.abspath(folder) and manifest["identity"]["model_sha256"]
    assert manifest["attn_implementation"] == ("eager" if name in EAGER_ONLY else "sdpa")
    assert json.loads(out)["counts"]["tokens"] > 0
    assert f"{manifest['attn_implementation']} attention" in run_cli(monkeypatch, capsys, "inspect", str(bt))[1]

    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", str(fast), "--layer", "0", "--sae", "standard",
                           "--out", str(run), "--expansion", "2", "--batch-size", "32", "--tokens", "640",
                           "--buffer-tokens", "128", "--lr", "3e-3", "--lr-warmup-steps", "2",
                           "--sparsity-warmup-steps", "4")
    assert code == 0, err

    code, out, err = run_cli(monkeypatch, capsys, "evaluate", "--sae", str(run), "--store", str(fast),
                             "--lm-tokens", "120", "--json")
    assert code == 0, err
    lm = json.loads(out)["lm"]
    assert lm["n_tokens"] > 0 and np.isfinite([lm["ce_clean"], lm["ce_spliced"], lm["ce_ablated"]]).all()
    assert lm["ce_spliced"] != lm["ce_clean"]  # the splice reached the model

    code, _, err = run_cli(monkeypatch, capsys, "features", "--sae", str(run), "--store", str(bt),
                           "--out", str(tmp_path / "features"), "--top", "3")
    assert code == 0, err
    features = json.loads((tmp_path / "features" / "features.json").read_text())
    assert len(features["features"] if isinstance(features, dict) else features) == 128

    steer = tmp_path / "steer.json"
    code, _, err = run_cli(monkeypatch, capsys, "steer", "--sae", str(run), "--feature", "0", "--alpha", "0,500",
                           "--prompt", "Tell me a story", "--max-new-tokens", "4", "--out", str(steer))
    assert code == 0, err
    generations = json.loads(steer.read_text())["generations"]
    assert [len(g["token_ids"]) > 0 for g in generations] == [True, True]


@pytest.mark.parametrize("name", NAMES)
def test_padded_batches_equal_each_dialogue_alone(name, family_folder):
    """FAST's right-padded batches (extract) and the LM view's give each dialogue exactly what it gets alone."""
    lm = load_model(str(family_folder(name)))
    group = [tokenize_dialogue(lm.tokenizer, dialogue(i), None, i) for i in range(4)]
    lengths = [len(instance.token_ids) for instance in group]
    assert len(set(lengths)) == 3  # so the batch really is padded
    cfg = ExtractConfig(out="unused", layers=(0, 1), dtype="float32", model_dtype="float32", device="cpu",
                        batch_tokens=4 * max(lengths))
    together = forward_group(lm, group, cfg)
    alone = forward_group(lm, group, cfg.model_copy(update={"batch_tokens": 1}))  # a batch of one each
    for layer in (0, 1):
        for padded_SD, single_SD in zip(together.acts[(layer, "resid_post")], alone.acts[(layer, "resid_post")]):
            torch.testing.assert_close(padded_SD, single_SD, rtol=1e-5, atol=1e-5 * single_SD.abs().max().item())

    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids_BS = torch.full((len(group), max(lengths)), pad)
    for row, instance in enumerate(group):
        ids_BS[row, :lengths[row]] = torch.from_numpy(instance.token_ids.astype(np.int64))
    spliced_BSD = final_hidden(lm.model, 0, ids_BS, 1, lambda x_ND: 0.5 * x_ND)
    for row, instance in enumerate(group):
        single_1SD = final_hidden(lm.model, 0, ids_BS[row:row + 1, :lengths[row]], 1, lambda x_ND: 0.5 * x_ND)
        torch.testing.assert_close(spliced_BSD[row, :lengths[row]], single_1SD[0], rtol=1e-5,
                                   atol=1e-5 * single_1SD.abs().max().item())


@pytest.mark.parametrize("name", WINDOWED)
def test_the_sliding_window_bites_inside_the_test_dialogues(name, family_folder):
    """Otherwise the padding test above would not test the window: widening it changes the late tokens."""
    lm = load_model(str(family_folder(name)))
    ids_1S = torch.from_numpy(tokenize_dialogue(lm.tokenizer, dialogue(1), None).token_ids.astype(np.int64))[None]
    windowed_SD = lm.model(ids_1S, output_hidden_states=True).hidden_states[-1][0]
    lm.model.config.sliding_window = 10_000
    try:
        full_SD = lm.model(ids_1S, output_hidden_states=True).hidden_states[-1][0]
    finally:
        lm.model.config.sliding_window = FAMILY[name].config["sliding_window"]
    window = FAMILY[name].config["sliding_window"]
    torch.testing.assert_close(windowed_SD[:window], full_SD[:window])  # within the window: the same
    assert not torch.allclose(windowed_SD[window + 1:], full_SD[window + 1:], rtol=1e-3, atol=1e-3)


def test_gemma2s_soft_caps_bite():
    """Otherwise the tests would not test them: without the caps the same weights give other hidden states and
    logits (raw logits reach past the final cap of 3)."""
    family = FAMILY["gemma2"]
    tokenizer = build_family_tokenizer(family)
    uncapped = dataclasses.replace(family, config={**family.config, "attn_logit_softcapping": None,
                                                   "final_logit_softcapping": None})
    ids_1S = torch.from_numpy(tokenize_dialogue(tokenizer, dialogue(2), None).token_ids.astype(np.int64))[None]
    with torch.no_grad():
        capped, plain = (build_family_model(variant, tokenizer)(ids_1S, output_hidden_states=True)
                         for variant in (family, uncapped))
    assert not torch.allclose(capped.hidden_states[-1], plain.hidden_states[-1], atol=0.05)
    assert plain.logits.abs().max() > 3 > capped.logits.abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_the_lm_view_reproduces_each_familys_logits(name, family_folder):
    """Gemma 2's final soft-cap (set low enough to bite) included; the layer stack is found for every family."""
    lm = load_model(str(family_folder(name)))
    assert len(decoder_layers(lm.model)) == lm.n_layers == 2
    ids_1S = torch.from_numpy(tokenize_dialogue(lm.tokenizer, dialogue(0), None).token_ids.astype(np.int64))[None]
    assert head_mismatch(lm.model, ids_1S) < 1e-5


def test_the_attention_implementation_can_be_forced(family_folder):
    auto, eager = load_model(str(family_folder("llama3"))), load_model(str(family_folder("llama3")),
                                                                         attn_implementation="eager")
    assert (auto.attn_implementation, eager.attn_implementation) == ("sdpa", "eager")
    ids_1S = torch.arange(3, 40)[None]
    torch.testing.assert_close(auto.model(ids_1S).logits, eager.model(ids_1S).logits, rtol=1e-4, atol=1e-4)


def test_sdpa_forced_on_gemma2_is_one_clear_error(family_folder, dialogues_jsonl, tmp_path, monkeypatch, capsys):
    out = tmp_path / "store"
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", str(family_folder("gemma2")), "--dataset",
                           str(dialogues_jsonl), "--layers", "0", "--attn-implementation", "sdpa", "--out", str(out))
    assert_one_line_error(code, err, "cannot load model", "Gemma2ForCausalLM")
    assert not out.exists()


@pytest.mark.parametrize("name, refuses", [("gemma2", True), ("mistral", True), ("gemma3", False)])
def test_templates_without_a_system_role_behave_like_the_real_ones(name, refuses):
    """Gemma 2's and Mistral's refuse a system message; Gemma 3's folds it into the first user turn."""
    tokenizer = build_family_tokenizer(FAMILY[name])
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    if refuses:
        with pytest.raises(Exception, match="role"):
            tokenizer.apply_chat_template(chat, tokenize=False)
    else:
        assert "<start_of_turn>user\nBe brief.\n\nHi" in tokenizer.apply_chat_template(chat, tokenize=False)


@pytest.mark.parametrize("config_class, stack", [("GPT2Config", "transformer.h"),
                                                 ("OPTConfig", "model.decoder.layers")])
def test_the_layer_stack_is_found_outside_the_llama_layout(config_class, stack):
    import transformers

    config = getattr(transformers, config_class)(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                                 num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert decoder_layers(model) is model.get_submodule(stack)
