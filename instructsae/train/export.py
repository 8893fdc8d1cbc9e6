"""Save and load an SAE folder in the SAELens layout: cfg.json + sae_weights.safetensors (raw-activation space)."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from instructsae.errors import UserError, first_line
from instructsae.fileio import write_atomically, write_text_atomically
from instructsae.run_folder import CFG_FILE, WEIGHTS_FILE
from instructsae.train.sae import SAE_CLASSES, SparseAutoencoder


def sae_cfg(sae: SparseAutoencoder, metadata: dict) -> dict:
    layer = metadata.get("layer")
    cfg = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,  # encode((x - b_dec) W_enc + b_enc), as trained
        "normalize_activations": "none",  # the training normalisation is folded into the weights
        "hook_name": f"blocks.{layer}.hook_resid_post" if layer is not None else None,
        "hook_layer": layer,
        "metadata": metadata,
    }
    cfg.update({name: getattr(sae, name) for name in sae.exported_settings})  # e.g. SAELens's `k` for topk
    return cfg


def save_sae(folder: str | Path, sae: SparseAutoencoder, input_scale: float, metadata: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = sae.export_tensors(input_scale)
    write_atomically(folder / WEIGHTS_FILE, lambda path: save_file(tensors, str(path)))
    cfg = json.dumps(sae_cfg(sae, metadata), indent=2, default=str)
    write_text_atomically(folder / CFG_FILE, cfg)


def load_sae(folder: str | Path) -> tuple[SparseAutoencoder, dict]:
    """The SAE a folder holds, acting on raw activations, and its cfg."""
    folder = Path(folder)
    if not (folder / CFG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"not an SAE folder (needs {CFG_FILE} and {WEIGHTS_FILE}): {folder}")
    try:
        cfg = json.loads((folder / CFG_FILE).read_text())
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except Exception as error:
        raise UserError(f"SAE folder {folder} is unreadable: {first_line(error)}") from None
    architecture = cfg.get("architecture") if isinstance(cfg, dict) else None
    if architecture not in SAE_CLASSES:
        raise UserError(f"SAE folder {folder} has unknown architecture {architecture!r} "
                        f"(known: {', '.join(SAE_CLASSES)})")
    if tensors.get("W_enc") is None or tensors["W_enc"].dim() != 2:
        raise UserError(f"SAE folder {folder} has no 2-D W_enc in {WEIGHTS_FILE}")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"SAE folder {folder} has {bad:,} NaN/inf values in {name} ({WEIGHTS_FILE}): "
                            f"its training diverged or the file is damaged")
    sae_class = SAE_CLASSES[architecture]
    # settings with a default may be absent (SAELens's own jumprelu folders carry no bandwidth); TopK's k may not
    settings = {name: cfg[name] for name in sae_class.exported_settings if name in cfg}
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
