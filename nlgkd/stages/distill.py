"""`distill`: train a student against one or more teachers (study stage S3, plus the classic KD methods).

The loss is a weighted sum of terms, each logged on its own:
    word-level   finetune (gold cross-entropy only) | logits_kd | noisy_kd | logits_mse, mixed with gold
                 cross-entropy by `alpha`; a list of teachers is an ensemble (their distributions averaged)
    hidden       PKD / DistilBERT cosine / TinyBERT projected MSE on mapped layers (`hidden:`)
    attention    MiniLM-v2 Q/K/V relations or TinyBERT attention MSE (`attention:`), via forward hooks
Every term is normalized by the global count of target tokens (see `nlgkd/loop.py`).
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict

import torch
from torch import nn

from ..features import QKVCapture, attentions, hidden_states
from ..generation import is_causal
from ..loop import train
from ..losses import (
    attention_score_mse,
    cosine_hidden_loss,
    cross_entropy_loss,
    kd_loss,
    layer_map,
    logits_mse_loss,
    pkd_loss,
    projected_mse_loss,
    relation_kd_loss,
)
from ..models import check_same_vocabulary, forward_on_targets, save_model
from .common import encode_splits, make_collator, make_validator

HIDDEN_LOSSES = {"pkd": pkd_loss, "cosine": cosine_hidden_loss, "tinybert": projected_mse_loss}


class StudentWithProjections(nn.Module):
    """The trained module: the student plus TinyBERT's learned projections (student width -> teacher
    width), so both are optimized and synchronized together. Only `student` is saved as the artifact."""

    def __init__(self, student: nn.Module, projections: dict[str, nn.Module]):
        super().__init__()
        self.student = student
        self.projections = nn.ModuleDict(projections)

    def forward(self, batch: dict, **kwargs):
        return forward_on_targets(self.student, batch, **kwargs)


def teacher_names(cfg) -> list[str]:
    if cfg.teacher is None:
        return []
    return [cfg.teacher] if isinstance(cfg.teacher, str) else list(cfg.teacher)


def resolve_teacher_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "bf16" or (choice == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def layer_pairs(spec, num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    if isinstance(spec, str):
        return layer_map(num_student, num_teacher, spec)
    return [(int(s), int(t)) for s, t in spec]


def num_layers(model, side: str) -> int:
    config = model.config
    if side == "encoder":
        return getattr(config, "encoder_layers", None) or getattr(config, "num_layers")
    if config.is_encoder_decoder:
        return getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers")
    return config.num_hidden_layers


def width(model) -> int:
    config = model.config
    return getattr(config, "d_model", None) or getattr(config, "hidden_size", None) or config.n_embd


def target_positions(batch: dict, hidden: torch.Tensor) -> torch.Tensor:
    """Decoder-only hidden states [B, L, D] at the positions whose logits predict the targets -> [B, T, D]."""
    t = batch["labels"].shape[1]
    positions = batch["target_offsets"][:, None] + torch.arange(t, device=hidden.device) - 1
    positions = positions.clamp(0, hidden.shape[1] - 1)
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))


def side_hidden(outputs, side: str, layer: int, batch: dict, causal: bool) -> torch.Tensor:
    """Output of layer `layer` on `side` (index 0 of hidden_states is the embeddings)."""
    hidden = hidden_states(outputs, side)[layer + 1]
    return target_positions(batch, hidden) if causal and side == "decoder" else hidden


def side_mask(batch: dict, side: str, causal: bool) -> torch.Tensor:
    if side in ("encoder", "encoder_self"):
        return batch["attention_mask"].bool()
    if side == "decoder_self" and causal:
        return batch["attention_mask"].bool()
    return batch["labels"] != -100


def check_distill_setup(cfg, student, teachers, tokenizer, teacher_tokenizers, names) -> None:
    """Fail before training on combinations that cannot work, naming the recipe field."""
    if cfg.objective != "finetune" or cfg.hidden or cfg.attention:
        if not teachers:
            raise ValueError(f"objective {cfg.objective!r} needs a teacher: set teacher: (a model or a list)")
    word_level = cfg.objective != "finetune"
    for teacher, t_tok, name in zip(teachers, teacher_tokenizers, names):
        if word_level:
            check_same_vocabulary(t_tok, tokenizer, name, cfg.student)
        if is_causal(teacher) != is_causal(student):
            raise ValueError(
                f"teacher {name!r} is {'decoder-only' if is_causal(teacher) else 'encoder-decoder'} but student "
                f"{cfg.student!r} is not; distill pairs of the same kind, or train the student on the teacher's "
                "pseudo-targets"
            )
    if cfg.hidden and cfg.hidden.loss != "tinybert" and teachers:
        if width(student) != width(teachers[0]):
            raise ValueError(
                f"hidden.loss {cfg.hidden.loss!r} compares hidden states of equal width, but the student has "
                f"{width(student)} and the teacher {width(teachers[0])}; use hidden.loss: tinybert (learned projection)"
            )
    if cfg.attention and cfg.attention.loss == "minilm" and is_causal(student) and "cross" in cfg.attention.sides:
        raise ValueError("attention.sides: decoder-only models have no cross-attention; use decoder_self")


def run(ctx) -> None:
    cfg = ctx.config
    acc = ctx.accelerator
    student, tokenizer = ctx.load_model(cfg.student)
    names = teacher_names(cfg)
    loaded = [ctx.load_model(name) for name in names]
    teachers = [m for m, _ in loaded]
    check_distill_setup(cfg, student, teachers, tokenizer, [t for _, t in loaded], names)
    causal = is_causal(student)

    dtype = resolve_teacher_dtype(cfg.teacher_dtype, acc.device)
    for teacher in teachers:
        teacher.to(acc.device, dtype=dtype)
        teacher.requires_grad_(False)
        # noisy KD (Sun et al.'s "noisy teacher"): the teacher keeps its dropout on
        teacher.train(cfg.objective == "noisy_kd")
    if cfg.attention and cfg.attention.loss == "tinybert":
        for model in [student, *teachers]:
            model.set_attn_implementation("eager")  # attention probabilities are only returned by eager

    projections = {}
    if cfg.hidden and cfg.hidden.loss == "tinybert":
        for side in cfg.hidden.sides:
            for s_layer, t_layer in layer_pairs(cfg.hidden.layer_map, num_layers(student, side),
                                                num_layers(teachers[0], side)):
                projections[f"{side}_{s_layer}"] = nn.Linear(width(student), width(teachers[0]))
    module = StudentWithProjections(student, projections)

    encoded = encode_splits(ctx, tokenizer)
    if "train" not in encoded:
        raise ValueError("distill needs a train split with targets")
    compute_loss = make_loss(cfg, teachers, causal)
    result = train(
        model=module,
        train_data=encoded["train"],
        collate_fn=make_collator(student, tokenizer),
        compute_loss=compute_loss,
        evaluate=make_validator(student, tokenizer, encoded, ctx, cfg),
        args=cfg,
        accelerator=acc,
        out_dir=ctx.out_dir,
        seed=cfg.seed if cfg.seed is not None else ctx.seed,
        log=ctx.log,
    )
    ctx.info["train"] = asdict(result)
    ctx.info["teachers"] = names
    if acc.is_main_process:
        save_model(acc.unwrap_model(module).student, tokenizer, ctx.out_dir)


def make_loss(cfg, teachers: list[nn.Module], causal: bool):
    """compute_loss(model, batch, normalizer) -> (loss, logs) for the loop."""
    want_hidden = cfg.hidden is not None
    want_attn_probs = cfg.attention is not None and cfg.attention.loss == "tinybert"
    minilm = cfg.attention is not None and cfg.attention.loss == "minilm"

    def compute_loss(model, batch, normalizer):
        mask = batch["labels"] != -100
        local_tokens = mask.sum()
        kwargs = {}
        if want_hidden:
            kwargs["output_hidden_states"] = True
        if want_attn_probs:
            kwargs["output_attentions"] = True
        unwrapped = getattr(model, "module", model)
        with ExitStack() as hooks:
            s_cap = t_caps = None
            if minilm:
                a = cfg.attention
                s_cap = hooks.enter_context(QKVCapture(unwrapped.student, sides=a.sides, layers=[a.student_layer],
                                                       kinds=a.relations))
                t_caps = [hooks.enter_context(QKVCapture(t, sides=a.sides, layers=[a.teacher_layer],
                                                         kinds=a.relations, detach=True)) for t in teachers]
            s_logits, s_out = model(batch, **kwargs)
            t_logits, t_outs = [], []
            # no_grad rather than inference_mode: teacher tensors are read by the student's backward
            with torch.no_grad():
                for teacher in teachers:
                    logits, out = forward_on_targets(teacher, batch, **kwargs)
                    t_logits.append(logits)
                    t_outs.append(out)

            logs = {}
            ce = cross_entropy_loss(s_logits, batch["labels"], num_tokens=normalizer,
                                    label_smoothing=cfg.label_smoothing)
            logs["ce"] = ce.detach()
            if cfg.objective == "finetune":
                loss = ce
            else:
                if cfg.objective == "logits_mse":
                    target = t_logits[0] if len(t_logits) == 1 else torch.stack(t_logits).mean(0)
                    word = logits_mse_loss(s_logits, target, mask, num_tokens=normalizer)
                else:
                    word = kd_loss(s_logits, t_logits if len(t_logits) > 1 else t_logits[0], mask,
                                   temperature=cfg.temperature, divergence=cfg.divergence, beta=cfg.jsd_beta,
                                   num_tokens=normalizer, chunk_size=cfg.kd_chunk_size)
                logs[cfg.objective] = word.detach()
                loss = (1 - cfg.alpha) * word + cfg.alpha * ce
                agree = (s_logits.argmax(-1) == t_logits[0].argmax(-1)) & mask
                logs["agreement"] = agree.sum() / normalizer
            # mean-per-position terms are weighted by this batch's share of the window's tokens
            share = local_tokens / normalizer
            if want_hidden:
                term = hidden_term(cfg.hidden, unwrapped, s_out, t_outs[0], batch, causal)
                logs["hidden"] = term.detach()
                loss = loss + cfg.hidden.weight * share * term
            if cfg.attention is not None:
                if minilm:
                    term = relation_term(cfg.attention, s_cap, t_caps[0], batch, causal)
                else:
                    term = attention_prob_term(cfg.attention, s_out, t_outs[0], batch, causal)
                logs["attention"] = term.detach()
                loss = loss + cfg.attention.weight * share * term
        return loss, {k: float(v) for k, v in logs.items()}

    return compute_loss


def hidden_term(spec, module, s_out, t_out, batch, causal) -> torch.Tensor:
    """Mean of the hidden-state loss over mapped layer pairs and sides."""
    terms = []
    for side in spec.sides:
        if side == "encoder" and causal:
            raise ValueError("hidden.sides: decoder-only models have no encoder; use [decoder]")
        n_student = len(hidden_states(s_out, side)) - 1
        n_teacher = len(hidden_states(t_out, side)) - 1
        mask = side_mask(batch, side, causal)
        for s_layer, t_layer in layer_pairs(spec.layer_map, n_student, n_teacher):
            s_h = side_hidden(s_out, side, s_layer, batch, causal)
            t_h = side_hidden(t_out, side, t_layer, batch, causal).to(s_h.dtype)
            if spec.loss == "tinybert":
                terms.append(projected_mse_loss(s_h, t_h, module.projections[f"{side}_{s_layer}"], mask))
            else:
                terms.append(HIDDEN_LOSSES[spec.loss](s_h, t_h, mask))
    return torch.stack(terms).mean()


def relation_term(spec, s_cap, t_cap, batch, causal) -> torch.Tensor:
    """MiniLM-v2: KL between teacher and student Q-Q, K-K, V-V relations (cross: decoder Q to encoder K)."""
    terms = []
    for side in spec.sides:
        query_mask = side_mask(batch, side, causal)
        if side == "cross":
            key_mask = batch["attention_mask"].bool()
            terms.append(relation_kd_loss(
                s_cap.get(side, "q", spec.student_layer), t_cap.get(side, "q", spec.teacher_layer).float(),
                spec.relation_heads, query_mask,
                student_y=s_cap.get(side, "k", spec.student_layer),
                teacher_y=t_cap.get(side, "k", spec.teacher_layer).float(), mask_y=key_mask))
            continue
        for kind in spec.relations:
            terms.append(relation_kd_loss(
                s_cap.get(side, kind, spec.student_layer), t_cap.get(side, kind, spec.teacher_layer).float(),
                spec.relation_heads, query_mask))
    return torch.stack(terms).mean()


def attention_prob_term(spec, s_out, t_out, batch, causal) -> torch.Tensor:
    """TinyBERT: MSE between the attention probabilities of the chosen student and teacher layers."""
    terms = []
    for side in spec.sides:
        s_att = attentions(s_out, side)[spec.student_layer]
        t_att = attentions(t_out, side)[spec.teacher_layer].to(s_att.dtype)
        q_mask = side_mask(batch, side, causal)
        k_mask = batch["attention_mask"].bool() if side in ("encoder_self", "cross") or causal else q_mask
        terms.append(attention_score_mse(s_att, t_att, q_mask, k_mask))
    return torch.stack(terms).mean()
