"""Recipes: typed dataclasses loaded from YAML, validated before anything runs.

A recipe is `name`, `seed`, `data`, `models` and an ordered list of `stages`. Each stage has a `name`, a
`kind` (one of `STAGE_CONFIGS`) and the fields of that kind's config dataclass, written flat in the stage.

Name resolution: a stage refers to models and artifacts by name. A name resolves to the latest *earlier*
stage of that name, else to an entry of `models:`. So in
    models: {teacher: {...}}
    stages: [{name: teacher, kind: finetune, model: teacher}, {name: student, kind: prune, from: teacher}]
the finetune stage trains the `models.teacher` entry, and `prune` starts from the fine-tuned stage output.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml


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


def doc(help: str) -> dict:
    return {"help": help}


# --------------------------------------------------------------------------------------------- data
@dataclass(kw_only=True)
class DemoSizes:
    train: int = 2000
    validation: int = 200
    test: int = 200
    unlabeled: int = 2000


@dataclass(kw_only=True)
class DataConfig:
    """Where examples come from and how they become (source, target) text pairs."""

    task: Optional[Literal["demo"]] = field(default=None, metadata=doc("built-in task that needs no download"))
    demo: DemoSizes = field(default_factory=DemoSizes, metadata=doc("split sizes of the demo task"))
    train: Optional[str] = field(default=None, metadata=doc("jsonl/csv/parquet file of the train split"))
    validation: Optional[str] = None
    test: Optional[str] = None
    unlabeled: Optional[str] = field(default=None, metadata=doc("inputs without targets"))
    hub: Optional[str] = field(default=None, metadata=doc("dataset name for datasets.load_dataset"))
    hub_config: Optional[str] = None
    hub_splits: dict[str, str] = field(
        default_factory=dict, metadata=doc("our split -> hub split, e.g. {validation: dev}")
    )
    source: str = field(
        default="source", metadata=doc("source column, or a template like '{context}; answer: {answer}'")
    )
    target: str = field(default="target", metadata=doc("target column, or a template"))
    max_source_length: int = field(default=256, metadata=doc("tokens; longer sources are truncated and counted"))
    max_target_length: int = field(default=128, metadata=doc("tokens; longer targets are truncated and counted"))
    on_empty: Literal["drop", "error"] = field(
        default="drop", metadata=doc("examples with empty source/target: drop and count, or stop")
    )
    max_examples: dict[str, int] = field(default_factory=dict, metadata=doc("cap per split, e.g. {train: 1000}"))


# ------------------------------------------------------------------------------------------- models


@dataclass(kw_only=True)
class ModelConfig:
    """A model entry: a pretrained hub name/local path, or a fresh config trained from scratch."""

    init: Literal["pretrained", "fresh"] = "fresh"
    name_or_path: Optional[str] = field(default=None, metadata=doc("hub name or local folder (init: pretrained)"))
    revision: Optional[str] = None
    trust_remote_code: bool = field(default=False, metadata=doc("off unless you trust the model's code"))
    arch: Literal["bart", "mbart", "t5", "gpt2"] = field(
        default="t5", metadata=doc("family of a fresh model; mbart = BART with pre-layer-norm. Post-LN bart "
                                   "trained from scratch can learn to ignore its input (transformers#18461)"))
    d_model: int = 256
    encoder_layers: int = 4
    decoder_layers: int = 4
    attention_heads: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.1
    max_position_embeddings: int = 512
    tokenizer: Literal["bpe", "unigram"] = field(
        default="bpe", metadata=doc("algorithm of the tokenizer trained for a fresh model")
    )
    tokenizer_from: Optional[str] = field(
        default=None, metadata=ref("model", "share this model's tokenizer instead of training one")
    )
    vocab_size: int = field(default=2000, metadata=doc("vocabulary of a trained tokenizer"))


# ------------------------------------------------------------------------------------------- stages
@dataclass(kw_only=True)
class DecodingConfig:
    """How text is generated (evaluation, pseudo-targets)."""

    strategy: Literal["greedy", "beam", "diverse_beam", "sample"] = "greedy"
    num_beams: int = 4
    num_beam_groups: int = field(default=2, metadata=doc("diverse beam: groups"))
    diversity_penalty: float = field(default=0.5, metadata=doc("diverse beam: penalty"))
    length_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_return_sequences: int = field(default=1, metadata=doc("K outputs per input"))
    max_new_tokens: int = 64
    no_repeat_ngram_size: int = 0
    batch_size: int = 32
    dedup: bool = field(default=False, metadata=doc("drop duplicate outputs of one input"))


@dataclass(kw_only=True)
class TrainArgs:
    """Hyper-parameters of the one training loop (`nlgkd/loop.py`), shared by every training stage."""

    epochs: float = 1.0
    max_steps: Optional[int] = field(default=None, metadata=doc("optimizer steps; overrides epochs"))
    batch_size: int = 16
    grad_accum: int = field(default=1, metadata=doc("micro-batches per optimizer step"))
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto", metadata=doc("auto = bf16 on a GPU that has it, else fp32")
    )
    eval_every: Optional[int] = field(default=None, metadata=doc("steps between evaluations; default once per epoch"))
    eval_samples: int = field(default=128, metadata=doc("validation examples decoded for the generation metric"))
    early_stopping_metric: Literal["val_loss", "bleu", "chrf"] = "val_loss"
    patience: Optional[int] = field(default=None, metadata=doc("evaluations without improvement before stopping"))
    save_every: Optional[int] = field(default=200, metadata=doc("steps between resumable checkpoints"))
    log_every: int = 10
    label_smoothing: float = 0.0
    seed: Optional[int] = field(default=None, metadata=doc("default: the recipe seed"))
    report_to: list[str] = field(default_factory=list, metadata=doc("accelerate trackers, e.g. [tensorboard]"))


@dataclass(kw_only=True)
class FinetuneConfig(TrainArgs):
    """Cross-entropy training of a model on gold targets (a teacher, or a baseline student)."""

    produces: ClassVar[str] = "model"
    model: str = field(metadata=ref("model", "models: entry or earlier stage to train"))


@dataclass(kw_only=True)
class EvaluateConfig:
    """Decode a split with each model; BLEU, chrF, ROUGE, lengths, size and speed; a comparison table."""

    produces: ClassVar[str] = "metrics"
    models: list[str] = field(metadata=ref("models", "models to evaluate"))
    split: Literal["test", "validation", "train"] = "test"
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    max_examples: Optional[int] = None


LayerSpec = Optional[Union[list[int], dict[str, int], str]]


@dataclass(kw_only=True)
class PruneConfig:
    """Build a student from a teacher by keeping chosen encoder and/or decoder layers (study stage S2)."""

    produces: ClassVar[str] = "model"
    from_: str = field(metadata=ref("model", "teacher model to prune", yaml_name="from"))
    encoder_layers: LayerSpec = field(default=None, metadata=doc(
        "layers to keep: a list like [0, -1], {first_last: N}, {first: N}, every_other, all (default)"))
    decoder_layers: LayerSpec = field(default=None, metadata=doc("as encoder_layers, for the decoder"))


@dataclass(kw_only=True)
class HiddenKD:
    """Hidden-state distillation: PKD (normalized MSE), DistilBERT cosine, TinyBERT projected MSE."""

    loss: Literal["pkd", "cosine", "tinybert"] = "pkd"
    weight: float = 1.0
    sides: list[Literal["encoder", "decoder"]] = field(default_factory=lambda: ["decoder"])
    layer_map: Union[Literal["last", "skip", "uniform"], list[list[int]]] = field(
        default="skip", metadata=doc("strategy, or explicit [[student_layer, teacher_layer], ...]"))


@dataclass(kw_only=True)
class AttentionKD:
    """Attention distillation: MiniLM-v2 Q/K/V relations, or TinyBERT attention-score MSE."""

    loss: Literal["minilm", "tinybert"] = "minilm"
    weight: float = 1.0
    sides: list[Literal["encoder_self", "decoder_self", "cross"]] = field(
        default_factory=lambda: ["encoder_self", "decoder_self"])
    relations: list[Literal["q", "k", "v"]] = field(default_factory=lambda: ["q", "k", "v"])
    relation_heads: int = field(default=4, metadata=doc("minilm: heads both sides are regrouped into"))
    student_layer: int = -1
    teacher_layer: int = -1


@dataclass(kw_only=True)
class JointTeachingConfig:
    """Joint-Teaching (study stage S8): word-level KD also on prefixes the current student samples."""

    student_ratio: float = field(default=0.5, metadata=doc("share of steps trained on student samples (1 = only)"))
    schedule: Literal["alternate", "random"] = field(
        default="alternate", metadata=doc("alternate: evenly spread; random: seeded coin per step"))
    decoding: DecodingConfig = field(
        default_factory=lambda: DecodingConfig(strategy="sample", top_p=0.95, max_new_tokens=64),
        metadata=doc("how the student samples its prefixes"))


@dataclass(kw_only=True)
class DistillConfig(TrainArgs):
    """Train a student against one or more teachers with word-level, hidden-state and attention KD (S3)."""

    produces: ClassVar[str] = "model"
    student: str = field(metadata=ref("model", "model to train (e.g. a prune stage)"))
    teacher: Optional[Union[str, list[str]]] = field(
        default=None, metadata=ref("models", "teacher, or a list of teachers (an ensemble averages them)"))
    objective: Literal["finetune", "logits_kd", "logits_mse", "noisy_kd"] = field(
        default="logits_kd", metadata=doc("word-level term: cross-entropy only, KD, logit MSE, KD with teacher dropout"))
    alpha: float = field(default=0.0, metadata=doc("loss = (1 - alpha) * word-level KD + alpha * gold cross-entropy"))
    temperature: float = 1.0
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = 0.5
    hidden: Optional[HiddenKD] = None
    attention: Optional[AttentionKD] = None
    teacher_dtype: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata=doc("auto: bf16 on a GPU that has it, else fp32"))
    kd_chunk_size: Optional[int] = field(default=None, metadata=doc("token rows per KD chunk (memory bound)"))
    gold: bool = field(default=True, metadata=doc("train on the gold targets"))
    pseudo_targets: list[str] = field(
        default_factory=list, metadata=ref("datasets", "pseudo_targets stages whose PTs join the training data"))
    pt_schedule: Literal["cycle", "all"] = field(
        default="cycle", metadata=doc("cycle: epoch e uses PT number e mod K (the study); all: every PT each epoch"))
    joint_teaching: Optional[JointTeachingConfig] = None
    cached_teacher: Optional[str] = field(
        default=None, metadata=ref("logits", "a cache_logits stage: KD from stored top-k, no teacher loaded"))
    cache_tail: Literal["renormalize", "bucket"] = field(
        default="renormalize", metadata=doc("teacher mass outside the cached top-k: see losses.sparse_kd_loss"))


@dataclass(kw_only=True)
class PseudoTargetsConfig:
    """Generate K pseudo-targets per input with a teacher: sequence-level KD data (study stages S4-S7)."""

    produces: ClassVar[str] = "dataset"
    teacher: str = field(metadata=ref("model", "model that writes the pseudo-targets"))
    inputs: list[Literal["train", "validation", "test", "unlabeled"]] = field(
        default_factory=lambda: ["train"], metadata=doc("splits whose sources get pseudo-targets"))
    augmented: list[str] = field(default_factory=list, metadata=ref("datasets", "augment stages whose inputs to label"))
    decoding: DecodingConfig = field(
        default_factory=lambda: DecodingConfig(strategy="sample", top_p=0.95, num_return_sequences=4),
        metadata=doc("how the teacher writes; default: nucleus sampling p=0.95, K=4"))
    max_examples: Optional[int] = field(default=None, metadata=doc("cap on inputs per split"))
    save_every: int = field(default=10, metadata=doc("batches between writes to disk (a kill loses at most these)"))


@dataclass(kw_only=True)
class AugmentConfig:
    """Make new inputs from a split by masking, POS-guided replacement and n-gram sampling (Tang et al.)."""

    produces: ClassVar[str] = "dataset"
    split: Literal["train", "unlabeled"] = "train"
    n_iter: int = field(default=4, metadata=doc("variants per input (duplicates dropped)"))
    p_mask: float = 0.1
    p_pos: float = 0.1
    p_ng: float = 0.25
    field_separator: Optional[str] = field(default=None, metadata=doc("e.g. ' | ' to augment one field at a time"))
    pos_method: Literal["auto", "distributional", "spacy"] = "distributional"
    max_examples: Optional[int] = None


@dataclass(kw_only=True)
class CacheLogitsConfig:
    """Run a teacher once over gold and/or pseudo-targets; store its top-k log-probs for teacher-free KD."""

    produces: ClassVar[str] = "logits"
    teacher: str = field(metadata=ref("model", "model whose distributions are cached"))
    gold: bool = field(default=True, metadata=doc("cache the train split's gold targets"))
    pseudo_targets: list[str] = field(default_factory=list, metadata=ref("datasets", "pseudo_targets stages to cache"))
    top_k: int = field(default=32, metadata=doc("entries kept per token"))
    dtype: Literal["fp16", "fp32"] = field(default="fp16", metadata=doc("storage of the log-probs"))
    batch_size: int = 32


# kind -> config dataclass. The run functions live in `nlgkd/stages/__init__.py:STAGES` (same keys).
STAGE_CONFIGS: dict[str, type] = {
    "finetune": FinetuneConfig,
    "evaluate": EvaluateConfig,
    "prune": PruneConfig,
    "distill": DistillConfig,
    "pseudo_targets": PseudoTargetsConfig,
    "augment": AugmentConfig,
    "cache_logits": CacheLogitsConfig,
}


@dataclass
class Stage:
    name: str
    kind: str
    config: Any
    index: int


@dataclass
class Recipe:
    name: str
    seed: int
    data: DataConfig
    models: dict[str, ModelConfig]
    stages: list[Stage]
    source: str = "<recipe>"  # file the recipe came from, for messages
    raw: dict = field(default_factory=dict)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise RecipeError(f"{self.source}: no stage named {name!r}; stages are {[s.name for s in self.stages]}")

    def resolve(self, name: str, before: int) -> tuple[str, Any]:
        """('stage', Stage) for the latest stage named `name` before index `before`, else ('model', ModelConfig)."""
        for stage in reversed(self.stages[:before]):
            if stage.name == name:
                return "stage", stage
        if name in self.models:
            return "model", self.models[name]
        raise KeyError(name)


# ------------------------------------------------------------------------------ typed construction
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
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
        raise RecipeError(f"{path}: expected {_type_name(tp)}, got {value!r}")
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise RecipeError(f"{path}: expected a number, got {value!r}")
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
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            help_text = f.metadata.get("help", "")
            raise RecipeError(f"{path}.{name}: required field is missing ({help_text})")
    return cls(**values)


def to_dict(obj: Any) -> Any:
    """Plain JSON-able dict of a config (for stage.json and fingerprints)."""
    if dataclasses.is_dataclass(obj):
        return {yaml_name(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def config_help(cls: type) -> list[tuple[str, str, str]]:
    """(field, type, help) rows for `nlgkd stages --fields`."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = "" if f.default is dataclasses.MISSING else f" = {f.default!r}"
        rows.append((yaml_name(f), _type_name(hints[f.name]) + default, f.metadata.get("help", "")))
    return rows


# ------------------------------------------------------------------------------------ overrides
def apply_override(raw: dict, assignment: str) -> None:
    """Apply `a.b.c=value` to the raw recipe dict. Stages are addressed by name or index: `stages.teacher.lr=1e-4`."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected key.path=value, e.g. stages.teacher.epochs=3")
    key, text = assignment.split("=", 1)
    value = yaml.safe_load(text) if text.strip() else ""
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = _list_item(node, part, where)
        else:
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {where} is not a mapping")
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        raise RecipeError(f"--set {key}: cannot replace a whole stage; set one of its fields")
    node[last] = value


def _list_item(items: list, part: str, where: str) -> Any:
    if part.lstrip("-").isdigit():
        return items[int(part)]
    for item in items:
        if isinstance(item, dict) and item.get("name") == part:
            return item
    names = [item.get("name") for item in items if isinstance(item, dict)]
    raise RecipeError(f"--set: {where}: no stage named {part!r}; stages are {names}")


# ---------------------------------------------------------------------------------------- loading
def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text; save the recipe as UTF-8") from None
    return parse_recipe(raw, source=str(path), overrides=overrides)


def parse_recipe(raw: Any, source: str = "<recipe>", overrides: list[str] = ()) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with name, data, models and stages")
    for assignment in overrides:
        apply_override(raw, assignment)
    allowed = {"name", "seed", "data", "models", "stages"}
    for key in raw:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), list(allowed), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise RecipeError(f"{source}: {key}: unknown top-level field{did_you_mean}; allowed: {sorted(allowed)}")
    try:
        name = _convert(str, raw.get("name", Path(source).stem), "name")
        seed = _convert(int, raw.get("seed", 0), "seed")
        data = build(DataConfig, raw.get("data", {}), "data")
        models = {
            str(k): build(ModelConfig, v, f"models.{k}") for k, v in (raw.get("models") or {}).items()
        }
        raw_stages = raw.get("stages") or []
        if not isinstance(raw_stages, list) or not raw_stages:
            raise RecipeError("stages: expected a non-empty list of stages")
        stages = [_build_stage(s, i) for i, s in enumerate(raw_stages)]
        recipe = Recipe(name=name, seed=seed, data=data, models=models, stages=stages, source=source, raw=raw)
        check_references(recipe)
        check_data(recipe)
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None
    return recipe


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
    if kind not in STAGE_CONFIGS:
        hint = difflib.get_close_matches(str(kind), list(STAGE_CONFIGS), n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise RecipeError(f"{path}.kind: {kind!r} is not a stage kind{did_you_mean}; kinds: {', '.join(STAGE_CONFIGS)}")
    config = build(STAGE_CONFIGS[kind], raw, path, ignore=("name", "kind"))
    return Stage(name=name, kind=kind, config=config, index=index)


SINGULAR = {"models": "model", "datasets": "dataset"}


def references(config: Any) -> list[tuple[str, str, str]]:
    """(field path, ref kind, name) for every reference field of a stage or model config."""
    found = []
    for f in dataclasses.fields(config):
        kind = f.metadata.get("ref")
        value = getattr(config, f.name)
        if kind is None or value is None:
            continue
        names = value if isinstance(value, list) else [value]
        for i, name in enumerate(names):
            where = f"{yaml_name(f)}[{i}]" if isinstance(value, list) else yaml_name(f)
            found.append((where, SINGULAR.get(kind, kind), name))
    return found


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
        for where, kind, target in references(stage.config):
            path = f"stages[{stage.index}] ({stage.name}).{where}"
            try:
                resolved = recipe.resolve(target, before=stage.index)
            except KeyError:
                later = [s for s in recipe.stages[stage.index:] if s.name == target]
                if later:
                    raise RecipeError(
                        f"{path}: {target!r} is a stage that runs later (stages[{later[0].index}]); "
                        "move it before this stage"
                    ) from None
                known = list(recipe.models) + [s.name for s in recipe.stages[: stage.index]]
                hint = difflib.get_close_matches(target, known, n=1)
                did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise RecipeError(f"{path}: unknown name {target!r}{did_you_mean}; known here: {known}") from None
            got = produces(resolved)
            if got != kind:
                raise RecipeError(f"{path}: {target!r} gives a {got}, but a {kind} is needed here")


def check_data(recipe: Recipe) -> None:
    data = recipe.data
    sources = [data.task is not None, data.hub is not None, data.train is not None]
    if sum(sources) != 1:
        raise RecipeError("data: give exactly one of task (built-in), hub (dataset name) or train (file)")
