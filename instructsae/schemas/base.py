"""Base for every config: frozen, no unknown fields, validators only check (they never do I/O); and how two
configs differ, field by field."""

from pydantic import BaseModel, ConfigDict


class FrozenModel(BaseModel):
    # allow_inf_nan=False: no setting is meaningful as NaN or inf (an lr of inf diverges, a steering alpha of
    # nan generates nothing), so they are refused while the flags are parsed, not found out mid-run
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


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
