"""`instructsae train`: a store in, an SAE folder out (SAELens layout, metrics.jsonl, summary.json)."""

import json
import math
import shutil
from pathlib import Path

import torch

from instructsae import __version__
from instructsae.errors import UserError
from instructsae.evaluate.metrics import reconstruction_metrics
from instructsae.extract.store import StoreReader, open_complete_store
from instructsae.fileio import write_text_atomically
from instructsae.schemas.train import TrainConfig
from instructsae.train.dead import DeadFeatureTracker
from instructsae.train.export import load_sae, save_sae
from instructsae.train.init import geometric_median
from instructsae.train.sae import build_sae
from instructsae.train.stream import iter_batches, prefetch_depth
from instructsae.train.trainer import train

SUMMARY_FILE = "summary.json"
# Everything a run writes (summary first: it goes first on a rerun); `eval` is where `instructsae evaluate` writes.
RUN_ENTRIES = (SUMMARY_FILE, "metrics.jsonl", "cfg.json", "sae_weights.safetensors", "eval")


def choose_layer(cfg: TrainConfig, reader: StoreReader) -> int:
    layers = list(reader.layers)
    layer = layers[0] if cfg.layer is None else cfg.layer
    if layer not in layers:
        raise UserError(f"layer {layer} is not in store {cfg.store} (it has layers {layers})")
    return layer


def split_chunks(n_chunks: int, holdout_fraction: float) -> tuple[list[int], list[int]]:
    """The last chunks are held out (whole dialogues, mostly unseen in training); none if only one chunk.

    At least one chunk always stays for training, whatever the fraction."""
    n_holdout = 0 if n_chunks <= 1 else max(1, math.ceil(holdout_fraction * n_chunks)) if holdout_fraction else 0
    n_holdout = min(n_holdout, max(n_chunks - 1, 0))
    return list(range(n_chunks - n_holdout)), list(range(n_chunks - n_holdout, n_chunks))


def run_paths(out: str) -> dict[str, Path]:
    """Every path of a run, computed in one place."""
    root = Path(out)
    return {"root": root, "metrics": root / "metrics.jsonl", "summary": root / SUMMARY_FILE}


def prepare_run_folder(root: Path) -> None:
    """A rerun starts clean, but deletes only what a run writes: a mistyped --out must never wipe a folder."""
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file, not a folder")
    if root.exists():
        names = [entry.name for entry in root.iterdir()]
        foreign = sorted(name for name in names if name not in RUN_ENTRIES and not name.endswith(".partial"))
        if foreign:
            raise UserError(f"--out {root} holds files no training run wrote ({', '.join(foreign[:3])}): "
                            "choose an empty or new folder")
        for name in RUN_ENTRIES:  # summary.json first, so the folder stops looking finished before anything else
            entry = root / name
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
        for partial in root.glob("*.partial"):
            partial.unlink()
    root.mkdir(parents=True, exist_ok=True)


def store_scale(reader, layer: int, store: str) -> float:
    """1/sqrt(E||x||^2): training inputs get unit mean squared norm, so coefficients carry across models."""
    stats = reader.manifest.layer_stats.get(str(layer))
    if stats is None or stats.mean_sq_norm <= 0:
        raise UserError(f"store {store} has no normalisation statistics for layer {layer}: re-extract it")
    return 1.0 / math.sqrt(stats.mean_sq_norm)


def run_training(cfg: TrainConfig) -> dict:
    reader = open_complete_store(cfg.store)
    layer = choose_layer(cfg, reader)
    if reader.n_tokens == 0:
        raise UserError(f"store {cfg.store} holds no tokens")
    train_chunks, holdout_chunks = split_chunks(reader.n_chunks, cfg.holdout_fraction)
    input_scale = store_scale(reader, layer, cfg.store)
    paths = run_paths(cfg.out)
    prepare_run_folder(paths["root"])  # summary.json, written last, is what marks a finished run

    def read_chunk(index: int) -> torch.Tensor:
        return reader.read_acts_chunk(layer, index) * input_scale

    train_tokens = sum(min(reader.chunk_tokens, reader.n_tokens - i * reader.chunk_tokens) for i in train_chunks)
    tokens = cfg.tokens or train_tokens
    n_steps = max(1, tokens // cfg.batch_size)
    torch.manual_seed(cfg.seed)
    sae = build_sae(cfg.sae, reader.d_model).to(cfg.device)
    # On a CPU the reader and the SAE share the same cores, and a reader thread cost more than it hid
    # (bench/train_stream.py); with an accelerator the thread reads while the device computes.
    depth = 0 if cfg.device == "cpu" else prefetch_depth(cfg.buffer_tokens, reader.chunk_tokens)
    batches = iter_batches(read_chunk, train_chunks, cfg.batch_size, cfg.buffer_tokens, cfg.seed, tokens, depth)
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
    summary["evaluated_on"] = "held-out chunks" if holdout_chunks else "training chunks (no chunk was held out)"
    write_text_atomically(paths["summary"], json.dumps(summary, indent=2))
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
