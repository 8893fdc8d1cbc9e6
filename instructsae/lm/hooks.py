"""Capture the residual stream after chosen decoder layers, running the model no further than needed."""

import torch

from instructsae.lm.models import decoder_layers


class _StopForward(Exception):
    """Raised by the deepest hook: the layers above it and the LM head are never computed."""


@torch.no_grad()
def residuals_at_layers(
    model: torch.nn.Module, layers: tuple[int, ...], input_ids_BS: torch.Tensor,
    attention_mask_BS: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """{layer: [batch, seq, d_model]} outputs of those decoder layers (resid_post), in the model's dtype."""
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)
    modules = decoder_layers(model)

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[layer] = hidden.detach()
            if layer == deepest:
                raise _StopForward
            # returning None keeps the layer's output unchanged

        return hook

    handles = [modules[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        model.base_model(input_ids=input_ids_BS, attention_mask=attention_mask_BS, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured
