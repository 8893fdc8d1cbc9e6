"""dashboard.html: one static page (inline data, CSS and JS; no server, no network) over the feature records.

The page embeds at most `max_features` features (special-token features first, then by id) with at most
`max_contexts` contexts each, and says so; features.json holds them all. Token strings are stored once
in a table and contexts refer to them by index, which keeps the page a few MB for thousands of features.
"""

import json
from pathlib import Path

from instructsae.schemas.manifest import ROLES

TEMPLATE = Path(__file__).with_name("dashboard_template.html")
DATA_MARKER = "/*FEATURE_DATA*/null"


def embedded_features(records: list[dict], special_ids: set[int], max_features: int) -> list[dict]:
    chosen = sorted(records, key=lambda r: (r["id"] not in special_ids, r["id"]))[:max_features]
    return sorted(chosen, key=lambda r: r["id"])


def page_data(summary: dict, records: list[dict], special: list[dict], max_features: int,
              max_contexts: int) -> dict:
    """The compact form the page's script reads."""
    special_ids = {feature["id"] for feature in special}
    strings: dict[str, int] = {}
    features = []
    for record in embedded_features(records, special_ids, max_features):
        contexts = [{"a": round(c["activation"], 4), "i": c["instance"], "p": c["position"], "r": c["role"],
                     "f": c["focus"], "t": [strings.setdefault(token, len(strings)) for token in c["tokens"]]}
                    for c in record["top"][:max_contexts]]
        features.append({"id": record["id"], "density": record["density"], "mean": record["mean_activation"],
                         "special": record["special_share"],
                         "roles": [round(record["role_share"].get(role, 0.0), 4) for role in ROLES], "top": contexts})
    return {"summary": summary, "roles": list(ROLES), "strings": list(strings), "features": features,
            "special_ids": sorted(special_ids), "n_live": len(records), "max_contexts": max_contexts}


def render_dashboard(summary: dict, records: list[dict], special: list[dict], max_features: int,
                     max_contexts: int) -> str:
    data = json.dumps(page_data(summary, records, special, max_features, max_contexts), separators=(",", ":"))
    # a token string can be anything, "</script>" or "<!--" included: escape every "<" inside the JSON strings
    return TEMPLATE.read_text().replace(DATA_MARKER, data.replace("<", "\\u003c"))
