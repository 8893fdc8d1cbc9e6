"""`instructsae export neuronpedia`: an SAE's features on a store in Neuronpedia's bulk-import layout, laid out as
SAEDashboard's exporter (sae_dashboard/neuronpedia/neuronpedia_export.py) lays it out:

    OUT/MODEL_ID/SOURCE_ID/                  SOURCE_ID = LAYER-SOURCE_SET
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl      one row each
        features/batch-N.jsonl.gz            one row per live feature
        activations/batch-N.jsonl.gz         one row per top context of those features
        explanations/batch-N.jsonl.gz        with --explanations: one row per explained feature of the batch

The rows are neuronpedia_rows.py's. The source folder is built beside its place and swapped in whole, under a
writer lock; a folder there that holds anything but this layout is refused.
"""

import gzip
import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path

from instructsae.errors import UserError, first_line
from instructsae.evaluate.features import measure_views
from instructsae.evaluate.neuronpedia_rows import (RowIds, Source, activation_rows, explanation_row, feature_row,
                                                   model_row, release_row, source_row, sourceset_row)
from instructsae.fileio import move_folder_into_place
from instructsae.lm.models import hub_id
from instructsae.locks import writer_lock
from instructsae.sae.folder import load_sae, sae_layer
from instructsae.schemas.features import FeaturesConfig
from instructsae.schemas.neuronpedia import NeuronpediaExportConfig
from instructsae.store.reader import open_complete_store

ONE_ROW_FILES = ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl")
BATCH_FOLDERS = ("features", "activations", "explanations")
BATCH_FILE = re.compile(r"batch-\d+\.jsonl\.gz")
GZIP_LEVEL = 5  # SAEDashboard's


def default_model_id(model: str) -> str:
    """Neuronpedia's model ids are the hub name's last part in lower case (gemma-2-2b, gpt2-small)."""
    return Path(hub_id(model).rstrip("/")).name.lower().removesuffix(".gguf")


def source_names(cfg: NeuronpediaExportConfig, model: str) -> Source:
    """The ids the export files its rows under, from the flags or from the SAE (architecture, width, layer)."""
    _, sae_cfg = load_sae(cfg.sae)
    layer = sae_layer(sae_cfg, cfg.sae)
    source_set = cfg.source_set or f"instructsae-{sae_cfg['architecture']}-{sae_cfg['d_sae']}"
    model_id = cfg.model_id or default_model_id(model)
    for flag, value in (("--model-id", model_id), ("--source-set", source_set)):
        if not value or "/" in value or value.startswith("."):
            raise UserError(f"{flag} {value!r} cannot name a folder (no '/', not empty, no leading '.')")
    title = cfg.release_title or (f"instructsae {sae_cfg['architecture']} SAE, {sae_cfg['d_sae']:,} features, "
                                  f"layer {layer} of {model_id}")
    return Source(model_id=model_id, source_set=source_set, source_id=f"{layer}-{source_set}",
                  release=cfg.release_id or source_set, title=title, creator_id=cfg.creator_id,
                  creator_name=cfg.creator_name, created_at=datetime.now().isoformat())


def explanation_of(result: dict) -> str | None:
    """A feature's explanation in an autointerp report: its own, or (a rubric-only run) the rubric's."""
    return result.get("explanation") or (result.get("rubric") or {}).get("explanation")


def read_explanations(path: str | None) -> tuple[dict[int, str], str | None]:
    """{feature id: explanation} and the judge model of an autointerp report; nothing without a path."""
    if path is None:
        return {}, None
    try:
        report = json.loads(Path(path).read_text())
        explained = {int(f["id"]): explanation_of(f) for f in report["features"] if explanation_of(f)}
        judge = (report.get("settings") or {}).get("model") or report.get("model")
    except FileNotFoundError:
        raise UserError(f"--explanations {path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"--explanations {path} is not an autointerp report (a JSON object with features: "
                        f"[{{id, explanation}}, ...]): {first_line(error)}") from None
    return explained, judge


def check_source_folder(target: Path) -> None:
    """A source folder is replaced only when it holds this layout and nothing else."""
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} is a file, not a Neuronpedia source folder")
    if not target.is_dir():
        return
    foreign = [p.name for p in target.iterdir() if p.name not in ONE_ROW_FILES + BATCH_FOLDERS]
    foreign += [f"{folder}/{p.name}" for folder in BATCH_FOLDERS if (target / folder).is_dir()
                for p in (target / folder).iterdir() if not BATCH_FILE.fullmatch(p.name)]
    if foreign:
        raise UserError(f"{target} holds files this command did not write ({', '.join(sorted(foreign)[:3])}); "
                        f"choose another --out or remove them")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object a line, compact and UTF-8 as orjson writes them; gzipped for a .gz path."""
    data = b"".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for row in rows)
    path.write_bytes(gzip.compress(data, compresslevel=GZIP_LEVEL) if path.suffix == ".gz" else data)


def build_source(folder: Path, source: Source, records: list[dict], per_batch: int, facts: dict,
                 explained: dict[int, str], explainer: str | None) -> None:
    write_jsonl(folder / "release.jsonl", [release_row(source)])
    write_jsonl(folder / "model.jsonl", [model_row(source, facts["d_model"])])
    write_jsonl(folder / "sourceset.jsonl", [sourceset_row(source)])
    write_jsonl(folder / "source.jsonl", [source_row(source, facts["dataset"], facts["n_prompts"],
                                                     facts["n_tokens_in_prompt"], facts["notes"])])
    for name in BATCH_FOLDERS if explained else BATCH_FOLDERS[:2]:
        (folder / name).mkdir()
    ids = RowIds()
    for n, start in enumerate(range(0, len(records), per_batch)):
        batch, name = records[start:start + per_batch], f"batch-{n}.jsonl.gz"
        write_jsonl(folder / "features" / name, [feature_row(source, r) for r in batch])
        write_jsonl(folder / "activations" / name, [row for r in batch for row in activation_rows(source, r, ids)])
        if explained:
            write_jsonl(folder / "explanations" / name, [explanation_row(source, r["id"], explained[r["id"]],
                                                                         explainer, ids)
                                                         for r in batch if r["id"] in explained])


def run_neuronpedia_export(cfg: NeuronpediaExportConfig) -> dict:
    explained, explainer = read_explanations(cfg.explanations)
    reader = open_complete_store(cfg.store)
    identity = reader.manifest.identity
    source = source_names(cfg, identity.model)
    target = Path(cfg.out) / source.model_id / source.source_id
    check_source_folder(target)  # before the long pass, and again under the lock
    summary, records, _ = measure_views(FeaturesConfig(sae=cfg.sae, store=cfg.store, out=cfg.out, top=cfg.top,
                                                       context=cfg.context, max_tokens=cfg.max_tokens,
                                                       logits=cfg.logits))
    facts = {"d_model": identity.d_model, "dataset": identity.dataset, "n_prompts": reader.n_instances,
             "n_tokens_in_prompt": 2 * cfg.context + 1,
             "notes": f"instructsae: {summary['n_tokens']:,} tokens of store {cfg.store} (fingerprint "
                      f"{summary['store_fingerprint']}), {identity.mode.upper()} mode; SAE {cfg.sae}"}
    with writer_lock(target, "Neuronpedia source folder"):
        check_source_folder(target)
        building = target.with_name(f".{target.name}.partial-{os.getpid()}")
        building.mkdir(parents=True)
        try:
            build_source(building, source, records, cfg.features_per_batch, facts, explained, explainer)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        move_folder_into_place(building, target)
    return {"out": str(target), "n_features": len(records), "n_batches": -(-len(records) // cfg.features_per_batch),
            "n_activations": sum(len(r["top"]) for r in records),
            "n_explanations": sum(r["id"] in explained for r in records)}
