"""Merge a train config from its sources: schema defaults < preset < YAML < CLI flags."""

from instructsae.cli_options import build
from instructsae.errors import UserError
from instructsae.schemas.train import PRESETS, TrainConfig


def _set(values: dict) -> dict:
    """The flags given (None: not given); `build` does this for the top level, not for nested sae/optim."""
    return {key: value for key, value in values.items() if value is not None}


def resolve_train_config(
    from_yaml: dict, preset: str | None, flags: dict, sae_flags: dict, optim_flags: dict
) -> TrainConfig:
    preset = preset or from_yaml.pop("preset", None) or "gemma-scope"
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    chosen = PRESETS[preset]
    yaml_sae = dict(from_yaml.pop("sae", None) or {})
    yaml_optim = dict(from_yaml.pop("optim", None) or {})
    arch = sae_flags.get("arch") or yaml_sae.get("arch") or "jumprelu"
    sae = {**chosen.get("sae", {}).get(arch, {}), **yaml_sae, **_set(sae_flags), "arch": arch}
    optim = {**chosen.get("optim", {}), **yaml_optim, **_set(optim_flags)}
    return build(TrainConfig, chosen.get("train", {}), from_yaml, flags, {"sae": sae, "optim": optim})
