"""`instructsae evaluate`: an exported SAE against a store it was not trained on.

One streaming pass over the store gives the reconstruction metrics, the FAST paper's Eq. 7 MSE / MSE_st and the
per-role figures; the LM view (evaluate/splice.py) then runs the model on the store's first sequences.
"""

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from instructsae.devices import resolve_device
from instructsae.errors import UserError
from instructsae.evaluate.breakdown import SequenceRoleSums
from instructsae.evaluate.dialogues import first_stored_position, stored_sequences
from instructsae.evaluate.splice import check_head, lm_view
from instructsae.store.reader import StoreReader, open_complete_store
from instructsae.fileio import write_text_atomically
from instructsae.lm.batches import batch_budget
from instructsae.lm.models import load_model, model_sha256
from instructsae.metrics import ReconstructionSums
from instructsae.schemas.evaluate import LMViewConfig
from instructsae.schemas.manifest import StoreIdentity
from instructsae.sae.folder import hook_name_of, load_sae, sae_layer, sae_sites
from instructsae.sae import SparseAutoencoder


Slots = tuple[int, str, str]  # (layer, site read, site reconstructed): an SAE's two sites are the same


def store_batches(reader: StoreReader, slots: Slots, max_tokens: int | None):
    """(inputs, targets, instance ids, roles) of the store in order, chunk by chunk, stopping at max_tokens
    (an SAE's targets are its inputs)."""
    layer, site, target = slots
    limit = reader.n_tokens if max_tokens is None else min(max_tokens, reader.n_tokens)
    with tqdm(total=limit, desc="evaluate", unit="tok", unit_scale=True, dynamic_ncols=True) as bar:
        for start in range(0, limit, reader.chunk_tokens):
            stop = min(start + reader.chunk_tokens, limit)
            batch_ND = reader.read_acts(layer, start, stop, site)
            target_ND = batch_ND if target == site else reader.read_acts(layer, start, stop, target)
            bar.update(len(batch_ND))
            yield (batch_ND, target_ND, reader.read_column("instance", start, stop),
                   reader.read_column("role", start, stop))


@torch.no_grad()
def store_metrics(saes: list[SparseAutoencoder], reader: StoreReader, slots: Slots,
                  max_tokens: int | None) -> list[dict]:
    """The metrics of SAEs of one (layer, site, target) from one read of the store, whatever their number."""
    totals = [ReconstructionSums(sae.d_in, sae.d_sae) for sae in saes]
    breakdowns = [SequenceRoleSums(reader.n_instances, sae.d_in) for sae in saes]
    for x_BD, target_BD, instance_B, role_B in store_batches(reader, slots, max_tokens):
        for sae, total, breakdown in zip(saes, totals, breakdowns):
            latents_BF = sae.encode(x_BD)
            recon_BD = sae.reconstruct(x_BD, latents_BF)
            total.add(target_BD, recon_BD, latents_BF)
            breakdown.add(target_BD, recon_BD, latents_BF, instance_B, role_B)
    return [{**total.result(), "eq7": breakdown.eq7(), "per_role": breakdown.per_role(),
             "per_sequence": breakdown.per_sequence()} for total, breakdown in zip(totals, breakdowns)]


def lm_metrics(saes: list[SparseAutoencoder], reader: StoreReader, slots: Slots, cfg: LMViewConfig) -> list[dict]:
    """The LM view of SAEs of one (layer, site, target) on the store's first cfg.lm_tokens stored tokens, with the
    model that made the store, loaded once; the clean and ablated runs are shared by all of them."""
    identity = reader.manifest.identity
    layer, site, target = slots
    cfg = cfg.model_copy(update={"device": resolve_device(cfg.device)})
    if cfg.model is None:
        refuse_a_changed_model(identity)
    lm = load_model(cfg.model or identity.model, identity.model_dtype, cfg.device, cfg.attn_implementation)
    if lm.d_model != saes[0].d_in or layer >= lm.n_layers:
        raise UserError(f"model '{lm.name}' (d_model {lm.d_model}, {lm.n_layers} layers) cannot take an SAE of "
                        f"d_in {saes[0].d_in} at layer {layer}")
    sequences = stored_sequences(reader, lm, cfg.lm_tokens, cfg.dataset)
    if sequences:
        check_head(lm.model, sequences, cfg.device)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    # the same runtime knob as extract's, with the same default per device
    results = lm_view(lm.model, layer, [sae.to(cfg.device) for sae in saes], sequences,
                      first_stored_position(reader), batch_budget(cfg.batch_tokens, cfg.device), pad_id, cfg.device,
                      site, target)
    return [{"model": lm.name, "n_sequences": len(sequences), **result} for result in results]


def refuse_a_changed_model(identity: StoreIdentity) -> None:
    """The manifest's local model folder or .gguf file must still hold the weights the store came from: an LM view
    of other weights would measure nothing. (An explicit --model is the user's own choice and is not checked.)"""
    if identity.model_sha256 is not None and model_sha256(identity.model) != identity.model_sha256:
        raise UserError(f"model {identity.model} has changed since the store was extracted (its config, weights or "
                        "tokenizer differ): pass --model to run the LM view with it anyway")


def open_sae_and_store(sae_dir: str, store: str) -> tuple[SparseAutoencoder, dict, StoreReader, Slots]:
    """An SAE, its cfg, a complete store it fits (same width, holds the SAE's layer and sites) and
    (layer, site, target)."""
    sae, cfg = load_sae(sae_dir)
    reader = open_complete_store(store)
    if cfg["d_in"] != reader.d_model:
        raise UserError(f"SAE {sae_dir} has d_in {cfg['d_in']} but store {store} has d_model {reader.d_model}")
    layer = sae_layer(cfg, sae_dir)
    if layer not in reader.layers:
        raise UserError(f"SAE {sae_dir} reads layer {layer} but store {store} has layers {list(reader.layers)}")
    site, target = sae_sites(cfg)
    for wanted in dict.fromkeys((site, target)):
        if (layer, wanted) not in reader.acts_keys:
            hook = hook_name_of(cfg) or wanted
            raise UserError(f"SAE {sae_dir} needs site {wanted} of layer {layer} (hook {hook}) but store {store} "
                            f"holds {', '.join(reader.sites)}: extract with --sites {','.join({site, target})}")
    return sae, cfg, reader, (layer, site, target)


def without_per_sequence(result: dict) -> dict:
    """A result as JSON takes it: the per-sequence arrays (store pass and LM view) left out."""
    out = {key: value for key, value in result.items() if key != "per_sequence"}
    if "lm" in out:
        out["lm"] = {key: value for key, value in out["lm"].items() if key != "per_sequence"}
    return out


def evaluate_saes_on_store(sae_dirs: list[str], store: str, max_tokens: int | None = None,
                           lm: LMViewConfig | None = None, per_sequence: bool = False) -> list[dict]:
    """The metrics of each SAE on a store; nothing is written (the SAE folders are only read). SAEs of one layer
    share one read of the store. Without `lm` (or with lm_tokens 0) the LM view is skipped and the results have
    no 'lm' section; with it, SAEs of one layer share one LM view (the model runs clean and ablated once for all
    of them). With `per_sequence`, each result (and its 'lm' section) also holds 'per_sequence': numpy arrays of
    the sums behind its figures per held-out sequence and token role (see breakdown.py and splice.py)."""
    opened = [open_sae_and_store(sae_dir, store) for sae_dir in sae_dirs]  # every SAE checked before any work
    results = [{"sae": str(sae_dir), "architecture": cfg["architecture"], "d_sae": cfg["d_sae"], "store": str(store),
                "store_fingerprint": reader.manifest.fingerprint, "layer": slots[0],
                **({} if slots[1] == slots[2] == "resid_post" else {"site": slots[1], "target_site": slots[2]})}
               for sae_dir, (_, cfg, reader, slots) in zip(sae_dirs, opened)]
    reader = opened[0][2]
    for slots in sorted({entry[3] for entry in opened}):
        members = [i for i, entry in enumerate(opened) if entry[3] == slots]
        saes = [opened[i][0] for i in members]
        for i, metrics in zip(members, store_metrics(saes, reader, slots, max_tokens)):
            results[i].update(metrics)
        if lm is not None and lm.lm_tokens > 0:
            for i, view in zip(members, lm_metrics(saes, reader, slots, lm)):
                results[i]["lm"] = view
    return results if per_sequence else [without_per_sequence(result) for result in results]


def write_results(out: str | Path, results: list[dict]) -> None:
    """--out: the JSON `--json` prints (one SAE: its result; several: the list), in a file the user named."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: name a JSON file")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(results[0] if len(results) == 1 else results, indent=2))


def evaluate_sae_on_store(sae_dir: str, store: str, max_tokens: int | None = None,
                          lm: LMViewConfig | None = None) -> dict:
    return evaluate_saes_on_store([sae_dir], store, max_tokens, lm)[0]


def format_optional(value: float | None, spec: str) -> str:
    """A table cell: "–" where a figure does not exist (no LM view, no template token)."""
    return "–" if value is None else format(value, spec)


def _lm_cells(lm: dict | None) -> str:
    if lm is None:
        return "– | – | – | – | –"
    return (f"{lm['ce_clean']:.4f} | {lm['ce_spliced']:.4f} | {lm['ce_ablated']:.4f} | "
            f"{format_optional(lm['ce_loss_recovered'], '.4f')} | {lm['kl_spliced']:.4f}")


def format_table(results: list[dict]) -> str:
    """A markdown table, readable in a terminal: one row per SAE, L0 beside every error figure."""
    header = ("| SAE | arch | d_sae | L0 | NMSE | explained var | dead frac | MSE | log2 MSE (Eq.7) | log2 MSE_st | "
              "CE clean | CE SAE | CE zero | CE recovered | KL | tokens |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        eq7 = r["eq7"]
        lines.append(f"| {Path(r['sae']).name} | {r['architecture']} | {r['d_sae']} | {r['l0']:.1f} | "
                     f"{r['nmse']:.4f} | {r['explained_variance']:.4f} | {r['dead_fraction']:.3f} | "
                     f"{r['mse']:.4g} | {format_optional(eq7['log2_mse'], '.4f')} | "
                     f"{format_optional(eq7['log2_mse_st'], '.4f')} | "
                     f"{_lm_cells(r.get('lm'))} | {r['n_tokens']:,} |")
    return "\n".join(lines)


def format_role_table(results: list[dict]) -> str:
    """Per token role: reconstruction (with L0) over the store, and the LM view over the tokens predicted."""
    header = "| SAE | role | tokens | L0 | NMSE | MSE | LM tokens | CE clean | CE SAE | CE zero | CE recovered | KL |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lm_roles = r["lm"]["per_role"] if "lm" in r else {}
        for role, m in r["per_role"].items():
            lm = lm_roles.get(role)
            lines.append(f"| {Path(r['sae']).name} | {role} | {m['n_tokens']:,} | {m['l0']:.1f} | {m['nmse']:.4f} | "
                         f"{m['mse']:.4g} | {lm['n_tokens'] if lm else 0:,} | {_lm_cells(lm)} |")
    return "\n".join(lines)
