"""`instructsae autointerp`: an LLM explains sampled features, and the explanations are scored.

- rubric: the FAST paper's procedure: one call per feature shows the strongest contexts with their activations
  and asks for a brief explanation and a 1-5 monosemanticity score under its "Activation Consistency" rubric;
  the FAST paper samples 128 live features per SAE and compares the share that scores in the top range (5).
- detection, fuzzing (EleutherAI delphi's; evaluate/scorers.py): the explainer sees the top contexts and
  contexts sampled across the activation quantiles (read from the store through the SAE,
  evaluate/context_sampler.py); a judge then predicts from the explanation alone on held-out contexts, and
  each feature gets the balanced accuracy of those predictions.

Features are scored `concurrency` at a time; the report is rewritten after each, and a rerun with the same
settings continues a partial one.
"""

import json
import random
import re
from functools import partial
from pathlib import Path

from instructsae.errors import UserError
from instructsae.evaluate.autointerp_report import (RUBRIC, build_report, resumable_results, summary_lines,
                                                    write_report)
from instructsae.evaluate.chat_client import api_key_from_env, chat_completion
from instructsae.evaluate.judge_pool import score_concurrently
from instructsae.evaluate.scorers import (EXPLAINER_SYSTEM, MARK_CLOSE, MARK_OPEN, balanced_accuracy, batches,
                                          detection_samples, explainer_prompt, fuzzing_samples, parse_explanation,
                                          parse_labels, scoring_messages)
from instructsae.schemas.autointerp import AutointerpConfig

FEATURES_FILE = "features.json"
SYSTEM_PROMPT = EXPLAINER_SYSTEM
PREDICTING = ("detection", "fuzzing")
SETTINGS_FIELDS = ("endpoint", "model", "seed", "scorers", "n_features", "n_contexts", "sae", "store",
                   "explain_top", "explain_sampled", "n_test", "n_quantiles", "context", "fuzz_threshold",
                   "batch_size", "max_tokens")


def load_features_file(folder: str) -> tuple[dict, list[dict]]:
    """The summary (sae, store, ... when `instructsae features` wrote it) and the feature records of
    FOLDER/features.json (a list, or {"features": [...], ...})."""
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
    summary = {key: value for key, value in data.items() if key != "features"} if isinstance(data, dict) else {}
    return summary, features


def load_features(folder: str) -> list[dict]:
    return load_features_file(folder)[1]


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


def check_context(example: dict, feature_id) -> None:
    tokens, focus = example.get("tokens"), example.get("focus")
    if not isinstance(tokens, list) or not isinstance(focus, int) or not 0 <= focus < len(tokens):
        raise UserError(f"feature {feature_id} in {FEATURES_FILE}: a top context needs 'tokens' and a 'focus' "
                        f"index into them (got focus {focus!r} for {len(tokens or [])} tokens)")


def marked_context(example: dict, feature_id) -> str:
    """The context's tokens on one line with the firing token marked «like this»."""
    check_context(example, feature_id)
    tokens, focus = example["tokens"], example["focus"]
    text = "".join(tokens[:focus]) + MARK_OPEN + tokens[focus] + MARK_CLOSE + "".join(tokens[focus + 1:])
    return text.replace("\r", "\\r").replace("\n", "\\n")


def strongest(feature: dict, n: int) -> list[dict]:
    return sorted(feature["top"], key=lambda example: -example.get("activation", 0))[:n]


def explanation_prompt(feature: dict, n_contexts: int) -> str:
    """The FAST paper's rubric prompt: explanation and 1-5 score from the strongest contexts."""
    lines = [f"Activation: {example.get('activation', 0):.3g} | Context: {marked_context(example, feature['id'])}"
             for example in strongest(feature, n_contexts)]
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
    # "Score: 4", "Score: [4]", "**Score:** 4", "Score: 5/5", "Score: 4 (clear)"; not an echoed "[5/4/3/2/1]"
    scores = re.findall(r"Score\W*?\[?([1-5])\]?(?:\s*/\s*5)?(?![\d/])", text, re.IGNORECASE)
    return parse_explanation(text), (int(scores[-1]) if scores else None)


def prepare_jobs(cfg: AutointerpConfig, features: list[dict], contexts: list[dict] | None) -> list[dict]:
    """Every prompt and example text of every feature, built before any (paid) request, so a malformed
    context fails first. contexts: per feature, the store's activating and non-activating ones."""
    jobs = []
    for k, feature in enumerate(features):
        job = {"id": feature["id"]}
        if "rubric" in cfg.scorers:
            job["rubric_prompt"] = explanation_prompt(feature, cfg.n_contexts)
        if contexts is not None:
            activating = contexts[k]["activating"]
            sampled, test = activating[:cfg.explain_sampled], activating[cfg.explain_sampled:]
            rng = random.Random(cfg.seed * 1_000_003 + feature["id"])
            job["explain_prompt"] = explainer_prompt(strongest(feature, cfg.explain_top), sampled,
                                                     cfg.fuzz_threshold)
            for scorer in (s for s in PREDICTING if s in cfg.scorers):
                samples = (detection_samples(test, contexts[k]["non_activating"]) if scorer == "detection"
                           else fuzzing_samples(test, cfg.fuzz_threshold, rng))
                job[scorer] = {"samples": samples, "batches": batches(samples, cfg.batch_size, rng)}
        jobs.append(job)
    return jobs


def judge_samples(ask, scorer: str, explanation: str | None, planned: dict) -> dict:
    """Each batch of examples sent with the explanation; a reply without a list of the right length leaves
    its batch unanswered (kept in unparsed_replies)."""
    samples = [{**sample, "prediction": None} for sample in planned["samples"]]
    unparsed = []
    for batch in planned["batches"] if explanation is not None else []:
        reply = ask(scoring_messages(scorer, explanation, [samples[i]["text"] for i in batch]))
        labels = parse_labels(reply, len(batch))
        if labels is None:
            unparsed.append(reply)
        for i, label in zip(batch, labels or [None] * len(batch)):
            samples[i]["prediction"] = label
    return {**balanced_accuracy(samples), "unparsed_replies": unparsed, "samples": samples}


def score_feature(ask, job: dict) -> dict:
    """One feature's requests, in turn: rubric; then explanation, detection and fuzzing."""
    result = {"id": job["id"]}
    if "rubric_prompt" in job:
        reply = ask([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": job["rubric_prompt"]}])
        explanation, score = parse_reply(reply)
        result["rubric"] = {"explanation": explanation, "score": score, "reply": reply}
    if "explain_prompt" in job:
        reply = ask([{"role": "system", "content": EXPLAINER_SYSTEM},
                     {"role": "user", "content": job["explain_prompt"]}])
        result["explanation"], result["explanation_reply"] = parse_explanation(reply), reply
        for scorer in (s for s in PREDICTING if s in job):
            result[scorer] = judge_samples(ask, scorer, result["explanation"], job[scorer])
    return result


def read_store_contexts(cfg: AutointerpConfig, summary: dict, features: list[dict]) -> list[dict]:
    """Per feature, activating contexts across quantiles and non-activating ones, from the store."""
    from instructsae.evaluate.context_sampler import sample_contexts
    from instructsae.evaluate.run import open_sae_and_store
    from instructsae.lm.models import load_tokenizer

    sae_dir, store = cfg.sae or summary.get("sae"), cfg.store or summary.get("store")
    if not sae_dir or not store:
        raise UserError(f"detection and fuzzing read contexts from a store: give --sae and --store ({FEATURES_FILE} "
                        f"in {cfg.features} names no {'SAE' if not sae_dir else 'store'}), or --scorers rubric")
    sae, _, reader, (layer, site, _) = open_sae_and_store(sae_dir, store)  # site: what the SAE reads
    outside = [f["id"] for f in features if not 0 <= f["id"] < sae.d_sae]
    if outside:
        raise UserError(f"feature {outside[0]} of {FEATURES_FILE} is not in SAE {sae_dir} (d_sae {sae.d_sae})")
    same_store = summary.get("store_fingerprint") in (None, reader.manifest.fingerprint)
    # contexts shown as top ones are not drawn again (only meaningful on the store they came from)
    taken = [{(c.get("instance"), c.get("position")) for c in strongest(f, cfg.explain_top)} if same_store else set()
             for f in features]
    return sample_contexts(sae, reader, layer, load_tokenizer(reader.manifest.identity.tokenizer),
                           [f["id"] for f in features], cfg.explain_sampled + cfg.n_test, cfg.n_test,
                           cfg.n_quantiles, cfg.context, cfg.max_tokens, cfg.seed, taken, site)


def run_autointerp(cfg: AutointerpConfig) -> dict:
    """Explain and score cfg.n_features sampled features; returns the report (also written to cfg.out)."""
    if cfg.endpoint is None:
        raise UserError("no endpoint: give --endpoint URL (an OpenAI-compatible API) or 'endpoint' in --config")
    if cfg.model is None:
        raise UserError(f"no model name for endpoint {cfg.endpoint}: give --model NAME or 'model' in --config")
    out = Path(cfg.out) if cfg.out else Path(cfg.features) / "autointerp.json"
    if out.is_dir():  # found now, not after every request has been paid for
        raise UserError(f"--out {out} is a folder: name a JSON file")
    api_key = api_key_from_env(cfg.api_key_env)
    summary, all_features = load_features_file(cfg.features)
    features = sample_live_features(all_features, cfg.n_features, cfg.seed)
    settings = {"features_file": str(Path(cfg.features) / FEATURES_FILE),
                **{name: getattr(cfg, name) for name in SETTINGS_FIELDS}}
    settings["scorers"] = list(cfg.scorers)
    wanted = {f["id"] for f in features}
    results = [r for r in resumable_results(out, settings) if r["id"] in wanted]
    done = {r["id"] for r in results}
    for feature in features:  # a malformed file fails before the store is read
        for example in feature["top"]:
            check_context(example, feature["id"])
    # the contexts of every sampled feature are drawn (not only those left), so a rerun draws the same ones
    predicting = any(s in cfg.scorers for s in PREDICTING) and len(done) < len(features)
    contexts = read_store_contexts(cfg, summary, features) if predicting else None
    jobs = [job for job in prepare_jobs(cfg, features, contexts) if job["id"] not in done]
    ask = partial(_ask, cfg, api_key)

    def keep(result: dict) -> None:
        results.append(result)
        write_report(out, build_report(settings, results, complete=False))

    stopped = score_concurrently(partial(score_feature, ask), jobs, cfg.concurrency, keep)
    if stopped is not None:
        error, job = stopped
        if not results:
            raise UserError(error)
        # the replies so far were paid for: they stay, marked as a partial report that a rerun continues
        write_report(out, build_report(settings, results, complete=False, stopped=error))
        raise UserError(f"{error} (stopped at feature {job['id']}; the {len(results)} features scored are in {out}; "
                        f"rerun the same command to continue)")
    return write_report(out, build_report(settings, results, complete=True))


def _ask(cfg: AutointerpConfig, api_key: str | None, messages: list[dict]) -> str:
    return chat_completion(cfg.endpoint, cfg.model, messages, api_key, cfg.timeout_s, cfg.retries)


def format_summary(report: dict) -> str:
    return "\n".join([*summary_lines(report), f"wrote {report['out']} and its .md"])
