"""The Python front door: what `import instructsae as isae` gives. The CLI calls these same functions.

Each takes the config the CLI builds (a pydantic model, or a dict of the same fields), and keyword settings on
top of it, validated the same way (a bad value raises UserError with the CLI's one line). Beyond the CLI,
`extract_activations` takes dialogues held in Python and `train_sae` activations held in Python.
"""

import json
import os
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from instructsae.cli_options import build
from instructsae.errors import UserError
from instructsae.schemas.evaluate import LMViewConfig
from instructsae.schemas.extract import ExtractConfig
from instructsae.schemas.manifest import StoreManifest
from instructsae.schemas.sweep import SweepConfig
from instructsae.schemas.train import TrainConfig


def _fields(model: type, config) -> dict:
    """The fields `config` (a `model`, a dict, or None) sets; a model keeps only those set explicitly."""
    if config is None:
        return {}
    if isinstance(config, model):
        return config.model_dump(exclude_unset=True)
    if isinstance(config, Mapping):
        return dict(config)
    raise UserError(f"expected a {model.__name__} or a dict of its fields, not a {type(config).__name__}")


def _config(model: type, config, settings: dict):
    """`config` with `settings` over it, as one validated `model`."""
    if isinstance(config, model) and not settings:
        return config  # as given: the fields it had set explicitly stay the only explicit ones
    return build(model, _fields(model, config), settings)


def extract_activations(config: ExtractConfig | Mapping | None = None, /, *, dialogues: Iterable | None = None,
                        show_progress: bool = True, **settings) -> StoreManifest:
    """Run the LM over a dataset and store per-token activations (`instructsae extract`); the store's manifest.

    dialogues: instead of `dataset`, a list of message lists ([{"role": "user", "content": "..."}, ...]), a
    `datasets.Dataset` or any iterable of rows in a format `dataset` files may use.
    """
    from instructsae.extract.memory_data import InMemoryDialogues
    from instructsae.extract.run import run_extract

    source = None if dialogues is None else InMemoryDialogues(dialogues)
    if source is not None:
        settings = {**settings, "dataset": source.name}
    return run_extract(_config(ExtractConfig, config, settings), show_progress, source)


def train_sae(config: TrainConfig | Mapping | None = None, /, *, activations: torch.Tensor | Iterable | None = None,
              resume: bool = False, overwrite: bool = False, **settings) -> dict | None:
    """Train one SAE on a store (`instructsae train`); its summary. The SAE folder is `out`: if it holds this very
    SAE already (same config, same store) its summary comes back untrained; one of another config is replaced
    only with `overwrite`. Under torchrun (data-parallel) rank 0 returns the summary, the other ranks None.

    activations: instead of `store`, a [tokens, d_model] tensor or an iterator of such tensors (one per sequence),
    written to a store first (in memory unless `store` names a location for it) and trained on like any store;
    `layer` labels which layer they come from (default 0). A store made here in memory is dropped afterwards.
    """
    from instructsae.train.run import run_training

    if activations is None:
        return run_training(_config(TrainConfig, config, settings), resume=resume, overwrite=overwrite)
    from instructsae.extract.from_tensors import write_activation_store
    from instructsae.store.location import remove_store

    given = {**_fields(TrainConfig, config), **{key: value for key, value in settings.items() if value is not None}}
    in_memory = "store" not in given
    store = given.setdefault("store", f"memory://instructsae/activations-{uuid.uuid4().hex}")
    cfg = build(TrainConfig, given)
    layer = 0 if cfg.layer is None else cfg.layer
    write_activation_store(activations, store, layer)
    try:
        return run_training(cfg, resume=resume, overwrite=overwrite)
    finally:
        if in_memory:
            remove_store(store)


def train_sweep(config: SweepConfig | Mapping, /, *, resume: bool = False, **settings) -> list[dict]:
    """Train every SAE of a grid in one pass over a store (`instructsae sweep`); one row per finished SAE."""
    from instructsae.train.sweep import run_sweep

    return run_sweep(_config(SweepConfig, config, settings), resume=resume)


def evaluate_sae(sae: str | list[str], store: str, *, max_tokens: int | None = None,
                 lm: LMViewConfig | Mapping | None = None, out: str | None = None, **lm_settings) -> dict | list[dict]:
    """Reconstruction, Eq. 7, per-role figures and (with lm_tokens > 0) the LM view (`instructsae evaluate`).

    One SAE folder gives its result; a list gives one result per folder, sharing store reads and LM runs.
    Without `lm` or lm settings, the LM view is skipped. The SAE folders are only read; `out` names a JSON file
    to write the result(s) to.
    """
    from instructsae.evaluate.run import evaluate_saes_on_store, write_results

    view = None if lm is None and not lm_settings else _config(LMViewConfig, lm, lm_settings)
    single = isinstance(sae, (str, os.PathLike))
    if out is not None and Path(out).is_dir():  # found now, not after the evaluation
        raise UserError(f"--out {out} is a folder: name a JSON file")
    results = evaluate_saes_on_store([str(sae)] if single else [str(s) for s in sae], str(store), max_tokens, view)
    if out is not None:
        write_results(out, results)
    return results[0] if single else results


def open_store(path: str):
    """A complete or partial store to read: `.manifest`, `.read_acts(layer, start, stop)`, `.read_column(name)`."""
    from instructsae.store.reader import open_store as open_reader

    return open_reader(str(path))


def load_sae(path: str, device: str | None = None):
    """The SAE of a folder (ours or SAELens's), on raw activations: `.encode`, `.decode`, `forward`, `.dtype`,
    `.device`, unit-norm `.W_dec` rows (for folders we export), and `.cfg`: cfg.json as a dict that also answers
    SAEBench's attributes (cfg.d_sae, cfg.hook_name, cfg.hook_layer, ...). `device`: where to put it ("auto":
    CUDA when present)."""
    from instructsae.devices import resolve_device
    from instructsae.sae.folder import load_sae as load

    sae, cfg = load(path)
    if device is not None:
        sae.to(resolve_device(device))
        cfg["device"] = str(sae.device)
    return sae


def steer(sae: str, feature: int, prompt: str, *, alpha=(0.0, 15.0, 25.0, 50.0, 100.0, 150.0), out: str | None = None,
          **settings) -> dict:
    """Greedy generations with α × the feature's unit-norm decoder row added after the SAE's layer (`instructsae
    steer`), one per α: the result, with "generations". Written to disk only when `out` names a JSON file."""
    from instructsae.evaluate.steering import run_steering
    from instructsae.schemas.steer import SteerConfig

    alphas = (alpha,) if isinstance(alpha, (int, float)) else tuple(alpha)
    return run_steering(build(SteerConfig, {"sae": str(sae), "feature": feature, "prompt": prompt, "alpha": alphas,
                                            "out": out}, settings))


def features(sae: str, store: str, *, out: str | None = None, **settings) -> dict:
    """Every live feature's density, mean activation, role shares and top contexts on a store (`instructsae
    features`): the summary with "features" (the features.json records) and "special". With `out`, the folder
    of features.json/.parquet and dashboard.html is written there; without, nothing is kept on disk."""
    from instructsae.evaluate.features import run_features
    from instructsae.schemas.features import FeaturesConfig

    def run(folder: str) -> dict:
        result = run_features(build(FeaturesConfig, {"sae": str(sae), "store": str(store), "out": folder}, settings))
        records = json.loads((Path(folder) / "features.json").read_text())["features"]
        return {**result, "features": records}

    if out is not None:
        return run(str(out))
    with tempfile.TemporaryDirectory(prefix="instructsae-features-") as folder:
        return {**run(str(Path(folder) / "features")), "out": None}


def autointerp(features: str | Mapping, *, endpoint: str, model: str, out: str | None = None, **settings) -> dict:
    """Explain and score sampled features through an OpenAI-compatible endpoint (`instructsae autointerp`): the
    report. `features`: a folder written by `features`, or the dict `features()` returned. Written to disk only
    when `out` names a JSON file."""
    from instructsae.evaluate.autointerp import run_autointerp
    from instructsae.schemas.autointerp import AutointerpConfig

    with tempfile.TemporaryDirectory(prefix="instructsae-autointerp-") as scratch:
        folder = features
        if isinstance(features, Mapping):  # features() held in Python: its records as the folder would hold them
            folder = Path(scratch) / "features"
            folder.mkdir()
            (folder / "features.json").write_text(json.dumps(dict(features)))
        target = out if out is not None else str(Path(scratch) / "autointerp.json")
        report = run_autointerp(build(AutointerpConfig, {"features": str(folder), "endpoint": endpoint,
                                                         "model": model, "out": target}, settings))
    return report if out is not None else {**report, "out": None}


def dedup(dataset: str, *, out: str | None = None, **settings) -> dict:
    """Drop exact and near-duplicate rows of a dataset (`instructsae dedup`): the report, with "rows" (the kept
    rows, as dicts) when no `out` parquet file is named (then nothing is written)."""
    from instructsae.extract.dedup_run import run_dedup
    from instructsae.schemas.dataset import DedupConfig

    if out is not None:
        return run_dedup(build(DedupConfig, {"dataset": str(dataset), "out": str(out)}, settings))
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="instructsae-dedup-") as folder:
        target = Path(folder) / "kept.parquet"
        report = run_dedup(build(DedupConfig, {"dataset": str(dataset), "out": str(target)}, settings))
        rows = pq.read_table(target).to_pylist()
    return {**report, "out": None, "rows": rows}


def compare(out: str, **settings) -> dict:
    """BT(P) vs BT(F) vs FAST at matched L0 (`instructsae pipeline compare`): stores, SAEs and the report are
    written under `out` (it resumes from there). Returns {"report": report.md's text, "results": [...],
    "verdicts": {...}, "out": out}."""
    from instructsae.pipelines.compare import run_compare
    from instructsae.schemas.compare import CompareConfig

    report = run_compare(build(CompareConfig, {"out": str(out)}, settings))
    root = Path(out)
    return {"report": report, "results": json.loads((root / "results.json").read_text()),
            "verdicts": json.loads((root / "verdicts.json").read_text()), "out": str(out)}
