"""`instructsae sweep`: every SAE of a grid trained in one pass over one store.

Each grid point becomes a full TrainConfig; all of them are checked against the store before any training.
A seed axis (grid.seed / grid.seeds) sets each SAE's sae_seed: its initial weights follow its own seed, while
the stream (chunk order, buffer shuffles, the b_dec sample) follows the base's `seed`, shared by every SAE of
the one pass; so each SAE still equals its standalone run with the same seed and sae_seed.
SAEs already finished in the sweep folder (same full config, same store) are skipped, so a rerun trains only
new grid points.

Under torchrun the SAEs left to train are spread over the ranks, balanced by estimated memory and FLOPs; every
rank streams the same shuffled batches (each reads the store itself: same seed, same order) and trains its
SAEs, so each SAE ends as it would in one process; rank 0 writes the report once every rank is done.
"""

import itertools
from contextlib import ExitStack
from pathlib import Path

from instructsae import distributed
from instructsae.devices import resolve_device
from instructsae.errors import UserError
from instructsae.fileio import made_for_this_command
from instructsae.store.reader import open_complete_store
from instructsae.schemas.sweep import SweepConfig
from instructsae.schemas.train import ARCHITECTURES, TrainConfig
from instructsae.train.config import resolve_train_config
from instructsae.run_folder import RunPaths, is_finished, refuse_a_file_as_out
from instructsae.train.run import choose_layer, config_key, train_saes
from instructsae.train.memory import sae_bytes
from instructsae.sae import check_sae_config, config_class
from instructsae.train.sweep_report import write_sweep_report


def grid_points(sweep: SweepConfig) -> list[tuple[dict, dict, dict]]:
    """(sae settings, optim settings, top-level settings) for every combination of the grid's axes."""
    grid = sweep.grid
    points = []
    for index, entry in enumerate(grid.sae):
        arch = entry.get("arch")
        if arch not in ARCHITECTURES:
            raise UserError(f"sweep grid.sae[{index}]: unknown architecture {arch!r} "
                            f"(choose from {', '.join(ARCHITECTURES)})")
        axes = {name: value if isinstance(value, list) else [value] for name, value in entry.items()}
        if grid.expansion is not None:
            if "expansion" in entry:
                raise UserError(f"sweep grid.sae[{index}] sets expansion and so does grid.expansion: keep one")
            axes["expansion"] = grid.expansion
        empty = [name for name, values in axes.items() if not values]
        if empty:
            raise UserError(f"sweep grid.sae[{index}]: the axis {empty[0]} is an empty list")
        names = list(axes)
        for values in itertools.product(*axes.values()):
            sae = dict(zip(names, values))
            for lr, layer, seed in itertools.product(grid.lr or [None], grid.layer or [None],
                                                     grid.seed_values() or [None]):
                points.append((sae, {"lr": lr}, {"layer": layer, "sae_seed": seed}))
    return points


def point_name(cfg: TrainConfig, key: str) -> str:
    """A folder name a person can read, made unique by the config key."""
    sparsity = config_class(cfg.sae).sweep_label(cfg.sae)
    layer = "" if cfg.layer is None else f"-l{cfg.layer}"
    seed = "" if cfg.sae_seed is None else f"-s{cfg.sae_seed}"
    return f"{cfg.sae.arch}-{cfg.sae.width_label()}-{sparsity}-lr{cfg.optim.lr:g}{layer}{seed}-{key[:6]}"


def resolve_grid(sweep: SweepConfig) -> list[tuple[str, TrainConfig]]:
    """(how to name it in an error, its TrainConfig) for every grid point; checked against the schema only."""
    resolved = []
    if not isinstance(sweep.base.get("sae") or {}, dict):
        raise UserError(f"invalid base.sae: must be a mapping of settings every SAE shares, not {sweep.base['sae']!r} "
                        "(the grid's sae entries name the architectures)")
    for index, (sae, optim, top) in enumerate(grid_points(sweep)):
        base = {key: value for key, value in sweep.base.items() if key not in ("store", "out")}
        settings = {**base, **{k: v for k, v in top.items() if v is not None},
                    "sae": {**(base.get("sae") or {}), **sae}}
        description = f"sweep grid point {index + 1} ({_describe(sae, optim, top)})"
        try:
            cfg = resolve_train_config(settings, sweep.preset, {"store": sweep.store, "out": sweep.out},
                                       {"arch": sae["arch"]}, optim)
        except UserError as error:
            raise UserError(f"{description}: {error}") from None
        resolved.append((description, cfg))
    return resolved


def expand_sweep(sweep: SweepConfig) -> list[TrainConfig]:
    """One TrainConfig per grid point, each with its own folder in the sweep folder; checked against the store."""
    grid = resolve_grid(sweep)  # what the config alone shows is wrong comes before what the store shows
    reader = open_complete_store(sweep.store)
    configs, seen = [], set()
    for description, cfg in grid:
        try:
            choose_layer(cfg, reader)
            check_sae_config(cfg.sae, reader.d_model)
        except UserError as error:
            raise UserError(f"{description}: {error}") from None
        key = config_key(cfg, reader.manifest.fingerprint)
        if key in seen:
            continue  # the grid names the same SAE twice
        seen.add(key)
        configs.append(cfg.model_copy(update={"out": str(Path(sweep.out) / point_name(cfg, key))}))
    return configs


def _describe(sae: dict, optim: dict, top: dict) -> str:
    settings = {**sae, **{k: v for k, v in {**optim, **top}.items() if v is not None}}
    return ", ".join(f"{name}={value}" for name, value in settings.items())


def sae_flops_per_token(cfg: TrainConfig, d_model: int) -> float:
    """Forward and backward of one token: the encoder is dense; TopK's decoder touches only k rows."""
    d_sae = cfg.sae.width(d_model)
    decoder_rows = config_class(cfg.sae).decoder_rows_per_token(cfg.sae, d_sae)
    return 6.0 * d_model * (d_sae + decoder_rows)


def rank_share(todo: list[TrainConfig], d_model: int, place: distributed.Ranks) -> list[TrainConfig]:
    """The SAEs this rank trains: the grid balanced over the ranks by estimated memory and FLOPs."""
    costs = [(float(sae_bytes(cfg, d_model)), sae_flops_per_token(cfg, d_model)) for cfg in todo]
    owners = distributed.balanced_assignment(costs, place.world)
    return [cfg for cfg, owner in zip(todo, owners) if owner == place.rank]


def checkpoint_path(sweep_out: Path, place: distributed.Ranks) -> Path:
    """The sweep's checkpoint covers all its SAEs, so it lives in the sweep folder; under torchrun one per rank:
    each rank resumes its own SAEs (a rerun on another number of ranks starts the unfinished ones afresh)."""
    single = RunPaths(sweep_out).checkpoint
    if not place.distributed:
        return single
    return single.with_name(f"{single.stem}.rank{place.rank}-of-{place.world}{single.suffix}")


def run_sweep(sweep: SweepConfig, resume: bool = False) -> list[dict]:
    """Train the grid points not finished yet; then report on every finished SAE of this store in the folder.

    Holds the sweep folder's writer lock (under torchrun, rank 0 holds it for every rank, and decides what is
    left to train, so every rank deals out the same list); each rank trains its share; rank 0 returns the
    report's rows, the other ranks none."""
    refuse_a_file_as_out(Path(sweep.out))
    configs = expand_sweep(sweep)
    place = distributed.ranks()
    if place.distributed:
        distributed.start(resolve_device(configs[0].device if configs else "cpu"))
    reader = open_complete_store(sweep.store)
    fingerprint = reader.manifest.fingerprint

    def left_to_train() -> list[int]:
        todo = [index for index, cfg in enumerate(configs) if not is_finished(cfg.out, config_key(cfg, fingerprint))]
        spread = f" over {place.world} ranks" if place.distributed else ""
        print(f"sweep {sweep.out}: {len(configs)} SAEs in the grid, {len(configs) - len(todo)} already finished, "
              f"training {len(todo)} in one pass over {sweep.store}{spread}")
        return todo

    # The sweep folder's lock, and each member's own (the lock `train --out` takes): a train into one of the
    # sweep's SAE folders is refused while the sweep runs, and the sweep while such a train runs. A sweep refused
    # before it trains anything leaves no empty folder behind.
    with made_for_this_command(Path(sweep.out)), distributed.lock_on_main(sweep.out, "sweep folder"), \
            ExitStack() as members:
        for cfg in configs:
            members.enter_context(distributed.lock_on_main(cfg.out, "run folder"))
        todo = [configs[index] for index in distributed.decided_on_main(left_to_train)]
        mine = rank_share(todo, reader.d_model, place)
        if mine:
            train_saes(mine, checkpoint_path(Path(sweep.out), place), resume)
        # Every rank's SAEs are finished before the report reads their summaries. A rank that fails exits instead
        # (no barrier): torchrun then ends the others.
        distributed.finish()
        return write_sweep_report(Path(sweep.out), fingerprint) if place.is_main else []
