"""Recipes: YAML loaded into the typed schema of `nlgkd/config.py`, validated before anything runs.

A recipe is `name`, `seed`, `data`, `models` and an ordered list of `stages`. Each stage has a `name`, a
`kind` (one of `STAGE_CONFIGS`) and the fields of that kind's config dataclass, written flat in the stage.

Name resolution: a stage refers to models and artifacts by name. A name resolves to the latest *earlier*
stage of that name, else to an entry of `models:`. So in
    models: {teacher: {...}}
    stages: [{name: teacher, kind: finetune, model: teacher}, {name: student, kind: prune, from: teacher}]
the finetune stage trains the `models.teacher` entry, and `prune` starts from the fine-tuned stage output.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .config import (SPLITS, STAGE_CONFIGS, DataConfig, DataSource, DecodingConfig, ModelConfig, Recipe,
                     RecipeError, Stage)
from .schema import check_bounds, yaml_name
from .field_help import TOP_LEVEL_FIELDS, type_name


def _convert(tp: Any, value: Any, path: str) -> Any:
    """`value` as the schema type `tp`, or a RecipeError naming `path`. One case per type form (Any, a union,
    Literal, list, dict, a nested dataclass, bool, int, float, str), kept in one function so every rule a recipe
    value meets reads in one place."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):  # null is "none", never "the default settings"
            return None
        errors = []
        for member in typing.get_args(tp):
            try:
                return _convert(member, value, path)
            except RecipeError as err:
                errors.append(err)
        # one member is a dataclass/list and the value has that shape: its error is the useful one
        for member, err in zip(typing.get_args(tp), errors):
            if isinstance(value, dict) and dataclasses.is_dataclass(member):
                raise err
        raise RecipeError(f"{path}: expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise RecipeError(f"{path}: {value!r} is not allowed{did_you_mean}; allowed: {', '.join(map(str, allowed))}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {value!r}")
        key_tp, item_tp = typing.get_args(tp)
        return {str(k): _convert(item_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is type(None):
        if value is None:
            return None
        raise RecipeError(f"{path}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # YAML 1.1 reads `5e-4` (no dot) as a string; accept what is plainly a number
        elif isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value.strip()):
            number = float(value)
        if number is None:
            raise RecipeError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(number):  # YAML's .inf and .nan
            raise RecipeError(f"{path}: {value!r} is not a finite number; give a number such as 0.001")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{path}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def build(cls: type, raw: Any, path: str, ignore: tuple[str, ...] = ()) -> Any:
    """Make dataclass `cls` from a YAML mapping; unknown keys, missing and mistyped fields name `path`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {yaml_name(f): f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key in ignore or key in fields:
            continue
        hint = difflib.get_close_matches(str(key), list(fields), n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise RecipeError(
            f"{path}.{key}: unknown field{did_you_mean}; allowed fields: {', '.join(sorted(fields))}"
        )
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[f.name] = _convert(hints[f.name], raw[name], f"{path}.{name}")
            check_bounds(values[f.name], f.metadata.get("bounds"), f"{path}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            help_text = f.metadata.get("help", "")
            raise RecipeError(f"{path}.{name}: required field is missing ({help_text})")
    try:
        return cls(**values)
    except RecipeError as err:  # a config's own check across fields (__post_init__)
        raise RecipeError(f"{path}: {err}") from None


def to_dict(obj: Any) -> Any:
    """Plain JSON-able dict of a config (for stage.json and fingerprints)."""
    if dataclasses.is_dataclass(obj):
        return {yaml_name(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"decoding.top_p": 0.95, ...}: a nested config dict (to_dict's) as dotted paths -> values."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


# ------------------------------------------------------------------------------------ overrides
def apply_override(raw: dict, assignment: str) -> None:
    """Apply `a.b.c=value` to the raw recipe dict. Stages are addressed by name or index: `stages.teacher.lr=1e-4`."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected key.path=value, e.g. stages.teacher.epochs=3")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        reason = str(err).splitlines()[0]
        raise RecipeError(f"--set {assignment!r}: the value is not valid YAML ({reason}); write it as in a recipe, "
                          "e.g. --set 'stages.pts.inputs=[train, unlabeled]', and quote it for the shell") from None
    set_path(raw, key.strip().split("."), value, label=f"--set {key}")


def set_path(raw: dict, parts: list[str], value: Any, label: str) -> None:
    """Set `raw[parts[0]][parts[1]]... = value`, making missing mappings; `--set` and stage variants use it.
    `label` starts every error message (the option or the recipe field being applied)."""
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = _list_item(node, part, where)
        else:
            if not isinstance(node, dict):
                raise RecipeError(f"{label}: {'.'.join(parts[:depth])} is {node!r}, not a mapping with fields")
            node = node.setdefault(part, {})
            if node is None:
                raise RecipeError(f"{label}: {where} is null; give it as a whole mapping instead")
    last = parts[-1]
    if not isinstance(node, (dict, list)):
        raise RecipeError(f"{label}: {'.'.join(parts[:-1])} is {node!r}, not a mapping with fields")
    if isinstance(node, list):
        raise RecipeError(f"{label}: cannot replace a whole stage; set one of its fields")
    node[last] = value


def _list_item(items: list, part: str, where: str) -> Any:
    if part.lstrip("-").isdigit():
        if not -len(items) <= int(part) < len(items):
            raise RecipeError(f"--set: {where}: there are {len(items)} stages (0 to {len(items) - 1}); address a "
                              f"stage by its name, e.g. stages.{items[0].get('name', 'NAME')}.lr")
        return items[int(part)]
    for item in items:
        if isinstance(item, dict) and item.get("name") == part:
            return item
    names = [item.get("name") for item in items if isinstance(item, dict)]
    raise RecipeError(f"--set: {where}: no stage named {part!r}; stages are {names}")


# ---------------------------------------------------------------------------------------- loading
class RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key written twice in one mapping (plain YAML keeps the last silently,
    so a second `lr:` in a stage would quietly win). Keys merged in (`<<: *anchor`) may be overridden."""

    def flatten_mapping(self, node):
        # a mapping's own keys, before merging puts the merged ones into node.value (which a mapping that merges
        # this one can do before this one is constructed)
        if not hasattr(node, "own_keys"):
            node.own_keys = [key for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"]
        super().flatten_mapping(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: dict = {}
            for key_node in node.own_keys:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise RecipeError(f"line {key_node.start_mark.line + 1}: {key!r} is written twice in one mapping "
                                      f"(first on line {seen[key]}); keep one of them")
                seen.setdefault(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path, overrides: list[str] = (), profile: str | None = None) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=RecipeLoader)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text; save the recipe as UTF-8") from None
    return parse_recipe(raw, source=str(path), overrides=overrides, profile=profile)


def parse_recipe(raw: Any, source: str = "<recipe>", overrides: list[str] = (), profile: str | None = None) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with name, data, models and stages")
    assignments = [*profile_assignments(raw, profile, source), *overrides]  # --set wins over the profile
    for assignment in assignments:
        apply_override(raw, assignment)
    allowed = {name for name, _, _ in TOP_LEVEL_FIELDS}
    for key in raw:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), list(allowed), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise RecipeError(f"{source}: {key}: unknown top-level field{did_you_mean}; allowed: {sorted(allowed)}")
    try:
        default_name = "recipe" if source == "<recipe>" else Path(source).stem  # the file's name
        name = _convert(str, raw.get("name", default_name), "name")
        if not re.fullmatch(r"\w[\w.-]*", name):
            # the run folder is runs/<name>: a path, '..' or an empty name would write outside it or into it
            said = "" if "name" in raw else " (the file's name, as the recipe sets no name:)"
            raise RecipeError(f"name: {name!r}{said} names the run folder runs/<name>; use letters, digits, '_', '-' "
                              "and '.' (not first), e.g. name: my_task")
        seed = _convert(int, raw.get("seed", 0), "seed")
        on_weak_teacher = _convert(Literal["warn", "stop"], raw.get("on_weak_teacher", "warn"), "on_weak_teacher")
        data = build(DataConfig, raw.get("data", {}), "data")
        models = {
            str(k): build(ModelConfig, v, f"models.{k}") for k, v in (raw.get("models") or {}).items()
        }
        raw_stages = raw.get("stages") or []
        if not isinstance(raw_stages, list) or not raw_stages:
            raise RecipeError("stages: expected a non-empty list of stages")
        stages = [_build_stage(s, i) for i, s in enumerate(raw_stages)]
        recipe = Recipe(name=name, seed=seed, data=data, models=models, stages=stages, source=source, raw=raw,
                        on_weak_teacher=on_weak_teacher, assignments=assignments)
        resolve_decoding_defaults(recipe)
        find_ce_students(recipe)
        check_references(recipe)
        recipe.instances = expand_variants(recipe)
        check_data(recipe)
        check_named_splits(recipe)
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None
    return recipe


def profile_assignments(raw: dict, profile: str | None, source: str) -> list[str]:
    """The `key.path=value` assignments of the recipe's profile `profile` (`profiles:`, e.g. a `cpu` profile
    holding a template's CPU sizes), applied before any --set; [] without a profile."""
    profiles = _convert(dict[str, list[str]], raw.get("profiles") or {}, "profiles")
    if profile is None:
        return []
    if profile not in profiles:
        have = f"the profiles {', '.join(sorted(profiles))}" if profiles else "no profiles: section"
        raise RecipeError(f"{source}: --profile {profile}: the recipe has {have}")
    return list(profiles[profile])


def resolve_decoding_defaults(recipe: Recipe) -> None:
    """Fill max_new_tokens, where a decoding block leaves it out, with data.max_target_length, so stage.json
    and fingerprints hold the length used."""

    def fill(config: Any) -> None:
        if isinstance(config, DecodingConfig):
            if config.max_new_tokens is None:
                config.max_new_tokens = recipe.data.max_target_length
            return
        if dataclasses.is_dataclass(config):
            for f in dataclasses.fields(config):
                fill(getattr(config, f.name))

    for stage in recipe.stages:
        for config in [stage.config, *stage.variants.values()]:
            fill(config)


def find_ce_students(recipe: Recipe) -> None:
    """A distill stage with a teacher and no `ce_student` compares its teacher with the recipe's latest earlier
    finetune stage of the same student (the baseline every distilled student must beat), if there is one."""
    for stage in recipe.stages:
        for config in [stage.config, *stage.variants.values()]:
            if stage.kind != "distill" or config.ce_student is not None or not (config.teacher or config.teachers_by_task):
                continue
            teachers = config.teacher if isinstance(config.teacher, list) else [config.teacher]
            teachers += [name for names in config.teachers_by_task.values() for name in names]
            for earlier in reversed(recipe.stages[:stage.index]):
                if earlier.name in teachers:  # self-distillation: the teacher fine-tuned the same start
                    continue
                if earlier.kind == "finetune" and earlier.config.model == config.student:
                    if not earlier.variants:  # a seed sweep of CE students: the recipe names one (name@variant)
                        config.ce_student = earlier.name
                    break


def _build_stage(raw: Any, index: int) -> Stage:
    path = f"stages[{index}]"
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a stage is a mapping with name, kind and its fields")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{path}.name: every stage needs a name (a string)")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise RecipeError(f"{path}.name: {name!r} must use letters, digits, '_' and '-' (it names a folder)")
    path = f"stages[{index}] ({name})"
    kind = raw.get("kind")
    if kind is None:
        raise RecipeError(f"{path}.kind: missing; every stage needs a kind, one of {', '.join(STAGE_CONFIGS)} "
                          "(`nlgkd stages` describes them)")
    if kind not in STAGE_CONFIGS:
        hint = difflib.get_close_matches(str(kind), list(STAGE_CONFIGS), n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise RecipeError(f"{path}.kind: {kind!r} is not a stage kind{did_you_mean}; kinds: {', '.join(STAGE_CONFIGS)}")
    config = build(STAGE_CONFIGS[kind], raw, path, ignore=("name", "kind", "variants"))
    variants = _build_variants(raw, kind, name, index)
    return Stage(name=name, kind=kind, config=config, index=index, variants=variants)


def _build_variants(raw: dict, kind: str, name: str, index: int) -> dict[str, Any]:
    """{variant name: config} from a stage's `variants:`. Each variant is the stage's own fields with its
    overrides set through `set_path` (what `--set` uses): `objective: noisy_kd` replaces a field,
    `decoding.strategy: beam` changes one field inside a nested mapping and keeps its siblings."""
    path = f"stages[{index}] ({name}).variants"
    spec = raw.get("variants")
    if spec is None:
        return {}
    example = "{beam: {decoding.strategy: beam}, sample: {decoding.strategy: sample}}"
    if not isinstance(spec, dict) or not spec:
        raise RecipeError(f"{path}: expected a mapping of variant name -> fields to override, e.g. {example}")
    cls = STAGE_CONFIGS[kind]
    fields = {yaml_name(f): f for f in dataclasses.fields(cls) if f.init}
    allowed = sorted(fields)
    variants = {}
    for variant, overrides in spec.items():
        where = f"{path}.{variant}"
        if not isinstance(variant, str) or not variant.replace("_", "").replace("-", "").isalnum():
            raise RecipeError(f"{where}: a variant name uses letters, digits, '_' and '-' (it names a folder)")
        if overrides is None:
            overrides = {}  # the stage exactly as written: a baseline next to the changed variants
        if not isinstance(overrides, dict):
            raise RecipeError(f"{where}: expected a mapping of fields to override, e.g. {example}")
        variant_raw = copy.deepcopy({k: v for k, v in raw.items() if k != "variants"})
        for key, value in overrides.items():
            parts = str(key).split(".")
            if parts[0] not in allowed:
                hint = difflib.get_close_matches(parts[0], allowed, n=1)
                did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise RecipeError(f"{where}.{key}: {parts[0]!r} is not a field of a {kind} stage{did_you_mean}; "
                                  f"a variant overrides the stage's own fields: {', '.join(allowed)}")
            default = fields[parts[0]].default_factory
            if len(parts) > 1 and parts[0] not in variant_raw and default is not dataclasses.MISSING:
                variant_raw[parts[0]] = to_dict(default())  # `decoding.top_p` keeps the field's other defaults
            set_path(variant_raw, parts, copy.deepcopy(value), label=f"{where}.{key}")
        variants[variant] = build(cls, variant_raw, f"stages[{index}] ({name}@{variant})", ignore=("name", "kind"))
    return variants


SINGULAR = {"models": "model", "datasets": "dataset", "decodables": "decodable"}
# a reference kind that accepts more than one kind of artifact: evaluate decodes models and their exports
ACCEPTS = {"decodable": ("model", "exported model")}


def references(config: Any) -> list[tuple[str, str, str]]:
    """(field path, ref kind, name) for every reference field of a stage or model config."""
    found = []
    for f in dataclasses.fields(config):
        kind = f.metadata.get("ref")
        value = getattr(config, f.name)
        if kind is None or value is None:
            continue
        if isinstance(value, dict):  # e.g. teachers_by_task: {task: [model, ...]}
            named = [(f"{yaml_name(f)}.{key}[{i}]", name) for key, names in value.items()
                     for i, name in enumerate(names)]
        elif isinstance(value, list):
            named = [(f"{yaml_name(f)}[{i}]", name) for i, name in enumerate(value)]
        else:
            named = [(yaml_name(f), value)]
        found += [(where, SINGULAR.get(kind, kind), name) for where, name in named]
    return found


def input_name(config: dict, where: str) -> str | None:
    """The name a recorded config reads at a reference path from `references`: `models[2]`, `teacher`,
    `teachers_by_task.qa[0]`; None where the record has no such field (an older layout; a task name with a
    dot in it)."""
    value: object = config
    for part in where.replace("[", ".[").split("."):
        if part.startswith("["):
            index = int(part[1:-1])
            value = value[index] if isinstance(value, list) and index < len(value) else None
        else:
            value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, str) else None


def produces(target: tuple[str, Any]) -> str:
    kind, obj = target
    return "model" if kind == "model" else STAGE_CONFIGS[obj.kind].produces


def check_references(recipe: Recipe) -> None:
    seen = set()
    for stage in recipe.stages:
        if stage.name in seen:
            raise RecipeError(f"stages[{stage.index}].name: {stage.name!r} is used twice; stage names are unique")
        seen.add(stage.name)
    for name, model in recipe.models.items():
        for where, kind, target in references(model):
            if target not in recipe.models:
                raise RecipeError(f"models.{name}.{where}: {target!r} is not a models: entry ({list(recipe.models)})")
    for stage in recipe.stages:
        # the stage as written and each of its variants (a variant may point a reference elsewhere)
        configs = [(stage.name, stage.config)] + [(f"{stage.name}@{v}", c) for v, c in stage.variants.items()]
        for label, config, where, kind, target in [(label, config, *r) for label, config in configs
                                                   for r in references(config)]:
            path = f"stages[{stage.index}] ({label}).{where}"
            try:
                # `name@variant` pins one variant; which variants exist is checked by expand_variants
                resolved = recipe.resolve(target.partition("@")[0], before=stage.index)
            except KeyError:
                later = [s for s in recipe.stages[stage.index:] if s.name == target.partition("@")[0]]
                if later:
                    raise RecipeError(
                        f"{path}: {target!r} is a stage that runs later (stages[{later[0].index}]); "
                        "move it before this stage"
                    ) from None
                known = list(dict.fromkeys([*recipe.models, *(s.name for s in recipe.stages[: stage.index])]))
                hint = difflib.get_close_matches(target, known, n=1)
                did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise RecipeError(f"{path}: unknown name {target!r}{did_you_mean}; known here: {known}") from None
            got = produces(resolved)
            if kind == "logits" and got == "dataset" and getattr(resolved[1].config, "align_to", None):
                continue  # pseudo_targets from an API with align_to also writes the cache_logits layout
            if got == "exported model" and where == "teacher" and getattr(config, "engine", None) == "ctranslate2":
                continue  # pseudo_targets decode through the engine: an export stage is that engine's model
            if got != kind and got not in ACCEPTS.get(kind, ()):
                hint = ("; an export is evaluated or served (or writes pseudo-targets with engine: ctranslate2), "
                        "not trained: use the stage it was exported from" if got == "exported model" else "")
                article = "an" if got[0] in "aeiou" else "a"
                raise RecipeError(f"{path}: {target!r} gives {article} {got}, but a {kind} is needed here{hint}")


def expand_variants(recipe: Recipe) -> list[Stage]:
    """The stages the runner runs (`Recipe.instances`), in recipe order, with variants spelled out:

    - a stage with `variants:` runs once per variant, as `name@variant` (its own folder);
    - a stage that reads a varied stage, directly or through a stage that does, runs once per variant too
      and reads the same variant: `final_ft` after `objective` runs as `final_ft@logits_kd`, ...; where the
      variant sets `seed` and the stage sets none, the copy takes the variant's seed;
    - an evaluate stage (`expands_variants`) runs once, with a row per variant of each varied stage it lists;
    - `name@variant` in a recipe pins one variant; a stage that only pins does not vary.
    References in the copies are rewritten to the `name@variant` they read, so fingerprints, folders and
    stage.json say exactly what was used, and a stage that reads no varied stage is unchanged (made once).
    A stage varies with one varied stage at most: reading two, or having variants and reading a varied
    stage, would need every combination; the error says to pin one instead.
    """
    axes: dict[str, Optional[tuple[str, list[str]]]] = {}  # stage name -> (varied stage, variant names)
    instances = []
    for stage in recipe.stages:
        configs = [(stage.name, stage.config)] + [(f"{stage.name}@{v}", c) for v, c in stage.variants.items()]
        read: dict[str, tuple[tuple[str, list[str]], str, str]] = {}  # varied stage -> (axis, path, name read)
        for label, config in configs:
            for where, _, target in references(config):
                base, _, pin = target.partition("@")
                kind, obj = recipe.resolve(base, stage.index)
                axis = axes.get(obj.name) if kind == "stage" else None
                path = f"stages[{stage.index}] ({label}).{where}"
                if pin and axis is None:
                    raise RecipeError(f"{path}: {target!r}: {base!r} has no variants; write {base!r}")
                if pin and pin not in axis[1]:
                    hint = difflib.get_close_matches(pin, axis[1], n=1)
                    did_you_mean = f" (did you mean {base + '@' + hint[0]!r}?)" if hint else ""
                    raise RecipeError(f"{path}: {target!r}: {base!r} has no variant {pin!r}{did_you_mean}; "
                                      f"its variants: {', '.join(axis[1])}")
                if not pin and axis is not None:
                    read.setdefault(axis[0], (axis, path, target))
        if stage.variants:
            for (varied, variants), path, target in read.values():
                raise RecipeError(
                    f"{path}: {target!r} has a variant per {varied!r} variant ({', '.join(variants)}), and this stage "
                    f"has variants of its own; pin the one it reads, e.g. {target + '@' + variants[0]!r}")
            axis = (stage.name, list(stage.variants))
        elif getattr(STAGE_CONFIGS[stage.kind], "expands_variants", False):
            axis = None
        elif len(read) > 1:
            (first, (_, _, t1)), (second, (axis2, path, t2)) = list(read.items())[:2]
            raise RecipeError(
                f"{path}: this stage reads {t1!r} (varies with {first!r}) and {t2!r} (varies with {second!r}); "
                f"a stage varies with one varied stage: pin the other, e.g. {t2 + '@' + axis2[1][0]!r}")
        else:
            axis = next(iter(read.values()))[0] if read else None
        axes[stage.name] = axis
        if axis is None:
            instances.append(dataclasses.replace(stage, config=_pin(recipe, stage, stage.config, None, axes),
                                                 variants={}))
            continue
        for variant in axis[1]:
            config = stage.variants[variant] if stage.variants else _with_variant_seed(recipe, stage, axis[0], variant)
            instances.append(dataclasses.replace(stage, config=_pin(recipe, stage, config, variant, axes),
                                                 variants={}, variant=variant, varied=axis[0]))
    return instances


def _with_variant_seed(recipe: Recipe, stage: Stage, varied: str, variant: str) -> Any:
    """The config of `stage`'s copy for `variant` of the varied stage `varied`. In a seed sweep (the variants of
    `varied` train with different seeds) a training stage that sets no seed of its own takes its variant's, so
    the sweep varies every stage that follows it (a final fine-tune's batch order too), not only `varied`."""
    config = stage.config
    if not hasattr(config, "seed") or config.seed is not None:  # a kind without a seed, or a seed of its own
        return config
    seeds = {name: getattr(c, "seed", None) for name, c in recipe.stage(varied).variants.items()}
    if len(set(seeds.values())) < 2:  # not a seed sweep: every variant trains with the same seed
        return config
    return dataclasses.replace(config, seed=seeds[variant])


def _pin(recipe: Recipe, stage: Stage, config: Any, variant: Optional[str], axes: dict) -> Any:
    """`config` with each reference to a varied stage written as the `name@variant` it reads: this copy's
    variant, or every variant (an evaluate stage, `variant` None)."""
    def pin(names: list[str]) -> list[str]:
        pinned = []
        for name in names:
            kind, obj = recipe.resolve(name, stage.index) if "@" not in name else ("pinned", None)
            axis = axes.get(obj.name) if kind == "stage" else None
            if axis is None:
                pinned.append(name)
            elif variant is not None:
                pinned.append(f"{name}@{variant}")
            else:
                pinned += [f"{name}@{v}" for v in axis[1]]
        return pinned

    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("ref") is None or value is None:
            continue
        if isinstance(value, dict):  # e.g. teachers_by_task: {task: [model, ...]}
            changes[f.name] = {key: pin(names) for key, names in value.items()}
        elif isinstance(value, list):
            changes[f.name] = pin(value)
        elif len(pin([value])) == 1:
            changes[f.name] = pin([value])[0]
        else:
            raise RecipeError(f"stages[{stage.index}] ({stage.name}).{yaml_name(f)}: {value!r} has variants "
                              f"({', '.join(pin([value]))}) and this field takes one name; pin one of them")
    return dataclasses.replace(config, **changes) if changes else config


def check_data(recipe: Recipe) -> None:
    data = recipe.data
    if data.tasks:
        if _has_source(data) or data.validation or data.test or data.unlabeled:
            raise RecipeError("data: with data.tasks, give each task's dataset under its name "
                              "(data.tasks.NAME.train, ...), not at the top of data:")
        for name, task in data.tasks.items():
            if not _has_source(task):
                raise RecipeError(f"data.tasks.{name}: give exactly one of task (built-in), hub (dataset "
                                  "name) or train (file)")
            _check_dir(task, f"data.tasks.{name}")
        return
    if not _has_source(data):
        raise RecipeError("data: give exactly one of task (built-in), hub (dataset name) or train (file), "
                          "or several datasets under tasks:")
    _check_dir(data, "data")


def declared_splits(data: DataConfig) -> set[str] | None:
    """The splits the recipe's data has, as its data: section says; None when a hub dataset's are only known
    once it is loaded."""
    sources = list(data.tasks.values()) or [data]
    found: set[str] = set()
    for source in sources:
        if source.hub is not None:
            return None
        if source.task is not None:
            found |= {s for s in SPLITS if getattr(source.demo, s) > 0}
        else:
            found |= {s for s in SPLITS if getattr(source, s) is not None}
    return found


def split_lists(config: Any) -> list[tuple[str, Any, str]]:
    """(field path, the object holding it, its attribute) of each stage field that names data splits."""
    denoising = getattr(config, "denoising", None)
    found = []
    if denoising is not None and denoising.file is None:
        found.append(("denoising.splits", denoising, "splits"))
    for name in ("inputs", "split"):
        if hasattr(config, name):
            found.append((name, config, name))
    return found


def check_named_splits(recipe: Recipe) -> None:
    """Every split a stage names must be in the data. `unlabeled` is optional by nature: a list that names it
    when the data has none goes on without it (a note says so), so one recipe serves data with and without
    unlabeled inputs; any other missing split, or a list left empty, is an error here, before anything runs."""
    have = declared_splits(recipe.data)
    if have is None:
        return
    configs = [(s.name, s.config) for s in recipe.instances]
    configs += [(s.name, c) for s in recipe.stages for c in (s.config, *s.variants.values())]
    for stage_name, config in configs:
        for path, holder, attr in split_lists(config):
            named = getattr(holder, attr)
            names = [named] if isinstance(named, str) else list(named)
            missing = [s for s in names if s not in have]
            kept = [s for s in names if s in have]
            where = f"stages.{stage_name}.{path}"
            if missing == ["unlabeled"] and kept and not isinstance(named, str):
                setattr(holder, attr, kept)
                note = f"{where}: the data has no unlabeled inputs (data.unlabeled), so it reads {kept} only"
                if note not in recipe.notes:
                    recipe.notes.append(note)
            elif missing:
                fix = f"set {path} to one it has" if isinstance(named, str) else f"remove it from {path}"
                raise RecipeError(f"{where}: {', '.join(map(repr, missing))} is not in the data, which has "
                                  f"{sorted(have)}; add data.{missing[0]} (a file) or {fix}")


def _check_dir(source: DataSource, where: str) -> None:
    if source.dir is not None and (source.task is not None or source.hub is not None):
        raise RecipeError(f"{where}.dir: the folder of data files, but this dataset is "
                          f"{'the built-in task' if source.task else 'the hub dataset ' + repr(source.hub)}; "
                          "remove dir (or give train/validation/... files instead)")


def _has_source(source: DataSource) -> bool:
    given = [source.task is not None, source.hub is not None, source.train is not None]
    if sum(given) > 1:
        raise RecipeError("data: give exactly one of task (built-in), hub (dataset name) or train (file)")
    return any(given)
