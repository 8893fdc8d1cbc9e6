"""Merge a train config from its sources: schema defaults < preset < YAML < CLI flags."""

from instructsae.cli_options import build
from instructsae.errors import UserError
from instructsae.schemas.train import PRESETS, TrainConfig


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


def resolve_train_config(
    from_yaml: dict, preset: str | None, flags: dict, sae_flags: dict, optim_flags: dict
) -> TrainConfig:
    preset = preset or from_yaml.pop("preset", None) or "gemma-scope"
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    chosen = PRESETS[preset]
    yaml_sae = _mapping(from_yaml, "sae", "{arch: jumprelu, expansion: 16}")
    yaml_optim = _mapping(from_yaml, "optim", "{lr: 0.0001}")
    arch = sae_flags.get("arch") or yaml_sae.get("arch") or "jumprelu"
    sae = {**chosen.get("sae", {}).get(arch, {}), **yaml_sae, **_set(sae_flags), "arch": arch}
    optim = {**chosen.get("optim", {}), **yaml_optim, **_set(optim_flags)}
    return build(TrainConfig, chosen.get("train", {}), from_yaml, flags, {"sae": sae, "optim": optim})
