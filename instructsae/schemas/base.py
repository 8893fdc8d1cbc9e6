"""Base for every config: frozen, no unknown fields, validators only check (they never do I/O); and how two
configs differ, field by field."""

from pydantic import AliasChoices, BaseModel, ConfigDict


class FrozenModel(BaseModel):
    # allow_inf_nan=False: no setting is meaningful as NaN or inf (an lr of inf diverges, a steering alpha of
    # nan generates nothing), so they are refused while the flags are parsed, not found out mid-run
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def split_list(value):
    """'15,20' (a flag's text) -> ['15', '20'] for pydantic to validate; other values unchanged (YAML may give a
    list)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def differing_fields(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted name, old value, new value) for every setting two nested dicts disagree on."""
    changes = []
    for name in sorted(set(old) | set(new), key=str):
        before, after = old.get(name), new.get(name)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += differing_fields(before, after, f"{prefix}{name}.")
        elif before != after:
            changes.append((f"{prefix}{name}", before, after))
    return changes


def other_names(model: type[BaseModel]) -> dict[str, str]:
    """{other name: field name} for every name a model also accepts besides its own (SAELens's names, given
    once per field as `validation_alias=AliasChoices(field name, other names...)`)."""
    names = {}
    for name, field in model.model_fields.items():
        if isinstance(field.validation_alias, AliasChoices):
            names.update({choice: name for choice in field.validation_alias.choices
                          if isinstance(choice, str) and choice != name})
    return names


def own_names(model: type[BaseModel], settings: dict) -> dict:
    """`settings` with every other name replaced by the field's own, so that layers of settings (preset, YAML,
    flags) merge by field; naming one setting twice in one layer is a ValueError."""
    aliases = other_names(model)
    renamed: dict = {}
    for key, value in settings.items():
        name = aliases.get(key, key)
        if name in renamed:
            given = [k for k in settings if aliases.get(k, k) == name]
            raise ValueError(f"{' and '.join(given)} name the same setting: give one")
        renamed[name] = value
    return renamed
