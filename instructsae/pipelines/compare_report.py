"""compare's report.md: the verdicts at matched L0, the seed-averaged SAEs per held-out set, and how to read them."""

import statistics

from instructsae.evaluate.run import format_optional
from instructsae.pipelines.compare_stats import format_interval
from instructsae.schemas.compare import CompareConfig

METHODS = ("bt-p", "bt-f", "fast")
LABELS = {"bt-p": "BT(P)", "bt-f": "BT(F)", "fast": "FAST"}
DIGITS = {"nmse": 4, "explained_variance": 4, "log2_eq7": 3, "log2_mse_st": 3, "ce_recovered": 3}

WHY_THEY_DIFFER = (
    "Per-token NMSE pools the squared error of every held-out token over their pooled squared norm, so long "
    "dialogues and their many content tokens dominate it, while the FAST paper's Eq. 7 averages the error within "
    "each sequence first and then over sequences, so every dialogue weighs the same and short ones, where chat "
    "template and special tokens are a large share, count far more. A method that mostly mends the template "
    "tokens (what FAST changes: block training cuts and mixes them) therefore moves Eq. 7 and MSE_st much more "
    "than NMSE, and Eq. 7, an unnormalised MSE on a log2 scale, is not a fraction of the signal as NMSE is.")

BOOTSTRAP = (
    "Each interval is a percentile bootstrap over two sources at once: the training seeds (each grid point's "
    "seeds drawn with replacement, independently per method: the seed sets an SAE's initial weights, while its "
    "sweep's stream order is shared by its seeds and not resampled) and the held-out sequences (drawn with "
    "replacement, the same draw for every SAE, since all are measured on the same dialogues: a hard dialogue counts "
    "against every method alike). Seeds alone would ignore which dialogues happened to be held out, sequences "
    "alone would ignore that another initialisation gives another SAE; a verdict should survive both. With three "
    "seeds the seed part of the interval is coarse (few distinct resamples), so a narrow interval is a lower "
    "bound on the real uncertainty, not a guarantee.")


def difference(row: dict) -> str:
    """FAST minus the other method and its interval, to the digits of the metric (per role: of the figure)."""
    return format_interval(row["delta"], row["interval"], DIGITS.get(row["metric"].split(":")[0], 4))


def verdict_table(rows: list[dict], keys: set[str] | None, level: float) -> str:
    """One row per (architecture, metric): FAST − BT(F) and FAST − BT(P) with interval and verdict."""
    lines = [f"| arch | metric | common L0 (vs BT(F)) | FAST − BT(F) [{level:.0%} CI] | verdict | "
             f"common L0 (vs BT(P)) | FAST − BT(P) [{level:.0%} CI] | verdict |",
             "|---|---|---|---:|---|---|---:|---|"]
    grouped: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        if keys is None or row["metric"] in keys:
            grouped.setdefault((row["arch"], row["metric"]), {"label": row["label"]})[row["other"]] = row
    for (arch, _metric), group in grouped.items():
        cells = []
        for other in ("bt-f", "bt-p"):
            row = group.get(other)
            if row is None:
                cells.append("– | – | –")
            elif "refused" in row:
                cells.append(f"– | not compared: {row['refused']} | –")
            else:
                cells.append(f"{row['l0_low']:.1f}–{row['l0_high']:.1f} | {difference(row)} | **{row['verdict']}**")
        lines.append(f"| {arch} | {group['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


OVERALL = ("nmse", "explained_variance", "log2_eq7", "log2_mse_st", "ce_recovered")


def summary_tables(verdicts: dict, level: float) -> str:
    """FAST − BT(F) and FAST − BT(P) on the overall metrics, one column per held-out set: the verdict at a glance
    (verdicts: verdicts.json's content, {held-out name: {"rows", "n_sequences", ...}}). The README's table."""
    names = list(verdicts)
    tables = []
    for other in ("bt-f", "bt-p"):
        held_out = ", ".join(f"{name} ({verdicts[name]['n_sequences']} sequences)" for name in names)
        lines = [f"FAST − {LABELS[other]} at matched L0 [{level:.0%} CI], held out: {held_out}", "",
                 "| arch | metric | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
        cells: dict[tuple[str, str], dict[str, str]] = {}
        for name in names:
            for row in verdicts[name]["rows"]:
                if row["other"] != other or row["metric"] not in OVERALL:
                    continue
                text = (f"not compared: {row['refused']}" if "refused" in row else
                        f"{difference(row)} **{row['verdict']}**")
                cells.setdefault((row["arch"], row["label"]), {})[name] = text
        for (arch, label), by_name in cells.items():
            lines.append(f"| {arch} | {label} | " + " | ".join(by_name.get(name, "–") for name in names) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _mean_std(values: list[float], spec: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.fmean(values), spec)} ± {format(spread, spec)}"


def seeds_table(results: list[dict]) -> str:
    """Each method's grid points on one held-out set: mean ± standard deviation over seeds."""
    lines = ["| method | arch | setting | seeds | L0 | NMSE | explained var | log2 MSE (Eq.7) | log2 MSE_st | "
             "CE recovered | dead frac |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["architecture"], METHODS.index(r["method"]), r["setting"]), []).append(r)
    ordered = sorted(groups.items(), key=lambda item: (item[0][0], item[0][1],
                                                       statistics.fmean(r["l0"] for r in item[1])))
    for (arch, method_index, setting), members in ordered:
        lm = [(r.get("lm") or {}).get("ce_loss_recovered") for r in members]
        lines.append(
            f"| {LABELS[METHODS[method_index]]} | {arch} | {setting} | {len(members)} | "
            f"{_mean_std([r['l0'] for r in members], '.1f')} | {_mean_std([r['nmse'] for r in members], '.4f')} | "
            f"{_mean_std([r['explained_variance'] for r in members], '.4f')} | "
            f"{_mean_std([r['eq7']['log2_mse'] for r in members], '.3f')} | "
            f"{_mean_std([r['eq7']['log2_mse_st'] for r in members], '.3f')} | {_mean_std(lm, '.3f')} | "
            f"{_mean_std([r['dead_fraction'] for r in members], '.3f')} |")
    return "\n".join(lines)


def role_counts(results: list[dict]) -> str:
    first = results[0]
    return ", ".join(f"{role} {figures['n_tokens']:,}" for role, figures in first["per_role"].items())


def render_report(cfg: CompareConfig, command: str, results: list[dict], analyses: dict) -> str:
    overall = set(OVERALL)
    sections = []
    for name, analysis in analyses.items():
        members = [r for r in results if r["heldout"] == name]
        first = members[0]
        roles = {row["metric"] for row in analysis["rows"]} - overall
        lm_tokens = (first.get("lm") or {}).get("n_tokens")
        sections.append(f"""## Held out: {name}

{first['n_tokens']:,} tokens in {analysis['n_sequences']} sequences (per role: {role_counts(members)}); the LM view on
the first {format_optional(lm_tokens, ',')} predicted tokens. FAST minus the other method at matched L0, averaged
over the L0 range both cover (five points evenly spaced in log L0); lower is better for NMSE and the MSEs, higher
for explained variance and CE recovered; the verdict is FAST's.

{verdict_table(analysis['rows'], overall, analysis['level'])}

Per token role:

{verdict_table(analysis['rows'], roles, analysis['level'])}

Each grid point over its seeds (mean ± sample standard deviation):

{seeds_table(members)}
""")
    body = "\n".join(sections)
    return f"""# BT(P) vs BT(F) vs FAST at matched L0

Command: `{command}`

Model `{cfg.model}`, layer {cfg.layer}. Three training stores of {cfg.tokens:,} tokens each:
BT(P) = `{cfg.pretraining_text}` joined and cut into {cfg.block_len}-token blocks, BT(F) = `{cfg.dialogues}`
dialogues chat-templated, joined and cut the same way, FAST = the same dialogues each run alone. On each store the
same grid of SAEs, every grid point with {_seed_note(analyses)}, trained for {cfg.train_tokens:,} tokens in one pass
shared by all of them. Every SAE is evaluated on held-out FAST stores of up to {cfg.heldout_tokens:,} tokens:
later dialogues of `{cfg.dialogues}` (after every conversation the training stores read) and
{', '.join(f'`{d}`' for d in cfg.heldout) or 'no other set'} (dialogue sets no store was made from).

**Matched L0.** Each method's frontier (a figure against L0, the seed means of its grid points) is interpolated
linearly in log L0 between its measured points, and two methods are compared only over the L0 range both cover;
where the ranges do not overlap the table says so instead of extrapolating.

**Intervals.** {BOOTSTRAP} {cfg.bootstrap} replicates, {cfg.confidence:.0%} intervals; "better" or "worse" means
the interval excludes zero, "indistinguishable" that it does not.

**NMSE and Eq. 7.** {WHY_THEY_DIFFER}

NMSE is Σ‖x−x̂‖² / Σ‖x‖²; log2 MSE is the FAST paper's Eq. 7 (per sequence, then over sequences, per element)
and MSE_st the same on template/special tokens; CE recovered = (CE zero-ablated − CE with the SAE) /
(CE zero-ablated − CE clean), over the predicted tokens of the LM view.

## At a glance

{summary_tables(analyses, cfg.confidence)}

{body}
## Frontiers

![NMSE against L0 per held-out set and architecture, with bands](frontier.png)
"""


def _seed_note(analyses: dict) -> str:
    counts = sorted({n for analysis in analyses.values() for seeds in analysis["seeds"].values() for n in seeds})
    return f"{'/'.join(map(str, counts))} seed(s)"
