"""Click options generated from pydantic fields, so each option is described once (in the schema)."""

import difflib
import types
import typing
from pathlib import Path

import click
import yaml
from pydantic import BaseModel, ValidationError

from instructsae.errors import UserError, first_line
from instructsae.schemas.base import other_names, own_names


def _unwrap_optional(annotation):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _click_type(annotation):
    annotation = _unwrap_optional(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(value) for value in typing.get_args(annotation)])
    if typing.get_origin(annotation) is tuple:
        return str  # "15,20" -> parsed by pydantic from a list
    return annotation if annotation in (int, float, str) else str


def _show(default) -> str:
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def options_from(model: type[BaseModel], skip: tuple[str, ...] = ()):
    """Decorator adding `--field-name` for every field of `model`; unset options stay None (not passed)."""

    def decorate(command):
        for name, field in reversed(list(model.model_fields.items())):
            if name in skip:
                continue
            flag = "--" + name.replace("_", "-")
            also = ["--" + other.replace("_", "-") for other, own in other_names(model).items() if own == name]
            help_text = field.description or ""
            if field.default is not None and not field.is_required():
                help_text += f" [default: {_show(field.default)}]"
            if _unwrap_optional(field.annotation) is bool:
                option = click.option(f"{flag}/--no-{name.replace('_', '-')}", *also, name, default=None,
                                      help=help_text)
            else:
                option = click.option(flag, *also, name, type=_click_type(field.annotation), default=None,
                                      help=help_text)
            command = option(command)
        return command

    return decorate


def read_yaml(path: str | None) -> dict:
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise UserError(f"config file {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                        f"{error.start})") from None
    except OSError as error:
        raise UserError(f"cannot read config file {path}: {error.strerror or first_line(error)}") from None
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {first_line(error)}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of options, not {type(data).__name__}")
    return data



def build(model: type[BaseModel], *layers: dict):
    """Merge dicts (later wins, None means unset) and validate into `model`, one line on failure. A layer may
    name a setting by one of its other names (SAELens's): it merges with the same setting named our way."""
    merged: dict = {}
    for layer in layers:
        try:
            layer = own_names(model, layer)
        except ValueError as error:
            raise UserError(f"invalid config: {error}") from None
        merged.update({key: value for key, value in layer.items() if value is not None})
    try:
        return model.model_validate(merged)
    except ValidationError as error:
        raise UserError(format_validation_error(error, model)) from None


def format_validation_error(error: ValidationError, model: type[BaseModel] | None = None) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "config"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    if first["type"] == "missing":
        return f"missing --{where.replace('_', '-')} (an option, or '{where}' in the --config file){more}"
    if first["type"] == "extra_forbidden" and model is not None:
        known = known_names(model, first["loc"][:-1])
        close = difflib.get_close_matches(str(first["loc"][-1]), sorted(known), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        return f"unknown setting {where}{hint}{more}"
    return f"invalid {where}: {first['msg']}{more}"


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (Optional, Annotated and unions unwrapped)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def known_names(model: type[BaseModel], loc: tuple) -> set[str]:
    """Every name (ours and other names) the model at `loc` inside `model` takes; at the top, its sections'
    names too (a flat YAML may give them there)."""
    models = [model]
    for part in loc:
        inner = [m for m in models if part in m.model_fields]
        if inner:
            models = _models_in(inner[0].model_fields[part].annotation)
        else:  # a discriminated union's tag, e.g. sae.jumprelu
            models = [m for m in models if any(f.default == part for f in m.model_fields.values())] or models
    names = {name for m in models for name in (*m.model_fields, *other_names(m))}
    if not loc:
        nested = [inner for field in model.model_fields.values() for inner in _models_in(field.annotation)]
        names |= {name for m in nested for name in (*m.model_fields, *other_names(m))}
    return names
