"""Options declared once: a dataclass field with its help text in the field's metadata.

A pass (:mod:`onnxopt.passes`), a job's own settings (e.g. :class:`onnxopt.quantize.QuantizeSettings`)
and the gates (:class:`onnxopt.gates.Gates`) declare each option as a field made by :func:`option`.
Everything else reads those fields:

* the CLI: :func:`click_options` turns fields into click options (flag, type, default, choices,
  help) -- the command names the fields it shows, nothing else;
* the Python API and recipes: :func:`build` makes the dataclass from keyword settings, with a
  ``did you mean`` for a typo (a ``BadInput`` naming the option, never a ``TypeError``);
* the search: a field's ``search`` values are what :func:`onnxopt.search.search_space` tries.

This module imports neither click nor onnx at import time; it sits at the bottom of the house
with :mod:`onnxopt.errors`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from .errors import BadInput

__all__ = ["option", "data_field", "data_fields", "fields_of", "settings_of", "build", "check_choices", "click_options", "flag_of",
           "split", "unknown_setting"]

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, choices: tuple | None = None, flag: str | None = None,
           off_flag: str | None = None, cli: bool = True, search: tuple | None = None, type: Any = None,
           metavar: str | None = None, **field_kwargs) -> Any:
    """A dataclass field that is also an option. ``help`` is what ``--help`` and the docs say;
    ``choices`` the allowed values (checked in :func:`build` and offered by the CLI); ``flag`` the
    CLI spelling (default ``--field-name``) and ``off_flag`` a bool's negative (default
    ``--no-field-name``); ``cli=False`` keeps it out of the CLI (e.g. settings only a recipe or
    the search sets); ``search``: the values the auto search tries; ``type``: the CLI type when
    the default does not tell (a ``None`` default)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "flag": flag, "off_flag": off_flag,
            "cli": cli, "search": tuple(search) if search else None, "type": type, "metavar": metavar}
    return dataclasses.field(default=default, metadata=meta, **field_kwargs)


def data_field() -> Any:
    """The field a pass receives its calibration data in: not a setting, never recorded, never
    on the CLI; the runner fills it."""
    return dataclasses.field(default=None, compare=False, repr=False, metadata={"data": True, "cli": False})


def data_fields(cls) -> list[dataclasses.Field]:
    """The data fields of a pass (class or instance): where the runner puts calibration feeds."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("data")]


def fields_of(cls) -> dict[str, dataclasses.Field]:
    """Setting fields of a dataclass (the data field excluded), in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("data")}


def settings_of(obj) -> dict:
    """The settings of a pass or settings object as recorded in a sidecar (no data)."""
    return {name: getattr(obj, name) for name in fields_of(type(obj))}


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_choices(cls, settings: dict) -> None:
    for name, f in fields_of(cls).items():
        choices = f.metadata.get("choices")
        if choices and name in settings and settings[name] not in choices:
            raise BadInput(flag_of(f), f"'{settings[name]}' is not one of {', '.join(map(str, choices))}")


def unknown_setting(key: str, allowed, what: str, where: str | None = None, noun: str = "setting") -> BadInput:
    """The error for a keyword ``what`` does not take: named as its flag, with the nearest name."""
    near = difflib.get_close_matches(str(key), list(allowed), n=1)
    article = "an" if noun[0] in "aeiou" else "a"
    return BadInput(where or "--" + str(key).replace("_", "-"), f"'{key}' is not {article} {noun} of {what}",
                    f"did you mean '{near[0]}'?" if near else f"{noun}s: {', '.join(allowed) or 'none'}")


def build(cls, settings: dict, *, what: str | None = None, **data):
    """``cls(**settings, **data)``: unknown keys and values outside ``choices`` are ``BadInput``
    naming the option (with the nearest valid name); lists become tuples (YAML and JSON have no
    tuples). ``data`` is for the data field (``calibration=...``)."""
    what = what or f"'{getattr(cls, 'name', cls.__name__)}'"
    allowed = fields_of(cls)
    for key in settings:
        if key not in allowed:
            raise unknown_setting(key, list(allowed), what)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    try:
        obj = cls(**kwargs, **data)  # __post_init__ checks first: its messages carry the better hints
    except TypeError as e:  # a value of the wrong kind deep in __post_init__
        raise BadInput(what, str(e)) from None
    check_choices(cls, kwargs)
    return obj


def split(options: dict, *classes) -> list[dict]:
    """Split one keyword dict over several settings classes (a job's own settings and its pass's);
    a key no class knows is a ``BadInput`` with the nearest name over all of them."""
    parts: list[dict] = [{} for _ in classes]
    every = [name for cls in classes for name in fields_of(cls)]
    for key, value in options.items():
        for part, cls in zip(parts, classes):
            if key in fields_of(cls):
                part[key] = value
                break
        else:
            raise unknown_setting(key, every, "this command")
    return parts


# ---- click -------------------------------------------------------------------------------------

def _base_type(annotation):
    """The plain type behind ``int | None``, ``tuple[str, ...]`` and the like (string annotations
    under ``from __future__ import annotations`` are resolved by the caller)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    if origin is tuple:
        return _base_type(typing.get_args(annotation)[0])
    return annotation if isinstance(annotation, type) else str


def click_options(cls, only: list[str] | None = None, *, defaults: dict | None = None,
                  show_default: bool = True):
    """A decorator adding one click option per field of ``cls`` (``only``: these fields, in this
    order). The parameter name is the field's name, so ``build(cls, kwargs)`` takes what click
    passes. ``defaults`` overrides a default where a command's use differs from the pass's; a field
    without a default is a required option."""
    import click

    hints = typing.get_type_hints(cls)
    fields = fields_of(cls)
    names = only if only is not None else [n for n, f in fields.items() if f.metadata.get("cli", True)]
    opts = []
    for name in names:
        f = fields[name]
        meta = f.metadata
        default = (defaults or {}).get(name, f.default)
        kind = meta.get("type") or _base_type(hints.get(name, str))
        is_tuple = typing.get_origin(hints.get(name)) is tuple or isinstance(f.default, tuple)
        flag = flag_of(f)
        help_text = meta.get("help", "")
        if kind is bool and not is_tuple:
            off = meta.get("off_flag") or "--no-" + flag[2:]
            opts.append(click.option(f"{flag}/{off}", name, default=default, show_default=show_default,
                                     help=help_text))
            continue
        ctype = click.Choice([str(c) for c in meta["choices"]]) if meta.get("choices") else kind
        kw: dict = {"help": help_text, "type": ctype}
        if default is _MISSING:  # no default: required (click checks that only when given no default)
            kw["required"] = True
        else:
            kw["default"] = default
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if is_tuple:
            opts.append(click.option(flag, name, multiple=True, **kw))
        else:
            opts.append(click.option(flag, name, show_default=show_default and kw.get("default") is not None, **kw))

    def deco(fn):
        for o in reversed(opts):
            fn = o(fn)
        return fn
    return deco
