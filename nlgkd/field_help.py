"""The help `nlgkd stages` prints: every field of a config dataclass (nested ones dotted), with its type,
default, bounds and help, read from the schema in `nlgkd/config.py`."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Optional, Union

from .schema import describe_bounds, yaml_name


def type_name(tp: Any) -> str:
    """How a recipe field's type reads in help and errors: 'a' | 'b', list of integer, mapping, ..."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _nested_config(tp: Any) -> tuple[Optional[type], str]:
    """The dataclass a field holds and how it is written under the field's name: ('.', directly or
    optional) or ('.NAME.', a mapping of name -> dataclass); (None, '') for plain values."""
    if dataclasses.is_dataclass(tp):
        return tp, "."
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1 and dataclasses.is_dataclass(members[0]):
            return members[0], "."
    if origin is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
        return typing.get_args(tp)[1], ".NAME."
    return None, ""


def _default_text(f: dataclasses.Field, defaults: Any = None) -> str:
    """' = value' of field `f`; `defaults`: the instance whose values are the defaults (a nested config whose
    parent's default differs from its class's, e.g. joint_teaching.decoding samples)."""
    if defaults is not None:
        value = getattr(defaults, f.name)
        return "" if dataclasses.is_dataclass(value) else f" = {value!r}"
    if f.default is not dataclasses.MISSING:
        return f" = {f.default!r}"
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "" if dataclasses.is_dataclass(value) else f" = {value!r}"
    return " (required)"


def config_help(cls: type, prefix: str = "", skip: set[str] = frozenset(),
                defaults: Any = None) -> list[tuple[str, str, str]]:
    """(field, type, help) rows for `nlgkd stages KIND | data | models`: every field of `cls`, and the fields
    of the configs it nests under dotted names (decoding.strategy, tasks.NAME.prefix)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if yaml_name(f) in skip:
            continue
        name = prefix + yaml_name(f)
        limits = f.metadata.get("bounds")
        allowed = f" ({describe_bounds(limits)})" if limits else ""
        rows.append((name, type_name(hints[f.name]) + allowed + _default_text(f, defaults),
                     f.metadata.get("help", "")))
        nested, joint = _nested_config(hints[f.name])
        if nested is None:
            continue
        # a nested config that shares a base with its parent (data.tasks.NAME: a dataset like data's own) says
        # so once instead of listing the shared fields again
        shared_bases = [b for b in nested.__mro__ if dataclasses.is_dataclass(b) and b in cls.__mro__]
        repeated = {yaml_name(g) for b in shared_bases for g in dataclasses.fields(b)}
        if repeated:
            rows.append((name + joint + "*", "", f"each of {', '.join(sorted(repeated))} as above, for this one"))
        nested_defaults = getattr(defaults, f.name) if defaults is not None else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if not dataclasses.is_dataclass(nested_defaults):
            nested_defaults = None
        rows.extend(config_help(nested, name + joint, skip=repeated, defaults=nested_defaults))
    return rows


# The top level of a recipe: (field, type, help). parse_recipe accepts exactly these.
TOP_LEVEL_FIELDS = [
    ("name", "string = the file's name", "the run directory is runs/NAME"),
    ("seed", "integer = 0", "seed of every stage that sets none (a stage's own seed: overrides it)"),
    ("on_weak_teacher", "'warn' | 'stop' = 'warn'",
     "a teacher that does not beat copying the source or the most frequent target on validation: print a "
     "warning and go on, or stop before any stage learns from it"),
    ("data", "mapping (required)", "where examples come from: `nlgkd stages data`"),
    ("models", "mapping of name -> model", "models the stages start from: `nlgkd stages models`"),
    ("stages", "list of stage (required)", "what runs, in order; each has name, kind and the kind's fields: "
     "`nlgkd stages KIND`"),
    ("profiles", "mapping of name -> list of string",
     "named sets of --set assignments, e.g. cpu: [stages.teacher.batch_size=64, ...]; `nlgkd run RECIPE --profile "
     "cpu` applies one before any --set"),
]
