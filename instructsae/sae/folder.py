"""Read an SAE folder in the SAELens layout: ours, or one SAELens (6.x or earlier) or another tool wrote.

Anything the folder says that our SAE classes do not run is refused in one line rather than run wrongly
(activation normalisation left in, a hook_z reshape, TopK latents rescaled by decoder norms). A folder that
does not subtract b_dec before encoding has it folded into b_enc, which is the same encoder.
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from instructsae.errors import UserError, first_line
from instructsae.lm.models import model_spec_from_hub_id
from instructsae.sae import DICTIONARY_CLASSES, SparseAutoencoder
from instructsae.schemas.sites import DEFAULT_SITE

CFG_FILE = "cfg.json"  # the SAELens layout: cfg.json + sae_weights.safetensors
WEIGHTS_FILE = "sae_weights.safetensors"
PROVENANCE_KEY = "instructsae"  # our own block inside SAELens's metadata
# The residual stream after decoder layer L, as hook names spell it: TransformerLens's and HF module paths.
RESID_POST = (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), re.compile(r"^(?:model\.)?layers\.(\d+)$"),
              re.compile(r"^(?:transformer\.)?h\.(\d+)$"))
RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")  # = resid_post of the block before
# Other sites of block L as TransformerLens names them (SAELens's hook_name / hook_name_out).
SITE_HOOKS = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_in": "ln2.hook_normalized",
              "mlp_out": "hook_mlp_out", "resid_post": "hook_resid_post"}
# (TransformerLens's hook_mlp_in is the residual stream before ln2, which no store holds: not matched)
OTHER_SITE = re.compile(r"^blocks\.(\d+)\.(hook_attn_out|ln2\.hook_normalized|hook_mlp_out)$")


def hook_name_for(layer: int, site: str) -> str:
    """TransformerLens's name of a site of block `layer` (what SAELens's hook_name holds)."""
    return f"blocks.{layer}.{SITE_HOOKS[site]}"


def site_from_hook_name(name: str) -> str | None:
    """The site a hook name reads; None for the residual stream's (resid_post/resid_pre) or an unknown one."""
    match = OTHER_SITE.match(name)
    if match is None:
        return None
    return {"hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out", "ln2.hook_normalized": "mlp_in"}[match.group(2)]


def _metadata(cfg: dict) -> dict:
    metadata = cfg.get("metadata") if isinstance(cfg, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def provenance(cfg: dict) -> dict:
    """What instructsae recorded: metadata.instructsae (earlier folders kept it flat in metadata); {} if none."""
    metadata = _metadata(cfg)
    own = metadata.get(PROVENANCE_KEY)
    if isinstance(own, dict):
        return own
    return metadata if "store_fingerprint" in metadata else {}


def hook_name_of(cfg: dict) -> str | None:
    """SAELens 6 keeps hook_name in metadata; earlier versions at the top (or as hook_point)."""
    return _metadata(cfg).get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")


def layer_from_hook_name(name: str) -> int | None:
    """The decoder layer whose output a hook reads, or None when it is not the residual stream after one."""
    for pattern in RESID_POST:
        if match := pattern.match(name):
            return int(match.group(1))
    if (match := RESID_PRE.match(name)) and int(match.group(1)) > 0:
        return int(match.group(1)) - 1
    if match := OTHER_SITE.match(name):
        return int(match.group(1))
    return None


def sae_layer(cfg: dict, sae_dir: str | Path) -> int:
    """The layer an SAE reads: our provenance, else its hook_name (e.g. blocks.15.hook_resid_post)."""
    layer = provenance(cfg).get("layer")
    if layer is not None:
        return int(layer)
    name = hook_name_of(cfg)
    if name is None:
        raise UserError(f"SAE {sae_dir} does not say which layer it reads (no metadata.hook_name in cfg.json)")
    layer = layer_from_hook_name(str(name))
    if layer is None:
        raise UserError(f"SAE {sae_dir} reads hook '{name}', which is no site a store holds (e.g. "
                        "blocks.15.hook_resid_post, model.layers.15, blocks.15.hook_mlp_out, "
                        "blocks.15.ln2.hook_normalized)")
    return layer


def slot_provenance(site: str, target: str) -> dict:
    """The site fields of our provenance: none for an SAE of resid_post, as folders had before sites."""
    return {} if site == target == DEFAULT_SITE else {"site": site, "target_site": target}


def sae_sites(cfg: dict) -> tuple[str, str]:
    """(site read, site reconstructed): our provenance, else SAELens's hook names, else resid_post."""
    own = provenance(cfg)
    if own.get("site"):
        return own["site"], own.get("target_site") or own["site"]
    metadata = _metadata(cfg)
    site = site_from_hook_name(str(hook_name_of(cfg) or "")) or DEFAULT_SITE
    out_name = metadata.get("hook_name_out") or cfg.get("hook_name_out")
    return site, (site_from_hook_name(str(out_name)) or site) if out_name else site


def sae_model(cfg: dict) -> str | None:
    """The --model that ran the SAE's activations: ours as given, else SAELens's model_name (embedded copy first)."""
    own = provenance(cfg).get("model")
    if own is not None:
        return str(own)
    name = _metadata(cfg).get("model_name") or cfg.get("model_name")
    return None if name is None else model_spec_from_hub_id(str(name))


def _read(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not (folder / CFG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"not an SAE folder (needs {CFG_FILE} and {WEIGHTS_FILE}): {folder}")
    try:
        cfg = json.loads((folder / CFG_FILE).read_text())
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except Exception as error:
        raise UserError(f"SAE folder {folder} is unreadable: {first_line(error)}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"SAE folder {folder} has unknown architecture None (known: {', '.join(DICTIONARY_CLASSES)})")
    _refuse_nonfinite(tensors, folder)
    return cfg, {name: tensor.float() for name, tensor in tensors.items()}


def _refuse_nonfinite(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """NaN/inf weights (a diverged run, a damaged file; ours or a folder SAELens wrote) would only yield NaN."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"SAE folder {folder} has {bad:,} NaN/inf values in {name} ({WEIGHTS_FILE}): "
                            f"its training diverged or the file is damaged")


def _architecture(cfg: dict, folder: Path) -> str:
    """Our class for the folder: what we trained (BatchTopK is written as SAELens's jumprelu), else its own."""
    architecture = cfg.get("architecture")
    trained = provenance(cfg).get("architecture")
    if trained in DICTIONARY_CLASSES:
        return trained
    if architecture not in DICTIONARY_CLASSES:
        raise UserError(f"SAE folder {folder} has unknown architecture {architecture!r} "
                        f"(known: {', '.join(DICTIONARY_CLASSES)})")
    return architecture


def _refuse_what_we_do_not_run(cfg: dict, folder: Path) -> None:
    normalize = cfg.get("normalize_activations", "none")
    if normalize not in ("none", None, False):
        raise UserError(f"SAE folder {folder} normalises its inputs ({normalize!r}); instructsae runs SAEs on raw "
                        "activations: fold the scale into the weights (SAELens: fold_activation_norm_scaling_factor)")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise UserError(f"SAE folder {folder} reshapes its inputs ({cfg['reshape_activations']!r}); "
                        "stores hold the residual stream")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise UserError(f"SAE folder {folder} rescales TopK latents by decoder norms, which instructsae does not run")


def _canonical_tensors(cfg: dict, tensors: dict[str, torch.Tensor], transcoder: bool) -> dict[str, torch.Tensor]:
    """The four shared tensors (+ threshold) as our classes take them (a transcoder's encoder never subtracts
    b_dec, which is its output's bias)."""
    tensors = dict(tensors)
    if "threshold" not in tensors and "log_threshold" in tensors:  # SAELens's JumpReLU training parameter
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if not transcoder and cfg.get("apply_b_dec_to_input") is False and {"W_enc", "b_enc", "b_dec"} <= tensors.keys():
        # x W + b_enc = (x - b_dec) W + (b_enc + b_dec W): the same encoder in our form
        tensors["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
    return tensors


def load_sae(folder: str | Path) -> tuple[SparseAutoencoder, dict]:
    """The SAE a folder holds, acting on raw activations, and its cfg."""
    folder = Path(folder)
    cfg, tensors = _read(folder)
    architecture = _architecture(cfg, folder)
    _refuse_what_we_do_not_run(cfg, folder)
    tensors = _canonical_tensors(cfg, tensors, DICTIONARY_CLASSES[architecture].transcoder)
    if tensors.get("W_enc") is None or tensors["W_enc"].dim() != 2:
        raise UserError(f"SAE folder {folder} has no 2-D W_enc in {WEIGHTS_FILE}")
    sae_class = DICTIONARY_CLASSES[architecture]
    # our settings (k, bandwidth, ...) sit in our provenance; SAELens's own k at the top; a setting with a
    # default may be absent (SAELens's jumprelu folders carry no bandwidth), TopK's k may not
    settings = provenance(cfg).get("settings") or {name: cfg[name] for name in sae_class.exported_settings
                                                     if name in cfg}
    try:
        sae = sae_class(*tensors["W_enc"].shape, **settings)
    except (TypeError, ValueError) as error:
        raise UserError(f"SAE folder {folder}: cfg.json does not describe a {architecture} SAE ({error})") from None
    try:
        sae.load_state_dict(tensors)
    except RuntimeError as error:
        raise UserError(f"SAE folder {folder} has weights that do not fit its architecture: "
                        f"{first_line(error)}") from None
    if (cfg.get("d_in"), cfg.get("d_sae")) != (sae.d_in, sae.d_sae):
        raise UserError(f"SAE folder {folder}: cfg.json says d_in {cfg.get('d_in')}, d_sae {cfg.get('d_sae')} "
                        f"but the weights are {sae.d_in} x {sae.d_sae}")
    return sae.eval().requires_grad_(False), cfg
