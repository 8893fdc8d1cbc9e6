"""Contexts of chosen store rows: windows that stay inside the row's instance, token ids read block by block
(only the blocks that hold a wanted row, so a store larger than RAM is fine), per-token strings, and a feature's
latent on every token of its windows (each distinct row encoded once)."""

import numpy as np
import torch

from instructsae.store.reader import StoreReader

GATHER_BLOCK_TOKENS = 1 << 20


def context_windows(rows_K: np.ndarray, instance_K: np.ndarray, instance_start_I: np.ndarray,
                    instance_length_I: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) rows of up to `context` tokens each side of every row, clipped to the row's instance."""
    first_K = instance_start_I[instance_K]
    end_K = first_K + instance_length_I[instance_K]
    return np.maximum(rows_K - context, first_K), np.minimum(rows_K + context + 1, end_K)


def window_rows(start_K: np.ndarray, stop_K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All rows of all windows, concatenated, and the offsets where each window begins (length K + 1)."""
    lengths_K = stop_K - start_K
    offsets = np.concatenate([[0], np.cumsum(lengths_K)])
    rows = np.repeat(start_K - offsets[:-1], lengths_K) + np.arange(offsets[-1])
    return rows, offsets


def gather_column(reader: StoreReader, name: str, rows: np.ndarray,
                  block_tokens: int = GATHER_BLOCK_TOKENS) -> np.ndarray:
    """reader's per-token column `name` at `rows` (any order, repeats allowed), reading only needed blocks."""
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    blocks, firsts = np.unique(sorted_rows // block_tokens, return_index=True)
    out = np.empty(len(rows), dtype=reader.read_column(name, 0, 0).dtype)
    for block, first, last in zip(blocks, firsts, [*firsts[1:], len(rows)]):
        start = int(block) * block_tokens
        values = reader.read_column(name, start, start + block_tokens)
        out[order[first:last]] = values[sorted_rows[first:last] - start]
    return out


def token_strings(tokenizer, token_ids: np.ndarray) -> list[str]:
    """Each token decoded on its own (a byte-level piece of a longer character may show as U+FFFD)."""
    unique_ids, inverse = np.unique(token_ids, return_inverse=True)
    decoded = [tokenizer.decode([int(token_id)]) for token_id in unique_ids]
    return [decoded[index] for index in inverse.reshape(-1)]


def latents_at(encode, reader: StoreReader, layer: int, rows_P: np.ndarray, features_P: np.ndarray,
               batch_tokens: int, site: str = "resid_post") -> np.ndarray:
    """The latent of feature features_P[p] at store row rows_P[p], for every pair p: each distinct row is read
    once (chunk by chunk, only the chunks that hold one) and encoded once, batch_tokens rows at a time."""
    order = np.argsort(rows_P, kind="stable")
    rows, features = rows_P[order], features_P[order]
    unique_rows, first_pair, pairs_per_row = np.unique(rows, return_index=True, return_counts=True)
    row_of_pair = np.repeat(np.arange(len(unique_rows)), pairs_per_row)
    first_pair = np.append(first_pair, len(rows))
    acts = np.empty(len(rows), dtype=np.float32)
    chunks, first_row = np.unique(unique_rows // reader.chunk_tokens, return_index=True)
    for chunk, lo, hi in zip(chunks, first_row, [*first_row[1:], len(unique_rows)]):
        start = int(chunk) * reader.chunk_tokens
        x_ND = reader.read_acts(layer, start, min(start + reader.chunk_tokens, reader.n_tokens), site)
        for b in range(lo, hi, batch_tokens):
            e = min(b + batch_tokens, hi)
            latents_BF = encode(x_ND[torch.from_numpy(unique_rows[b:e] - start)]).float().numpy()
            pairs = slice(first_pair[b], first_pair[e])
            acts[pairs] = latents_BF[row_of_pair[pairs] - b, features[pairs]]
    out = np.empty_like(acts)
    out[order] = acts
    return out


def role_runs(roles: list[str]) -> list[list]:
    """[[role, count], ...] of consecutive equal roles: a window's roles in a few entries, not one per token."""
    runs: list[list] = []
    for role in roles:
        if runs and runs[-1][0] == role:
            runs[-1][1] += 1
        else:
            runs.append([role, 1])
    return runs


def significant(values: np.ndarray, digits: int = 4) -> list[float]:
    """Values rounded to `digits` significant digits (zeros stay 0.0): short in JSON, ample for a display."""
    values = values.astype(np.float64)
    magnitude = np.floor(np.log10(np.abs(np.where(values == 0, 1.0, values))))
    scale = 10.0 ** (digits - 1 - magnitude)
    return (np.round(values * scale) / scale).tolist()
