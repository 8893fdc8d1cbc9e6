"""How large is dashboard.html for 5,000 features? A synthetic feature set shaped like `instructsae features` output.

    .venv/bin/python bench/dashboard_size.py [--features 5000] [--contexts 5] [--context 12]

Each feature gets `--contexts` contexts of 2 x `--context` + 1 tokens drawn from a 49,152-entry vocabulary of
made-up token strings (SmolLM2's vocabulary size), the feature's activation on every token (about a third nonzero,
as windows around a firing token tend to be), a 32-bin activation histogram, 10 promoted and 10 suppressed
tokens and a 40-bin histogram of the logit effects. Prints the page's size, its gzip size, and features.json's
size for the same records.
"""

import argparse
import gzip
import json

import numpy as np

from instructsae.evaluate.dashboard import render_dashboard
from instructsae.evaluate.feature_stats import HISTOGRAM_BINS
from instructsae.schemas.manifest import ROLES

VOCAB = 49_152
ZIPF = 1.2  # token frequencies: a few very common tokens, a long tail (so the string table stays realistic)


def synthetic_records(n_features: int, n_contexts: int, context: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = [f"{'Ġ' if i % 3 else ''}tok{i:05d}"[: 3 + i % 9] + str(i) for i in range(VOCAB)]
    width = 2 * context + 1
    records = []
    for f in range(n_features):
        top_act = float(rng.gamma(2.0, 3.0))
        contexts = []
        for rank in range(n_contexts):
            activation = top_act * (1 - 0.1 * rank)
            token_ids = np.minimum(rng.zipf(ZIPF, width), VOCAB) - 1
            acts = np.where(rng.random(width) < 0.33, rng.random(width) * activation, 0.0)
            acts[context] = activation
            contexts.append({"activation": activation, "instance": int(rng.integers(10**5)),
                             "position": int(rng.integers(2048)), "role": "assistant",
                             "tokens": [words[t] for t in token_ids], "focus": context,
                             "acts": [float(f"{a:.4g}") for a in acts], "roles": [["assistant", width]]})
        counts = np.sort(rng.poisson(50, HISTOGRAM_BINS))[::-1] * (np.arange(HISTOGRAM_BINS) < rng.integers(8, 33))
        logits = {kind: [[words[int(t)], float(f"{sign * rng.random():.4g}")] for t in rng.integers(VOCAB, size=10)]
                  for kind, sign in (("promoted", 1), ("suppressed", -1))}
        logits["histogram"] = {"counts": np.histogram(rng.normal(size=VOCAB), bins=40)[0].tolist(),
                               "low": float(-rng.random()), "width": float(rng.random() / 20)}
        records.append({"id": f, "density": float(10 ** rng.uniform(-5, -1)), "mean_activation": top_act / 3,
                        "role_share": {role: 1 / len(ROLES) for role in ROLES}, "special_share": 0.0,
                        "top": contexts, "histogram": {"counts": counts.tolist(), "width": top_act / HISTOGRAM_BINS},
                        "logits": logits})
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=5000)
    parser.add_argument("--contexts", type=int, default=5, help="contexts per feature on the page (the default)")
    parser.add_argument("--context", type=int, default=12, help="tokens each side (the default)")
    args = parser.parse_args()
    records = synthetic_records(args.features, args.contexts, args.context)
    summary = {"sae": "synthetic", "store": "synthetic", "layer": 15, "d_sae": args.features, "n_tokens": 10**6,
               "special_threshold": 0.5, "special_tokens": ["<|im_start|>"], "logits": "synthetic"}
    page = render_dashboard(summary, records, [], max_features=args.features, max_contexts=args.contexts).encode()
    features_json = json.dumps({**summary, "features": records}).encode()
    print(f"{args.features:,} features x {args.contexts} contexts x {2 * args.context + 1} tokens")
    print(f"dashboard.html  {len(page) / 2**20:7.2f} MiB ({len(page) / args.features / 1024:.2f} KiB a feature), "
          f"gzip {len(gzip.compress(page)) / 2**20:.2f} MiB")
    print(f"features.json   {len(features_json) / 2**20:7.2f} MiB (the same contexts; `--top` 10 doubles them)")


if __name__ == "__main__":
    main()
