"""`instructsae train`: a store in, SAE folders out (SAELens layout, metrics, curves, summary).

One SAE or a sweep's many: every SAE trains on the same batches from one pass over the store.
"""

import hashlib
import json
import sys
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
    remove_building_folders,
)
from instructsae.schemas.train import DEFAULT_EXPANSION, OptimConfig, TrainConfig
from instructsae.schemas.transcoder import TARGET_L0_GAIN
from instructsae.store.reader import open_complete_store
from instructsae.train import checkpoint, memory
from instructsae.train.dead import DeadFeatureTracker
from instructsae.sae.export import load_sae, save_sae
from instructsae.train.init import geometric_median
from instructsae.train.metrics_log import MetricsLog
from instructsae.train.parallel import DataParallel, check_splittable
from instructsae.sae import build_sae, config_class, constructor_settings
from instructsae.sae.folder import slot_provenance
from instructsae.train.schedule import describe_schedule, fitted_batch_size, fitted_optim, left_to_fit, schedule_line
from instructsae.train.store_view import (  # noqa: F401 (re-exported)
    Slot, StoreView, choose_layer, choose_slots, open_view, split_chunks, store_scale,
)
from instructsae.train.stream import ShuffledStream, prefetch_depth
from instructsae.train.trainer import Trainee, train

# Settings that cannot change what a run learns: two configs differing only here are the same SAE.
RUNTIME_FIELDS = {"store", "out", "device", "log_every", "checkpoint_every", "wandb", "wandb_project"}
# SAE settings added after SAEs were trained without them, and the value that means "as before".
ADDED_SAE_FIELDS = {"target_l0": None, "target_l0_gain": TARGET_L0_GAIN}
# Settings of the stream: SAEs trained together must agree on them.
STREAM_FIELDS = ("store", "tokens", "batch_size", "buffer_tokens", "holdout_fraction", "seed", "device",
                 "checkpoint_every", "geometric_median_tokens")


def key_settings(cfg: TrainConfig) -> dict:
    """The settings that make an SAE what it is (runtime knobs left out)."""
    settings = cfg.model_dump(mode="json", exclude=RUNTIME_FIELDS)
    sae = settings["sae"]
    if sae.pop("d_sae") is None:  # sized by expansion (16 unless given), as every key before d_sae was
        sae["expansion"] = sae["expansion"] or DEFAULT_EXPANSION
    else:
        sae["d_sae"] = cfg.sae.d_sae
    for name in ("site", "target_site"):  # added with hook sites: absent while unset, so older keys hold
        if settings[name] is None:
            del settings[name]
    if settings["sae_seed"] in (None, cfg.seed):  # the same weights as no sae_seed: the same SAE (and old keys hold)
        del settings["sae_seed"]
    for name, unset in ADDED_SAE_FIELDS.items():  # settings added later: at their default, old keys hold
        if settings["sae"].get(name, unset) == unset:
            settings["sae"].pop(name, None)
    for name, used in constructor_settings(cfg.sae).items():  # a mode's own defaults (target L0's): what runs
        if used != getattr(cfg.sae, name):
            settings["sae"][name] = used
    if sparsity_coeff(cfg) != getattr(cfg.sae, "sparsity_coeff", 0.0):
        settings["sae"]["sparsity_coeff"] = sparsity_coeff(cfg)
    fitted = left_to_fit(cfg)
    if fitted:  # absent when every schedule setting is given, so such configs keep the keys they had
        settings["fitted_to_run"] = fitted
    return settings


def config_key(cfg: TrainConfig, store_fingerprint: str) -> str:
    """Names what an SAE is: its full config (runtime knobs aside) on this exact store."""
    text = json.dumps({"config": key_settings(cfg), "store": store_fingerprint}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sparsity_coeff(cfg: TrainConfig) -> float:
    """The penalty's final coefficient; architectures whose sparsity is a k have none."""
    return config_class(cfg.sae).penalty_coeff(cfg.sae)


def train_saes(configs: list[TrainConfig], checkpoint_path: Path, resume: bool = False,
               parallel: DataParallel | None = None) -> list[dict]:
    """_train_saes; a run that fails (or is interrupted) before its first checkpoint leaves nothing resumable,
    so the RUN.partial folders it made go again (those of an earlier run, or with a checkpoint, stay)."""
    prepared: list[Path] = []
    try:
        return _train_saes(configs, checkpoint_path, resume, parallel, prepared)
    except BaseException:
        if not checkpoint_path.is_file():
            remove_building_folders(prepared)
        raise


def _train_saes(configs: list[TrainConfig], checkpoint_path: Path, resume: bool,
                parallel: DataParallel | None, prepared: list[Path]) -> list[dict]:
    """Train every config on the same batches from one pass over their (common) store; their summaries.

    Each SAE is built in its RUN.partial and moved into its RUN when every SAE is finished. Data-parallel
    (`parallel`): every rank steps on its slice of each batch; rank 0 alone builds RUN.partial (metrics,
    checkpoints, the SAE, its summary), moves it into place and returns the summaries, the other ranks none."""
    writes = parallel is None or parallel.rank == 0
    configs = _on_one_device(configs)
    view, member_slots = open_view(configs)  # the (input, target) slots of each
    memory.check_fits(configs, view.reader.d_model, len(view.slots))
    plan = _plan(configs, view)
    saes = _build_saes(configs, view.reader.d_model)
    runs = [RunPaths(cfg.out) for cfg in configs]
    saved = _resume_or_prepare(checkpoint_path, resume, plan.keys, view, runs if writes else [], prepared)
    if writes:  # data-parallel: rank 0 speaks for the run
        _print_schedules(configs, plan.schedules)
    stream = _open_stream(configs[0], view, plan)
    if saved is None and configs[0].geometric_median_tokens:
        # b_dec is the output's bias: a transcoder's starts at its target's median
        _initialise_decoder_bias(saes, [target for _, target in member_slots], view, configs[0])
    logs = [MetricsLog(run.building.metrics, cfg, run.root.name,
                       keep_before_step=saved["step"] if saved is not None else None) if writes else _NoLog()
            for cfg, run in zip(configs, runs)]
    trainees = [Trainee(sae.to(plan.device), optim, sparsity_coeff(cfg),
                        DeadFeatureTracker(sae.d_sae, cfg.dead_threshold, cfg.dead_window), log.write,
                        view.slots.index(source), parallel, view.slots.index(target))
                for sae, cfg, optim, log, (source, target) in zip(saes, configs, plan.optims, logs, member_slots)]
    if saved is not None:
        _restore(saved, trainees, stream)

    checkpointer = _Checkpointer(checkpoint_path if writes else None, configs[0].checkpoint_every, plan, view,
                                 stream, trainees)
    first_step, tokens_done = (saved["step"], saved["tokens"]) if saved is not None else (0, 0)
    try:
        stats = train(trainees, view.on_device(stream, plan.device), plan.n_steps, configs[0].log_every,
                      configs[0].device, first_step, tokens_done, checkpointer.after_step)
    finally:
        stream.close()
        for log in logs:
            log.close()
    stats["stream_seconds"] = stream.seconds
    if not writes:
        return []
    summaries = _export_and_summarise(configs, runs, plan, trainees, member_slots, view, stats)
    checkpoint_path.unlink(missing_ok=True)  # every SAE is finished: nothing to resume
    for run in runs:
        move_folder_into_place(run.building.root, run.root)
    return summaries


@dataclass
class _Plan:
    """What a one-pass run settles before it starts: on which device, what each SAE is (its key), how long the
    run is, and the schedule each SAE follows (the defaults fitted to the run's length, train/schedule.py)."""

    device: torch.device
    keys: list[str]
    tokens: int
    batch_size: int
    n_steps: int
    optims: list[OptimConfig]
    schedules: list[dict]


def _on_one_device(configs: list[TrainConfig]) -> list[TrainConfig]:
    """The configs with their device resolved, refused unless they share the stream's settings."""
    first = configs[0]
    for cfg in configs[1:]:
        differing = [name for name in STREAM_FIELDS if getattr(cfg, name) != getattr(first, name)]
        if differing:
            raise UserError(f"SAEs trained together must share {', '.join(differing)} ({cfg.out} differs)")
    device = resolve_device(first.device)
    return [cfg.model_copy(update={"device": device}) for cfg in configs]


def _plan(configs: list[TrainConfig], view: StoreView) -> _Plan:
    first = configs[0]
    tokens = first.tokens or view.train_tokens()
    batch_size = fitted_batch_size(configs, tokens)
    n_steps = max(1, tokens // batch_size)
    optims = [fitted_optim(cfg.optim, n_steps, config_class(cfg.sae).needs_sparsity_warmup(cfg.sae))
              for cfg in configs]
    schedules = [describe_schedule(cfg.optim, optim, n_steps, config_class(cfg.sae).has_sparsity_penalty,
                                   batch_size, first.batch_size) for cfg, optim in zip(configs, optims)]
    keys = [config_key(cfg, view.reader.manifest.fingerprint) for cfg in configs]
    return _Plan(torch.device(first.device), keys, tokens, batch_size, n_steps, optims, schedules)


def _build_saes(configs: list[TrainConfig], d_model: int) -> list:
    saes = []
    for cfg in configs:
        # each SAE starts as it would alone, whatever else trains beside it; its own seed, not the stream's
        torch.manual_seed(cfg.seed if cfg.sae_seed is None else cfg.sae_seed)
        saes.append(build_sae(cfg.sae, d_model))
    return saes


def _resume_or_prepare(checkpoint_path: Path, resume: bool, keys: list[str], view: StoreView,
                       runs: list[RunPaths], prepared: list[Path]) -> dict | None:
    """The checkpoint to continue from; or, starting afresh, empty RUN.partial folders (none given: not ours to
    write; each one made is added to `prepared`) and no checkpoint that starting would throw away."""
    if resume:
        return checkpoint.load(checkpoint_path, view.reader.manifest.fingerprint, keys)
    checkpoint.refuse_to_overwrite(checkpoint_path)
    for run in runs:
        refuse_unless_ours(run.root)
        prepare_building_folder(run.building)
        prepared.append(run.building.root)
    return None


def _open_stream(first: TrainConfig, view: StoreView, plan: _Plan) -> ShuffledStream:
    # On a CPU the reader and the SAE share the same cores, and a reader thread cost more than it hid
    # (bench/train_stream.py); with an accelerator the thread reads while the device computes.
    reader = view.reader
    depth = 0 if first.device == "cpu" else prefetch_depth(first.buffer_tokens, reader.chunk_tokens)
    return ShuffledStream(view.read_chunk, view.train_chunks, reader.chunk_tokens, plan.batch_size,
                          first.buffer_tokens, first.seed, plan.tokens, depth, pin_memory=plan.device.type == "cuda")


def _restore(saved: dict, trainees: list[Trainee], stream: ShuffledStream) -> None:
    for trainee, state in zip(trainees, saved["trainees"]):
        trainee.load_state_dict(state)
    stream.load_state_dict(saved["stream"])
    torch.set_rng_state(saved["torch_rng"])


class _Checkpointer:
    """Every `every_tokens` (not after the last step): everything a resumed run needs, at `path` (None: this
    data-parallel rank writes none)."""

    def __init__(self, path: Path | None, every_tokens: int, plan: _Plan, view: StoreView, stream: ShuffledStream,
                 trainees: list[Trainee]):
        self.path, self.plan, self.view, self.stream, self.trainees = path, plan, view, stream, trainees
        self.every_steps = max(1, every_tokens // plan.batch_size)

    def after_step(self, step: int, tokens_so_far: int) -> None:
        if self.path is None or (step + 1) % self.every_steps or step + 1 >= self.plan.n_steps:
            return
        checkpoint.save(self.path, {
            "store_fingerprint": self.view.reader.manifest.fingerprint, "member_keys": self.plan.keys,
            "step": step + 1, "tokens": tokens_so_far, "stream": self.stream.state_dict(),
            "trainees": [trainee.state_dict() for trainee in self.trainees], "torch_rng": torch.get_rng_state()})


def _export_and_summarise(configs, runs, plan: _Plan, trainees, member_slots: list[tuple[Slot, Slot]],
                          view: StoreView, stats: dict) -> list[dict]:
    """Each SAE saved in its RUN.partial, measured on the held-out chunks, and its summary written."""
    exported = [_export(cfg, settings_that_ran(cfg, plan, optim, schedule), run, key, trainee.sae, pair, view)
                for cfg, optim, schedule, run, key, trainee, pair
                in zip(configs, plan.optims, plan.schedules, runs, plan.keys, trainees, member_slots)]
    metrics = _heldout_metrics(exported, member_slots, view)
    return [_summary(run, key, trainee, pair, view, {**stats, "schedule": schedule}, result)
            for run, key, trainee, pair, result, schedule
            in zip(runs, plan.keys, trainees, member_slots, metrics, plan.schedules)]


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


def settings_that_ran(cfg: TrainConfig, plan: _Plan, optim: OptimConfig, schedule: dict) -> dict:
    """cfg.json's record of training: `train_config`, the settings the run followed (the batch, lr and warm-ups
    fitted to its length, its tokens, the penalty coefficient in force); `given_config`, the config as given;
    `fitted`, each setting the run chose itself, with the default it replaced."""
    ran = cfg.model_copy(update={"batch_size": plan.batch_size, "optim": optim, "tokens": plan.tokens})
    train_config = ran.model_dump(mode="json")
    fitted = dict(schedule["fitted"])
    coeff = sparsity_coeff(cfg)
    if config_class(cfg.sae).has_sparsity_penalty and coeff != cfg.sae.sparsity_coeff:
        train_config["sae"]["sparsity_coeff"] = coeff
        fitted["sparsity_coeff"] = {"default": cfg.sae.sparsity_coeff, "used": coeff}
    for name, used in constructor_settings(cfg.sae).items():
        if used != getattr(cfg.sae, name):
            train_config["sae"][name] = used
            fitted[name] = {"default": getattr(cfg.sae, name), "used": used}
    return {"train_config": train_config, "given_config": cfg.model_dump(mode="json"), "fitted": fitted}


def _export(cfg: TrainConfig, ran: dict, run: RunPaths, key: str, sae, pair: tuple[Slot, Slot], view: StoreView):
    """Save the SAE (raw activation space) and its curves; the exported SAE, as a user will load it."""
    root, reader = run.building.root, view.reader
    (layer, site), target = pair
    own = {"layer": layer, **slot_provenance(site, target[1]), "store": cfg.store,
           "store_fingerprint": reader.manifest.fingerprint,
           "model": reader.manifest.identity.model, "input_scale": view.scales[pair[0]],
           **ran, "config_key": key, "instructsae_version": __version__}
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
        "held_out": bool(view.holdout_chunks),
    }
    write_text_atomically(run.building.summary, json.dumps(summary, indent=2))
    return summary
