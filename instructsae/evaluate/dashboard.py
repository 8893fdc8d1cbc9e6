"""dashboard.html: one static page (inline data, CSS and JS; no server, no network) over the feature records.

The page embeds at most `max_features` features (special-token features first, then by id) with at most
`max_contexts` contexts each, and says so; features.json holds them all. Token strings are stored once
in a table and contexts and logit lists refer to them by index; per-token activations are kept to 3
significant digits. That keeps the page ~2 KB a feature (bench/dashboard_size.py measures it).
"""

import json
import math
from pathlib import Path

import numpy as np

from instructsae.schemas.manifest import ROLES

TEMPLATE = Path(__file__).with_name("dashboard_template.html")
DATA_MARKER = "/*FEATURE_DATA*/null"
DENSITY_BINS_PER_DECADE = 4
SHOWN_DIGITS = 3


def embedded_features(records: list[dict], special_ids: set[int], max_features: int) -> list[dict]:
    chosen = sorted(records, key=lambda r: (r["id"] not in special_ids, r["id"]))[:max_features]
    return sorted(chosen, key=lambda r: r["id"])


def shown(value: float) -> float:
    """A value to SHOWN_DIGITS significant digits: all a shaded token or a tooltip needs, and short in JSON."""
    return 0.0 if value == 0 else round(value, SHOWN_DIGITS - 1 - math.floor(math.log10(abs(value))))


def density_histogram(records: list[dict], n_tokens: int) -> dict:
    """Live features per bin of log10(density), from the rarest a store of n_tokens can show (1/n_tokens) to 1."""
    low = math.floor(-math.log10(max(n_tokens, 1)) * DENSITY_BINS_PER_DECADE) / DENSITY_BINS_PER_DECADE
    edges = np.arange(low, 0 + 1e-9, 1 / DENSITY_BINS_PER_DECADE)
    if len(edges) < 2:
        edges = np.array([low - 1 / DENSITY_BINS_PER_DECADE, low])
    log_density = np.log10([max(r["density"], 10.0 ** low) for r in records]) if records else np.array([])
    counts, _ = np.histogram(np.clip(log_density, edges[0], edges[-1]), bins=edges)
    return {"low": float(edges[0]), "step": 1 / DENSITY_BINS_PER_DECADE, "counts": counts.tolist()}


def page_data(summary: dict, records: list[dict], special: list[dict], max_features: int,
              max_contexts: int) -> dict:
    """The compact form the page's script reads."""
    special_ids = {feature["id"] for feature in special}
    strings: dict[str, int] = {}

    def index(token: str) -> int:
        return strings.setdefault(token, len(strings))

    features = []
    for record in embedded_features(records, special_ids, max_features):
        contexts = [{"a": shown(c["activation"]), "i": c["instance"], "p": c["position"], "r": c["role"],
                     "f": c["focus"], "t": [index(token) for token in c["tokens"]],
                     "v": [shown(v) for v in c.get("acts", [])]}
                    for c in record["top"][:max_contexts]]
        logits = record.get("logits") or {"promoted": [], "suppressed": []}
        histogram = record.get("histogram") or {"counts": [], "width": 0.0}
        features.append({"id": record["id"], "density": record["density"], "mean": record["mean_activation"],
                         "special": record["special_share"],
                         "roles": [round(record["role_share"].get(role, 0.0), 4) for role in ROLES], "top": contexts,
                         "h": histogram["counts"], "w": histogram["width"],
                         "lp": [[index(token), shown(value)] for token, value in logits["promoted"]],
                         "ln": [[index(token), shown(value)] for token, value in logits["suppressed"]]})
    return {"summary": summary, "roles": list(ROLES), "strings": list(strings), "features": features,
            "special_ids": sorted(special_ids), "n_live": len(records), "max_contexts": max_contexts,
            "density_hist": density_histogram(records, summary["n_tokens"])}


def render_dashboard(summary: dict, records: list[dict], special: list[dict], max_features: int,
                     max_contexts: int) -> str:
    data = json.dumps(page_data(summary, records, special, max_features, max_contexts), separators=(",", ":"))
    # a token string can be anything, "</script>" or "<!--" included: escape every "<" inside the JSON strings
    return TEMPLATE.read_text().replace(DATA_MARKER, data.replace("<", "\\u003c"))
