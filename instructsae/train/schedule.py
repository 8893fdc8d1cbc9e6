"""The schedule a run actually follows: defaults fitted to runs shorter than they assume.

Gemma Scope's defaults (batch 4096, lr 7e-5, a 1,000-step lr warm-up, a 10,000-step sparsity warm-up) suit runs
of hundreds of thousands of steps. `train --tokens 300000` with them is 73 steps that end inside both warm-ups
at an lr that barely moves the weights: held-out NMSE 1.41, worse than predicting zero. So what the user did not
set is fitted to the run:

- the batch halves (down to 1,024) until the run has at least 1,000 steps;
- the lr grows as 1/sqrt(steps) below 100,000 steps (7e-5 there, at most 1e-3): Adam moves each weight about
  lr per step, so a run of fewer steps needs larger ones to get as far;
- the lr warm-up takes at most 5% of the steps, the sparsity warm-up at most the first half (none where the
  architecture needs none: JumpReLU with a target L0).

A setting given explicitly (flag, YAML, preset, or a config built in Python) is kept as given, and a run that
then ends inside a warm-up says so.
"""

import math

from instructsae.schemas.train import OptimConfig, TrainConfig

MIN_STEPS = 1000
MIN_BATCH = 1024
LONG_RUN_STEPS = 100_000
MAX_FITTED_LR = 1e-3
LR_WARMUP_SHARE = 0.05
SPARSITY_WARMUP_SHARE = 0.5
FITTED_FIELDS = {"lr_warmup_steps": LR_WARMUP_SHARE, "sparsity_warmup_steps": SPARSITY_WARMUP_SHARE}


def left_to_fit(cfg: TrainConfig) -> list[str]:
    """The settings of cfg that the run fits (left unset): part of what the SAE is, since `--lr 7e-5` given
    explicitly trains another SAE than the lr fitted from the 7e-5 default."""
    names = [] if "batch_size" in cfg.model_fields_set else ["batch_size"]
    return names + [name for name in ("lr", *FITTED_FIELDS) if name not in cfg.optim.model_fields_set]


def fitted_batch_size(configs: list[TrainConfig], tokens: int) -> int:
    """The batch of a run of `tokens` (every SAE trained together shares it): the default halved for short runs."""
    batch = configs[0].batch_size
    if any("batch_size" in cfg.model_fields_set for cfg in configs):
        return batch
    while batch // 2 >= MIN_BATCH and tokens // batch < MIN_STEPS:
        batch //= 2
    return batch


def fitted_optim(optim: OptimConfig, n_steps: int, sparsity_warmup: bool = True) -> OptimConfig:
    """The optimiser settings with the lr and every warm-up left at its default fitted to n_steps (no sparsity
    warm-up where the architecture needs none)."""
    updates = {}
    if "lr" not in optim.model_fields_set and n_steps < LONG_RUN_STEPS:
        updates["lr"] = min(MAX_FITTED_LR, max(optim.lr, optim.lr * math.sqrt(LONG_RUN_STEPS / n_steps)))
    shares = {**FITTED_FIELDS, **({} if sparsity_warmup else {"sparsity_warmup_steps": 0.0})}
    for name, share in shares.items():
        if name not in optim.model_fields_set:
            updates[name] = min(getattr(optim, name), int(share * n_steps))
    return optim.model_copy(update=updates)


def describe_schedule(given: OptimConfig, fitted: OptimConfig, n_steps: int, has_penalty: bool,
                      batch_size: int | None = None, default_batch_size: int | None = None) -> dict:
    """What summary.json records: the effective schedule, which warm-ups were fitted, and warnings."""
    fitted_names = [name for name in ("lr", *FITTED_FIELDS) if getattr(fitted, name) != getattr(given, name)
                    and (has_penalty or name != "sparsity_warmup_steps")]  # TopK has no penalty to warm up
    warnings = []
    if fitted.lr_warmup_steps >= n_steps:
        warnings.append(f"the run ends inside the lr warm-up ({n_steps} steps, warm-up {fitted.lr_warmup_steps}): "
                        "the learning rate never reaches --lr")
    if has_penalty and fitted.sparsity_warmup_steps >= n_steps:
        warnings.append(f"the run ends inside the sparsity warm-up ({n_steps} steps, warm-up "
                        f"{fitted.sparsity_warmup_steps}): the penalty never reaches --sparsity-coeff")
    fitted_record = {name: {"default": getattr(given, name), "used": getattr(fitted, name)} for name in fitted_names}
    if batch_size is not None and default_batch_size is not None and batch_size != default_batch_size:
        fitted_record["batch_size"] = {"default": default_batch_size, "used": batch_size}
    record = {
        "n_steps": n_steps, "batch_size": batch_size, "lr": fitted.lr, "lr_warmup_steps": fitted.lr_warmup_steps,
        "lr_decay": "none" if fitted.lr_end is None else
        f"cosine to {fitted.lr_end:g} over steps {min(fitted.lr_warmup_steps, n_steps)}..{n_steps - 1}",
        "fitted": fitted_record,
        "warnings": warnings,
    }
    if has_penalty:
        record["sparsity_warmup_steps"] = fitted.sparsity_warmup_steps
    return record


def schedule_line(name: str, schedule: dict) -> str:
    """One line for the terminal: 'run: 293 steps of 1024 tokens (fitted, default 4096); lr 1e-3 (fitted, ...'."""

    def part(field: str, text: str) -> str:
        fitted = schedule["fitted"].get(field)
        return f"{text} (fitted, default {fitted['default']:g})" if fitted else text

    parts = [part("lr", f"lr {schedule['lr']:.3g}"),
             part("lr_warmup_steps", f"lr warm-up {schedule['lr_warmup_steps']} steps")]
    if "sparsity_warmup_steps" in schedule:
        parts.append(part("sparsity_warmup_steps", f"sparsity warm-up {schedule['sparsity_warmup_steps']} steps"))
    parts.append("lr decay " + schedule["lr_decay"])
    batch = part("batch_size", f"{schedule['batch_size']} tokens") if schedule.get("batch_size") else ""
    return f"{name}: {schedule['n_steps']} steps" + (f" of {batch}" if batch else "") + "; " + "; ".join(parts)
