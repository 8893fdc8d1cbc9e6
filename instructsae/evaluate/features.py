"""`instructsae features`: what each SAE feature responds to on a store, for a person to look at.

One streaming pass gives every feature's density, mean activation, role shares and top-N rows; then the
contexts of those rows are read and decoded. Writes features.json (all live features), features.parquet
(the per-feature table), special_token_features.json and dashboard.html.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from instructsae.errors import UserError
from instructsae.evaluate.contexts import context_windows, gather_column, token_strings, window_rows
from instructsae.evaluate.dashboard import render_dashboard
from instructsae.evaluate.feature_stats import FeatureStats
from instructsae.evaluate.run import open_sae_and_store
from instructsae.store.reader import StoreReader
from instructsae.fileio import write_atomically, write_text_atomically
from instructsae.lm.models import load_tokenizer
from instructsae.schemas.features import FeaturesConfig
from instructsae.schemas.manifest import ROLE_CODE, ROLES
from instructsae.sae import SparseAutoencoder

LATENT_BUDGET = 1 << 24  # latents per encoded batch (64 MB of float32), whatever d_sae is
OUTPUT_FILES = ("features.json", "features.parquet", "special_token_features.json", "dashboard.html")
FIRES_ON_SHOWN = 5
SPECIAL_PRINTED = 25


def check_out_folder(out: Path) -> None:
    """Refuse a folder holding anything but this command's own files: a rerun replaces those, nothing else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    ours = set(OUTPUT_FILES) | {name + ".partial" for name in OUTPUT_FILES}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    if foreign:
        raise UserError(f"--out {out} holds files this command did not write ({', '.join(foreign[:3])}); "
                        f"choose a new folder")


def special_token_ids(tokenizer) -> np.ndarray:
    return np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)


@torch.no_grad()
def measure_features(sae: SparseAutoencoder, reader: StoreReader, layer: int, special_ids: np.ndarray,
                     top_n: int, max_tokens: int | None, site: str = "resid_post") -> FeatureStats:
    """One pass over the store, chunk by chunk; chunks are encoded in batches that bound d_sae x batch. `site`:
    what the SAE reads (a transcoder's latents come from the MLP's input)."""
    stats = FeatureStats.empty(sae.d_sae, len(ROLES), top_n)
    limit = reader.n_tokens if max_tokens is None else min(max_tokens, reader.n_tokens)
    batch_tokens = max(1, LATENT_BUDGET // sae.d_sae)
    with tqdm(total=limit, desc="features", unit="tok", unit_scale=True, dynamic_ncols=True) as bar:
        for chunk_start in range(0, limit, reader.chunk_tokens):
            chunk_stop = min(chunk_start + reader.chunk_tokens, limit)
            x_ND = reader.read_acts(layer, chunk_start, chunk_stop, site)
            roles_N = torch.from_numpy(reader.read_column("role", chunk_start, chunk_stop).astype(np.int64))
            token_ids = reader.read_column("token_id", chunk_start, chunk_stop)
            special_N = (roles_N == ROLE_CODE["template"]) | torch.from_numpy(np.isin(token_ids, special_ids))
            for start in range(0, len(x_ND), batch_tokens):
                batch = slice(start, start + batch_tokens)
                rows_B = torch.arange(chunk_start + start, chunk_start + min(start + batch_tokens, len(x_ND)))
                stats.add(sae.encode(x_ND[batch]), rows_B, roles_N[batch], special_N[batch])
            bar.update(chunk_stop - chunk_start)
    return stats


def top_contexts(stats: FeatureStats, feature_ids: np.ndarray, reader: StoreReader, tokenizer,
                 context: int) -> list[list[dict]]:
    """Per feature, its top tokens (activation > 0, largest first) with their decoded context windows."""
    acts_KN = stats.top_acts_FN[feature_ids].numpy()
    rows_KN = stats.top_rows_FN[feature_ids].numpy()
    fired_KN = acts_KN > 0
    rows = rows_KN[fired_KN]
    instance = gather_column(reader, "instance", rows)
    position = gather_column(reader, "position", rows)
    role = gather_column(reader, "role", rows)
    start, stop = context_windows(rows, instance, reader.read_column("instance_start"),
                                  reader.read_column("instance_length"), context)
    all_rows, offsets = window_rows(start, stop)
    strings = token_strings(tokenizer, gather_column(reader, "token_id", all_rows))
    contexts = [{"activation": float(activation), "instance": int(instance[k]), "position": int(position[k]),
                 "role": ROLES[role[k]], "tokens": strings[offsets[k]:offsets[k + 1]],
                 "focus": int(rows[k] - start[k])}
                for k, activation in enumerate(acts_KN[fired_KN])]
    per_feature = np.cumsum([0, *fired_KN.sum(axis=1)])
    return [contexts[per_feature[i]:per_feature[i + 1]] for i in range(len(feature_ids))]


def feature_records(stats: FeatureStats, feature_ids: np.ndarray, tops: list[list[dict]]) -> list[dict]:
    """The features.json entries (autointerp reads these field names)."""
    density, mean = stats.density_F.tolist(), stats.mean_activation_F.tolist()
    role_share_RF, special_share = stats.role_share_RF.numpy(), stats.special_share_F.tolist()
    return [{"id": int(f), "density": density[f], "mean_activation": mean[f],
             "role_share": {role: float(role_share_RF[r, f]) for r, role in enumerate(ROLES)},
             "special_share": special_share[f], "top": top}
            for f, top in zip(feature_ids.tolist(), tops)]


def special_token_features(records: list[dict], threshold: float) -> list[dict]:
    """Features with at least `threshold` of their mass on template/special tokens, most concentrated first."""
    chosen = sorted((r for r in records if r["special_share"] >= threshold), key=lambda r: -r["special_share"])
    return [{"id": r["id"], "special_share": r["special_share"], "density": r["density"],
             "mean_activation": r["mean_activation"],
             "fires_on": dict(Counter(c["tokens"][c["focus"]] for c in r["top"]).most_common(FIRES_ON_SHOWN))}
            for r in chosen]


def feature_table(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"id": r["id"], "density": r["density"], "mean_activation": r["mean_activation"],
                          "max_activation": r["top"][0]["activation"], "special_share": r["special_share"],
                          **{f"role_share_{role}": share for role, share in r["role_share"].items()}}
                         for r in records])


def run_features(cfg: FeaturesConfig) -> dict:
    out = Path(cfg.out)
    check_out_folder(out)
    sae, _, reader, (layer, site, _) = open_sae_and_store(cfg.sae, cfg.store)
    tokenizer = load_tokenizer(reader.manifest.identity.tokenizer)
    special_ids = special_token_ids(tokenizer)
    stats = measure_features(sae, reader, layer, special_ids, cfg.top, cfg.max_tokens, site)
    live_ids = torch.nonzero(stats.live_F).flatten().numpy()
    records = feature_records(stats, live_ids, top_contexts(stats, live_ids, reader, tokenizer, cfg.context))
    special = special_token_features(records, cfg.special_threshold)
    summary = {"sae": cfg.sae, "store": cfg.store, "store_fingerprint": reader.manifest.fingerprint,
               "layer": layer, "d_sae": sae.d_sae, "n_tokens": stats.n_tokens, "n_live": len(records),
               "special_threshold": cfg.special_threshold,
               "special_tokens": tokenizer.convert_ids_to_tokens(special_ids.tolist())}
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "features.parquet", lambda path: feature_table(records).to_parquet(path, index=False))
    write_text_atomically(out / "special_token_features.json", json.dumps({**summary, "features": special}, indent=1))
    html = render_dashboard(summary, records, special, cfg.dashboard_features, cfg.dashboard_contexts)
    write_text_atomically(out / "dashboard.html", html)
    write_text_atomically(out / "features.json", json.dumps({**summary, "features": records}))
    return {**summary, "special": special, "out": str(out)}


def format_summary(result: dict) -> str:
    lines = [f"{result['n_live']:,} of {result['d_sae']:,} features live on {result['n_tokens']:,} tokens; "
             f"written to {result['out']}",
             f"special-token features (>= {result['special_threshold']:.0%} of their activation mass on "
             f"template/special tokens): {len(result['special'])}"]
    for feature in result["special"][:SPECIAL_PRINTED]:
        fires_on = ", ".join(f"{token!r} x{count}" for token, count in feature["fires_on"].items())
        lines.append(f"  feature {feature['id']}: share {feature['special_share']:.2f}, "
                     f"density {feature['density']:.4f}, fires on {fires_on}")
    if len(result["special"]) > SPECIAL_PRINTED:
        lines.append(f"  ... {len(result['special']) - SPECIAL_PRINTED} more in special_token_features.json")
    return "\n".join(lines)
