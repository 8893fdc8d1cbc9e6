"""Merge a train config from its sources: schema defaults < preset < YAML < CLI flags.

Each source may use SAELens's names (training_tokens, l0_coefficient, ...): they are turned into ours first,
so sources merge setting by setting. A YAML may also be flat, as the flags are: a top-level optimiser or SAE
setting goes to its section, as in SAELens's runner config.
"""

from instructsae.cli_options import build
from instructsae.errors import UserError
from instructsae.schemas.base import other_names, own_names
from instructsae.schemas.train import PRESETS, SAE_CONFIGS, OptimConfig, TrainConfig

WIDTH_FIELDS = ("expansion", "d_sae")  # one replaces the other from an earlier source


def _set(values: dict) -> dict:
    """The flags given (None: not given); `build` does this for the top level, not for nested sae/optim."""
    return {key: value for key, value in values.items() if value is not None}


def _mapping(from_yaml: dict, name: str, example: str) -> dict:
    """A nested section of the YAML (`sae:`, `optim:`), which must be a mapping of settings."""
    value = from_yaml.pop(name, None)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"invalid {name}: must be a mapping of settings like `{name}: {example}`, not {value!r}")
    return dict(value)


def _names(model, settings: dict, where: str) -> dict:
    try:
        return own_names(model, settings)
    except ValueError as error:
        raise UserError(f"invalid {where}: {error}") from None


def _section_names(models) -> set[str]:
    return {name for model in models for name in (*model.model_fields, *other_names(model))}


def _lift(from_yaml: dict, names: set[str]) -> dict:
    """The top-level settings of a flat YAML that belong to a section, taken out of it."""
    return {key: from_yaml.pop(key) for key in list(from_yaml) if key in names and key not in TrainConfig.model_fields}


def _over(earlier: dict, later: dict) -> dict:
    """later's settings over earlier's; a width given later (expansion or d_sae) replaces any earlier width."""
    if any(later.get(name) is not None for name in WIDTH_FIELDS):
        earlier = {key: value for key, value in earlier.items() if key not in WIDTH_FIELDS}
    return {**earlier, **later}


def resolve_train_config(
    from_yaml: dict, preset: str | None, flags: dict, sae_flags: dict, optim_flags: dict
) -> TrainConfig:
    from_yaml = dict(from_yaml)
    preset = preset or from_yaml.pop("preset", None) or "gemma-scope"
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    chosen = PRESETS[preset]
    yaml_sae = {**_lift(from_yaml, _section_names(SAE_CONFIGS)),
                **_mapping(from_yaml, "sae", "{arch: jumprelu, expansion: 16}")}
    yaml_optim = {**_lift(from_yaml, _section_names([OptimConfig])), **_mapping(from_yaml, "optim", "{lr: 0.0001}")}
    arch = sae_flags.get("arch") or yaml_sae.get("arch") or "jumprelu"
    sae_model = {config.model_fields["arch"].default: config for config in SAE_CONFIGS}.get(arch, SAE_CONFIGS[0])
    sae = _over(_over(chosen.get("sae", {}).get(arch, {}), _names(sae_model, yaml_sae, "sae")),
                _names(sae_model, _set(sae_flags), "sae"))
    optim = {**chosen.get("optim", {}), **_names(OptimConfig, yaml_optim, "optim"),
             **_names(OptimConfig, _set(optim_flags), "optim")}
    return build(TrainConfig, chosen.get("train", {}), from_yaml, flags, {"sae": {**sae, "arch": arch},
                                                                        "optim": optim})
