"""`instructsae evaluate`: an exported SAE against a store it was not trained on."""

import json
from pathlib import Path

from tqdm import tqdm

from instructsae.errors import UserError
from instructsae.evaluate.metrics import reconstruction_metrics
from instructsae.extract.store import StoreReader, open_complete_store
from instructsae.fileio import write_text_atomically
from instructsae.train.export import load_sae


def store_batches(reader: StoreReader, layer: int, max_tokens: int | None):
    """The store's activations in order, chunk by chunk, stopping at max_tokens."""
    limit = reader.n_tokens if max_tokens is None else min(max_tokens, reader.n_tokens)
    with tqdm(total=limit, desc="evaluate", unit="tok", unit_scale=True, dynamic_ncols=True) as bar:
        for start in range(0, limit, reader.chunk_tokens):
            batch_ND = reader.read_acts(layer, start, min(start + reader.chunk_tokens, limit))
            bar.update(len(batch_ND))
            yield batch_ND


def sae_layer(cfg: dict, sae_dir: str) -> int:
    layer = cfg.get("metadata", {}).get("layer")
    if layer is None:
        raise UserError(f"SAE {sae_dir} does not say which layer it reads (cfg.json metadata.layer)")
    return int(layer)


def evaluate_sae_on_store(sae_dir: str, store: str, max_tokens: int | None = None) -> dict:
    sae, cfg = load_sae(sae_dir)
    reader = open_complete_store(store)
    if cfg["d_in"] != reader.d_model:
        raise UserError(f"SAE {sae_dir} has d_in {cfg['d_in']} but store {store} has d_model {reader.d_model}")
    layer = sae_layer(cfg, sae_dir)
    if layer not in reader.layers:
        raise UserError(f"SAE {sae_dir} reads layer {layer} but store {store} has layers {list(reader.layers)}")
    metrics = reconstruction_metrics(sae, store_batches(reader, layer, max_tokens))
    result = {"sae": str(sae_dir), "architecture": cfg["architecture"], "d_sae": cfg["d_sae"],
              "store": str(store), "store_fingerprint": reader.manifest.fingerprint, "layer": layer, **metrics}
    out = Path(sae_dir) / "eval" / f"{reader.manifest.fingerprint}.json"
    out.parent.mkdir(exist_ok=True)
    write_text_atomically(out, json.dumps(result, indent=2))
    return result


def format_table(results: list[dict]) -> str:
    """A markdown table, readable in a terminal."""
    header = "| SAE | arch | d_sae | NMSE | explained var | L0 | dead frac | MSE | tokens |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {Path(r['sae']).name} | {r['architecture']} | {r['d_sae']} | {r['nmse']:.4f} | "
                     f"{r['explained_variance']:.4f} | {r['l0']:.1f} | {r['dead_fraction']:.3f} | "
                     f"{r['mse']:.4g} | {r['n_tokens']:,} |")
    return "\n".join(lines)
