"""`instructsae convert OLD --out NEW`: rewrite a finished store of format 1 (one file per chunk, no checksums) or 2
in the current format, through the same writer an extraction uses.

Format 1 has nothing to check its bytes against, and zarr wrote no file for an all-zero chunk, so its rows
are read as zarr gives them; from the new store on, every chunk carries its crc32c.
"""

from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm

from instructsae.errors import UserError
from instructsae.schemas.manifest import FORMAT_VERSION, MANIFEST_KEY, StoreIdentity, StoreManifest
from instructsae.store.layout import (
    INSTANCE_COLUMNS, TOKEN_COLUMNS, TokenBlock, default_shard_tokens, layer_array_name,
)
from instructsae.store.location import location_exists, location_is_occupied, zarr_location
from instructsae.locks import writer_lock
from instructsae.store.writer import StoreWriter

BLOCK_TOKENS = 65536  # rows read from the old store at a time (whole instances; more when one is longer)


def _old_manifest(path: str) -> dict:
    if not location_exists(path):
        raise UserError(f"store not found: {path}")
    try:
        raw = dict(zarr.open_group(zarr_location(path), mode="r").attrs[MANIFEST_KEY])
    except Exception:
        raise UserError(f"not an instructsae store (no zarr group with a manifest): {path}") from None
    if raw.get("format_version") == FORMAT_VERSION:
        raise UserError(f"store {path} is already in store format {FORMAT_VERSION}: nothing to convert")
    if raw.get("format_version") not in (1, 2):
        raise UserError(f"store {path} has store format {raw.get('format_version')!r}, which convert does not know")
    if raw.get("part_tokens") is not None:
        raise UserError(f"store {path} was written by several ranks: convert rewrites single-process stores only")
    if not raw.get("complete"):
        raise UserError(f"store {path} is incomplete: finish it with the version that began it, then convert")
    return raw


def convert_store(path: str, out: str, shard_mb: float = 512.0, show_progress: bool = True) -> StoreManifest:
    """Format 1 (no checksums, a file per chunk) or 2 (chunks not bound to their place) rewritten in the current
    format, under the new store's writer lock."""
    raw = _old_manifest(path)
    with writer_lock(out, "store"):
        if location_is_occupied(out):
            raise UserError(f"--out {out} exists: convert writes a new store")
        return _rewrite(path, out, raw, shard_mb, show_progress)


def _rewrite(path: str, out: str, raw: dict, shard_mb: float, show_progress: bool) -> StoreManifest:
    old = zarr.open_group(zarr_location(path), mode="r")
    fields = dict(raw["identity"])
    fields["shard_tokens"] = default_shard_tokens(fields["d_model"], fields["dtype"], fields["chunk_tokens"], shard_mb)
    identity = StoreIdentity.model_validate(fields)
    final = StoreManifest.model_validate({**raw, "format_version": FORMAT_VERSION, "identity": identity,
                                          "fingerprint": identity.fingerprint()})
    manifest = final.model_copy(update={"n_tokens": 0, "n_instances": 0, "complete": False})
    writer = StoreWriter.create(out, manifest)
    starts = np.asarray(old["instance_start"][: final.n_instances], dtype=np.int64)
    lengths = np.asarray(old["instance_length"][: final.n_instances], dtype=np.int64)
    ends = starts + lengths
    bar = tqdm(total=final.n_tokens, unit="tok", unit_scale=True, desc="convert", disable=not show_progress)
    first = 0
    while first < final.n_instances:
        stop = max(first + 1, int(np.searchsorted(ends, starts[first] + BLOCK_TOKENS, side="right")))
        rows = slice(int(starts[first]), int(ends[stop - 1]))
        block = TokenBlock(
            acts={key: np.asarray(old[layer_array_name(*key)][rows]) for key in identity.acts_keys},
            **{name: np.asarray(old[name][rows]) for name in TOKEN_COLUMNS},
            **{name: np.asarray(old[name][first:stop]) for name in INSTANCE_COLUMNS},
        )
        manifest = manifest.model_copy(update={"n_tokens": rows.stop, "n_instances": stop})
        writer.append(block, manifest)
        bar.update(block.n_tokens)
        first = stop
    bar.close()
    writer.finish(final)
    return final


def describe(manifest: StoreManifest, out: str | Path) -> str:
    return (f"store {out}: {manifest.n_tokens:,} tokens, {manifest.n_instances:,} instances in store format "
            f"{FORMAT_VERSION} (`instructsae verify {out}` reads it all back)")
