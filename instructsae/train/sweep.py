"""`instructsae sweep`: every SAE of a grid trained in one pass over one store.

Each grid point becomes a full TrainConfig; all of them are checked against the store before any training.
SAEs already finished in the sweep folder (same full config, same store) are skipped, so a rerun trains only
new grid points.

Under torchrun the SAEs left to train are spread over the ranks, balanced by estimated memory and FLOPs; every
rank streams the same shuffled batches (each reads the store itself: same seed, same order) and trains its
SAEs, so each SAE ends as it would in one process; rank 0 writes the report once every rank is done.
"""

import itertools
from pathlib import Path

from instructsae import distributed
from instructsae.devices import resolve_device
from instructsae.errors import UserError
from instructsae.store.reader import open_complete_store
from instructsae.schemas.sweep import SweepConfig
from instructsae.schemas.train import ARCHITECTURES, TrainConfig
from instructsae.train.config import resolve_train_config
from instructsae.train.run import (
    CHECKPOINT_FILE, choose_layer, config_key, is_finished, refuse_a_file_as_out, train_saes,
)
from instructsae.train.memory import sae_bytes
from instructsae.train.sae import check_sae_config
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
            for lr, layer in itertools.product(grid.lr or [None], grid.layer or [None]):
                points.append((sae, {"lr": lr}, {"layer": layer}))
    return points


def point_name(cfg: TrainConfig, key: str) -> str:
    """A folder name a person can read, made unique by the config key."""
    sparsity = f"k{cfg.sae.k}" if hasattr(cfg.sae, "k") else f"c{cfg.sae.sparsity_coeff:g}"
    layer = "" if cfg.layer is None else f"-l{cfg.layer}"
    return f"{cfg.sae.arch}-x{cfg.sae.expansion}-{sparsity}-lr{cfg.optim.lr:g}{layer}-{key[:6]}"


def resolve_grid(sweep: SweepConfig) -> list[tuple[str, TrainConfig]]:
    """(how to name it in an error, its TrainConfig) for every grid point; checked against the schema only."""
    resolved = []
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
    reader = open_complete_store(sweep.store)
    configs, seen = [], set()
    for description, cfg in resolve_grid(sweep):
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
    d_sae = cfg.sae.expansion * d_model
    decoder_rows = min(cfg.sae.k, d_sae) if hasattr(cfg.sae, "k") else d_sae
    return 6.0 * d_model * (d_sae + decoder_rows)


def rank_share(todo: list[TrainConfig], d_model: int, place: distributed.Ranks) -> list[TrainConfig]:
    """The SAEs this rank trains: the grid balanced over the ranks by estimated memory and FLOPs."""
    costs = [(float(sae_bytes(cfg, d_model)), sae_flops_per_token(cfg, d_model)) for cfg in todo]
    owners = distributed.balanced_assignment(costs, place.world)
    return [cfg for cfg, owner in zip(todo, owners) if owner == place.rank]


def checkpoint_path(sweep_out: Path, place: distributed.Ranks) -> Path:
    """One checkpoint per rank: each rank resumes its own SAEs (a rerun on another number of ranks starts
    the unfinished ones afresh)."""
    if not place.distributed:
        return sweep_out / CHECKPOINT_FILE
    return sweep_out / f"{Path(CHECKPOINT_FILE).stem}.rank{place.rank}-of-{place.world}.pt"


def run_sweep(sweep: SweepConfig, resume: bool = False) -> list[dict]:
    """Train the grid points not finished yet; then report on every finished SAE of this store in the folder.

    Under torchrun, each rank trains its share; rank 0 returns the report's rows, the other ranks none."""
    refuse_a_file_as_out(Path(sweep.out))
    configs = expand_sweep(sweep)
    reader = open_complete_store(sweep.store)
    fingerprint = reader.manifest.fingerprint
    todo = [cfg for cfg in configs if not is_finished(Path(cfg.out), config_key(cfg, fingerprint))]
    place = distributed.start(resolve_device(todo[0].device)) if todo else distributed.ranks()
    mine = rank_share(todo, reader.d_model, place)
    if place.is_main:
        spread = f" over {place.world} ranks" if place.distributed else ""
        print(f"sweep {sweep.out}: {len(configs)} SAEs in the grid, {len(configs) - len(todo)} already finished, "
              f"training {len(todo)} in one pass over {sweep.store}{spread}")
    Path(sweep.out).mkdir(parents=True, exist_ok=True)
    if mine:
        train_saes(mine, checkpoint_path(Path(sweep.out), place), resume)
    # Every rank's SAEs are finished before the report reads their summaries. A rank that fails exits instead
    # (no barrier): torchrun then ends the others.
    distributed.finish()
    return write_sweep_report(Path(sweep.out), fingerprint) if place.is_main else []
