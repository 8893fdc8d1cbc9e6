"""Logits from last hidden states, as the model's own head computes them, a few hundred rows at a time.

The LM view computes logits in slices (a full [batch, seq, vocab] tensor would not fit at a 256k vocabulary), so it
applies the output embedding itself, and with it what some families do after it, read from their configs:
Gemma 2/3's final soft-cap, Cohere's logit scale, Granite's logit divisor. A family doing something else is caught
by `head_mismatch`, which compares against the model's own forward pass once, rather than measured wrongly.
"""

import torch


@torch.no_grad()
def logits_from_hidden(model: torch.nn.Module, hidden_ND: torch.Tensor) -> torch.Tensor:
    """[N, vocab] float32 logits of last hidden states (after the final norm)."""
    config = model.config.get_text_config()
    logits_NV = model.get_output_embeddings()(hidden_ND).float()
    scale = getattr(config, "logit_scale", None)  # Cohere multiplies
    if isinstance(scale, (int, float)) and scale != 1:
        logits_NV = logits_NV * scale
    divisor = getattr(config, "logits_scaling", None)  # Granite divides
    if isinstance(divisor, (int, float)) and divisor != 1:
        logits_NV = logits_NV / divisor
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 and 3 squash into (-cap, cap)
    if cap:
        logits_NV = cap * torch.tanh(logits_NV / cap)
    return logits_NV


@torch.no_grad()
def head_mismatch(model: torch.nn.Module, input_ids_1S: torch.Tensor) -> float:
    """The largest gap between `logits_from_hidden` and the model's own logits on one sequence, relative to the
    logits' spread: about 1e-6 where this module reproduces the model's head."""
    own_SV = model(input_ids=input_ids_1S, use_cache=False).logits[0].float()
    hidden_SD = model.base_model(input_ids=input_ids_1S, use_cache=False).last_hidden_state[0]
    ours_SV = logits_from_hidden(model, hidden_SD)
    return float((ours_SV - own_SV).abs().max() / own_SV.std().clamp_min(1e-12))
