"""Contexts of chosen features read from a store, for scoring explanations by prediction (delphi's detection
and fuzzing): activating contexts sampled across each feature's activation quantiles, not only its top, and
non-activating contexts drawn from the same store, each with the feature's activation at every token.

One pass over the store keeps, per feature, a uniform random sample of the rows where it fires (bottom-k of a
random key per row, merged chunk by chunk); the sample is then cut into equal-count activation bins and drawn
from round-robin, so any prefix of n_quantiles * m contexts holds m from every bin.
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from instructsae.evaluate.contexts import context_windows, gather_column, latents_at, token_strings, window_rows
from instructsae.sae import SparseAutoencoder
from instructsae.schemas.manifest import ROLES
from instructsae.store.reader import StoreReader

LATENT_BUDGET = 1 << 24  # latents per encoded batch, whatever d_sae is
RESERVOIR = 512  # firing rows kept per feature to draw the quantile bins from
POOL_PER_CONTEXT = 4  # random windows drawn per wanted non-activating context (dense features reject many)


@torch.no_grad()
def firing_sample(sae: SparseAutoencoder, reader: StoreReader, layer: int, feature_ids: np.ndarray, size: int,
                  limit: int, seed: int, site: str = "resid_post") -> tuple[np.ndarray, np.ndarray]:
    """Per feature, up to `size` rows where it fires, drawn uniformly without replacement, and their
    activations: rows [K, size] (-1 past the rows it has) and acts [K, size]."""
    n_features, ids = len(feature_ids), torch.from_numpy(feature_ids)
    generator = torch.Generator().manual_seed(seed)
    keys_KS = torch.full((n_features, size), torch.inf)
    rows_KS = torch.full((n_features, size), -1, dtype=torch.int64)
    acts_KS = torch.zeros(n_features, size)
    batch_tokens = max(1, LATENT_BUDGET // sae.d_sae)
    with tqdm(total=limit, desc="sample contexts", unit="tok", unit_scale=True, dynamic_ncols=True) as bar:
        for chunk_start in range(0, limit, reader.chunk_tokens):
            x_ND = reader.read_acts(layer, chunk_start, min(chunk_start + reader.chunk_tokens, limit), site)
            for start in range(0, len(x_ND), batch_tokens):
                acts_BK = sae.encode(x_ND[start:start + batch_tokens])[:, ids].float()
                keys_BK = torch.rand(acts_BK.shape, generator=generator).masked_fill(acts_BK <= 0, torch.inf)
                rows_B = torch.arange(len(acts_BK)) + chunk_start + start
                keys = torch.cat([keys_KS, keys_BK.T], dim=1)
                keep = keys.topk(size, dim=1, largest=False).indices
                keys_KS = keys.gather(1, keep)
                rows_KS = torch.cat([rows_KS, rows_B.expand(n_features, -1)], dim=1).gather(1, keep)
                acts_KS = torch.cat([acts_KS, acts_BK.T], dim=1).gather(1, keep)
            bar.update(len(x_ND))
    fired_KS = torch.isfinite(keys_KS)
    return rows_KS.masked_fill(~fired_KS, -1).numpy(), acts_KS.masked_fill(~fired_KS, 0).numpy()


def quantile_picks(acts: np.ndarray, where: list[tuple[int, int]], n_quantiles: int, taken: set, gap: int,
                   n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to n (index into acts, bin) pairs: acts cut into n_quantiles equal-count bins by value (bin 1 the
    lowest), each bin shuffled, then one taken per bin in turn, skipping any whose (instance, position) in
    `where` is within 2 x gap tokens of one in `taken` or picked before (so no two windows share a token)."""
    queues = [list(rng.permutation(part)) for part in np.array_split(np.argsort(acts, kind="stable"), n_quantiles)]
    near, picked = set(taken), []
    while len(picked) < n and any(queues):
        for q, queue in enumerate(queues):
            while queue and len(picked) < n:
                index = int(queue.pop(0))
                instance, position = where[index]
                if not any((instance, position + d) in near for d in range(-2 * gap, 2 * gap + 1)):
                    picked.append((index, q + 1))
                    near.add((instance, position))
                    break
    return picked


@torch.no_grad()
def latents_of_rows(sae: SparseAutoencoder, reader: StoreReader, layer: int, rows: np.ndarray,
                    feature_ids: np.ndarray, site: str = "resid_post") -> np.ndarray:
    """The chosen features' activations at `rows` (any order) [len(rows), K], reading each chunk once."""
    n_features = len(feature_ids)
    pairs = latents_at(sae.encode, reader, layer, np.repeat(rows, n_features), np.tile(feature_ids, len(rows)),
                       reader.chunk_tokens, site)
    return pairs.reshape(len(rows), n_features)


def sample_contexts(sae: SparseAutoencoder, reader: StoreReader, layer: int, tokenizer, feature_ids: list[int],
                    n_activating: int, n_non_activating: int, n_quantiles: int, context: int,
                    max_tokens: int | None, seed: int, taken: list[set[tuple[int, int]]],
                    site: str = "resid_post") -> list[dict]:
    """Per feature, {"activating": contexts in quantile round-robin order, "non_activating": contexts where it
    is zero at every token}. A context is a features.json context (tokens, focus, activation, instance,
    position, role) with "acts", the feature at every token, and (activating ones) "quantile", its bin 1..n.
    `taken[k]` holds (instance, position) of contexts already shown for feature k, which none here overlaps.
    `site`: what the SAE reads at `layer` (a transcoder's input site)."""
    ids = np.asarray(feature_ids, dtype=np.int64)
    limit = reader.n_tokens if max_tokens is None else min(max_tokens, reader.n_tokens)
    rows_KS, acts_KS = firing_sample(sae, reader, layer, ids, RESERVOIR, limit, seed, site)
    rng = np.random.default_rng(seed)
    fired_KS = rows_KS >= 0
    instance_KS, position_KS = np.full_like(rows_KS, -1), np.full_like(rows_KS, -1)
    instance_KS[fired_KS] = gather_column(reader, "instance", rows_KS[fired_KS])
    position_KS[fired_KS] = gather_column(reader, "position", rows_KS[fired_KS])
    chosen = []  # per feature: (rows, bins)
    for k in range(len(ids)):
        fired = fired_KS[k]
        where = list(zip(instance_KS[k][fired].tolist(), position_KS[k][fired].tolist()))
        picks = quantile_picks(acts_KS[k][fired], where, n_quantiles, taken[k], context, n_activating, rng)
        chosen.append((rows_KS[k][fired][[i for i, _ in picks]].astype(np.int64), [q for _, q in picks]))
    pool = rng.choice(limit, size=min(limit, POOL_PER_CONTEXT * n_non_activating), replace=False)
    all_rows = np.concatenate([rows for rows, _ in chosen] + [pool]).astype(np.int64)
    windows = read_windows(sae, reader, layer, tokenizer, all_rows, ids, context, site)
    result, offset = [], 0
    for k, (rows, bins) in enumerate(chosen):
        activating = [{**window_for(windows[offset + i], k), "quantile": q} for i, q in enumerate(bins)]
        offset += len(rows)
        result.append({"activating": activating})
    pooled = windows[offset:]
    for k, feature in enumerate(result):
        quiet = [window_for(window, k) for window in pooled if window["acts_WK"][:, k].max() <= 0]
        feature["non_activating"] = [quiet[i] for i in rng.permutation(len(quiet))[:n_non_activating]]
    return result


def read_windows(sae: SparseAutoencoder, reader: StoreReader, layer: int, tokenizer, rows: np.ndarray,
                 feature_ids: np.ndarray, context: int, site: str = "resid_post") -> list[dict]:
    """The window around each row, with every chosen feature's activation at each of its tokens."""
    instance = gather_column(reader, "instance", rows)
    start, stop = context_windows(rows, instance, reader.read_column("instance_start"),
                                  reader.read_column("instance_length"), context)
    all_rows, offsets = window_rows(start, stop)
    strings = token_strings(tokenizer, gather_column(reader, "token_id", all_rows))
    acts_WK = latents_of_rows(sae, reader, layer, all_rows, feature_ids, site)
    position, role = gather_column(reader, "position", rows), gather_column(reader, "role", rows)
    return [{"tokens": strings[offsets[i]:offsets[i + 1]], "focus": int(rows[i] - start[i]),
             "instance": int(instance[i]), "position": int(position[i]), "role": ROLES[role[i]],
             "acts_WK": acts_WK[offsets[i]:offsets[i + 1]]} for i in range(len(rows))]


def window_for(window: dict, k: int) -> dict:
    """A window as feature k's context: its activations, and the activation at the focus row."""
    acts = window["acts_WK"][:, k].tolist()
    return {key: value for key, value in window.items() if key != "acts_WK"} | {
        "acts": acts, "activation": acts[window["focus"]]}
