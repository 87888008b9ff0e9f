"""The building blocks of the recipe schema (nlgkd/config.py): a field's help text and numeric bounds, references
to earlier artifacts, and the error every recipe problem raises."""
from __future__ import annotations

import dataclasses
from typing import Any


class RecipeError(ValueError):
    """A recipe problem; the message names the file and the field path and says what to do."""


def ref(kind: str, help: str, yaml_name: str | None = None) -> dict:
    """Field metadata marking a reference to an earlier artifact (`model`, `models`, `dataset`, `datasets`).
    `yaml_name` is the recipe key when it is not a valid Python name (`from`)."""
    meta = {"ref": kind, "help": help}
    if yaml_name:
        meta["yaml_name"] = yaml_name
    return meta


def yaml_name(f: dataclasses.Field) -> str:
    return f.metadata.get("yaml_name", f.name)


def doc(help: str, **limits) -> dict:
    """Field metadata: its help text and, for a number, the allowed range (`bounds`)."""
    return {"help": help, **bounds(**limits)} if limits else {"help": help}


def bounds(**limits: float) -> dict:
    """Field metadata: the range a number must lie in, checked when a recipe is read (`check_bounds`):
    ge / gt (at least / above) and le / lt (at most / below)."""
    return {"bounds": limits}


BOUND_WORDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
BOUND_TESTS = {"ge": lambda v, x: v >= x, "gt": lambda v, x: v > x, "le": lambda v, x: v <= x,
               "lt": lambda v, x: v < x}


def describe_bounds(limits: dict) -> str:
    return " and ".join(f"{BOUND_WORDS[k]} {v:g}" for k, v in limits.items())


def check_bounds(value: Any, limits: dict | None, path: str) -> None:
    """A number (or each number of a mapping) outside `limits` is an error naming the field path."""
    if not limits or value is None:
        return
    items = value.items() if isinstance(value, dict) else [(None, value)]
    for key, number in items:
        if not all(BOUND_TESTS[k](number, x) for k, x in limits.items()):
            where = f"{path}.{key}" if key is not None else path
            raise RecipeError(f"{where}: {number!r} is out of range; it must be {describe_bounds(limits)}")
