"""`instructsae extract` under torchrun: N ranks write one store, one sub-store per work unit (store/parts.py).

Every rank plans the same instances (the whole store's --max-tokens / --max-instances) and cuts them into the same
work units (plan.work_units: they depend on the dataset and config only). Before anyone writes, every rank notes
which units are already complete; the others are dealt out in turn, the j-th unfinished unit to rank j mod N.
Units hold equal token counts, so dealing them out balances tokens. Each rank extracts its units into their own
parts, each resumable like any store. When all ranks are done, rank 0 checks every part, sums their counts and
statistics into the top-level manifest and marks the store complete.

A killed rank (torchrun then ends the others) leaves complete parts, at most one partial part per rank and an
incomplete store; the same command on any number of ranks keeps the complete parts, resumes the partial ones from
their last commit, and ends with exactly the instances of a single-process run.
"""

import functools
from collections.abc import Iterable

from tqdm.auto import tqdm

from instructsae import __version__, distributed
from instructsae.errors import UserError
from instructsae.extract.data import DatasetReader
from instructsae.extract.data_report import data_notes, summed
from instructsae.extract.instances import TokenizedInstance
from instructsae.lm.models import LoadedModel
from instructsae.extract.plan import work_units
from instructsae.store.location import location_is_occupied, remove_store, zarr_location
from instructsae.store.parts import existing_parts, part_location, part_name
from instructsae.store.reader import is_store, read_manifest
from instructsae.store.writer import StoreWriter
from instructsae.schemas.extract import ExtractConfig
from instructsae.schemas.manifest import (
    MANIFEST_KEY, LayerStats, StoreIdentity, StoreManifest, StorePart, attn_implementations,
)

CHUNKS_PER_PART = 64


def default_part_tokens(chunk_tokens: int) -> int:
    return CHUNKS_PER_PART * chunk_tokens


def commit_top(out: str, manifest: StoreManifest, create: bool = False) -> None:
    """The top-level group holds only the manifest, the whole store's commit record."""
    import zarr

    group = zarr.open_group(zarr_location(out), mode="w" if create else "r+", zarr_format=3)
    group.attrs[MANIFEST_KEY] = manifest.model_dump(mode="json")


def check_top(cfg: ExtractConfig, identity: StoreIdentity) -> StoreManifest | None:
    """The existing multi-rank store at --out to continue, or None when a new one is to be made (refusals as for
    one process; every rank checks, only rank 0 then creates)."""
    from instructsae.extract.run import refuse_another_config

    out = cfg.out
    if is_store(out) and not cfg.overwrite:
        existing = read_manifest(out)
        refuse_another_config(cfg, existing, identity.model_dump(mode="json"))
        if existing.part_tokens is None and not existing.complete:
            raise UserError(f"store {out} was started by one process: finish it without torchrun, or --overwrite")
        if cfg.part_tokens is not None and existing.part_tokens not in (None, cfg.part_tokens):
            raise UserError(f"store {out} was started with --part-tokens {existing.part_tokens}, "
                            f"not {cfg.part_tokens}: rerun without it or with that value")
        return existing
    if not is_store(out) and location_is_occupied(out):
        raise UserError(f"output path exists and is not a store: {out} (--overwrite replaces only instructsae "
                        "stores: move it away or choose another --out)")
    return None


def run_parts(cfg: ExtractConfig, lm: LoadedModel, dataset: DatasetReader, identity: StoreIdentity,
              chat_template: str | None, planned: Iterable[TokenizedInstance], show_progress: bool) -> StoreManifest:
    """This rank's share of a multi-rank extraction; `planned`: the whole store's instances, in order.

    Called with the process group started and the store's writer lock held by rank 0 for every rank (run.py):
    the lock covers the store and all its parts, and within one command a part is written only by the rank
    the deal gives it to."""
    place = distributed.ranks()
    top = check_top(cfg, identity)
    distributed.barrier()  # every rank has looked at --out before rank 0 creates anything there
    if place.is_main and top is None:
        remove_store(cfg.out)  # --overwrite of a store (check_top refused anything else)
        top = StoreManifest(tool_version=__version__, identity=identity, fingerprint=identity.fingerprint(),
                            chat_template=chat_template, attn_implementation=lm.attn_implementation,
                            part_tokens=cfg.part_tokens or default_part_tokens(identity.chunk_tokens))
        commit_top(cfg.out, top.model_copy(update={"n_truncated": 0, "tokens_truncated": 0}), create=True)
    distributed.barrier()  # the top-level store exists before any rank reads it
    top = read_manifest(cfg.out)
    if top.complete:
        if place.is_main:
            tqdm.write(f"store {cfg.out} is already complete ({top.n_tokens:,} tokens); nothing to do")
        distributed.finish()
        return top
    done = {index for index, manifest in existing_parts(cfg.out).items() if manifest.complete}
    distributed.barrier()  # every rank has seen the same finished units before any rank writes

    bar = tqdm(desc=f"extract (rank {place.rank}/{place.world})", unit="tok", unit_scale=True, dynamic_ncols=True,
               disable=not show_progress or not place.is_main)
    n_units, pending = 0, 0
    try:
        for index, unit in work_units(planned, top.part_tokens, cfg.keep_first_token):
            n_units = index + 1
            if index in done:
                continue
            if pending % place.world == place.rank:
                extract_unit(cfg, lm, dataset, part_location(cfg.out, index), top, unit, bar)
            pending += 1
    finally:
        bar.close()
    if n_units == 0:
        raise UserError(f"dataset '{cfg.dataset}' gave no usable instances "
                        f"({dataset.skip_report() or 'it has no rows'})")
    distributed.barrier()  # every unit is written
    if place.is_main:
        top = finish_top(cfg.out, top, n_units, dataset)
        for note in data_notes(top, dataset):
            tqdm.write(f"note: {note}")
    distributed.finish()  # rank 0 has committed the whole store before any rank returns
    return read_manifest(cfg.out)


def extract_unit(cfg: ExtractConfig, lm: LoadedModel, dataset: DatasetReader, location: str, top: StoreManifest,
                 unit: list[TokenizedInstance], bar) -> None:
    """One work unit into its own part: created, or resumed from its last commit; whole when `finish` returns.
    (A part is usually smaller than a shard, so it is written at `finish`: a killed rank redoes its part.)"""
    from instructsae.extract.run import write_instances

    if is_store(location):
        writer = StoreWriter.resume(location)
    else:
        fresh = StoreManifest(tool_version=__version__, identity=top.identity, fingerprint=top.fingerprint,
                              chat_template=top.chat_template, n_truncated=0, tokens_truncated=0)
        writer = StoreWriter.create(location, fresh)
    manifest = write_instances(writer, unit[writer.manifest.n_instances:], cfg, lm, dataset, bar)
    writer.finish(manifest.model_copy(update={"complete": True}))


def finish_top(out: str, top: StoreManifest, n_units: int, dataset: DatasetReader) -> StoreManifest:
    """Every part checked complete; their counts and norm sums become the whole store's; complete."""
    parts = existing_parts(out)
    missing = [index for index in range(n_units) if index not in parts or not parts[index].complete]
    if missing:
        raise UserError(f"store {out}: work unit {part_name(missing[0])} is not complete after every rank finished")
    layer_stats: dict[str, LayerStats] = {}
    for index in range(n_units):
        for layer, stats in parts[index].layer_stats.items():
            layer_stats[layer] = layer_stats.get(layer, LayerStats()).add(stats.count, stats.sum_sq_norm,
                                                                          stats.sum_norm, stats.nonfinite)
    manifest = top.model_copy(update={
        "n_tokens": sum(parts[i].n_tokens for i in range(n_units)),
        "n_instances": sum(parts[i].n_instances for i in range(n_units)),
        "rows_used": dataset.rows_used, "rows_skipped": dataset.rows_skipped,
        "rows_skipped_by_reason": dict(dataset.skipped), "layer_stats": layer_stats,
        **summed([parts[i] for i in range(n_units)]),
        "parts": [StorePart(name=part_name(i), n_tokens=parts[i].n_tokens, n_instances=parts[i].n_instances)
                  for i in range(n_units)],
        "complete": True,
        "attn_implementation": functools.reduce(
            attn_implementations, (parts[i].attn_implementation for i in range(n_units)), top.attn_implementation),
    })
    commit_top(out, manifest)
    return manifest
