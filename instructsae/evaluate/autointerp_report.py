"""autointerp.json and its .md: the settings, one summary per scorer and every feature's results. Rewritten
atomically after each feature, so a run that stops midway (an endpoint down, a kill) leaves a partial report
("complete": false) that a rerun with the same settings continues from."""

import json
from pathlib import Path

from instructsae.evaluate.scorers import summarise_scorer
from instructsae.fileio import write_text_atomically

RUBRIC = (
    "5: Clear pattern with no deviating examples\n"
    "4: Clear pattern with one or two deviating examples\n"
    "3: Clear overall pattern but quite a few examples not fitting that pattern\n"
    "2: Broad consistent theme but lacking structure\n"
    "1: No discernible pattern"
)


def summarise_rubric(results: list[dict]) -> dict:
    scores = [r["rubric"]["score"] for r in results if r.get("rubric") and r["rubric"]["score"] is not None]
    return {
        "n_scored": len(scores),
        "n_unscored": len(results) - len(scores),
        "mean_score": sum(scores) / len(scores) if scores else None,
        "score_counts": {str(level): scores.count(level) for level in range(5, 0, -1)},
        "top_score_share": scores.count(5) / len(scores) if scores else None,
    }


def build_report(settings: dict, results: list[dict], complete: bool, stopped: str | None = None) -> dict:
    results = sorted(results, key=lambda r: r["id"])
    summary = {scorer: summarise_rubric(results) if scorer == "rubric" else summarise_scorer(results, scorer)
               for scorer in settings["scorers"]}
    return {"settings": settings, "rubric": RUBRIC if "rubric" in settings["scorers"] else None,
            "complete": complete, "stopped_early": stopped, "n_features": len(results), "summary": summary,
            "features": results}


def write_report(out: Path, report: dict) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(report, indent=1))
    write_text_atomically(out.with_suffix(".md"), report_markdown(report))
    return {**report, "out": str(out)}


def resumable_results(out: Path, settings: dict) -> list[dict]:
    """The features a partial report at `out` already holds, if it was written with the same settings."""
    try:
        report = json.loads(out.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(report, dict) or report.get("complete") is not False or report.get("settings") != settings:
        return []
    return [r for r in report.get("features", []) if isinstance(r, dict) and "id" in r]


def _number(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def summary_lines(report: dict) -> list[str]:
    lines = []
    for scorer, summary in report["summary"].items():
        if scorer == "rubric":
            counts = ", ".join(f"{level}: {n}" for level, n in summary["score_counts"].items())
            lines.append(f"rubric: mean score {_number(summary['mean_score'], '.2f')} over {summary['n_scored']} "
                         f"features ({summary['n_unscored']} unscored); scored 5: "
                         f"{_number(summary['top_score_share'], '.1%')}; counts {counts}")
        else:
            lines.append(f"{scorer}: mean balanced accuracy {_number(summary['mean_balanced_accuracy'], '.3f')} "
                         f"(median {_number(summary['median_balanced_accuracy'], '.3f')}) over "
                         f"{summary['n_features']} features ({summary['n_without']} without one, "
                         f"{summary['n_unanswered_examples']} examples unanswered)")
    return lines


def report_markdown(report: dict) -> str:
    settings, scorers = report["settings"], report["settings"]["scorers"]
    lines = [f"# Autointerp of {settings['features_file']}", "",
             f"Judge `{settings['model']}` at {settings['endpoint']}; seed {settings['seed']}; scorers "
             f"{', '.join(scorers)}.", "", *[f"- {line}" for line in summary_lines(report)], ""]
    if not report["complete"]:
        lines += [f"**Partial report**: {report['n_features']} features so far; stopped early "
                  f"({report['stopped_early'] or 'interrupted'}).", ""]
    columns = [s for s in ("rubric", "detection", "fuzzing") if s in scorers]
    lines += ["| feature | " + " | ".join(columns) + " | explanation |", "|---:|" + "---:|" * len(columns) + "---|"]
    for r in report["features"]:
        cells = [_cell(r, scorer) for scorer in columns]
        explanation = r.get("explanation") or (r.get("rubric") or {}).get("explanation") or "(none)"
        lines.append(f"| {r['id']} | " + " | ".join(cells) + " | " + explanation.replace("|", "\\|") + " |")
    return "\n".join(lines) + "\n"


def _cell(result: dict, scorer: str) -> str:
    value = result.get(scorer) or {}
    if scorer == "rubric":
        return "-" if value.get("score") is None else str(value["score"])
    return "-" if value.get("balanced_accuracy") is None else f"{value['balanced_accuracy']:.2f}"
