"""`instructsae extract`: dataset -> instances -> LM forward with hooks -> zarr store, resumably."""

import hashlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from instructsae import __version__, distributed
from instructsae.devices import resolve_device, resolve_model_dtype
from instructsae.errors import UserError
from instructsae.extract.chat import system_policy_applies
from instructsae.extract.data import DatasetReader
from instructsae.extract.data_report import counted, data_notes
from instructsae.extract.instances import TokenizedInstance
from instructsae.extract.parts import run_parts
from instructsae.extract.plan import grouped, planned_instances
from instructsae.extract.preflight import check_rows_used
from instructsae.store.layout import (
    TokenBlock, acts_to_storage, count_nonfinite, default_chunk_tokens, default_shard_tokens,
)
from instructsae.store.location import location_is_occupied, remove_store
from instructsae.store.reader import is_store, read_manifest
from instructsae.store.writer import StoreWriter
from instructsae.extract.writer_thread import BackgroundWriter
from instructsae.lm.batches import batch_budget, length_batches, padded_batch
from instructsae.lm.hooks import activations_at
from instructsae.lm.models import LoadedModel, load_model, load_tokenizer, model_location, model_sha256
from instructsae.locks import local_path
from instructsae.run_folder import refuse_enclosing_cwd
from instructsae.schemas.base import differing_fields
from instructsae.schemas.extract import ExtractConfig
from instructsae.schemas.manifest import LayerStats, StoreIdentity, StoreManifest, attn_implementations
from instructsae.schemas.sites import DEFAULT_SITE, stats_key


def identity_from_arguments(cfg: ExtractConfig) -> dict:
    """The store identity fields the arguments alone decide (the rest needs the model or the dataset's bytes)."""
    fields = dict(model=cfg.model, tokenizer=cfg.model, dataset=cfg.dataset, mode=cfg.mode,
                  max_len=cfg.max_len, block_len=cfg.block_len, max_instances=cfg.max_instances,
                  skip_instances=cfg.skip_instances, max_tokens=cfg.max_tokens, keep_first_token=cfg.keep_first_token,
                  layers=list(cfg.layers), sites=identity_sites(cfg), dtype=cfg.dtype, model_dtype=cfg.model_dtype,
                  column=cfg.column, role_key=cfg.role_key, content_key=cfg.content_key)
    fields.update(system_column=cfg.system_column, prompt_column=cfg.prompt_column,
                  response_column=cfg.response_column)
    if cfg.chunk_tokens is not None:
        fields["chunk_tokens"] = cfg.chunk_tokens
    return fields


def identity_sites(cfg: ExtractConfig) -> list[str] | None:
    """None for resid_post alone, so such a store keeps the identity and fingerprint it had before sites (a list,
    as a manifest read back holds it)."""
    return None if cfg.sites == (DEFAULT_SITE,) else list(cfg.sites)


def build_identity(cfg: ExtractConfig, lm: LoadedModel, dataset: DatasetReader) -> StoreIdentity:
    template = getattr(lm.tokenizer, "chat_template", None)
    chunk_tokens = cfg.chunk_tokens or default_chunk_tokens(lm.d_model, cfg.dtype)
    return StoreIdentity(
        model=cfg.model, tokenizer=cfg.model, model_sha256=model_sha256(cfg.model),
        chat_template_sha256=hashlib.sha256(template.encode()).hexdigest() if template else None,
        dataset=cfg.dataset, dataset_sha256=dataset.sha256(), split=dataset.split,
        dataset_revision=dataset.source.revision, column=cfg.column, role_key=cfg.role_key,
        content_key=cfg.content_key, dedup=cfg.dedup_settings(), mode=cfg.mode,
        max_len=cfg.max_len, block_len=cfg.block_len, max_instances=cfg.max_instances,
        skip_instances=cfg.skip_instances, max_tokens=cfg.max_tokens, keep_first_token=cfg.keep_first_token,
        layers=cfg.layers, sites=identity_sites(cfg), d_model=lm.d_model, dtype=cfg.dtype, model_dtype=cfg.model_dtype,
        chunk_tokens=chunk_tokens, shard_tokens=default_shard_tokens(lm.d_model, cfg.dtype, chunk_tokens, cfg.shard_mb),
        system_prompt=cfg.system_prompt if system_policy_applies(lm.tokenizer) else None,
        system_column=cfg.system_column, prompt_column=cfg.prompt_column, response_column=cfg.response_column,
    )


def refuse_another_config(cfg: ExtractConfig, existing: StoreManifest, identity: dict) -> None:
    """An existing store of another config is replaced only with --overwrite; the refusal names what differs."""
    if cfg.overwrite:
        return
    old = existing.identity.model_dump(mode="json")
    for name in ("model", "tokenizer"):  # stores made before paths were recorded absolute
        old[name] = model_location(old[name])
    changes = differing_fields({name: old.get(name) for name in identity}, identity)
    if changes:
        shown = ", ".join(f"{name}: {before} -> {after}" for name, before, after in changes[:4])
        more = f" and {len(changes) - 4} more" if len(changes) > 4 else ""
        raise UserError(f"store {cfg.out} was made with another config ({shown}{more}): use --overwrite or "
                        "another --out")


def check_layers(layers: tuple[int, ...], lm: LoadedModel) -> None:
    bad = [layer for layer in layers if layer >= lm.n_layers]
    if bad:
        raise UserError(f"layer {bad[0]} is out of range: model '{lm.name}' has {lm.n_layers} layers "
                        f"(0..{lm.n_layers - 1})")


def open_writer(cfg: ExtractConfig, identity: StoreIdentity, chat_template: str | None) -> StoreWriter | None:
    """Create, resume or refuse; None when the store is already complete."""
    out = cfg.out
    if is_store(out) and not cfg.overwrite:
        existing = read_manifest(out)
        refuse_another_config(cfg, existing, identity.model_dump(mode="json"))
        if existing.complete:
            return None
        return StoreWriter.resume(out)
    if is_store(out):
        remove_store(out)  # --overwrite: a store with our manifest, provably ours
    elif location_is_occupied(out):
        raise UserError(f"output path exists and is not a store: {out} (--overwrite replaces only instructsae "
                        "stores: move it away or choose another --out)")
    manifest = StoreManifest(tool_version=__version__, identity=identity, fingerprint=identity.fingerprint(),
                             chat_template=chat_template, n_truncated=0, tokens_truncated=0)
    return StoreWriter.create(out, manifest)


def group_tokens(cfg: ExtractConfig, chunk_tokens: int) -> int:
    """Tokens computed, then written and committed, at a time: whole chunks, and at least one forward batch."""
    return max(batch_budget(cfg.batch_tokens, cfg.device), 4 * chunk_tokens)


@dataclass
class GroupActs:
    """What the LM gave for a group, already on the host: per (layer, site), per instance, the activations in the
    store's dtype and each token's squared norm (float64, taken before the cast, for the normalisation statistics)."""

    acts: dict[tuple[int, str], list[torch.Tensor]]  # (layer, site) -> per instance [len, d_model], store dtype
    sq_norms: dict[tuple[int, str], list[torch.Tensor]]  # (layer, site) -> per instance [len], float64


def forward_group(lm: LoadedModel, group: list[TokenizedInstance], cfg: ExtractConfig) -> GroupActs:
    """Every instance of the group computed with no other in its context. Activations leave the device in the
    store's dtype (half the bytes over PCIe for bf16), their norms computed on the device first."""
    lengths = [len(instance.token_ids) for instance in group]
    keys = [(layer, site) for layer in cfg.layers for site in cfg.sites]
    per_instance: dict[tuple[int, str], list] = {key: [None] * len(group) for key in keys}
    sq_norms: dict[tuple[int, str], list] = {key: [None] * len(group) for key in keys}
    store_dtype = STORE_TORCH_DTYPES[cfg.dtype]
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    for batch in length_batches(lengths, batch_budget(cfg.batch_tokens, cfg.device)):
        input_ids_BS = padded_batch(group, batch, pad_id).to(cfg.device)
        # No attention mask: with right padding and causal attention no real token ever sees a pad, and
        # without a mask SDPA may pick its causal kernel (on this CPU no faster, BENCHMARKS.md, nor slower).
        for key, hidden_BSD in activations_at(lm.model, keys, input_ids_BS).items():
            squared_BS = hidden_BSD.float().pow(2).sum(-1, dtype=torch.float64)
            stored_BSD = hidden_BSD.to(store_dtype).cpu()
            squared_BS = squared_BS.cpu()
            for row, index in enumerate(batch):
                per_instance[key][index] = stored_BSD[row, : lengths[index]]
                sq_norms[key][index] = squared_BS[row, : lengths[index]]
    return GroupActs(per_instance, sq_norms)


STORE_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# (layer, site) -> (count, sum ||x||^2, sum ||x||, NaN/inf values)
LayerSums = dict[tuple[int, str], tuple[int, float, float, int]]


def build_block(group: list[TokenizedInstance], acts: GroupActs, first_instance: int,
                first_row: int, cfg: ExtractConfig) -> tuple[TokenBlock, LayerSums]:
    """Assemble a TokenBlock (the first token of each sequence dropped unless kept) and its norm sums."""
    drop = 0 if cfg.keep_first_token else 1
    token_id, instance, position, role, starts, lengths_kept, sources = [], [], [], [], [], [], []
    row = first_row
    for offset, item in enumerate(group):
        n = len(item.token_ids) - drop
        token_id.append(item.token_ids[drop:])
        instance.append(np.full(n, first_instance + offset, dtype=np.int32))
        position.append(np.arange(drop, drop + n, dtype=np.int32))
        role.append(item.roles[drop:])
        starts.append(row)
        lengths_kept.append(n)
        sources.append(item.source_row)
        row += n
    layer_acts, stats = {}, {}
    for key, tensors in acts.acts.items():
        stacked_ND = torch.cat([tensor[drop:] for tensor in tensors])
        squared_N = torch.cat([squared[drop:] for squared in acts.sq_norms[key]])
        layer_acts[key] = acts_to_storage(stacked_ND, cfg.dtype)
        # counted as stored: a finite float32 may still overflow float16
        nonfinite = count_nonfinite(layer_acts[key], cfg.dtype)
        stats[key] = (len(stacked_ND), float(squared_N.sum()), float(squared_N.sqrt().sum()), nonfinite)
    block = TokenBlock(
        acts=layer_acts, token_id=np.concatenate(token_id).astype(np.int32), instance=np.concatenate(instance),
        position=np.concatenate(position), role=np.concatenate(role).astype(np.uint8),
        instance_start=np.array(starts, dtype=np.int64), instance_length=np.array(lengths_kept, dtype=np.int32),
        instance_source=np.array(sources, dtype=np.int64),
    )
    return block, stats


def advance_manifest(manifest: StoreManifest, block: TokenBlock, stats: LayerSums,
                     dataset: DatasetReader, group: list[TokenizedInstance] = ()) -> StoreManifest:
    layer_stats = dict(manifest.layer_stats)
    for (layer, site), (count, sum_sq, sum_norm, nonfinite) in stats.items():
        name = stats_key(layer, site)
        layer_stats[name] = layer_stats.get(name, LayerStats()).add(count, sum_sq, sum_norm, nonfinite)
    return manifest.model_copy(update={
        "n_tokens": manifest.n_tokens + block.n_tokens,
        "n_instances": manifest.n_instances + len(block.instance_start),
        "rows_used": dataset.rows_used, "rows_skipped": dataset.rows_skipped,
        "rows_skipped_by_reason": dict(dataset.skipped), "layer_stats": layer_stats, **counted(manifest, group),
    })


def refuse_nonfinite(stats: LayerSums, group: list[TokenizedInstance], cfg: ExtractConfig) -> None:
    """Stop at the first NaN/inf activation (before it is written) unless told to keep them: an SAE trained
    on one has NaN weights. What came before stays committed; the store stays incomplete."""
    bad = {key: counts[3] for key, counts in stats.items() if counts[3]}
    if bad and not cfg.keep_nonfinite:
        (layer, site), count = next(iter(bad.items()))
        rows = f"dataset rows {group[0].source_row}-{group[-1].source_row}"
        raise UserError(f"{count:,} activations at layer {layer} ({site}) are NaN or inf ({rows}; model dtype "
                        f"{cfg.model_dtype}, store dtype {cfg.dtype}): stopped before storing them; "
                        f"--keep-nonfinite stores and counts them")


def resolved(cfg: ExtractConfig) -> ExtractConfig:
    """`auto` device and model dtype made concrete: the identity records the dtype the model really ran in, and a
    local model path absolute."""
    device = resolve_device(cfg.device)
    return cfg.model_copy(update={"device": device, "model_dtype": resolve_model_dtype(cfg.model_dtype, device),
                                  "model": model_location(cfg.model)})


def multi_rank(cfg: ExtractConfig) -> bool:
    """Under torchrun, or continuing a store that ranks started: one sub-store per work unit (parts.py)."""
    if distributed.under_torchrun():
        return True
    return not cfg.overwrite and is_store(cfg.out) and read_manifest(cfg.out).part_tokens is not None


def run_extract(cfg: ExtractConfig, show_progress: bool = True, dialogues=None) -> StoreManifest:
    """Extract into cfg.out, holding its writer lock; what the arguments alone show is checked before the model
    loads (the location: its file system package, writable, not the working directory; an existing store's
    config). Under torchrun rank 0 holds the lock for every rank (distributed.lock_on_main). `dialogues`: rows
    given in Python (extract/memory_data.InMemoryDialogues) instead of cfg.dataset."""
    cfg = resolved(cfg)
    local = local_path(cfg.out)
    if local is not None:
        refuse_enclosing_cwd(local)
    ranked = multi_rank(cfg)
    if ranked:
        distributed.start(cfg.device)
    with distributed.lock_on_main(cfg.out, "store"):
        if is_store(cfg.out):
            refuse_another_config(cfg, read_manifest(cfg.out), identity_from_arguments(cfg))
        return _run_extract(cfg, show_progress, ranked, dialogues)


def _run_extract(cfg: ExtractConfig, show_progress: bool, ranked: bool, dialogues=None) -> StoreManifest:
    if dialogues is not None:
        dataset = dialogues.reader(cfg, cfg.dedup_settings())
    else:
        dataset = DatasetReader.from_options(cfg, cfg.dedup_settings())
    # dataset errors before the model loads (under torchrun every rank reads the same rows; rank 0 shows it)
    if not distributed.decided_on_main(lambda: rows_checked_before(cfg, dataset)):
        check_rows_used(cfg, load_tokenizer(cfg.model), dataset, show_progress and distributed.ranks().is_main)
    lm = load_model(cfg.model, cfg.model_dtype, cfg.device, cfg.attn_implementation)
    check_layers(cfg.layers, lm)
    identity = build_identity(cfg, lm, dataset)
    if ranked:
        return run_parts(cfg, lm, dataset, identity, getattr(lm.tokenizer, "chat_template", None),
                         planned_instances(cfg, lm.tokenizer, dataset), show_progress)
    writer = open_writer(cfg, identity, getattr(lm.tokenizer, "chat_template", None))
    if writer is None:
        manifest = read_manifest(cfg.out)
        tqdm.write(f"store {cfg.out} is already complete ({manifest.n_tokens:,} tokens); nothing to do")
        return manifest
    fresh = writer.manifest.n_tokens == 0
    try:
        return _extract_into(writer, cfg, lm, dataset, show_progress)
    except BaseException:
        if fresh and writer.manifest.n_tokens == 0:
            remove_store(cfg.out)  # nothing committed: leave nothing behind
        raise


def rows_checked_before(cfg: ExtractConfig, dataset: DatasetReader) -> bool:
    """A store of this config over these very bytes is being continued: its first run read every row it uses
    before writing anything, so a resume need not tokenise them all again (the dataset's digest is cached)."""
    if cfg.overwrite or not is_store(cfg.out):
        return False
    return read_manifest(cfg.out).identity.dataset_sha256 == dataset.sha256()


def write_instances(writer: StoreWriter, instances: Iterable[TokenizedInstance], cfg: ExtractConfig,
                    lm: LoadedModel, dataset: DatasetReader, bar: tqdm) -> StoreManifest:
    """Compute the instances group by group and append them after the writer's last commit (on a background
    thread); the manifest counting them all, for the caller's `writer.finish` (the last shard is written there)."""
    manifest = writer.manifest.model_copy(update={
        "attn_implementation": attn_implementations(writer.manifest.attn_implementation, lm.attn_implementation)})
    background = BackgroundWriter(writer)
    try:
        for group in grouped(instances, group_tokens(cfg, manifest.identity.chunk_tokens)):
            acts = forward_group(lm, group, cfg)
            block, stats = build_block(group, acts, manifest.n_instances, manifest.n_tokens, cfg)
            refuse_nonfinite(stats, group, cfg)
            manifest = advance_manifest(manifest, block, stats, dataset, group)
            background.submit(block, manifest)
            bar.update(block.n_tokens)
    finally:
        background.close()
    return manifest


def _extract_into(writer: StoreWriter, cfg: ExtractConfig, lm: LoadedModel, dataset: DatasetReader,
                  show_progress: bool) -> StoreManifest:
    manifest = writer.manifest
    done = manifest.n_instances
    instances = itertools.islice(planned_instances(cfg, lm.tokenizer, dataset), done, None)
    first = next(instances, None)
    if first is None and done == 0:
        raise UserError(f"dataset '{cfg.dataset}' gave no usable instances "
                        f"({dataset.skip_report() or 'it has no rows'})")
    instances = itertools.chain([first], instances) if first is not None else iter(())
    bar = tqdm(total=cfg.max_tokens, initial=manifest.n_tokens, unit="tok", unit_scale=True,
               desc="extract", disable=not show_progress, dynamic_ncols=True)
    try:
        manifest = write_instances(writer, instances, cfg, lm, dataset, bar)
    finally:
        bar.close()
    manifest = manifest.model_copy(update={"complete": True, "rows_used": dataset.rows_used,
                                           "rows_skipped": dataset.rows_skipped,
                                           "rows_skipped_by_reason": dict(dataset.skipped)})
    writer.finish(manifest)
    for note in data_notes(manifest, dataset):
        tqdm.write(f"note: {note}")
    return manifest
