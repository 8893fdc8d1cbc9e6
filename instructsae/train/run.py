"""`instructsae train`: a store in, SAE folders out (SAELens layout, metrics, curves, summary).

One SAE or a sweep's many: every SAE trains on the same batches from one pass over the store.
"""

import hashlib
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from instructsae import __version__, distributed
from instructsae.charts import plot_training_curves
from instructsae.devices import resolve_device
from instructsae.errors import UserError
from instructsae.fileio import move_folder_into_place, write_text_atomically
from instructsae.metrics import ReconstructionSums
from instructsae.run_folder import (
    RunPaths, check_existing_run, prepare_building_folder, refuse_enclosing_cwd, refuse_unless_ours,
)
from instructsae.schemas.train import TrainConfig
from instructsae.store.reader import StoreReader, open_complete_store
from instructsae.train import checkpoint, memory
from instructsae.train.dead import DeadFeatureTracker
from instructsae.sae.export import load_sae, save_sae
from instructsae.train.init import geometric_median
from instructsae.train.metrics_log import MetricsLog
from instructsae.train.parallel import DataParallel, check_splittable
from instructsae.sae import build_sae, config_class
from instructsae.sae.folder import slot_provenance
from instructsae.schemas.sites import DEFAULT_SITE, stats_key
from instructsae.train.schedule import describe_schedule, fitted_batch_size, fitted_optim, left_to_fit, schedule_line
from instructsae.train.stream import ShuffledStream, prefetch_depth
from instructsae.train.trainer import Trainee, train

# Settings that cannot change what a run learns: two configs differing only here are the same SAE.
RUNTIME_FIELDS = {"store", "out", "device", "log_every", "checkpoint_every", "wandb", "wandb_project"}
# Settings of the stream: SAEs trained together must agree on them.
STREAM_FIELDS = ("store", "tokens", "batch_size", "buffer_tokens", "holdout_fraction", "seed", "device",
                 "checkpoint_every", "geometric_median_tokens")


def key_settings(cfg: TrainConfig) -> dict:
    """The settings that make an SAE what it is (runtime knobs left out)."""
    settings = cfg.model_dump(mode="json", exclude=RUNTIME_FIELDS)
    for name in ("site", "target_site"):  # added with hook sites: absent while unset, so older keys hold
        if settings[name] is None:
            del settings[name]
    if settings["sae_seed"] in (None, cfg.seed):  # the same weights as no sae_seed: the same SAE (and old keys hold)
        del settings["sae_seed"]
    fitted = left_to_fit(cfg)
    if fitted:  # absent when every schedule setting is given, so such configs keep the keys they had
        settings["fitted_to_run"] = fitted
    return settings


def config_key(cfg: TrainConfig, store_fingerprint: str) -> str:
    """Names what an SAE is: its full config (runtime knobs aside) on this exact store."""
    text = json.dumps({"config": key_settings(cfg), "store": store_fingerprint}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def choose_layer(cfg: TrainConfig, reader: StoreReader) -> int:
    layers = list(reader.layers)
    layer = layers[0] if cfg.layer is None else cfg.layer
    if layer not in layers:
        raise UserError(f"layer {layer} is not in store {cfg.store} (it has layers {layers})")
    return layer


Slot = tuple[int, str]  # (layer, site): one array of activations of the store


def choose_slots(cfg: TrainConfig, reader: StoreReader) -> tuple[Slot, Slot]:
    """The (layer, site) the dictionary reads and the one it reconstructs: an SAE its own input (resid_post
    unless told), a transcoder mlp_in to mlp_out unless told."""
    layer = choose_layer(cfg, reader)
    transcoder = config_class(cfg.sae).transcoder
    site = cfg.site or ("mlp_in" if transcoder else DEFAULT_SITE)
    target = cfg.target_site or ("mlp_out" if transcoder else site)
    if not transcoder and target != site:
        raise UserError(f"{cfg.sae.arch} reconstructs its own input: target_site {target} differs from site {site} "
                        "(a transcoder, --sae transcoder, reconstructs another site)")
    for wanted in dict.fromkeys((site, target)):
        if (layer, wanted) not in reader.acts_keys:
            needed = ",".join(dict.fromkeys((site, target)))
            raise UserError(f"site {wanted} at layer {layer} is not in store {cfg.store} (it has "
                            f"{', '.join(reader.sites)}): extract with --sites {needed}")
    return (layer, site), (layer, target)


def split_chunks(n_chunks: int, holdout_fraction: float) -> tuple[list[int], list[int]]:
    """The last chunks are held out (whole dialogues, mostly unseen in training); none if only one chunk.

    At least one chunk always stays for training, whatever the fraction."""
    n_holdout = 0 if n_chunks <= 1 else max(1, math.ceil(holdout_fraction * n_chunks)) if holdout_fraction else 0
    n_holdout = min(n_holdout, max(n_chunks - 1, 0))
    return list(range(n_chunks - n_holdout)), list(range(n_chunks - n_holdout, n_chunks))


def store_scale(reader, slot: Slot, store: str) -> float:
    """1/sqrt(E||x||^2): training inputs get unit mean squared norm, so coefficients carry across models."""
    layer, site = slot
    stats = reader.manifest.layer_stats.get(stats_key(layer, site))
    if stats is None or stats.mean_sq_norm <= 0:
        where = f"layer {layer}" if site == DEFAULT_SITE else f"layer {layer} {site}"
        raise UserError(f"store {store} has no normalisation statistics for {where}: re-extract it")
    return 1.0 / math.sqrt(stats.mean_sq_norm)


def sparsity_coeff(cfg: TrainConfig) -> float:
    """The penalty's final coefficient; architectures whose sparsity is a k have none."""
    return cfg.sae.sparsity_coeff if config_class(cfg.sae).has_sparsity_penalty else 0.0


@dataclass
class StoreView:
    """The store as training sees it: chosen (layer, site) slots, each scaled to unit mean squared norm, split
    into chunks."""

    reader: StoreReader
    slots: list[Slot]
    scales: dict[Slot, float]
    train_chunks: list[int]
    holdout_chunks: list[int]

    def read_chunk(self, index: int) -> torch.Tensor:
        """[rows, d_model] with one slot, [rows, slots, d_model] with several, in the store's dtype, unscaled."""
        parts = [self.reader.read_acts_chunk_as_stored(layer, index, site) for layer, site in self.slots]
        return parts[0] if len(parts) == 1 else torch.stack(parts, dim=1)

    def on_device(self, batches: Iterator[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
        """Each batch copied to the device as stored (bf16: half the bytes), then made float32 and scaled there.

        The same float32 values, bit for bit, as converting and scaling on the CPU before the copy."""
        scale = self.scales[self.slots[0]] if len(self.slots) == 1 else \
            torch.tensor([self.scales[slot] for slot in self.slots], device=device)[:, None]
        for batch in batches:
            yield batch.to(device, non_blocking=True).float() * scale

    def train_tokens(self) -> int:
        return sum(stop - start for start, stop in map(self.reader.chunk_bounds, self.train_chunks))


def train_saes(configs: list[TrainConfig], checkpoint_path: Path, resume: bool = False,
               parallel: DataParallel | None = None) -> list[dict]:
    """Train every config on the same batches from one pass over their (common) store; their summaries.

    Each SAE is built in its RUN.partial and moved into its RUN when every SAE is finished. Data-parallel
    (`parallel`): every rank steps on its slice of each batch; rank 0 alone builds RUN.partial (metrics,
    checkpoints, the SAE, its summary), moves it into place and returns the summaries, the other ranks none."""
    writes = parallel is None or parallel.rank == 0
    first = configs[0]
    for cfg in configs[1:]:
        differing = [name for name in STREAM_FIELDS if getattr(cfg, name) != getattr(first, name)]
        if differing:
            raise UserError(f"SAEs trained together must share {', '.join(differing)} ({cfg.out} differs)")
    device = torch.device(resolve_device(first.device))
    configs = [cfg.model_copy(update={"device": str(device)}) for cfg in configs]
    first = configs[0]
    reader = open_complete_store(first.store)
    if reader.n_tokens == 0:
        raise UserError(f"store {first.store} holds no tokens")
    member_slots = [choose_slots(cfg, reader) for cfg in configs]  # (input, target) of each
    slots = sorted({slot for pair in member_slots for slot in pair})
    scales = {slot: store_scale(reader, slot, first.store) for slot in slots}
    view = StoreView(reader, slots, scales, *split_chunks(reader.n_chunks, first.holdout_fraction))
    keys = [config_key(cfg, reader.manifest.fingerprint) for cfg in configs]
    memory.check_fits(configs, reader.d_model, len(slots))
    saes = []
    for cfg in configs:
        # each SAE starts as it would alone, whatever else trains beside it; its own seed, not the stream's
        torch.manual_seed(cfg.seed if cfg.sae_seed is None else cfg.sae_seed)
        saes.append(build_sae(cfg.sae, reader.d_model))

    runs = [RunPaths(cfg.out) for cfg in configs]
    saved = checkpoint.load(checkpoint_path, reader.manifest.fingerprint, keys) if resume else None
    if saved is None:
        checkpoint.refuse_to_overwrite(checkpoint_path)
        for run in runs if writes else ():
            refuse_unless_ours(run.root)
            prepare_building_folder(run.building)

    tokens = first.tokens or view.train_tokens()
    batch_size = fitted_batch_size(configs, tokens)  # the defaults fitted to a short run (train/schedule.py)
    n_steps = max(1, tokens // batch_size)
    optims = [fitted_optim(cfg.optim, n_steps) for cfg in configs]
    schedules = [describe_schedule(cfg.optim, optim, n_steps, config_class(cfg.sae).has_sparsity_penalty, batch_size,
                                   first.batch_size) for cfg, optim in zip(configs, optims)]
    if writes:  # data-parallel: rank 0 speaks for the run
        _print_schedules(configs, schedules)
    # On a CPU the reader and the SAE share the same cores, and a reader thread cost more than it hid
    # (bench/train_stream.py); with an accelerator the thread reads while the device computes.
    depth = 0 if first.device == "cpu" else prefetch_depth(first.buffer_tokens, reader.chunk_tokens)
    stream = ShuffledStream(view.read_chunk, view.train_chunks, reader.chunk_tokens, batch_size,
                            first.buffer_tokens, first.seed, tokens, depth,
                            pin_memory=device.type == "cuda")
    if saved is None and first.geometric_median_tokens:
        _initialise_decoder_bias(saes, [target for _, target in member_slots], view, first)

    first_step, tokens_done = (saved["step"], saved["tokens"]) if saved is not None else (0, 0)
    logs = [MetricsLog(run.building.metrics, cfg, run.root.name,
                       keep_before_step=first_step if saved is not None else None) if writes else _NoLog()
            for cfg, run in zip(configs, runs)]
    trainees = [Trainee(sae.to(cfg.device), optim, sparsity_coeff(cfg),
                        DeadFeatureTracker(sae.d_sae, cfg.dead_threshold, cfg.dead_window), log.write,
                        slots.index(source), parallel, slots.index(target))
                for sae, cfg, optim, log, (source, target) in zip(saes, configs, optims, logs, member_slots)]
    if saved is not None:
        for trainee, state in zip(trainees, saved["trainees"]):
            trainee.load_state_dict(state)
        stream.load_state_dict(saved["stream"])
        torch.set_rng_state(saved["torch_rng"])

    every_steps = max(1, first.checkpoint_every // batch_size)

    def after_step(step: int, tokens_so_far: int) -> None:
        if writes and (step + 1) % every_steps == 0 and step + 1 < n_steps:
            checkpoint.save(checkpoint_path, {
                "store_fingerprint": reader.manifest.fingerprint, "member_keys": keys, "step": step + 1,
                "tokens": tokens_so_far, "stream": stream.state_dict(),
                "trainees": [trainee.state_dict() for trainee in trainees], "torch_rng": torch.get_rng_state()})

    try:
        stats = train(trainees, view.on_device(stream, device), n_steps, first.log_every, first.device, first_step,
                      tokens_done, after_step)
    finally:
        stream.close()
        for log in logs:
            log.close()
    stats["stream_seconds"] = stream.seconds
    if not writes:
        return []

    exported = [_export(cfg, run, key, trainee.sae, pair, view) for cfg, run, key, trainee, pair
                in zip(configs, runs, keys, trainees, member_slots)]
    metrics = _heldout_metrics(exported, member_slots, view)
    summaries = [_summary(run, key, trainee, pair, view, {**stats, "schedule": schedule}, result)
                 for run, key, trainee, pair, result, schedule
                 in zip(runs, keys, trainees, member_slots, metrics, schedules)]
    checkpoint_path.unlink(missing_ok=True)  # every SAE is finished: nothing to resume
    for run in runs:
        move_folder_into_place(run.building.root, run.root)
    return summaries


def run_training(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict | None:
    """Train one SAE into cfg.out, holding its writer lock; a finished run of the same config is not retrained
    (its summary comes back), one of another config is replaced only with `overwrite`.

    Under torchrun: data-parallel over the ranks. Rank 0 holds the lock for all of them, decides whether there
    is anything to train, builds RUN.partial and moves it into place; it returns the summary, the others None."""
    device = resolve_device(cfg.device)
    cfg = cfg.model_copy(update={"device": device})
    run = RunPaths(cfg.out)
    refuse_enclosing_cwd(run.root)
    place = distributed.ranks()
    parallel = None
    if place.distributed:
        check_splittable(config_class(cfg.sae).architecture)
        distributed.start(device)
        parallel = DataParallel(place)

    def already_trained() -> bool:
        fingerprint = open_complete_store(cfg.store).manifest.fingerprint
        key = config_key(cfg, fingerprint)
        return check_existing_run(run.root, key, key_settings(cfg), fingerprint, overwrite)

    with distributed.lock_on_main(cfg.out, "run folder"):
        if distributed.decided_on_main(already_trained):
            summary = None
            if place.is_main:
                print(f"run {cfg.out} is already trained (same config and store): nothing to do; "
                      "--overwrite trains it again", file=sys.stderr)
                summary = json.loads(run.summary.read_text())
            distributed.finish()
            return summary
        summaries = train_saes([cfg], run.building.checkpoint, resume, parallel)
        distributed.finish()  # the other ranks wait for rank 0's export; a failing rank exits before this instead
    return summaries[0] if summaries else None


class _NoLog:
    """The metrics log of a data-parallel rank other than 0: rank 0 writes the one metrics.jsonl."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _print_schedules(configs: list[TrainConfig], schedules: list[dict]) -> None:
    """The effective schedule of each SAE, and a warning where a run would end inside a warm-up; SAEs with the
    same schedule share one line (a sweep of 18 SAEs printed 18 identical ones)."""
    groups: dict[tuple, list[str]] = {}
    for cfg, schedule in zip(configs, schedules):
        key = (schedule_line("", schedule), tuple(schedule["warnings"]))
        groups.setdefault(key, []).append(Path(cfg.out).name)
    for (line, warnings), names in groups.items():
        who = names[0] if len(names) == 1 else f"{len(names)} SAEs ({names[0]}, ...)"
        print(f"schedule: {who}{line}", file=sys.stderr, flush=True)
        for warning in warnings:
            print(f"warning: {who}: {warning}", file=sys.stderr, flush=True)


def _initialise_decoder_bias(saes, targets: list[Slot], view: StoreView, cfg: TrainConfig) -> None:
    """b_dec at the geometric median of a sample of what each dictionary reconstructs (one sample per slot)."""
    samples = {}
    for sae, target in zip(saes, targets):
        if target not in samples:
            samples[target] = geometric_median(_initial_sample(view, target, cfg))
        with torch.no_grad():
            sae.b_dec.copy_(samples[target])


def _initial_sample(view: StoreView, slot: Slot, cfg: TrainConfig) -> torch.Tensor:
    """Rows from a few chunks spread over the store (not only its first dialogues)."""
    parts, n = [], 0
    stride = max(1, len(view.train_chunks) // 8)
    for index in view.train_chunks[::stride]:
        parts.append(view.reader.read_acts_chunk(slot[0], index, slot[1]) * view.scales[slot])
        n += len(parts[-1])
        if n >= cfg.geometric_median_tokens:
            break
    sample_ND = torch.cat(parts)
    pick = torch.randperm(len(sample_ND), generator=torch.Generator().manual_seed(cfg.seed))
    return sample_ND[pick[: cfg.geometric_median_tokens]]


def _export(cfg: TrainConfig, run: RunPaths, key: str, sae, pair: tuple[Slot, Slot], view: StoreView):
    """Save the SAE (raw activation space) and its curves; the exported SAE, as a user will load it."""
    root, reader = run.building.root, view.reader
    (layer, site), target = pair
    own = {"layer": layer, **slot_provenance(site, target[1]), "store": cfg.store,
           "store_fingerprint": reader.manifest.fingerprint,
           "model": reader.manifest.identity.model, "input_scale": view.scales[pair[0]],
           "train_config": cfg.model_dump(mode="json"), "config_key": key, "instructsae_version": __version__}
    save_sae(root, sae.cpu(), view.scales[pair[0]], own, reader.manifest.identity, view.scales[target])
    plot_training_curves(MetricsLog.read(run.building.metrics), run.building.curves, title=run.root.name)
    return load_sae(root)[0]


@torch.no_grad()
def _heldout_metrics(saes, member_slots: list[tuple[Slot, Slot]], view: StoreView) -> list[dict]:
    """Every SAE measured on the held-out chunks (against its target site), each chunk read once whatever the
    number of SAEs."""
    sums = [ReconstructionSums(sae.d_in, sae.d_sae) for sae in saes]
    for index in view.holdout_chunks or view.train_chunks:
        acts = {slot: view.reader.read_acts_chunk(slot[0], index, slot[1]) for slot in view.slots}
        for sae, (source, target), accumulator in zip(saes, member_slots, sums):
            latents_BF = sae.encode(acts[source])
            accumulator.add(acts[target], sae.reconstruct(acts[source], latents_BF), latents_BF)
    return [accumulator.result() for accumulator in sums]


def _summary(run: RunPaths, key: str, trainee: Trainee, pair: tuple[Slot, Slot], view: StoreView, stats: dict,
             metrics: dict) -> dict:
    sae = trainee.sae
    (layer, site), (_, target) = pair
    summary = {
        "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "layer": layer, "site": site,
        "target_site": target,
        "nmse": metrics["nmse"], "explained_variance": metrics["explained_variance"], "mse": metrics["mse"],
        "l0": metrics["l0"], "dead_fraction_heldout": metrics["dead_fraction"],
        "dead_fraction_train": trainee.dead.dead_fraction(), "heldout_tokens": metrics["n_tokens"], **stats,
        "sae_seconds": trainee.seconds, "config_key": key,
        "evaluated_on": "held-out chunks" if view.holdout_chunks else "training chunks (no chunk was held out)",
    }
    write_text_atomically(run.building.summary, json.dumps(summary, indent=2))
    return summary
