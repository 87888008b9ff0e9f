"""Build a student from a teacher by keeping some of its layers (study stage S2).

Two steps, kept apart so a recipe can be checked against a teacher's config before its weights load:

* `select_layers(num_layers, spec, side)` turns a recipe value (`[0, -1]`, `{"first_last": 3}`,
  `{"first": 3}`, `"every_other"`, `"all"`) into sorted teacher layer indices.
* `prune_model(model, encoder_layers, decoder_layers)` deep-copies the teacher, keeps those layers
  and fixes everything that depends on the layer count or position: the config fields, the
  `layer_idx` each attention module uses to find its slot in the KV cache, and T5's relative
  attention bias, which only the first block of a stack holds.

The layer-selection rules follow Shleifer & Rush, "Pre-trained Summarization Distillation" (2020)
(shrink and fine-tune: first + last + evenly spaced), Sun et al., "Patient Knowledge Distillation"
(2019) (first k), and Sanh et al., "DistilBERT" (2019) (every other layer).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel



@dataclass(frozen=True)
class Family:
    """Where a model family keeps its layer lists and how its config counts them.

    Paths are attribute paths from `model.base_model` (e.g. `BartModel` inside
    `BartForConditionalGeneration`), so any head class of the family works. `None` = no such side.
    """

    encoder_path: str | None
    decoder_path: str
    encoder_field: str | None
    decoder_field: str


_BART_LIKE = Family("encoder.layers", "decoder.layers", "encoder_layers", "decoder_layers")
_T5_LIKE = Family("encoder.block", "decoder.block", "num_layers", "num_decoder_layers")

# model_type -> Family. Add a family here after checking its modeling file for other per-layer state.
SUPPORTED_FAMILIES: dict[str, Family] = {
    "bart": _BART_LIKE,
    "mbart": _BART_LIKE,
    "marian": _BART_LIKE,
    "pegasus": _BART_LIKE,
    "t5": _T5_LIKE,
    "mt5": _T5_LIKE,
    "gpt2": Family(None, "h", None, "n_layer"),
    "opt": Family(None, "decoder.layers", None, "num_hidden_layers"),
    "llama": Family(None, "layers", None, "num_hidden_layers"),
}

LAYER_SPEC_HELP = (
    'a list of layer indices (e.g. [0, -1]), {"first_last": N}, {"first": N}, "every_other" or "all"'
)


# ---------------------------------------------------------------------------------------------
# Layer selection
# ---------------------------------------------------------------------------------------------


def select_layers(num_layers: int, spec, side: str) -> list[int]:
    """Turn a layer spec into the sorted teacher layer indices to keep.

    `side` (e.g. "decoder_layers") only names the recipe field in error messages.

    Specs:
      * list of ints: these layers. Negative indices count from the end (-1 = last layer). The
        result is sorted ascending whatever the given order, because a student keeps the teacher's
        layer order ([-1, 0] == [0, -1]). Must be non-empty, in range and unique after
        normalization ([0, -N] names layer 0 twice and is an error).
      * {"first_last": N}: first and last layer kept, the rest evenly spaced (shrink and fine-tune).
        Student layer i takes teacher layer floor(i * (L - 1) / (N - 1) + 1/2) (round half up),
        computed in integers. E.g. L=12: N=2 -> [0, 11], N=3 -> [0, 6, 11], N=4 -> [0, 4, 7, 11],
        N=6 -> [0, 2, 4, 7, 9, 11]. N=1 keeps [0] only (there is room for one layer, the bottom
        one, as in distilbart's layer maps). 1 <= N <= L.
      * {"first": N}: the first N layers (PKD's initialization). 1 <= N <= L.
      * "every_other": layers 0, 2, 4, ... (DistilBERT); ceil(L / 2) layers.
      * "all": every layer.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{side}: the model has {num_layers!r} layers on this side; nothing to select.")

    if isinstance(spec, str):
        if spec == "all":
            return list(range(num_layers))
        if spec == "every_other":
            return list(range(0, num_layers, 2))
        raise ValueError(f"{side}: unknown layer spec {spec!r}; use {LAYER_SPEC_HELP}.")

    if isinstance(spec, dict):
        if len(spec) != 1 or next(iter(spec)) not in ("first_last", "first"):
            raise ValueError(
                f"{side}: layer spec {spec!r} must have exactly one key, 'first_last' or 'first'; "
                f"use {LAYER_SPEC_HELP}."
            )
        (rule, count), = spec.items()
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= num_layers:
            raise ValueError(
                f"{side}: {{{rule!r}: {count!r}}} asks for {count!r} layers but the teacher has "
                f"{num_layers}; use a whole number from 1 to {num_layers}."
            )
        if rule == "first":
            return list(range(count))
        return _first_last(num_layers, count)

    if isinstance(spec, (list, tuple)):
        return _explicit_layers(num_layers, list(spec), side)

    raise ValueError(f"{side}: unsupported layer spec {spec!r}; use {LAYER_SPEC_HELP}.")


def _first_last(num_layers: int, count: int) -> list[int]:
    if count == 1:
        return [0]
    # round half up of i * (L-1) / (N-1) in integer arithmetic, so no float rounding surprises;
    # the step is >= 1 when N <= L, so the indices are strictly increasing.
    span, steps = num_layers - 1, count - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(count)]


def _explicit_layers(num_layers: int, indices: list, side: str) -> list[int]:
    valid = f"valid indices are 0..{num_layers - 1}, or -{num_layers}..-1 counting from the end"
    if not indices:
        raise ValueError(f"{side}: the layer list is empty; keep at least one layer ({valid}).")
    normalized = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"{side}: layer index {index!r} is not an integer; {valid}.")
        if not -num_layers <= index < num_layers:
            raise ValueError(
                f"{side}: layer index {index} is out of range for a teacher with {num_layers} layers "
                f"on this side; {valid}."
            )
        normalized.append(index % num_layers)
    duplicates = sorted({i for i in normalized if normalized.count(i) > 1})
    if duplicates:
        raise ValueError(
            f"{side}: {indices} names teacher layer(s) {duplicates} more than once (negative "
            f"indices count from the end); list each layer once ({valid})."
        )
    return sorted(normalized)


# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------


def get_family(model: PreTrainedModel) -> tuple[str, Family]:
    """The model's `model_type` and its `Family`, or a ValueError naming the supported ones."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"cannot prune model_type {model_type!r}: layer pruning supports "
            f"{', '.join(sorted(SUPPORTED_FAMILIES))}. Use one of these families, or start the "
            "student from a fresh config instead."
        )
    return model_type, SUPPORTED_FAMILIES[model_type]


def layer_counts(model: PreTrainedModel) -> dict[str, int]:
    """{"encoder_layers": n, "decoder_layers": m} as stored in the model (0 = no encoder)."""
    _, family = get_family(model)
    base = model.base_model
    encoder = _get_path(base, family.encoder_path) if family.encoder_path else []
    return {"encoder_layers": len(encoder), "decoder_layers": len(_get_path(base, family.decoder_path))}


def prune_model(model: PreTrainedModel, encoder_layers, decoder_layers) -> tuple[PreTrainedModel, dict]:
    """Return a new model keeping the chosen teacher layers, and a summary.

    `encoder_layers` / `decoder_layers`: teacher layer indices to keep, or any spec `select_layers`
    accepts (so [0, -1] and {"first_last": 3} work); None keeps that side whole. The teacher is
    deep-copied and never modified; embeddings, norms, positional embeddings, the LM head (and
    its tying) and the generation config come with the copy.

    Returns (student, info) with info = {"family", "encoder_layers": [teacher index of each
    student encoder layer] ([] without an encoder), "decoder_layers": [...], "teacher_params",
    "student_params", "compression": teacher_params / student_params}.
    """
    model_type, family = get_family(model)
    check_prunable(model, model_type, family, encoder_layers)
    # Resolve both specs first, so a bad index fails before anything is copied.
    sides = {"encoder_layers": (encoder_layers, family.encoder_path, family.encoder_field),
             "decoder_layers": (decoder_layers, family.decoder_path, family.decoder_field)}
    kept = {"encoder_layers": [], "decoder_layers": []}
    dropped = {}  # id(teacher layer) -> None: deepcopy's memo then skips the layers we drop,
    for side, (spec, path, _) in sides.items():  # so a big teacher is never held twice
        if path is None:
            continue
        teacher_layers = _get_path(model.base_model, path)
        kept[side] = select_layers(len(teacher_layers), "all" if spec is None else spec, side)
        dropped.update({id(layer): None for i, layer in enumerate(teacher_layers) if i not in kept[side]})

    student = copy.deepcopy(model, memo=dropped)
    for side, (_, path, field) in sides.items():
        if path is None:
            continue
        layers = torch.nn.ModuleList([_get_path(student.base_model, path)[i] for i in kept[side]])
        if family is _T5_LIKE:
            _set_t5_relative_bias(layers, _get_path(model.base_model, path)[0])
        _set_layer_indices(layers)
        _set_path(student.base_model, path, layers)
        setattr(student.config, field, len(layers))

    if family is _T5_LIKE:
        set_t5_stack_depths(student, kept, model_type)

    teacher_params, student_params = model.num_parameters(), student.num_parameters()
    info = {
        "family": model_type,
        "encoder_layers": kept["encoder_layers"],
        "decoder_layers": kept["decoder_layers"],
        "teacher_params": teacher_params,
        "student_params": student_params,
        "compression": teacher_params / student_params,
    }
    return student, info


def check_prunable(model: PreTrainedModel, model_type: str, family, encoder_layers) -> None:
    """Refuse, before anything is copied, a model whose kept layers would compute differently at their new
    indices, and an encoder spec for a model without an encoder."""
    if family.encoder_path is None and encoder_layers is not None:
        raise ValueError(
            f"{model_type} has no encoder; use decoder_layers to choose which layers to keep "
            "(and leave encoder_layers unset)."
        )

    if getattr(model.config, "is_heterogeneous", False):
        raise ValueError(
            f"cannot prune this {model_type} model: its config has per-layer overrides "
            "(per_layer_config), which pruning does not re-index. Start the student from a fresh config."
        )

    if model_type == "gpt2" and model.config.scale_attn_by_inverse_layer_idx:
        raise ValueError(
            "cannot prune this gpt2 model: scale_attn_by_inverse_layer_idx=True scales each layer's "
            "attention by 1/(layer index + 1), so a kept layer would compute differently at its new "
            "index. Start the student from a fresh config instead."
        )


def set_t5_stack_depths(student, kept: dict, model_type: str) -> None:
    """Each T5 stack holds its own copy of the config; its `num_layers` is that stack's depth."""
    student.encoder.config.num_layers = len(kept["encoder_layers"])
    student.decoder.config.num_layers = len(kept["decoder_layers"])
    if len(kept["encoder_layers"]) < len(kept["decoder_layers"]):
        warnings.warn(
            f"this {model_type} student has fewer encoder ({len(kept['encoder_layers'])}) than decoder "
            f"({len(kept['decoder_layers'])}) layers. transformers (seen in 5.23 and 5.24) sizes the KV "
            "cache of generate() from T5's `num_layers` (the encoder depth), so generate(use_cache=True) "
            "raises IndexError, even for a fresh model of this shape; pass cache=EncoderDecoderCache("
            "DynamicCache(), DynamicCache()) to generate() (past_key_values= before transformers 5.24), "
            "or use_cache=False. nlgkd's own generation does this for you.",
            stacklevel=3,  # the caller of prune_model
        )


def _get_path(module: torch.nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _set_path(module: torch.nn.Module, path: str, value: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get_path(module, parent) if parent else module, name, value)


def _set_layer_indices(layers: torch.nn.ModuleList) -> None:
    # Attention modules find their KV-cache slot by `layer_idx`; student layer i must use slot i,
    # or two layers would read and write the same slot during cached generation.
    for i, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = i


def _set_t5_relative_bias(blocks: torch.nn.ModuleList, teacher_first_block: torch.nn.Module) -> None:
    # T5 computes the relative position bias in the first block of each stack and passes it on to
    # the others, so only block 0 holds `relative_attention_bias`. The student's block 0 gets the
    # teacher's block-0 bias whichever layer it came from; later blocks must not hold one.
    bias = teacher_first_block.layer[0].SelfAttention.relative_attention_bias
    for i, block in enumerate(blocks):
        attention = block.layer[0].SelfAttention
        if i == 0 and not attention.has_relative_attention_bias:
            attention.has_relative_attention_bias = True
            attention.relative_attention_bias = copy.deepcopy(bias)
        elif i > 0 and attention.has_relative_attention_bias:
            attention.has_relative_attention_bias = False
            del attention.relative_attention_bias
