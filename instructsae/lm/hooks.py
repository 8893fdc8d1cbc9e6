"""Capture activations at chosen (layer, site)s, running the model no further than needed.

Sites are found the same way in every family: a decoder layer's input and output (resid_pre, resid_post), its
attention module's output (attn_out: `self_attn`, GPT-2's `attn`) and its `mlp` module's input and output
(mlp_in: after the norm that feeds it, mlp_out: before any norm after it), whatever the layer's class is called.
"""

import torch

from instructsae.errors import UserError
from instructsae.lm.models import decoder_layers

# the module of each site, by the names families give it (self_attn: Llama, Qwen, Gemma, ...; attn: GPT-2)
SITE_MODULES = {"attn_out": ("self_attn", "attn", "self_attention"), "mlp_in": ("mlp",), "mlp_out": ("mlp",)}


class _StopForward(Exception):
    """Raised once the deepest layer is done: the layers above it and the LM head are never computed."""


def _first_tensor(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def site_module(layer_module: torch.nn.Module, site: str) -> torch.nn.Module:
    """The module whose input or output is `site` within one decoder layer (the layer itself for resid_*)."""
    names = SITE_MODULES.get(site)
    if names is None:
        return layer_module
    for name in names:
        module = getattr(layer_module, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise UserError(f"{type(layer_module).__name__} has no `{names[0]}` module: site {site} cannot be read")


def _register(module: torch.nn.Module, site: str, keep) -> torch.utils.hooks.RemovableHandle:
    """A hook handing `keep` the site's tensor: a module's input (pre-hook) or its output."""
    if site in ("resid_pre", "mlp_in"):
        def pre_hook(_module, args, kwargs):
            keep(args[0] if args else kwargs["hidden_states"])

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_module, _inputs, output):
        keep(_first_tensor(output))  # returning None keeps the module's output unchanged

    return module.register_forward_hook(hook)


@torch.no_grad()
def activations_at(
    model: torch.nn.Module, keys: list[tuple[int, str]], input_ids_BS: torch.Tensor,
    attention_mask_BS: torch.Tensor | None = None,
) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, site): [batch, seq, d_model]} activations, in the model's dtype."""
    captured: dict[tuple[int, str], torch.Tensor] = {}
    modules = decoder_layers(model)
    handles = []

    def keeper(key):
        def keep(tensor):
            captured[key] = tensor.detach()

        return keep

    def stop(_module, _inputs, _output):
        raise _StopForward

    try:
        for layer, site in keys:
            handles.append(_register(site_module(modules[layer], site), site, keeper((layer, site))))
        # registered last, so the deepest layer's own resid_post hook has run when it stops the pass
        handles.append(modules[max(layer for layer, _ in keys)].register_forward_hook(stop))
        model.base_model(input_ids=input_ids_BS, attention_mask=attention_mask_BS, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def residuals_at_layers(
    model: torch.nn.Module, layers: tuple[int, ...], input_ids_BS: torch.Tensor,
    attention_mask_BS: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """{layer: [batch, seq, d_model]} outputs of those decoder layers (resid_post), in the model's dtype."""
    found = activations_at(model, [(layer, "resid_post") for layer in layers], input_ids_BS, attention_mask_BS)
    return {layer: tensor for (layer, _), tensor in found.items()}
