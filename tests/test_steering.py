"""`instructsae steer` on the tiny model: α = 0 is the plain model, α shifts the layer output by exactly α·u."""

import json

import pytest
import torch
from helpers import assert_one_line_error, run_cli

from instructsae.errors import UserError
from instructsae.evaluate.steering import (
    greedy_generate, prompt_ids, residual_added, side_by_side, steering_direction,
)
from instructsae.lm.models import decoder_layers, load_model
from instructsae.schemas import StandardConfig
from instructsae.sae.export import save_sae
from instructsae.sae import build_sae

LAYER = 1
PROMPT = "Tell me a story about a robot."


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture
def sae_dir(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    sae = build_sae(StandardConfig(expansion=2), d_in=64)
    folder = tmp_path / "sae"
    # input_scale 0.1 would make the saved decoder rows norm 10: the export folds it into the latents
    save_sae(folder, sae, input_scale=0.1, metadata={"layer": LAYER, "model": str(tiny_model_dir)})
    return folder


def layer_output(loaded, input_ids_1S) -> torch.Tensor:
    """[1, seq, d_model] output of decoder layer LAYER, read by a second hook registered after the steering one."""
    captured = {}
    handle = decoder_layers(loaded.model)[LAYER].register_forward_hook(
        lambda _m, _i, out: captured.setdefault("h", (out[0] if isinstance(out, tuple) else out).clone()))
    try:
        with torch.no_grad():
            loaded.model(input_ids=input_ids_1S)
    finally:
        handle.remove()
    return captured["h"]


def test_direction_is_the_unit_norm_decoder_row():
    W_dec_FD = torch.randn(8, 5) * 30
    direction_D = steering_direction(W_dec_FD, 3)
    torch.testing.assert_close(direction_D.norm(), torch.tensor(1.0))
    torch.testing.assert_close(direction_D * W_dec_FD[3].norm(), W_dec_FD[3])
    with pytest.raises(UserError, match="feature 8 is out of range"):
        steering_direction(W_dec_FD, 8)


def test_steering_shifts_the_layer_output_by_alpha_times_direction(loaded):
    input_ids_1S = prompt_ids(loaded.tokenizer, PROMPT, chat=True)
    direction_D = steering_direction(torch.randn(4, 64), 2)
    clean_1SD = layer_output(loaded, input_ids_1S)
    with residual_added(loaded.model, LAYER, 50.0 * direction_D):
        steered_1SD = layer_output(loaded, input_ids_1S)
    assert not torch.equal(steered_1SD, clean_1SD)
    expected_1SD = (clean_1SD + 50.0 * direction_D).expand_as(steered_1SD)
    torch.testing.assert_close(steered_1SD, expected_1SD, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer_output(loaded, input_ids_1S), clean_1SD, rtol=0, atol=0)  # hook removed


def test_steer_cli_zero_alpha_is_the_plain_model_and_large_alpha_changes_it(
        sae_dir, loaded, tmp_path, monkeypatch, capsys):
    out = tmp_path / "steer.json"
    code, stdout, err = run_cli(monkeypatch, capsys, "steer", "--sae", str(sae_dir), "--feature", "5",
                                "--alpha", "0,1e4", "--prompt", PROMPT, "--max-new-tokens", "12", "--out", str(out))
    assert code == 0, err
    result = json.loads(out.read_text())
    assert [g["alpha"] for g in result["generations"]] == [0.0, 1e4]
    assert (result["layer"], result["feature"], result["chat"]) == (LAYER, 5, True)
    assert result["decoder_row_norm"] == pytest.approx(1.0, rel=1e-5)  # exported rows are unit norm
    plain_ids = greedy_generate(loaded, prompt_ids(loaded.tokenizer, PROMPT, chat=True), 12)
    assert result["generations"][0]["token_ids"] == plain_ids
    assert result["generations"][1]["token_ids"] != plain_ids
    assert "α = 0" in stdout and "α = 10000" in stdout
    assert not list(tmp_path.glob("*.partial"))


def test_no_chat_steers_the_raw_text(sae_dir, loaded, tmp_path, monkeypatch, capsys):
    out = tmp_path / "raw.json"
    code, _, err = run_cli(monkeypatch, capsys, "steer", "--sae", str(sae_dir), "--feature", "0", "--alpha", "0",
                           "--prompt", PROMPT, "--max-new-tokens", "6", "--no-chat", "--out", str(out))
    assert code == 0, err
    raw_ids = greedy_generate(loaded, loaded.tokenizer(PROMPT, return_tensors="pt").input_ids, 6)
    assert json.loads(out.read_text())["generations"][0]["token_ids"] == raw_ids


def test_side_by_side_puts_each_alpha_in_its_own_column():
    generations = [{"alpha": a, "text": f"answer for {a} " * 5} for a in (0, 15, 25, 50)]
    text = side_by_side(generations, width=80, max_columns=3)
    first_block, second_block = text.split("\n\n")
    assert first_block.splitlines()[0].split(" | ") == ["α = 0".ljust(24), "α = 15".ljust(24), "α = 25"]
    assert second_block.startswith("α = 50")
    assert all(len(line) <= 80 for line in text.splitlines())


@pytest.mark.parametrize("args, expected", [
    (["--feature", "128"], ["feature 128 is out of range", "128 features"]),
    (["--feature", "1", "--alpha", "0,lots"], ["invalid alpha"]),
    (["--feature", "1", "--alpha", ","], ["alpha", "at least one"]),
])
def test_bad_feature_or_alpha_is_one_line(sae_dir, args, expected, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "steer", "--sae", str(sae_dir), "--prompt", PROMPT, *args)
    assert_one_line_error(code, err, *expected)


def test_missing_sae_folder_is_one_line(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "steer", "--sae", str(tmp_path / "nope"), "--feature", "0",
                           "--prompt", PROMPT)
    assert_one_line_error(code, err, "not an SAE folder", "nope")


def test_model_without_the_layer_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "deep"
    save_sae(folder, build_sae(StandardConfig(expansion=2), d_in=64), input_scale=1.0,
             metadata={"layer": 7, "model": str(tiny_model_dir)})
    code, _, err = run_cli(monkeypatch, capsys, "steer", "--sae", str(folder), "--feature", "0", "--prompt", PROMPT,
                           "--out", str(tmp_path / "x.json"))
    assert_one_line_error(code, err, "layer 7", "layers 0..1")
    assert not (tmp_path / "x.json").exists()


def test_greedy_ignores_the_checkpoints_own_penalties(loaded):
    """The argmax at every step, whatever repetition penalty or n-gram blocking generation_config asks for."""
    input_ids_1S = prompt_ids(loaded.tokenizer, PROMPT, chat=True)
    expected, ids_1S = [], input_ids_1S
    with torch.no_grad():
        for _ in range(10):
            next_id = int(loaded.model(input_ids=ids_1S).logits[0, -1].argmax())
            expected.append(next_id)
            if next_id == loaded.tokenizer.eos_token_id:
                break
            ids_1S = torch.cat([ids_1S, torch.tensor([[next_id]])], dim=1)
    config = loaded.model.generation_config
    saved = config.repetition_penalty, config.no_repeat_ngram_size
    config.repetition_penalty, config.no_repeat_ngram_size = 5.0, 1
    try:
        assert greedy_generate(loaded, input_ids_1S, 10) == expected
    finally:
        config.repetition_penalty, config.no_repeat_ngram_size = saved


def test_an_out_that_is_a_folder_is_refused_before_generating(sae_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("instructsae.evaluate.steering.load_model", lambda *a, **k: pytest.fail("model loaded"))
    code, _, err = run_cli(monkeypatch, capsys, "steer", "--sae", str(sae_dir), "--feature", "0", "--prompt",
                           PROMPT, "--out", str(tmp_path))
    assert_one_line_error(code, err, "is a folder")
