"""`instructsae features`: what each SAE feature responds to on a store, for a person to look at.

One streaming pass gives every feature's density, mean activation, role shares, activation histogram and top-N
rows; then the contexts of those rows are read, decoded and encoded again, so every token of a context carries
the feature's activation; the model's unembedding gives each feature's logit effects (lm/unembed.py). Writes
features.json (all live features), features.parquet (the per-feature table), contexts.parquet (one row per
context, per-token tokens, activations and roles), special_token_features.json and dashboard.html.

A context in features.json: activation, instance, position and role of its top token, `tokens` (strings),
`focus` (the top token's index in them), `acts` (the feature's latent on each token, 4 significant digits) and
`roles` ([[role, count], ...] runs over the tokens). A feature's `histogram`: counts of its nonzero activations
in bins of `width` from 0 (bin b: [b·width, (b+1)·width)). Its `logits`: {"promoted": [[token, logit change per
unit of activation], ...], "suppressed": [...], "histogram": the logit changes of the whole vocabulary in 40
bins from `low`, `width` each}, or null with --logits 0.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from instructsae.errors import UserError
from instructsae.evaluate.contexts import (context_windows, gather_column, latents_at, role_runs, significant,
                                          token_strings, window_rows)
from instructsae.evaluate.dashboard import render_dashboard
from instructsae.evaluate.feature_stats import FeatureStats
from instructsae.evaluate.run import open_sae_and_store
from instructsae.store.reader import StoreReader
from instructsae.fileio import built_aside, write_atomically, write_text_atomically
from instructsae.locks import writer_lock
from instructsae.lm.models import load_model, load_tokenizer
from instructsae.lm.unembed import logit_effects
from instructsae.schemas.features import FeaturesConfig
from instructsae.schemas.manifest import ROLE_CODE, ROLES
from instructsae.sae import SparseAutoencoder

LATENT_BUDGET = 1 << 24  # latents per encoded batch (64 MB of float32), whatever d_sae is
OUTPUT_FILES = ("features.json", "features.parquet", "contexts.parquet", "special_token_features.json",
                "dashboard.html")
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


def top_contexts(stats: FeatureStats, feature_ids: np.ndarray, reader: StoreReader, tokenizer, context: int,
                 sae: SparseAutoencoder, layer: int, site: str = "resid_post") -> list[list[dict]]:
    """Per feature, its top tokens (activation > 0, largest first) with their decoded context windows, the
    feature's activation on every token of each window and the windows' roles (`site`: what the SAE reads)."""
    acts_KN = stats.top_acts_FN[feature_ids].numpy()
    rows_KN = stats.top_rows_FN[feature_ids].numpy()
    fired_KN = acts_KN > 0
    rows = rows_KN[fired_KN]
    instance = gather_column(reader, "instance", rows)
    position = gather_column(reader, "position", rows)
    start, stop = context_windows(rows, instance, reader.read_column("instance_start"),
                                  reader.read_column("instance_length"), context)
    all_rows, offsets = window_rows(start, stop)
    strings = token_strings(tokenizer, gather_column(reader, "token_id", all_rows))
    roles = [ROLES[code] for code in gather_column(reader, "role", all_rows)]
    feature_of_context = np.repeat(feature_ids, fired_KN.sum(axis=1))
    with torch.no_grad():
        window_acts = latents_at(sae.encode, reader, layer, all_rows, np.repeat(feature_of_context, stop - start),
                                 max(1, LATENT_BUDGET // sae.d_sae), site)
    window_acts = significant(window_acts)
    contexts = []
    for k, activation in enumerate(acts_KN[fired_KN]):
        window = slice(offsets[k], offsets[k + 1])
        focus = int(rows[k] - start[k])
        contexts.append({"activation": float(activation), "instance": int(instance[k]), "position": int(position[k]),
                         "role": roles[offsets[k] + focus], "tokens": strings[window], "focus": focus,
                         "acts": window_acts[window], "roles": role_runs(roles[window])})
    per_feature = np.cumsum([0, *fired_KN.sum(axis=1)])
    return [contexts[per_feature[i]:per_feature[i + 1]] for i in range(len(feature_ids))]


def logit_lists(sae: SparseAutoencoder, feature_ids: np.ndarray, lm, tokenizer,
                top: int) -> tuple[list[dict | None], str | None]:
    """Per feature, the tokens its decoder row promotes and suppresses most, and how they were computed (None for
    all, and no description, without a model)."""
    if lm is None:
        return [None] * len(feature_ids), None
    effects = logit_effects(sae.W_dec.detach()[torch.from_numpy(feature_ids)], lm.model, top)
    ids = sorted(set(effects.promoted_ids_FK.flatten().tolist()) | set(effects.suppressed_ids_FK.flatten().tolist()))
    names = dict(zip(ids, token_strings(tokenizer, np.array(ids, dtype=np.int64))))

    def pairs(ids_FK: torch.Tensor, values_FK: torch.Tensor) -> list[list[list]]:
        values = significant(values_FK.numpy().reshape(-1))
        per_feature = values_FK.shape[1]
        return [[[names[i], values[k * per_feature + j]] for j, i in enumerate(ids)]
                for k, ids in enumerate(ids_FK.tolist())]

    histograms = [{"counts": counts, "low": low, "width": width} for counts, low, width in
                  zip(effects.hist_counts_FN.tolist(), effects.hist_low_F.tolist(), effects.hist_width_F.tolist())]
    lists = [{"promoted": promoted, "suppressed": suppressed, "histogram": histogram}
             for promoted, suppressed, histogram in zip(pairs(effects.promoted_ids_FK, effects.promoted_FK),
                                                        pairs(effects.suppressed_ids_FK, effects.suppressed_FK),
                                                        histograms)]
    return lists, (f"W_dec[f] @ W_U after the final norm's gain ({effects.final_norm or 'no final norm'}), "
                   f"the logit change per unit of activation")


def feature_records(stats: FeatureStats, feature_ids: np.ndarray, tops: list[list[dict]],
                    logits: list[dict | None]) -> list[dict]:
    """The features.json entries (autointerp reads these field names)."""
    density, mean = stats.density_F.tolist(), stats.mean_activation_F.tolist()
    role_share_RF, special_share = stats.role_share_RF.numpy(), stats.special_share_F.tolist()
    records = []
    for f, top, logit in zip(feature_ids.tolist(), tops, logits):
        counts, width = stats.histogram(f)
        records.append({"id": int(f), "density": density[f], "mean_activation": mean[f],
                        "role_share": {role: float(role_share_RF[r, f]) for r, role in enumerate(ROLES)},
                        "special_share": special_share[f], "top": top,
                        "histogram": {"counts": counts, "width": width},
                        "logits": logit})
    return records


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


def context_table(records: list[dict]) -> pd.DataFrame:
    """contexts.parquet: one row per (feature, rank) with its tokens, the feature's activation on each and roles."""
    return pd.DataFrame([{"feature": r["id"], "rank": rank, "activation": c["activation"], "instance": c["instance"],
                          "position": c["position"], "role": c["role"], "focus": c["focus"], "tokens": c["tokens"],
                          "acts": np.array(c["acts"], dtype=np.float32),
                          "roles": [role for role, count in c["roles"] for _ in range(count)]}
                         for r in records for rank, c in enumerate(r["top"])])


def load_views_model(cfg: FeaturesConfig, reader: StoreReader):
    """The model that made the store (its unembedding gives the logit effects), or None with --logits 0."""
    if cfg.logits == 0:
        return None
    identity = reader.manifest.identity
    try:
        return load_model(identity.model, identity.model_dtype, "cpu")
    except UserError as error:
        raise UserError(f"{error} (the store's model, for its unembedding; --logits 0 goes without it)") from None


def measure_views(cfg: FeaturesConfig) -> tuple[dict, list[dict], list[dict]]:
    """(summary, records of every live feature, special-token features): what the files and the page show."""
    sae, _, reader, (layer, site, _) = open_sae_and_store(cfg.sae, cfg.store)  # site: what the SAE reads
    lm = load_views_model(cfg, reader)
    tokenizer = load_tokenizer(reader.manifest.identity.tokenizer)  # the store's, which made its token ids
    special_ids = special_token_ids(tokenizer)
    stats = measure_features(sae, reader, layer, special_ids, cfg.top, cfg.max_tokens, site)
    live_ids = torch.nonzero(stats.live_F).flatten().numpy()
    tops = top_contexts(stats, live_ids, reader, tokenizer, cfg.context, sae, layer, site)
    logits, logits_method = logit_lists(sae, live_ids, lm, tokenizer, cfg.logits)
    records = feature_records(stats, live_ids, tops, logits)
    special = special_token_features(records, cfg.special_threshold)
    summary = {"sae": cfg.sae, "store": cfg.store, "store_fingerprint": reader.manifest.fingerprint,
               "model": reader.manifest.identity.model, "layer": layer, "d_sae": sae.d_sae,
               "n_tokens": stats.n_tokens, "n_live": len(records), "special_threshold": cfg.special_threshold,
               "special_tokens": tokenizer.convert_ids_to_tokens(special_ids.tolist()),
               "logits": logits_method}
    return summary, records, special


def run_features(cfg: FeaturesConfig) -> dict:
    out = Path(cfg.out)
    with writer_lock(out, "features folder"):  # one writer at a time; a link or a read-only --out: one line
        return _run_features(cfg, out)


def _run_features(cfg: FeaturesConfig, out: Path) -> dict:
    check_out_folder(out)
    summary, records, special = measure_views(cfg)
    with built_aside(out, lambda name: name in OUTPUT_FILES or name.removesuffix(".partial") in OUTPUT_FILES) \
            as building:  # the files swap in together
        write_atomically(building / "features.parquet",
                         lambda path: feature_table(records).to_parquet(path, index=False))
        write_atomically(building / "contexts.parquet",
                         lambda path: context_table(records).to_parquet(path, index=False))
        write_text_atomically(building / "special_token_features.json",
                              json.dumps({**summary, "features": special}, indent=1))
        html = render_dashboard(summary, records, special, cfg.dashboard_features, cfg.dashboard_contexts)
        write_text_atomically(building / "dashboard.html", html)
        write_text_atomically(building / "features.json", json.dumps({**summary, "features": records}))
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
