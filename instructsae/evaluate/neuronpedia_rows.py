"""The rows of Neuronpedia's bulk-import layout, as SAEDashboard's exporter writes them: the fields of
neuronpedia-utils' database models (inlined in sae_dashboard/neuronpedia/neuronpedia_export.py), in their order.
Pure functions of the feature records `instructsae features` measures; neuronpedia.py writes them to files.

Our additions: each activation row carries `roles` (the chat role of every token) and `dataIndex` (the dialogue's
instance in the store). What is not measured here stays at the exporter's empty defaults (correlated neurons and
features, a steering vector).
"""

import secrets
import time
from dataclasses import dataclass

EXPLANATION_TYPE = "instructsae-autointerp"


@dataclass(frozen=True)
class Source:
    """Whose rows these are and where Neuronpedia files them."""

    model_id: str
    source_set: str
    source_id: str  # LAYER-SOURCE_SET, as SAEDashboard names it
    release: str
    title: str
    creator_id: str
    creator_name: str
    created_at: str


class RowIds:
    """25-character ids starting with "c", as Neuronpedia's cuids do: time, a random part, a counter."""

    def __init__(self):
        self.prefix, self.count = f"c{int(time.time()):08x}{secrets.token_hex(4)}", 0

    def next(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count:08x}"[:25]


def release_row(s: Source) -> dict:
    return {"name": s.release, "description": s.title, "creatorName": s.creator_name, "creatorId": s.creator_id,
            "visibility": "PUBLIC", "isNewUi": False, "featured": False, "descriptionShort": s.title, "urls": [],
            "creatorEmail": None, "creatorNameShort": s.creator_name, "defaultSourceSetName": None,
            "defaultSourceId": None, "defaultUmapSourceIds": [], "createdAt": s.created_at}


def model_row(s: Source, d_model: int) -> dict:
    return {"id": s.model_id, "instruct": True, "creatorId": s.creator_id, "displayNameShort": s.model_id,
            "displayName": s.model_id, "tlensId": None, "dimension": d_model, "visibility": "PUBLIC",
            "defaultSourceSetName": None, "defaultSourceId": None, "inferenceEnabled": False, "layers": 0,
            "neuronsPerLayer": 0, "createdAt": s.created_at, "owner": "", "updatedAt": s.created_at, "website": None}


def sourceset_row(s: Source) -> dict:
    return {"modelId": s.model_id, "name": s.source_set, "creatorId": s.creator_id, "hasDashboards": True,
            "visibility": "PUBLIC", "description": s.title, "type": "", "creatorName": s.creator_name, "urls": [],
            "creatorEmail": None, "releaseName": s.release, "defaultOfModelId": None, "defaultRange": 1,
            "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False, "showHeadAttribution": False,
            "showUmap": False, "createdAt": s.created_at}


def source_row(s: Source, dataset: str, n_prompts: int, n_tokens_in_prompt: int, notes: str) -> dict:
    return {"id": s.source_id, "modelId": s.model_id, "setName": s.source_set, "creatorId": s.creator_id,
            "hasDashboards": True, "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None,
            "saelensRelease": None, "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None,
            "visibility": "PUBLIC", "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False,
            "hasUmapClusters": False, "num_prompts": n_prompts, "num_tokens_in_prompt": n_tokens_in_prompt,
            "dataset": dataset, "notes": notes, "createdAt": s.created_at}


def feature_row(s: Source, record: dict) -> dict:
    """Density, logit lists, activation and logit histograms (bar values: the bins' centres, 5 places as
    SAEDashboard rounds them)."""
    logits = record["logits"] or {"promoted": [], "suppressed": [], "histogram": {"counts": [], "low": 0, "width": 0}}
    counts, width = record["histogram"]["counts"], record["histogram"]["width"]
    logit_hist = logits["histogram"]
    return {"modelId": s.model_id, "layer": s.source_id, "index": record["id"], "creatorId": s.creator_id,
            "createdAt": s.created_at, "maxActApprox": max(c["activation"] for c in record["top"]),
            "hasVector": False, "vector": [], "vectorLabel": None, "vectorDefaultSteerStrength": 10, "hookName": None,
            "topkCosSimIndices": [], "topkCosSimValues": [], "neuron_alignment_indices": [],
            "neuron_alignment_values": [], "neuron_alignment_l1": [], "correlated_neurons_indices": [],
            "correlated_neurons_pearson": [], "correlated_neurons_l1": [], "correlated_features_indices": [],
            "correlated_features_pearson": [], "correlated_features_l1": [],
            "neg_str": [token for token, _ in logits["suppressed"]], "neg_values": [v for _, v in logits["suppressed"]],
            "pos_str": [token for token, _ in logits["promoted"]], "pos_values": [v for _, v in logits["promoted"]],
            "frac_nonzero": record["density"], "freq_hist_data_bar_heights": counts,
            "freq_hist_data_bar_values": [round((b + 0.5) * width, 5) for b in range(len(counts))],
            "logits_hist_data_bar_heights": logit_hist["counts"],
            "logits_hist_data_bar_values": [round(logit_hist["low"] + (b + 0.5) * logit_hist["width"], 5)
                                            for b in range(len(logit_hist["counts"]))],
            "decoder_weights_dist": [],
            "sourceSetName": None}


def activation_rows(s: Source, record: dict, ids: RowIds) -> list[dict]:
    """One row per top context; the bin fields as SAEDashboard marks its top-activations group (-1, max, -1)."""
    rows = []
    top = max(c["activation"] for c in record["top"])
    for context in record["top"]:
        values = context["acts"]
        rows.append({"id": ids.next(), "tokens": context["tokens"], "index": record["id"], "layer": s.source_id,
                     "modelId": s.model_id, "maxValue": max(values), "maxValueTokenIndex": values.index(max(values)),
                     "minValue": min(values), "values": values, "creatorId": s.creator_id, "dataSource": None,
                     "dataIndex": str(context["instance"]), "dfaValues": [], "dfaTargetIndex": None,
                     "dfaMaxValue": None, "createdAt": s.created_at, "lossValues": [], "logitContributions": None,
                     "binMin": -1, "binMax": top, "binContains": -1, "qualifyingTokenIndex": context["focus"],
                     "zIndices": None, "zValues": None,
                     "roles": [role for role, count in context["roles"] for _ in range(count)]})
    return rows


def explanation_row(s: Source, feature: int, text: str, explainer: str | None, ids: RowIds) -> dict:
    """neuronpedia-utils' Explanation (what SAEDashboard's rename script rewrites in explanations/)."""
    return {"id": ids.next(), "modelId": s.model_id, "layer": s.source_id, "index": feature, "description": text,
            "authorId": s.creator_id, "embedding": None, "triggeredById": None, "typeName": EXPLANATION_TYPE,
            "explanationModelName": explainer, "notes": None, "createdAt": s.created_at}
