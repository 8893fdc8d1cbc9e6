"""Contexts of chosen store rows: windows that stay inside the row's instance, token ids read block by block
(only the blocks that hold a wanted row, so a store larger than RAM is fine), and per-token strings."""

import numpy as np

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
    out = np.empty(len(rows), dtype=reader.group[name].dtype)
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
