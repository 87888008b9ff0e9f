"""Model internals for feature distillation, read with forward hooks (transformers is never patched).

* Queries / keys / values of attention blocks (MiniLM relation KD): ``QKVCapture``.
* Hidden states: run the model with ``output_hidden_states=True`` and pick them with ``hidden_states``.
* Attention probabilities (TinyBERT attention KD): run with ``output_attentions=True`` and pick them with
  ``attentions``. Models using SDPA / flash attention return no attention weights; load them with
  ``attn_implementation="eager"`` (``from_pretrained(..., attn_implementation="eager")`` or
  ``config._attn_implementation = "eager"`` before building a fresh model).

Sides of an attention layer, as used throughout:

* ``"encoder_self"``: encoder self-attention (encoder-decoder models only).
* ``"decoder_self"``: decoder self-attention; for decoder-only models (GPT-2, OPT, Llama) the only side.
* ``"cross"``: decoder-to-encoder attention; queries come from the decoder ([B, L_tgt, D]), keys and
  values from the encoder output ([B, L_src, D]).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor, nn

__all__ = ["SIDES", "KINDS", "SUPPORTED_MODEL_TYPES", "QKVCapture", "attention_layers", "hidden_states", "attentions"]

SIDES = ("encoder_self", "decoder_self", "cross")
KINDS = ("q", "k", "v")

# config.model_type -> module layout family. Explicit on purpose: grep a model type to see its support.
SUPPORTED_MODEL_TYPES = {
    "bart": "bart",
    "mbart": "bart",
    "marian": "bart",
    "pegasus": "bart",
    "t5": "t5",
    "mt5": "t5",
    "gpt2": "gpt2",
    "opt": "opt",
    "llama": "llama",
}
_DECODER_ONLY = ("gpt2", "opt", "llama")


def _family(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{type(model).__name__} (model_type={model_type!r}) is not supported for attention capture; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return SUPPORTED_MODEL_TYPES[model_type]


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def attention_layers(model: nn.Module, side: str) -> list[nn.Module]:
    """The attention modules of ``side``, one per layer, in layer order.

    BART family (BART, mBART, Marian, Pegasus): ``layers[i].self_attn`` / ``layers[i].encoder_attn``;
    T5: ``block[i].layer[0].SelfAttention`` / decoder ``block[i].layer[1].EncDecAttention``;
    GPT-2: ``h[i].attn``; OPT: ``decoder.layers[i].self_attn``; Llama: ``layers[i].self_attn``.
    Works on the bare model and on the task heads (``...ForConditionalGeneration``, ``...ForCausalLM``).
    """
    _check_side(side)
    family = _family(model)
    name = type(model).__name__
    base = model.base_model  # BartModel inside BartForConditionalGeneration, GPT2Model inside GPT2LMHeadModel, ...
    if family in _DECODER_ONLY:
        if side != "decoder_self":
            raise ValueError(f"{name} is decoder-only: its only attention side is 'decoder_self', got {side!r}")
        if family == "gpt2":
            return [block.attn for block in base.h]
        if family == "opt":
            return [layer.self_attn for layer in base.decoder.layers]
        return [layer.self_attn for layer in base.layers]

    stack = getattr(base, "encoder" if side == "encoder_self" else "decoder", None)
    if stack is None:
        raise ValueError(f"{name} has no {'encoder' if side == 'encoder_self' else 'decoder'} for side {side!r}")
    if family == "bart":
        return [layer.encoder_attn if side == "cross" else layer.self_attn for layer in stack.layers]
    # t5
    if side == "cross":
        return [block.layer[1].EncDecAttention for block in stack.block]
    return [block.layer[0].SelfAttention for block in stack.block]


def _projection_modules(attention: nn.Module, family: str) -> dict[str, nn.Module]:
    if family == "t5":
        return {"q": attention.q, "k": attention.k, "v": attention.v}
    return {"q": attention.q_proj, "k": attention.k_proj, "v": attention.v_proj}


class QKVCapture:
    """Context manager that records the query/key/value projection outputs of chosen attention layers.

    Example (MiniLM-v2 relation KD on the last decoder self-attention layer)::

        with QKVCapture(student, sides=["decoder_self"], layers=[-1]) as s_cap, \\
             QKVCapture(teacher, sides=["decoder_self"], layers=[-1]) as t_cap:
            student_out = student(**batch)
            with torch.inference_mode():
                teacher(**batch)
            loss = relation_kd_loss(s_cap.get("decoder_self", "q", -1), t_cap.get("decoder_self", "q", -1),
                                    num_relation_heads=12, mask=batch["decoder_attention_mask"])

    What is stored: the raw output of each projection module, ``[B, L, D]`` (``D`` = heads * head_dim,
    before reshaping into heads and before any scaling the attention applies afterwards). For GPT-2 the
    fused ``c_attn`` output ``[B, L, 3D]`` is split into q, k, v. Outputs are kept as they are (still
    attached to the graph, so student features receive gradients) unless ``detach=True``.
    ``outputs[(side, kind, layer)]`` holds the latest forward's tensor; call ``clear()`` to drop them
    (e.g. after computing the loss, or between generation steps). Layer indices are normalised to
    non-negative numbers in ``outputs``; ``get`` accepts negative ones.

    Hooks are registered on ``__enter__`` (or ``register()``) and every one is removed on exit, also
    when the body raises. Hooks fire whenever a projection runs: with a KV cache (generation) cached
    cross-attention keys/values are computed on the first step only, and gradient checkpointing re-runs
    the forward during backward (the stored tensors are then replaced by equal ones).

    Args:
        model: a supported transformers model (see ``SUPPORTED_MODEL_TYPES``).
        sides: any of ``"encoder_self"``, ``"decoder_self"``, ``"cross"``.
        layers: layer indices (negative allowed) for every side, a ``{side: indices}`` dict, or ``None``
            for all layers.
        kinds: any of ``"q"``, ``"k"``, ``"v"``.
        detach: store detached tensors (e.g. for the teacher when not already under no_grad).
    """

    def __init__(
        self,
        model: nn.Module,
        sides: Sequence[str] = ("decoder_self",),
        layers: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
        kinds: Sequence[str] = KINDS,
        detach: bool = False,
    ):
        if isinstance(sides, str):
            sides = [sides]
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"kinds must be among {KINDS}, got {kind!r}")
        self.family = _family(model)
        self.kinds = tuple(kinds)
        self.detach = detach
        self.outputs: dict[tuple[str, str, int], Tensor] = {}
        self._num_layers: dict[str, int] = {}
        self._handles: list = []
        # (side, layer, attention module) for every chosen layer; resolved now so errors come early.
        self._targets: list[tuple[str, int, nn.Module]] = []
        for side in sides:
            modules = attention_layers(model, side)
            self._num_layers[side] = len(modules)
            chosen = layers.get(side) if isinstance(layers, Mapping) else layers
            indices = range(len(modules)) if chosen is None else [self._layer_index(side, i) for i in chosen]
            self._targets.extend((side, i, modules[i]) for i in indices)

    def _layer_index(self, side: str, layer: int) -> int:
        n = self._num_layers.get(side)
        if n is None:
            raise KeyError(f"side {side!r} is not captured; captured sides: {list(self._num_layers)}")
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} is out of range for {side!r}, which has {n} layers")
        return layer % n

    def _store(self, side: str, kind: str, layer: int, tensor: Tensor) -> None:
        self.outputs[(side, kind, layer)] = tensor.detach() if self.detach else tensor

    def register(self) -> "QKVCapture":
        if self._handles:
            raise RuntimeError("QKVCapture hooks are already registered")
        for side, layer, attention in self._targets:
            if self.family == "gpt2":
                width = attention.split_size

                def fused_hook(module, args, output, side=side, layer=layer, width=width):
                    for kind, part in zip(KINDS, output.split(width, dim=-1)):
                        if kind in self.kinds:
                            self._store(side, kind, layer, part)

                self._handles.append(attention.c_attn.register_forward_hook(fused_hook))
                continue
            projections = _projection_modules(attention, self.family)
            for kind in self.kinds:

                def hook(module, args, output, side=side, kind=kind, layer=layer):
                    self._store(side, kind, layer, output)

                self._handles.append(projections[kind].register_forward_hook(hook))
        return self

    def remove(self) -> None:
        """Remove every hook this object registered (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        """Drop the stored tensors (hooks stay registered)."""
        self.outputs.clear()

    def get(self, side: str, kind: str, layer: int) -> Tensor:
        """The stored ``[B, L, D]`` output of ``kind`` ("q", "k", "v") for ``side`` and ``layer``."""
        key = (side, kind, self._layer_index(side, layer))
        if key not in self.outputs:
            raise KeyError(f"nothing captured for {key}: was the model run inside the context, with this side/kind/layer chosen?")
        return self.outputs[key]

    def __enter__(self) -> "QKVCapture":
        return self.register()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.remove()
        return False


def hidden_states(outputs, side: str) -> tuple[Tensor, ...]:
    """Per-layer hidden states from a model run with ``output_hidden_states=True``.

    ``side`` is ``"encoder"`` or ``"decoder"`` (``"decoder"`` also for decoder-only models). Element 0 is
    the embedding output and element ``i + 1`` the output of layer ``i`` (see ``feature_losses.layer_map``);
    each is ``[B, L, D]``.
    """
    if side == "encoder":
        found = getattr(outputs, "encoder_hidden_states", None)
    elif side == "decoder":
        found = getattr(outputs, "decoder_hidden_states", None)
        if found is None:
            found = getattr(outputs, "hidden_states", None)
    else:
        raise ValueError(f"side must be 'encoder' or 'decoder', got {side!r}")
    if found is None:
        raise ValueError(f"the model outputs carry no {side} hidden states: call the model with output_hidden_states=True")
    return found


def attentions(outputs, side: str) -> tuple[Tensor, ...]:
    """Per-layer attention probabilities ``[B, H, Lq, Lk]`` from a model run with ``output_attentions=True``.

    ``side`` is one of ``SIDES``. Needs the eager attention implementation (see the module docstring).
    """
    _check_side(side)
    if side == "encoder_self":
        found = getattr(outputs, "encoder_attentions", None)
    elif side == "cross":
        found = getattr(outputs, "cross_attentions", None)
    else:
        found = getattr(outputs, "decoder_attentions", None)
        if found is None:
            found = getattr(outputs, "attentions", None)
    if not found or any(a is None for a in found):
        raise ValueError(
            f"the model outputs carry no {side} attentions: call the model with output_attentions=True "
            "and load it with attn_implementation='eager'"
        )
    return found
