"""The schedule a run actually follows: warm-ups fitted to runs shorter than the defaults assume.

Gemma Scope's defaults (a 1,000-step lr warm-up, a 10,000-step sparsity warm-up) suit runs of hundreds of
thousands of steps. A run of 73 steps would end inside both, with a learning rate that never peaked and a
penalty that never bit. So a warm-up the user did not set is cut to a share of the run: the lr warm-up to at
most 5% of the steps, the sparsity warm-up to at most the first half. One set explicitly (flag, YAML, preset,
or a config built in Python) is kept as given, and a run that then ends inside it says so.
"""

from instructsae.schemas.train import OptimConfig

LR_WARMUP_SHARE = 0.05
SPARSITY_WARMUP_SHARE = 0.5
FITTED_FIELDS = {"lr_warmup_steps": LR_WARMUP_SHARE, "sparsity_warmup_steps": SPARSITY_WARMUP_SHARE}


def fitted_optim(optim: OptimConfig, n_steps: int) -> OptimConfig:
    """The optimiser settings with every warm-up left at its default cut to its share of n_steps."""
    updates = {}
    for name, share in FITTED_FIELDS.items():
        if name not in optim.model_fields_set:
            updates[name] = min(getattr(optim, name), int(share * n_steps))
    return optim.model_copy(update=updates)


def describe_schedule(given: OptimConfig, fitted: OptimConfig, n_steps: int, has_penalty: bool) -> dict:
    """What summary.json records: the effective schedule, which warm-ups were fitted, and warnings."""
    fitted_names = [name for name in FITTED_FIELDS if getattr(fitted, name) != getattr(given, name)]
    warnings = []
    if fitted.lr_warmup_steps >= n_steps:
        warnings.append(f"the run ends inside the lr warm-up ({n_steps} steps, warm-up {fitted.lr_warmup_steps}): "
                        "the learning rate never reaches --lr")
    if has_penalty and fitted.sparsity_warmup_steps >= n_steps:
        warnings.append(f"the run ends inside the sparsity warm-up ({n_steps} steps, warm-up "
                        f"{fitted.sparsity_warmup_steps}): the penalty never reaches --sparsity-coeff")
    record = {
        "n_steps": n_steps, "lr": fitted.lr, "lr_warmup_steps": fitted.lr_warmup_steps,
        "lr_decay": "none" if fitted.lr_end is None else
        f"cosine to {fitted.lr_end:g} over steps {min(fitted.lr_warmup_steps, n_steps)}..{n_steps - 1}",
        "fitted": {name: {"default": getattr(given, name), "used": getattr(fitted, name)} for name in fitted_names},
        "warnings": warnings,
    }
    if has_penalty:
        record["sparsity_warmup_steps"] = fitted.sparsity_warmup_steps
    return record


def schedule_line(name: str, schedule: dict) -> str:
    """One line for the terminal, e.g. 'run: 73 steps; lr warm-up 3 steps (fitted, default 1000), ...'."""

    def part(field: str, label: str) -> str:
        fitted = schedule["fitted"].get(field)
        note = f" (fitted: default {fitted['default']} > {FITTED_FIELDS[field]:.0%} of the run)" if fitted else ""
        return f"{label} {schedule[field]} steps{note}"

    parts = [part("lr_warmup_steps", "lr warm-up")]
    if "sparsity_warmup_steps" in schedule:
        parts.append(part("sparsity_warmup_steps", "sparsity warm-up"))
    parts.append("lr decay " + schedule["lr_decay"])
    return f"{name}: {schedule['n_steps']} steps; " + "; ".join(parts)
