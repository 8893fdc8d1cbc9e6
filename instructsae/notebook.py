"""The notebook path: a dialogue (or a prompt) through a model, per token: activations, then an SAE's latents.

    import instructsae as isae
    acts = isae.activations("smollm2", "Tell me a joke.", layers=15)   # acts.tokens, acts[15]
    lat = isae.latents(isae.load_sae("runs/jumprelu"), None, "Tell me a joke.")
    lat.top_features(10)

The dialogues go through extract itself, into a store held in memory and dropped afterwards (nothing is written
to disk): the same chat template, roles and truncation as a store, and the same first token. Extract drops each
sequence's first token, the attention sink whose norm is ~100x the rest's, unless keep_first_token=True; SAEs
trained on a store never saw it, so latents drop it too by default.
"""

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from instructsae.errors import UserError

STORE_PREFIX = "memory://instructsae/notebook-"
ENCODE_TOKENS = 4096  # tokens per SAE encode, so [tokens, d_sae] stays small


@dataclass(frozen=True)
class TokenActivations:
    """Per-token activations of some dialogues: `tokens` has one row per token (dialogue, position, token_id,
    text, role) and `acts[layer]` the [tokens, d_model] float32 activations in the same row order."""

    tokens: pd.DataFrame
    acts: dict[int, torch.Tensor]
    model: str

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.acts:
            raise KeyError(f"layer {layer} was not extracted (layers: {sorted(self.acts)})")
        return self.acts[layer]


@dataclass(frozen=True)
class TokenLatents:
    """An SAE's latents per token: `tokens` as in TokenActivations, `latents` [tokens, d_sae] (raw activation
    units: latent × the unit-norm decoder row is its share of the reconstruction)."""

    tokens: pd.DataFrame
    latents: torch.Tensor
    layer: int
    model: str

    def top_features(self, n: int = 10) -> pd.DataFrame:
        """The n features with the largest activation on any token, with that token and where it is."""
        peak_F, row_F = self.latents.max(dim=0)
        order = torch.argsort(peak_F, descending=True)[:n]
        order = order[peak_F[order] > 0]
        rows = row_F[order].numpy()
        table = self.tokens.iloc[rows].reset_index(drop=True)
        return pd.DataFrame({"feature": order.numpy(), "activation": peak_F[order].numpy(),
                             "density": (self.latents[:, order] > 0).float().mean(dim=0).numpy(),
                             **{column: table[column] for column in ("dialogue", "position", "text", "role")}})


def as_dialogues(dialogues) -> list:
    """A prompt (one user turn), one dialogue (a list of messages) or several (a list of message lists / rows)."""
    if isinstance(dialogues, str):
        return [[{"role": "user", "content": dialogues}]]
    if isinstance(dialogues, list) and dialogues and isinstance(dialogues[0], dict) and "role" in dialogues[0]:
        return [dialogues]
    if not isinstance(dialogues, Iterable):
        raise UserError(f"dialogues: expected a prompt, a list of messages or a list of dialogues, not a "
                        f"{type(dialogues).__name__}")
    return dialogues


def _layers(layers) -> tuple[int, ...]:
    return (layers,) if isinstance(layers, int) else tuple(layers)


def activations(model: str, dialogues, layers, *, keep_first_token: bool = False, show_progress: bool = True,
                site: str = "resid_post", **settings) -> TokenActivations:
    """Per-token activations of `dialogues` at `layers` (an int or several) of `model` (a --model value: an
    embedded name, a HF id, a local folder). Any other extract setting (max_len, device, batch_tokens, mode,
    model_dtype, ...) may be given; the activations are float32 whatever the store default. `dialogue` numbers
    the dialogues extract kept: one it cannot use (empty, an unknown role) is skipped, as in a store. `site`: the
    hook site read at each layer (resid_post: the layer's output; mlp_in, the MLP's input, is what a transcoder
    reads)."""
    from instructsae.api import extract_activations, open_store
    from instructsae.evaluate.contexts import token_strings
    from instructsae.lm.models import load_tokenizer
    from instructsae.schemas.manifest import ROLES
    from instructsae.store.location import remove_store

    store = f"{STORE_PREFIX}{uuid.uuid4().hex}"
    try:
        manifest = extract_activations(dialogues=as_dialogues(dialogues), model=model, layers=_layers(layers),
                                       out=store, dtype="float32", keep_first_token=keep_first_token,
                                       show_progress=show_progress, sites=(site,), **settings)
        reader = open_store(store)
        acts = {layer: reader.read_acts(layer, 0, reader.n_tokens, site).float() for layer in manifest.identity.layers}
        columns = {name: reader.read_column(name) for name in ("instance", "position", "token_id", "role")}
    finally:
        remove_store(store)
    tokenizer = load_tokenizer(manifest.identity.tokenizer)
    tokens = pd.DataFrame({
        "dialogue": columns["instance"].astype(np.int64), "position": columns["position"].astype(np.int64),
        "token_id": columns["token_id"].astype(np.int64), "text": token_strings(tokenizer, columns["token_id"]),
        "role": [ROLES[code] for code in columns["role"]]})
    return TokenActivations(tokens, acts, manifest.identity.model)


def latents(sae, model: str | None, dialogues, *, layer: int | None = None, keep_first_token: bool = False,
            show_progress: bool = True, **settings) -> TokenLatents:
    """The latents of `sae` (a folder, or an SAE from load_sae) on `dialogues` run through `model` (None: the
    model the SAE names), at the SAE's layer (or `layer`)."""
    from instructsae.api import load_sae
    from instructsae.sae.folder import sae_layer, sae_model, sae_sites

    if not isinstance(sae, torch.nn.Module):
        sae = load_sae(sae)
    cfg = getattr(sae, "cfg", None) or {}
    if layer is None and cfg:
        layer = sae_layer(cfg, "(the one given)")
    if layer is None:
        raise UserError("latents: the SAE does not say which layer it reads: pass layer=")
    model = model or (sae_model(cfg) if cfg else None)
    if model is None:
        raise UserError("latents: the SAE does not name its model: pass the model")
    site = sae_sites(cfg)[0] if cfg else "resid_post"  # what it reads (a transcoder: the MLP's input)
    acts = activations(model, dialogues, layer, keep_first_token=keep_first_token, show_progress=show_progress,
                       site=site, **settings)
    x_ND = acts[layer]
    if x_ND.shape[1] != sae.d_in:
        raise UserError(f"latents: model '{model}' has d_model {x_ND.shape[1]} but the SAE has d_in {sae.d_in}")
    with torch.no_grad():
        latents_NF = torch.cat([sae.encode(x_ND[start:start + ENCODE_TOKENS].to(sae.device, sae.dtype)).cpu()
                                for start in range(0, len(x_ND), ENCODE_TOKENS)])
    return TokenLatents(acts.tokens, latents_NF.float(), layer, acts.model)
