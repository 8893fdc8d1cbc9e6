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

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm")
LOGIT_BUDGET = 1 << 24  # logits per matmul block (64 MB of float32), whatever the vocabulary size
HISTOGRAM_BINS = 40


@dataclass
class LogitEffects:
    """Per direction, the `top` most promoted and most suppressed token ids and their logit changes."""

    promoted_ids_FK: torch.Tensor
    promoted_FK: torch.Tensor
    suppressed_ids_FK: torch.Tensor
    suppressed_FK: torch.Tensor
    # each direction's logit effects over the whole vocabulary: counts in equal bins from low_F, width_F each
    hist_counts_FN: torch.Tensor
    hist_low_F: torch.Tensor
    hist_width_F: torch.Tensor
    final_norm: str | None  # the module's class name, None when the model has no final norm


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm between the last decoder layer and the LM head: beside the decoder layers, in the decoder
    (transformers' `get_decoder()`: `model.norm` in Llama, Gemma, Qwen; `model.decoder.final_layer_norm` in OPT) or
    in the base model (`transformer.ln_f` in GPT-2)."""
    roots = [model.get_decoder()] if hasattr(model, "get_decoder") else []
    roots += [getattr(model, "base_model", model), model]
    for root in roots:
        for name in FINAL_NORM_NAMES:
            module = getattr(root, name, None)
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


def row_histograms(x_BV: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts_BN, low_B, width_B): each row's values in n_bins equal bins from its minimum to its maximum."""
    low_B, high_B = x_BV.min(dim=1).values, x_BV.max(dim=1).values
    width_B = ((high_B - low_B) / n_bins).clamp_min(torch.finfo(x_BV.dtype).tiny)
    bin_BV = ((x_BV - low_B[:, None]) / width_B[:, None]).long().clamp(0, n_bins - 1)
    counts_BN = torch.zeros(len(x_BV), n_bins, dtype=torch.int64).scatter_add_(1, bin_BV, torch.ones_like(bin_BV))
    return counts_BN, low_B, width_B


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
        parts.append((promoted.indices, promoted.values, suppressed.indices, suppressed.values,
                      *row_histograms(logits_BV.cpu(), HISTOGRAM_BINS)))
    norm_name = None if norm is None else type(norm).__name__
    if not parts:
        ids, values = torch.zeros(0, top, dtype=torch.int64), torch.zeros(0, top)
        return LogitEffects(ids, values, ids, values, torch.zeros(0, HISTOGRAM_BINS, dtype=torch.int64),
                            torch.zeros(0), torch.zeros(0), norm_name)
    return LogitEffects(*(torch.cat([part[i] for part in parts]).cpu() for i in range(7)), final_norm=norm_name)
