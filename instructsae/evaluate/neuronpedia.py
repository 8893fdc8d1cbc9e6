"""`instructsae export neuronpedia`: an SAE's features on a store in Neuronpedia's bulk-import layout.

The layout and the rows are those SAEDashboard's exporter writes (sae_dashboard/neuronpedia/neuronpedia_export.py,
whose dataclasses mirror neuronpedia-utils' database models), field for field and in the same order:

    OUT/MODEL_ID/SOURCE_ID/                  SOURCE_ID = LAYER-SOURCE_SET
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl      one row each
        features/batch-N.jsonl.gz            one row per live feature: density, logits, activation histogram
        activations/batch-N.jsonl.gz         one row per top context: tokens, per-token values
        explanations/batch-N.jsonl.gz        with --explanations: one row per explained feature

Our additions: each activation row carries `roles` (the chat role of every token) and `dataIndex` (the dialogue's
instance in the store). What is not measured here stays at SAEDashboard's empty defaults (correlated neurons and
features, the logit histogram, a steering vector). The source folder is built beside its place and swapped in
whole, under a writer lock; a folder there that holds anything else is refused.
"""

import gzip
import json
import os
import secrets
import shutil
import time
from datetime import datetime
from pathlib import Path

from instructsae.errors import UserError, first_line
from instructsae.evaluate.features import measure_views
from instructsae.fileio import move_folder_into_place
from instructsae.lm.models import hub_id
from instructsae.locks import writer_lock
from instructsae.sae.folder import load_sae, sae_layer
from instructsae.schemas.features import FeaturesConfig
from instructsae.schemas.neuronpedia import NeuronpediaExportConfig
from instructsae.store.reader import open_complete_store

ONE_ROW_FILES = ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl")
BATCH_FOLDERS = ("features", "activations", "explanations")
GZIP_LEVEL = 5  # SAEDashboard's
EXPLANATION_TYPE = "instructsae-autointerp"


class RowIds:
    """25-character ids starting with "c", as Neuronpedia's cuids do: time, a random part, a counter."""

    def __init__(self):
        self.prefix, self.count = f"c{int(time.time()):08x}{secrets.token_hex(4)}", 0

    def next(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count:08x}"[:25]


def default_model_id(model: str) -> str:
    """Neuronpedia's model ids are the hub name's last part in lower case (gemma-2-2b, gpt2-small)."""
    return Path(hub_id(model).rstrip("/")).name.lower().removesuffix(".gguf")


def release_row(name: str, title: str, cfg: NeuronpediaExportConfig, created_at: str) -> dict:
    return {"name": name, "description": title, "creatorName": cfg.creator_name, "creatorId": cfg.creator_id,
            "visibility": "PUBLIC", "isNewUi": False, "featured": False, "descriptionShort": title, "urls": [],
            "creatorEmail": None, "creatorNameShort": cfg.creator_name, "defaultSourceSetName": None,
            "defaultSourceId": None, "defaultUmapSourceIds": [], "createdAt": created_at}


def model_row(model_id: str, d_model: int, cfg: NeuronpediaExportConfig, created_at: str) -> dict:
    return {"id": model_id, "instruct": True, "creatorId": cfg.creator_id, "displayNameShort": model_id,
            "displayName": model_id, "tlensId": None, "dimension": d_model, "visibility": "PUBLIC",
            "defaultSourceSetName": None, "defaultSourceId": None, "inferenceEnabled": False, "layers": 0,
            "neuronsPerLayer": 0, "createdAt": created_at, "owner": "", "updatedAt": created_at, "website": None}


def sourceset_row(model_id: str, source_set: str, release: str, description: str, cfg: NeuronpediaExportConfig,
                  created_at: str) -> dict:
    return {"modelId": model_id, "name": source_set, "creatorId": cfg.creator_id, "hasDashboards": True,
            "visibility": "PUBLIC", "description": description, "type": "", "creatorName": cfg.creator_name,
            "urls": [], "creatorEmail": None, "releaseName": release, "defaultOfModelId": None, "defaultRange": 1,
            "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False, "showHeadAttribution": False,
            "showUmap": False, "createdAt": created_at}


def source_row(model_id: str, source_set: str, source_id: str, dataset: str, n_prompts: int, n_tokens: int,
               notes: str, cfg: NeuronpediaExportConfig, created_at: str) -> dict:
    return {"id": source_id, "modelId": model_id, "setName": source_set, "creatorId": cfg.creator_id,
            "hasDashboards": True, "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None,
            "saelensRelease": None, "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None,
            "visibility": "PUBLIC", "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False,
            "hasUmapClusters": False, "num_prompts": n_prompts, "num_tokens_in_prompt": n_tokens,
            "dataset": dataset, "notes": notes, "createdAt": created_at}


def feature_row(record: dict, model_id: str, source_id: str, creator_id: str, created_at: str) -> dict:
    logits = record["logits"] or {"promoted": [], "suppressed": []}
    width = record["histogram"]["width"]
    counts = record["histogram"]["counts"]
    return {"modelId": model_id, "layer": source_id, "index": record["id"], "creatorId": creator_id,
            "createdAt": created_at, "maxActApprox": max(c["activation"] for c in record["top"]), "hasVector": False,
            "vector": [], "vectorLabel": None, "vectorDefaultSteerStrength": 10, "hookName": None,
            "topkCosSimIndices": [], "topkCosSimValues": [], "neuron_alignment_indices": [],
            "neuron_alignment_values": [], "neuron_alignment_l1": [], "correlated_neurons_indices": [],
            "correlated_neurons_pearson": [], "correlated_neurons_l1": [], "correlated_features_indices": [],
            "correlated_features_pearson": [], "correlated_features_l1": [],
            "neg_str": [token for token, _ in logits["suppressed"]], "neg_values": [v for _, v in logits["suppressed"]],
            "pos_str": [token for token, _ in logits["promoted"]], "pos_values": [v for _, v in logits["promoted"]],
            "frac_nonzero": record["density"], "freq_hist_data_bar_heights": counts,
            "freq_hist_data_bar_values": [round((b + 0.5) * width, 5) for b in range(len(counts))],
            "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [], "decoder_weights_dist": [],
            "sourceSetName": None}


def activation_rows(record: dict, model_id: str, source_id: str, creator_id: str, created_at: str,
                    ids: RowIds) -> list[dict]:
    """One row per top context; bin fields as SAEDashboard marks its top-activations group (-1, max, -1)."""
    rows = []
    top = max(c["activation"] for c in record["top"])
    for context in record["top"]:
        values = context["acts"]
        rows.append({"id": ids.next(), "tokens": context["tokens"], "index": record["id"], "layer": source_id,
                     "modelId": model_id, "maxValue": max(values), "maxValueTokenIndex": values.index(max(values)),
                     "minValue": min(values), "values": values, "creatorId": creator_id, "dataSource": None,
                     "dataIndex": str(context["instance"]), "dfaValues": [], "dfaTargetIndex": None,
                     "dfaMaxValue": None, "createdAt": created_at, "lossValues": [], "logitContributions": None,
                     "binMin": -1, "binMax": top, "binContains": -1, "qualifyingTokenIndex": context["focus"],
                     "zIndices": None, "zValues": None,
                     "roles": [role for role, count in context["roles"] for _ in range(count)]})
    return rows


def read_explanations(path: str | None) -> tuple[dict[int, str], str | None]:
    """{feature id: explanation} and the judge model of an autointerp report; nothing without a path."""
    if path is None:
        return {}, None
    try:
        report = json.loads(Path(path).read_text())
        features = report["features"]
        explained = {int(f["id"]): f["explanation"] for f in features if f.get("explanation")}
    except FileNotFoundError:
        raise UserError(f"--explanations {path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"--explanations {path} is not an autointerp report (a JSON object with features: "
                        f"[{{id, explanation}}, ...]): {first_line(error)}") from None
    return explained, report.get("model")


def explanation_row(feature: int, text: str, explainer: str | None, model_id: str, source_id: str,
                    creator_id: str, created_at: str, ids: RowIds) -> dict:
    """neuronpedia-utils' Explanation (what SAEDashboard's rename script rewrites in explanations/)."""
    return {"id": ids.next(), "modelId": model_id, "layer": source_id, "index": feature, "description": text,
            "authorId": creator_id, "embedding": None, "triggeredById": None, "typeName": EXPLANATION_TYPE,
            "explanationModelName": explainer, "notes": None, "createdAt": created_at}


def write_jsonl(path: Path, rows: list[dict], gzipped: bool) -> None:
    data = b"".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for row in rows)
    path.write_bytes(gzip.compress(data, compresslevel=GZIP_LEVEL) if gzipped else data)


def check_source_folder(target: Path) -> None:
    """A source folder is replaced only when it holds this layout and nothing else."""
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} is a file, not a Neuronpedia source folder")
    if not target.is_dir():
        return
    foreign = [p.name for p in target.iterdir() if p.name not in ONE_ROW_FILES and p.name not in BATCH_FOLDERS]
    foreign += [f"{p.parent.name}/{p.name}" for folder in BATCH_FOLDERS if (target / folder).is_dir()
                for p in (target / folder).iterdir() if not (p.name.startswith("batch-") and p.name.endswith(".jsonl.gz"))]
    if foreign:
        raise UserError(f"{target} holds files this command did not write ({', '.join(sorted(foreign)[:3])}); "
                        f"choose another --out or remove them")


def build_source(folder: Path, cfg: NeuronpediaExportConfig, names: dict, records: list[dict], store_facts: dict,
                 explained: dict[int, str], explainer: str | None) -> None:
    created_at, ids = datetime.now().isoformat(), RowIds()
    model_id, source_id, source_set, release = (names[k] for k in ("model_id", "source_id", "source_set", "release"))
    write_jsonl(folder / "release.jsonl", [release_row(release, names["title"], cfg, created_at)], gzipped=False)
    write_jsonl(folder / "model.jsonl", [model_row(model_id, store_facts["d_model"], cfg, created_at)], gzipped=False)
    write_jsonl(folder / "sourceset.jsonl", [sourceset_row(model_id, source_set, release, names["title"], cfg,
                                                           created_at)], gzipped=False)
    write_jsonl(folder / "source.jsonl", [source_row(model_id, source_set, source_id, store_facts["dataset"],
                                                     store_facts["n_instances"], 2 * cfg.context + 1,
                                                     store_facts["notes"], cfg, created_at)], gzipped=False)
    for name in BATCH_FOLDERS[:2] + (BATCH_FOLDERS[2:] if explained else ()):
        (folder / name).mkdir()
    for n, start in enumerate(range(0, len(records), cfg.features_per_batch)):
        batch = records[start:start + cfg.features_per_batch]
        write_jsonl(folder / "features" / f"batch-{n}.jsonl.gz",
                    [feature_row(r, model_id, source_id, cfg.creator_id, created_at) for r in batch], gzipped=True)
        write_jsonl(folder / "activations" / f"batch-{n}.jsonl.gz",
                    [row for r in batch for row in activation_rows(r, model_id, source_id, cfg.creator_id,
                                                                   created_at, ids)], gzipped=True)
        if explained:
            write_jsonl(folder / "explanations" / f"batch-{n}.jsonl.gz",
                        [explanation_row(r["id"], explained[r["id"]], explainer, model_id, source_id,
                                         cfg.creator_id, created_at, ids) for r in batch if r["id"] in explained],
                        gzipped=True)


def export_names(cfg: NeuronpediaExportConfig, model: str) -> dict:
    _, sae_cfg = load_sae(cfg.sae)
    layer = sae_layer(sae_cfg, cfg.sae)
    source_set = cfg.source_set or f"instructsae-{sae_cfg['architecture']}-{sae_cfg['d_sae']}"
    model_id = cfg.model_id or default_model_id(model)
    for flag, value in (("--model-id", model_id), ("--source-set", source_set)):
        if not value or "/" in value or value.startswith("."):
            raise UserError(f"{flag} {value!r} cannot name a folder (no '/', not empty, no leading '.')")
    return {"model_id": model_id, "source_set": source_set, "source_id": f"{layer}-{source_set}",
            "release": cfg.release_id or source_set,
            "title": cfg.release_title or f"instructsae {sae_cfg['architecture']} SAE, {sae_cfg['d_sae']:,} "
                                          f"features, layer {layer} of {model_id}"}


def run_neuronpedia_export(cfg: NeuronpediaExportConfig) -> dict:
    explained, explainer = read_explanations(cfg.explanations)
    reader = open_complete_store(cfg.store)
    identity = reader.manifest.identity
    features_cfg = FeaturesConfig(sae=cfg.sae, store=cfg.store, out=cfg.out, top=cfg.top, context=cfg.context,
                                  max_tokens=cfg.max_tokens, logits=cfg.logits)
    names = export_names(cfg, identity.model)
    target = Path(cfg.out) / names["model_id"] / names["source_id"]
    check_source_folder(target)  # before the long pass, and again under the lock
    summary, records, _ = measure_views(features_cfg)
    store_facts = {"d_model": identity.d_model, "dataset": identity.dataset, "n_instances": reader.n_instances,
                   "notes": f"instructsae: {summary['n_tokens']:,} tokens of store {cfg.store} (fingerprint "
                            f"{summary['store_fingerprint']}), {identity.mode.upper()} mode; SAE {cfg.sae}"}
    with writer_lock(target, "Neuronpedia source folder"):
        check_source_folder(target)
        building = target.with_name(f".{target.name}.partial-{os.getpid()}")
        building.mkdir(parents=True)
        try:
            build_source(building, cfg, names, records, store_facts, explained, explainer)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        move_folder_into_place(building, target)
    n_batches = -(-len(records) // cfg.features_per_batch)
    return {"out": str(target), "n_features": len(records), "n_batches": n_batches,
            "n_activations": sum(len(r["top"]) for r in records),
            "n_explanations": sum(r["id"] in explained for r in records), **names}
