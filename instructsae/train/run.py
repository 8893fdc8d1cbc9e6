"""`instructsae train`: a store in, an SAE folder out (SAELens layout, metrics.jsonl, summary.json)."""

import json
import math
import shutil
from pathlib import Path

import torch

from instructsae import __version__
from instructsae.errors import UserError
from instructsae.evaluate.metrics import reconstruction_metrics
from instructsae.extract.store import StoreReader, open_store
from instructsae.schemas.train import TrainConfig
from instructsae.train.dead import DeadFeatureTracker
from instructsae.train.export import load_sae, save_sae
from instructsae.train.init import geometric_median
from instructsae.train.sae import build_sae
from instructsae.train.stream import iter_batches
from instructsae.train.trainer import train

SUMMARY_FILE = "summary.json"


def choose_layer(cfg: TrainConfig, reader: StoreReader) -> int:
    layers = list(reader.layers)
    layer = layers[0] if cfg.layer is None else cfg.layer
    if layer not in layers:
        raise UserError(f"layer {layer} is not in store {cfg.store} (it has layers {layers})")
    return layer


def split_chunks(n_chunks: int, holdout_fraction: float) -> tuple[list[int], list[int]]:
    """The last chunks are held out (whole dialogues, mostly unseen in training); none if only one chunk."""
    n_holdout = 0 if n_chunks <= 1 else max(1, math.ceil(holdout_fraction * n_chunks)) if holdout_fraction else 0
    return list(range(n_chunks - n_holdout)), list(range(n_chunks - n_holdout, n_chunks))


def run_paths(out: str) -> dict[str, Path]:
    """Every path of a run, computed in one place."""
    root = Path(out)
    return {"root": root, "metrics": root / "metrics.jsonl", "summary": root / SUMMARY_FILE}


def run_training(cfg: TrainConfig) -> dict:
    reader = open_store(cfg.store)
    if not reader.manifest.complete:
        raise UserError(f"store {cfg.store} is incomplete: rerun its extract to finish it")
    layer = choose_layer(cfg, reader)
    train_chunks, holdout_chunks = split_chunks(reader.n_chunks, cfg.holdout_fraction)
    input_scale = 1.0 / math.sqrt(reader.manifest.layer_stats[str(layer)].mean_sq_norm)
    paths = run_paths(cfg.out)
    shutil.rmtree(paths["root"], ignore_errors=True)  # a rerun starts clean; summary.json marks a finished run
    paths["root"].mkdir(parents=True)

    def read_chunk(index: int) -> torch.Tensor:
        return reader.read_acts_chunk(layer, index) * input_scale

    train_tokens = sum(min(reader.chunk_tokens, reader.n_tokens - i * reader.chunk_tokens) for i in train_chunks)
    tokens = cfg.tokens or train_tokens
    n_steps = max(1, tokens // cfg.batch_size)
    torch.manual_seed(cfg.seed)
    sae = build_sae(cfg.sae, reader.d_model).to(cfg.device)
    batches = iter_batches(read_chunk, train_chunks, cfg.batch_size, cfg.buffer_tokens, cfg.seed, tokens)
    if cfg.geometric_median_tokens:
        sample_ND = _initial_sample(read_chunk, train_chunks, cfg)
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(sample_ND).to(cfg.device))

    dead = DeadFeatureTracker(sae.d_sae, cfg.dead_threshold, cfg.dead_window)
    with open(paths["metrics"], "w") as metrics_file:
        def log(record: dict) -> None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

        stats = train(sae, batches, cfg.optim, cfg.sae.sparsity_coeff, n_steps, dead, log, cfg.log_every, cfg.device)

    metadata = {"layer": layer, "store": cfg.store, "store_fingerprint": reader.manifest.fingerprint,
                "model": reader.manifest.identity.model, "input_scale": input_scale,
                "train_config": cfg.model_dump(mode="json"), "instructsae_version": __version__}
    save_sae(paths["root"], sae.cpu(), input_scale, metadata)
    summary = _summary(sae, reader, layer, holdout_chunks or train_chunks, dead, stats, cfg)
    summary["evaluated_on"] = "held-out chunks" if holdout_chunks else "training chunks (store has one chunk)"
    paths["summary"].write_text(json.dumps(summary, indent=2))
    return summary


def _initial_sample(read_chunk, train_chunks: list[int], cfg: TrainConfig) -> torch.Tensor:
    """Rows from a few chunks spread over the store (not only its first dialogues)."""
    parts, n = [], 0
    stride = max(1, len(train_chunks) // 8)
    for index in train_chunks[::stride]:
        parts.append(read_chunk(index))
        n += len(parts[-1])
        if n >= cfg.geometric_median_tokens:
            break
    sample_ND = torch.cat(parts)
    pick = torch.randperm(len(sample_ND), generator=torch.Generator().manual_seed(cfg.seed))
    return sample_ND[pick[: cfg.geometric_median_tokens]]


def _summary(sae, reader, layer, eval_chunks, dead, stats, cfg) -> dict:
    """Metrics in raw activation space (the exported SAE's), on the held-out chunks."""
    exported, _ = load_sae(cfg.out)
    metrics = reconstruction_metrics(exported, (reader.read_acts_chunk(layer, i) for i in eval_chunks))
    return {
        "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "layer": layer,
        "nmse": metrics["nmse"], "explained_variance": metrics["explained_variance"], "mse": metrics["mse"],
        "l0": metrics["l0"], "dead_fraction_heldout": metrics["dead_fraction"],
        "dead_fraction_train": dead.dead_fraction(), "heldout_tokens": metrics["n_tokens"], **stats,
    }
