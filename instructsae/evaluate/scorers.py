"""Scoring an explanation by prediction, as EleutherAI's delphi does: a judge reads the explanation and labels
held-out contexts, and the score is the balanced accuracy of its labels (0.5 is chance, 1 is perfect).

- detection: activating contexts mixed with non-activating ones from the same store; the judge says in which
  the feature fires.
- fuzzing: each activating context twice, once with the tokens where the feature fires marked and once with as
  many tokens where it does not fire marked at random; the judge says which markings are right.

Balanced accuracy is the mean of the true-positive and true-negative rates, so the mix of the two classes
cannot move it; examples the judge left unanswered (a reply without a list of the right length) are counted
apart and left out.
"""

import random
import re
import statistics

MARK_OPEN, MARK_CLOSE = "«", "»"
SCORERS = ("detection", "fuzzing", "rubric")

EXPLAINER_SYSTEM = "You analyse the features a sparse autoencoder learned from a language model's activations."
DETECTION_SYSTEM = (
    "You check an explanation of one feature of a language model. You get the explanation and numbered text "
    "examples. For each example in turn, answer 1 if the feature, as the explanation describes it, is present "
    "somewhere in the example, and 0 if it is not. Any number of the examples may have it, all or none "
    "included. Reply with a list of 0s and 1s, one per example, like [1,0,0], and nothing else."
)
FUZZING_SYSTEM = (
    "You check an explanation of one feature of a language model. You get the explanation and numbered text "
    f"examples in which some tokens are marked {MARK_OPEN}like this{MARK_CLOSE}. For each example in turn, answer "
    "1 if every marked token is one where the feature, as the explanation describes it, fires, and 0 if any "
    "marked token is not. Any number of the examples may be marked right, all or none included. Reply with a "
    "list of 0s and 1s, one per example, like [1,0,0], and nothing else."
)
# one made-up demonstration per scorer, so the judge sees the reply format once
DEMO_EXPLANATION = "the word 'robot' (and its plural)"
DETECTION_DEMO = (["Once upon a time there was a small robot.", "The weather was fine today.",
                   "Two robots met at the market."], "[1,0,1]")
FUZZING_DEMO = ([f"Once upon a time there was a small{MARK_OPEN} robot{MARK_CLOSE}.",
                 f"The{MARK_OPEN} weather{MARK_CLOSE} was fine today.",
                 f"Two robots met at{MARK_OPEN} the{MARK_CLOSE} market."], "[1,0,0]")


def firing_tokens(context: dict, threshold: float) -> list[int]:
    """Token indices where the feature fires at >= threshold x the context's peak (delphi's rule); a context
    with only its peak known (no per-token "acts") fires at its focus."""
    acts = context.get("acts")
    if not isinstance(acts, list) or len(acts) != len(context["tokens"]):
        return [context["focus"]]
    peak = max(acts)
    return [i for i, act in enumerate(acts) if act > 0 and act >= threshold * peak]


def marked_text(tokens: list[str], marked) -> str:
    """The tokens on one line, each run of marked tokens in «»; newlines shown as \\n."""
    marked, pieces = set(marked), []
    for i, token in enumerate(tokens):
        opens, closes = i in marked and i - 1 not in marked, i in marked and i + 1 not in marked
        pieces.append((MARK_OPEN if opens else "") + token + (MARK_CLOSE if closes else ""))
    return "".join(pieces).replace("\r", "\\r").replace("\n", "\\n")


def explainer_prompt(top: list[dict], sampled: list[dict], threshold: float) -> str:
    """Ask for an explanation from the strongest contexts and contexts sampled across the activation range."""
    def line(context: dict) -> str:
        marked = marked_text(context["tokens"], firing_tokens(context, threshold))
        return f"Activation: {context.get('activation', 0):.3g} | Context: {marked}"

    sections = [f"Its strongest contexts:\n" + "\n".join(map(line, top))] if top else []
    if sampled:
        sections.append("Contexts sampled across the range of its activations, weak ones included:\n"
                        + "\n".join(map(line, sampled)))
    return (
        "We are analysing one feature of a language model. Below are texts where it fires; in each, the tokens "
        f"where it fires are marked {MARK_OPEN}like this{MARK_CLOSE}, and the activation is the context's "
        "peak. Find what the marked tokens have in common, in their context, and explain it in one short "
        "phrase: the explanation will be used to predict where the feature fires in new texts.\n\n"
        + "\n\n".join(sections)
        + "\n\nAnswer in one line, in this fixed format:\nExplanation: [your brief explanation]\n"
    )


def parse_explanation(reply: str) -> str | None:
    found = re.search(r"Explanation\W*(.+)", reply, re.IGNORECASE)
    return found.group(1).strip() if found and found.group(1).strip() else None


def _sample(context: dict, truth: bool, text: str, **extra) -> dict:
    where = {key: context[key] for key in ("instance", "position", "quantile") if key in context}
    return {**where, **extra, "truth": truth, "text": text}


def detection_samples(activating: list[dict], non_activating: list[dict]) -> list[dict]:
    return ([_sample(c, True, marked_text(c["tokens"], ())) for c in activating]
            + [_sample(c, False, marked_text(c["tokens"], ())) for c in non_activating])


def fuzzing_samples(activating: list[dict], threshold: float, rng: random.Random) -> list[dict]:
    """Each context marked right, and (where it has enough tokens that do not fire) as often wrong at random."""
    samples = []
    for context in activating:
        right = firing_tokens(context, threshold)
        samples.append(_sample(context, True, marked_text(context["tokens"], right), marked=right))
        quiet = sorted(set(range(len(context["tokens"]))) - set(right))
        if len(quiet) >= len(right):
            wrong = sorted(rng.sample(quiet, len(right)))
            samples.append(_sample(context, False, marked_text(context["tokens"], wrong), marked=wrong))
    return samples


def batches(samples: list[dict], size: int, rng: random.Random) -> list[list[int]]:
    """Indices of the samples, shuffled, in batches of `size` (one judge request each)."""
    order = list(range(len(samples)))
    rng.shuffle(order)
    return [order[i:i + size] for i in range(0, len(order), size)]


def _examples(explanation: str, texts: list[str]) -> str:
    return (f"Feature explanation: {explanation}\n\nExamples:\n"
            + "\n".join(f"Example {i + 1}: {text}" for i, text in enumerate(texts)))


def scoring_messages(scorer: str, explanation: str, texts: list[str]) -> list[dict]:
    system, (demo_texts, demo_reply) = {"detection": (DETECTION_SYSTEM, DETECTION_DEMO),
                                        "fuzzing": (FUZZING_SYSTEM, FUZZING_DEMO)}[scorer]
    return [{"role": "system", "content": system},
            {"role": "user", "content": _examples(DEMO_EXPLANATION, demo_texts)},
            {"role": "assistant", "content": demo_reply},
            {"role": "user", "content": _examples(explanation, texts)}]


def parse_labels(reply: str, n: int) -> list[bool] | None:
    """The last list of n 0/1 labels in the reply ("[1, 0, 1]"), or None."""
    for found in reversed(re.findall(r"\[([^\[\]]*)\]", reply)):
        items = [item.strip().strip("'\"") for item in found.split(",")]
        if len(items) == n and all(item in ("0", "1") for item in items):
            return [item == "1" for item in items]
    return None


def balanced_accuracy(samples: list[dict]) -> dict:
    """From samples with "truth" and "prediction" (None: unanswered): (TPR + TNR) / 2 and its parts."""
    answered = [s for s in samples if s.get("prediction") is not None]
    positives = [s["prediction"] for s in answered if s["truth"]]
    negatives = [not s["prediction"] for s in answered if not s["truth"]]
    tpr = sum(positives) / len(positives) if positives else None
    tnr = sum(negatives) / len(negatives) if negatives else None
    return {"balanced_accuracy": (tpr + tnr) / 2 if tpr is not None and tnr is not None else None,
            "true_positive_rate": tpr, "true_negative_rate": tnr, "n_positive": len(positives),
            "n_negative": len(negatives), "n_unanswered": len(samples) - len(answered)}


def summarise_scorer(results: list[dict], scorer: str) -> dict:
    """Mean and median balanced accuracy over the features that have one."""
    values = [r[scorer]["balanced_accuracy"] for r in results
              if r.get(scorer) and r[scorer]["balanced_accuracy"] is not None]
    return {"n_features": len(values), "n_without": len(results) - len(values),
            "mean_balanced_accuracy": statistics.fmean(values) if values else None,
            "median_balanced_accuracy": statistics.median(values) if values else None,
            "n_unanswered_examples": sum(r[scorer]["n_unanswered"] for r in results if r.get(scorer))}
