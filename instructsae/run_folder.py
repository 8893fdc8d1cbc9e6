"""A run folder: every path in it computed in one place, and what may be done to one that already exists.

A run is built in `RUN.partial` beside RUN (its checkpoint lives there, so `--resume` finds it) and moved into
place only when finished, so RUN holds a finished SAE or nothing: a killed run never leaves a half-replaced
folder, and the SAE it was replacing stays intact until the new one is whole.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from instructsae.errors import UserError
from instructsae.sae.folder import CFG_FILE, WEIGHTS_FILE, provenance
from instructsae.schemas.base import differing_fields

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
CHECKPOINT_FILE = "checkpoint.pt"
EVAL_DIR = "eval"  # where `instructsae evaluate` writes its results
BUILDING_SUFFIX = ".partial"
# Everything a run writes (summary first: removing it first makes a folder stop looking finished).
RUN_ENTRIES = (SUMMARY_FILE, METRICS_FILE, CFG_FILE, WEIGHTS_FILE, CURVES_FILE, CHECKPOINT_FILE, EVAL_DIR)


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run folder."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))  # a str is welcome too

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def cfg(self) -> Path:
        return self.root / CFG_FILE

    @property
    def weights(self) -> Path:
        return self.root / WEIGHTS_FILE

    @property
    def curves(self) -> Path:
        return self.root / CURVES_FILE

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_FILE

    @property
    def eval_dir(self) -> Path:
        return self.root / EVAL_DIR

    def eval_result(self, store_fingerprint: str) -> Path:
        return self.eval_dir / f"{store_fingerprint}.json"

    @property
    def building(self) -> "RunPaths":
        """The folder the run is built in, beside the run folder, until it is finished."""
        return RunPaths(self.root.with_name(self.root.name + BUILDING_SUFFIX))


def is_building_folder(folder: Path) -> bool:
    return folder.name.endswith(BUILDING_SUFFIX)


def finished_key(folder: str | Path) -> str | None:
    """The config key of the finished SAE a folder holds; None when it holds none (or an unreadable summary)."""
    try:
        key = json.loads(RunPaths(folder).summary.read_text()).get("config_key")
    except (OSError, ValueError, AttributeError):
        return None
    return key if isinstance(key, str) else None


def is_finished(folder: str | Path, key: str) -> bool:
    """The folder holds this SAE (same full config, same store), finished."""
    return finished_key(folder) == key


def foreign_entries(folder: Path) -> list[str]:
    """What is in the folder that no training run writes."""
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir()
                  if entry.name not in RUN_ENTRIES and not entry.name.endswith(".partial"))


def refuse_enclosing_cwd(path: str | Path, flag: str = "--out") -> None:
    """Nothing we replace or remove may be the working directory or a folder above it (`--out .`)."""
    target, cwd = Path(os.path.abspath(path)), Path.cwd()
    if target == cwd or target in cwd.parents:
        raise UserError(f"{flag} {path} is the working directory or a folder above it: choose a new folder")


def refuse_a_file_as_out(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file, not a folder")


def refuse_unless_ours(root: Path) -> None:
    """RUN may be replaced only when it is new, empty, or holds nothing but what a run writes."""
    refuse_enclosing_cwd(root)
    refuse_a_file_as_out(root)
    foreign = foreign_entries(root)
    if foreign:
        raise UserError(f"--out {root} holds files no training run wrote ({', '.join(foreign[:3])}): "
                        "choose an empty or new folder (--overwrite replaces only run folders)")


def check_existing_run(root: Path, key: str, settings: dict, store_fingerprint: str, overwrite: bool) -> bool:
    """Whether RUN already holds this very SAE (nothing to train); refuses what must not be replaced.

    `settings` is the config as `config_key` sees it (runtime knobs left out)."""
    refuse_unless_ours(root)
    paths = RunPaths(root)
    old_key = finished_key(root)
    if old_key == key:
        return not overwrite
    if old_key is not None and not overwrite:
        raise UserError(f"--out {root} holds a finished SAE of another config "
                        f"({_describe_difference(paths, settings, store_fingerprint)}): pass --overwrite to "
                        "replace it, or choose another --out")
    if old_key is None and paths.checkpoint.is_file() and not overwrite:
        raise UserError(f"--out {root} holds the checkpoint of an unfinished run made by an earlier version "
                        "(checkpoints now live in RUN.partial): pass --overwrite to start again")
    return False


def _describe_difference(paths: RunPaths, settings: dict, store_fingerprint: str) -> str:
    """'sae.arch: jumprelu -> topk, ...' as far as the old cfg.json tells."""
    try:
        metadata = provenance(json.loads(paths.cfg.read_text()))
        given = metadata.get("given_config") or metadata["train_config"]  # train_config: what ran, fitted values
        old_settings = {name: value for name, value in given.items() if name in settings}
        old_store = metadata["store_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {CFG_FILE} does not say which"
    changes = differing_fields(old_settings, settings)
    if old_store != store_fingerprint:
        changes.append(("store fingerprint", old_store, store_fingerprint))
    shown = [f"{name}: {old} -> {new}" for name, old, new in changes[:4]]
    more = f" and {len(changes) - 4} more" if len(changes) > 4 else ""
    return ", ".join(shown) + more if shown else "same settings, another config key"


def prepare_building_folder(building: RunPaths) -> None:
    """A fresh start clears what an earlier attempt left in RUN.partial; it deletes only what a run writes."""
    root = building.root
    refuse_a_file_as_out(root)
    foreign = foreign_entries(root)
    if foreign:
        raise UserError(f"{root} holds files no training run wrote ({', '.join(foreign[:3])}): move them away")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
