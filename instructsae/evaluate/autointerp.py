"""`instructsae autointerp`: an LLM explains sampled features from their top contexts and scores them.

The FAST paper's procedure: one call per feature shows the strongest contexts with their activations and asks for
a brief explanation and a 1-5 monosemanticity score under its "Activation Consistency" rubric; the FAST paper
samples 128 live features per SAE and compares the share that scores in the top range (5).
"""

import json
import random
import re
from pathlib import Path

from tqdm import tqdm

from instructsae.errors import UserError
from instructsae.evaluate.chat_client import api_key_from_env, chat_completion
from instructsae.fileio import write_text_atomically
from instructsae.schemas.autointerp import AutointerpConfig

FEATURES_FILE = "features.json"
# Not << >>: the template tokens themselves (<|im_end|>) end in ">", which would make the mark ambiguous.
MARK_OPEN, MARK_CLOSE = "«", "»"
RUBRIC = (
    "5: Clear pattern with no deviating examples\n"
    "4: Clear pattern with one or two deviating examples\n"
    "3: Clear overall pattern but quite a few examples not fitting that pattern\n"
    "2: Broad consistent theme but lacking structure\n"
    "1: No discernible pattern"
)
SYSTEM_PROMPT = "You analyse the features a sparse autoencoder learned from a language model's activations."


def load_features(folder: str) -> list[dict]:
    """The feature records of FOLDER/features.json (a list, or {"features": [...]})."""
    path = Path(folder) / FEATURES_FILE
    if not path.is_file():
        raise UserError(f"no {FEATURES_FILE} in {folder} (write it with `instructsae features`)")
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None
    features = data.get("features") if isinstance(data, dict) else data
    if not isinstance(features, list) or not all(_is_feature(f) for f in features):
        raise UserError(f"{path} must hold a list of features, each with an 'id' and a 'top' list of contexts")
    return features


def _is_feature(record) -> bool:
    if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("top", []), list):
        return False
    return all(isinstance(example, dict) for example in record.get("top", []))


def sample_live_features(features: list[dict], n: int, seed: int) -> list[dict]:
    """Up to n features that fired (positive density, some top contexts), drawn reproducibly, in id order."""
    live = sorted((f for f in features if f.get("density", 1) > 0 and f.get("top")), key=lambda f: f["id"])
    if not live:
        raise UserError("features.json has no live feature (none with a positive density and top contexts)")
    picked = random.Random(seed).sample(live, min(n, len(live)))
    return sorted(picked, key=lambda f: f["id"])


def marked_context(example: dict, feature_id) -> str:
    """The context's tokens on one line with the firing token marked «like this»."""
    tokens, focus = example.get("tokens"), example.get("focus")
    if not isinstance(tokens, list) or not isinstance(focus, int) or not 0 <= focus < len(tokens):
        raise UserError(f"feature {feature_id} in {FEATURES_FILE}: a top context needs 'tokens' and a 'focus' "
                        f"index into them (got focus {focus!r} for {len(tokens or [])} tokens)")
    text = "".join(tokens[:focus]) + MARK_OPEN + tokens[focus] + MARK_CLOSE + "".join(tokens[focus + 1:])
    return text.replace("\r", "\\r").replace("\n", "\\n")


def explanation_prompt(feature: dict, n_contexts: int) -> str:
    top = sorted(feature["top"], key=lambda example: -example.get("activation", 0))[:n_contexts]
    lines = [f"Activation: {example.get('activation', 0):.3g} | Context: {marked_context(example, feature['id'])}"
             for example in top]
    return (
        "We are analysing the activation levels of one feature of a language model. Below are the contexts "
        f"where it activates most strongly; in each, the token where it fires is marked {MARK_OPEN}like this"
        f"{MARK_CLOSE}. A higher activation value means a stronger association with the feature.\n"
        "Give this feature a monosemanticity score with the following rubric.\n"
        f"Activation Consistency\n{RUBRIC}\n\n"
        + "\n\n".join(lines)
        + "\n\nAnswer in exactly two lines, in this fixed format:\n"
        "Explanation: [your brief explanation of what the feature responds to]\n"
        "Score: [5/4/3/2/1]\n"
    )


def parse_reply(text: str) -> tuple[str | None, int | None]:
    """(explanation, score 1-5) from the two-line answer; None for a part the reply lacks."""
    explanation = re.search(r"Explanation\W*(.+)", text, re.IGNORECASE)
    # "Score: 4", "Score: [4]", "**Score:** 4", "Score: 5/5", "Score: 4 (clear)"; not an echoed "[5/4/3/2/1]"
    scores = re.findall(r"Score\W*?\[?([1-5])\]?(?:\s*/\s*5)?(?![\d/])", text, re.IGNORECASE)
    return (explanation.group(1).strip() if explanation else None), (int(scores[-1]) if scores else None)


def summarise(results: list[dict]) -> dict:
    scores = [r["score"] for r in results if r["score"] is not None]
    return {
        "n_scored": len(scores),
        "n_unscored": len(results) - len(scores),
        "mean_score": sum(scores) / len(scores) if scores else None,
        "score_counts": {str(level): scores.count(level) for level in range(5, 0, -1)},
        "top_score_share": scores.count(5) / len(scores) if scores else None,
    }


def run_autointerp(cfg: AutointerpConfig) -> dict:
    if cfg.endpoint is None:
        raise UserError("no endpoint: give --endpoint URL (an OpenAI-compatible API) or 'endpoint' in --config")
    if cfg.model is None:
        raise UserError(f"no model name for endpoint {cfg.endpoint}: give --model NAME or 'model' in --config")
    out = Path(cfg.out) if cfg.out else Path(cfg.features) / "autointerp.json"
    if out.is_dir():  # found now, not after every request has been paid for
        raise UserError(f"--out {out} is a folder: name a JSON file")
    api_key = api_key_from_env(cfg.api_key_env)
    features = sample_live_features(load_features(cfg.features), cfg.n_features, cfg.seed)
    # every prompt is built first, so a malformed context fails before any (paid) request
    prompts = [explanation_prompt(feature, cfg.n_contexts) for feature in features]
    results = []
    for feature, prompt in tqdm(list(zip(features, prompts)), desc="autointerp", unit="feature", dynamic_ncols=True):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        try:
            reply = chat_completion(cfg.endpoint, cfg.model, messages, api_key, cfg.timeout_s, cfg.retries)
        except UserError as error:
            if not results:
                raise
            # the replies so far were paid for: keep them, marked as a partial report
            report = write_report(out, cfg, results, stopped=str(error))
            raise UserError(f"{error} (stopped at feature {feature['id']}; the {len(results)} replies before it "
                            f"are in {report['out']})") from None
        explanation, score = parse_reply(reply)
        results.append({"id": feature["id"], "explanation": explanation, "score": score, "reply": reply})
    return write_report(out, cfg, results)


def write_report(out: Path, cfg: AutointerpConfig, results: list[dict], stopped: str | None = None) -> dict:
    """autointerp.json and its .md; `stopped` says why a partial report ends early."""
    report = {"features_file": str(Path(cfg.features) / FEATURES_FILE), "endpoint": cfg.endpoint,
              "model": cfg.model, "seed": cfg.seed, "n_contexts": cfg.n_contexts, "rubric": RUBRIC,
              "stopped_early": stopped, **summarise(results), "features": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(report, indent=2))
    write_text_atomically(out.with_suffix(".md"), report_markdown(report))
    report["out"] = str(out)
    return report


def report_markdown(report: dict) -> str:
    mean = "n/a" if report["mean_score"] is None else f"{report['mean_score']:.2f}"
    top = "n/a" if report["top_score_share"] is None else f"{report['top_score_share']:.1%}"
    counts = ", ".join(f"{level}: {n}" for level, n in report["score_counts"].items())
    lines = [
        f"# Autointerp of {report['features_file']}", "",
        f"Judge `{report['model']}` at {report['endpoint']}; seed {report['seed']}, "
        f"{report['n_contexts']} contexts per feature.", "",
        f"**Mean score {mean}** over {report['n_scored']} scored features "
        f"({report['n_unscored']} replies without a score); scored 5: {top}; counts {counts}.", "",
        *([f"**Partial report**: stopped early ({report['stopped_early']}).", ""] if report["stopped_early"] else []),
        "| feature | score | explanation |", "|---:|---:|---|",
    ]
    for r in report["features"]:
        explanation = (r["explanation"] or "(none)").replace("|", "\\|")
        lines.append(f"| {r['id']} | {r['score'] if r['score'] is not None else '-'} | {explanation} |")
    return "\n".join(lines) + "\n"
