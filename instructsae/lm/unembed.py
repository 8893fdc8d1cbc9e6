"""Logit effects of directions in the residual stream: the tokens a direction promotes and suppresses through the
model's final norm and unembedding, as SAEDashboard and Neuronpedia show them for a feature's decoder row.

The path is direct (the layers above the SAE's are skipped) and linearised: the final norm divides the residual by
its own RMS, a positive number the same for every vocabulary entry, so it is left out (as if the residual's RMS
were 1, which is what TransformerLens's fold_ln assumes too); what stays is the norm's per-dimension gain, and for
a LayerNorm the mean-centring. A norm's bias (and the LM head's) adds the same logits whatever the direction, so
it is no part of a direction's effect. The gain is read off the norm module by probing it, not from a parameter
name, so RMSNorm (weight), Gemma's RMSNorm (1 + weight) and LayerNorm (weight, centring) are all handled alike.
"""

from dataclasses import dataclass

import torch

from instructsae.lm.models import decoder_layers

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm")
LOGIT_BUDGET = 1 << 24  # logits per matmul block (64 MB of float32), whatever the vocabulary size


@dataclass
class LogitEffects:
    """Per direction, the `top` most promoted and most suppressed token ids and their logit changes."""

    promoted_ids_FK: torch.Tensor
    promoted_FK: torch.Tensor
    suppressed_ids_FK: torch.Tensor
    suppressed_FK: torch.Tensor
    final_norm: str | None  # the module's class name, None when the model has no final norm


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm between the last decoder layer and the LM head (a sibling of the decoder layers)."""
    base = getattr(model, "base_model", model)
    decoder_layers(model)  # the same model shapes the rest of the code accepts, else its one-line error
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


@torch.no_grad()
def norm_gain(norm: torch.nn.Module | None, d_model: int) -> tuple[torch.Tensor, bool]:
    """(gain_D, centres): the norm acts on a zero-mean, unit-RMS vector v as v * gain_D (+ a constant), and
    subtracts the mean first when `centres`. Probed with two zero-mean ±1 patterns that together cover every
    dimension (an odd d_model leaves one zero in each)."""
    if norm is None:
        return torch.ones(d_model), False
    weight = next(norm.parameters(), torch.empty(0))
    dtype, device = (weight.dtype, weight.device) if weight.numel() else (torch.float32, "cpu")

    def apply(x_D: torch.Tensor) -> torch.Tensor:
        return norm(x_D.to(dtype=dtype, device=device)[None, None]).flatten().double().cpu()

    zero = apply(torch.zeros(d_model))
    # a constant vector: a centring norm maps it to its image of 0 (its bias); RMSNorm to its gain
    centres = d_model > 1 and bool((apply(torch.ones(d_model)) - zero).abs().max() < 1e-6)
    gain_D = torch.zeros(d_model, dtype=torch.float64)
    alternating_D = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(d_model)], dtype=torch.float64)
    if d_model % 2:
        alternating_D[-1] = 0.0
    for probe_D in (alternating_D, alternating_D.roll(1)):
        probe_D = probe_D / probe_D.pow(2).mean().sqrt()
        seen = probe_D != 0
        gain_D[seen] = (apply(probe_D) - zero)[seen] / probe_D[seen]
    return gain_D.float(), centres


@torch.no_grad()
def logit_effects(directions_FD: torch.Tensor, model: torch.nn.Module, top: int) -> LogitEffects:
    """The `top` largest and smallest entries of (centre(d) * gain) @ W_U^T for every direction d, in blocks of
    directions so that a 256k vocabulary never needs F x V floats at once."""
    norm = final_norm(model)
    W_U_VD = model.get_output_embeddings().weight
    gain_D, centres = norm_gain(norm, directions_FD.shape[1])
    device, dtype = W_U_VD.device, torch.float32
    W_U_VD = W_U_VD.to(dtype)
    top = min(top, W_U_VD.shape[0])
    block = max(1, LOGIT_BUDGET // W_U_VD.shape[0])
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, len(directions_FD), block):
        d_BD = directions_FD[start:start + block].to(device=device, dtype=dtype)
        if centres:
            d_BD = d_BD - d_BD.mean(dim=1, keepdim=True)
        logits_BV = (d_BD * gain_D.to(device)) @ W_U_VD.T
        promoted = logits_BV.topk(top, dim=1)
        suppressed = logits_BV.topk(top, dim=1, largest=False)
        parts.append((promoted.indices, promoted.values, suppressed.indices, suppressed.values))
    if not parts:
        empty_ids, empty = torch.zeros(0, top, dtype=torch.int64), torch.zeros(0, top)
        return LogitEffects(empty_ids, empty, empty_ids, empty, None if norm is None else type(norm).__name__)
    columns = [torch.cat([part[i] for part in parts]).cpu() for i in range(4)]
    return LogitEffects(*columns, final_norm=None if norm is None else type(norm).__name__)
