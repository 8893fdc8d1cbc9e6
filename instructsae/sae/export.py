"""Save and load an SAE folder as SAELens 6 writes it: cfg.json + sae_weights.safetensors (raw-activation space).

cfg.json carries SAELens's own fields (architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input,
normalize_activations, reshape_activations, `k` for TopK) and its `metadata` block (sae_lens_version,
model_name, hook_name, context_size, prepend_bos, seqpos_slice, dataset_path, ...). Without
`sae_lens_version` SAELens takes its pre-6.0 path and drops the metadata block, so it is always written.
Our own provenance (store, its fingerprint, the train config, the input scale, settings SAELens has no field
for) lives under `metadata.instructsae`, which SAELens keeps as it is.

Decoder rows are written at unit norm, each row's norm folded into its latent (sae/fold.py), so latents are in raw
activation units as SAELens's fold_W_dec_norm leaves them. A transcoder's too: its encoder reads the input as it
is, so scaling a latent's encoder column and bias by its row's norm stays exact; a skip transcoder's W_skip (input to
output, beside the latents) is left as it is.

BatchTopK has no inference class in SAELens: at inference it keeps every latent above one threshold, which is
a JumpReLU, so it is exported as `architecture: jumprelu` with that threshold, and `metadata.instructsae`
says it was trained as BatchTopK (our loader rebuilds that class; SAELens runs the JumpReLU, the same maths).
"""

import json
from pathlib import Path

from safetensors.torch import save_file

from instructsae.fileio import write_atomically, write_text_atomically
from instructsae.lm.models import hub_id
from instructsae.schemas.manifest import StoreIdentity
from instructsae.sae import SparseAutoencoder
from instructsae.sae.fold import fold_decoder_norms
from instructsae.sae.folder import (  # noqa: F401
    CFG_FILE, PROVENANCE_KEY, WEIGHTS_FILE, hook_name_for, load_sae, provenance,
)
from instructsae.schemas.sites import DEFAULT_SITE

# The cfg format written: SAELens >= 6.0 reads a folder by its 6.x path when metadata.sae_lens_version says so.
# It names the format, not a SAELens that trained this SAE (sae_lens_training_version stays null).
SAELENS_FORMAT_VERSION = "6.0.0"


def hook_name(layer: int | None, site: str = DEFAULT_SITE) -> str | None:
    """TransformerLens's name for a site of a block (resid_post: the residual stream after it)."""
    return None if layer is None else hook_name_for(layer, site)


def saelens_metadata(layer: int | None, identity: StoreIdentity | None, site: str = DEFAULT_SITE,
                     target_site: str | None = None) -> dict:
    """SAELens's metadata block, from the store the SAE was trained on (what is known of it); a transcoder's
    also names the site it writes (hook_name_out)."""
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                "hook_name": hook_name(layer, site), "hook_head_index": None, "prepend_bos": False,
                "model_from_pretrained_kwargs": {}, "neuronpedia_id": None}
    if target_site is not None:
        metadata.update({"hook_name_out": hook_name(layer, target_site), "hook_head_index_out": None})
    if identity is not None:
        metadata.update({
            "model_name": hub_id(identity.model),
            "model_class_name": "HookedTransformer",
            # the chat template already opens each dialogue; nothing is prepended
            "context_size": identity.max_len if identity.mode == "fast" else identity.block_len,
            # extract drops each sequence's first token (the attention sink) unless told to keep it
            "seqpos_slice": [None] if identity.keep_first_token else [1, None],
            "dataset_path": identity.dataset,
        })
    return metadata


def sae_cfg(sae: SparseAutoencoder, own: dict, identity: StoreIdentity | None = None) -> dict:
    """cfg.json: SAELens's fields and metadata, our provenance under metadata.instructsae."""
    settings = {name: getattr(sae, name) for name in sae.exported_settings}
    cfg = {
        "architecture": sae.saelens_architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,  # encode((x - b_dec) W_enc + b_enc), as trained
        "normalize_activations": "none",  # the training normalisation is folded into the weights
        "reshape_activations": "none",
    }
    cfg.update(sae.saelens_fields())
    site = own.get("site", DEFAULT_SITE)
    target = own.get("target_site", site) if sae.transcoder else None
    metadata = saelens_metadata(own.get("layer"), identity, site, target)
    metadata[PROVENANCE_KEY] = {**own, "architecture": sae.architecture, "settings": settings}
    cfg["metadata"] = metadata
    return cfg


def save_sae(folder: str | Path, sae: SparseAutoencoder, input_scale: float, metadata: dict,
             identity: StoreIdentity | None = None, output_scale: float | None = None) -> None:
    """Write the folder; `metadata` is our provenance (layer, site, store, ...), `identity` the training store's;
    output_scale: a transcoder's target site's (an SAE's is its input's)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = sae.export_tensors(input_scale, output_scale)
    # a transcoder's encoder reads its input without b_dec, so the fold is exact for it too; W_skip is untouched
    tensors = fold_decoder_norms(tensors, sae.in_latent_units, sae.selects_by_rank)
    write_atomically(folder / WEIGHTS_FILE, lambda path: save_file(tensors, str(path)))
    cfg = json.dumps(sae_cfg(sae, metadata, identity), indent=2, default=str)
    write_text_atomically(folder / CFG_FILE, cfg)
