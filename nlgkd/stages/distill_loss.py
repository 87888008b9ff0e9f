"""The distill stage's loss: what each recipe word computes, and `make_loss` that sums the terms.

    word-level   finetune (gold cross-entropy only) | logits_kd | noisy_kd | logits_mse, mixed with gold
                 cross-entropy by `alpha`; a list of teachers is an ensemble (their distributions averaged)
    hidden       PKD / DistilBERT cosine / TinyBERT projected MSE on mapped layers (`hidden:`)
    attention    MiniLM-v2 Q/K/V relations or TinyBERT attention MSE (`attention:`), via forward hooks
Every term is normalized by the global count of target tokens (see `nlgkd/loop.py`).
"""
from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import Tensor, nn

from ..feature_losses import (attention_score_mse, cosine_hidden_loss, layer_map, pkd_loss, relation_kd_loss,
                              tinybert_hidden_loss)
from ..hooks import QKVCapture, attentions, hidden_states
from ..losses import cross_entropy_loss, kd_loss, logits_mse_loss, sparse_kd_loss
from ..models import at_target_positions, forward_on_targets, with_shared_sources


# ------------------------------------------------------------------------- what each recipe word computes
# Word-level objectives (`objective:`). Each: student logits [B, T, V], the teachers' logits (a list; several
# form an ensemble), the mask [B, T] of counted tokens, the window's token count and the stage config ->
# an fp32 scalar, summed over counted tokens / normalizer.
def logits_kd(s_logits: Tensor, t_logits: list[Tensor], mask: Tensor, normalizer, cfg) -> Tensor:
    """Word-level KD (Hinton et al. 2015; Kim & Rush 2016): `divergence` (forward_kl, reverse_kl, jsd; see
    nlgkd/losses.py) between the tempered teacher distribution (an ensemble's mean) and the student's."""
    return kd_loss(s_logits, t_logits if len(t_logits) > 1 else t_logits[0], mask, temperature=cfg.temperature,
                   divergence=cfg.divergence, beta=cfg.jsd_beta, num_tokens=normalizer, chunk_size=cfg.kd_chunk_size)


def noisy_kd(s_logits: Tensor, t_logits: list[Tensor], mask: Tensor, normalizer, cfg) -> Tensor:
    """Noisy KD: logits_kd from a teacher that keeps its dropout on while it teaches (`noise_dropout`, set
    up by `set_teacher_noise` in `run`), so every step sees a differently perturbed teacher."""
    return logits_kd(s_logits, t_logits, mask, normalizer, cfg)


def logits_mse(s_logits: Tensor, t_logits: list[Tensor], mask: Tensor, normalizer, cfg) -> Tensor:
    """MSE between the student's and the teacher's raw logits (Ba & Caruana 2014; an ensemble's mean logits)."""
    target = t_logits[0] if len(t_logits) == 1 else torch.stack(t_logits).mean(0)
    return logits_mse_loss(s_logits, target, mask, num_tokens=normalizer)


OBJECTIVES = {
    "finetune": None,  # gold cross-entropy only: no teacher term
    "logits_kd": logits_kd,
    "noisy_kd": noisy_kd,
    "logits_mse": logits_mse,
}


# Hidden-state losses (`hidden.loss:`), on one pair of layers: student [B, L, Ds] (already projected to the
# teacher's width where the loss needs it: see HIDDEN_PROJECTED), teacher [B, L, Dt], mask [B, L] -> scalar.
HIDDEN_LOSSES = {"pkd": pkd_loss, "cosine": cosine_hidden_loss, "tinybert": tinybert_hidden_loss}


HIDDEN_PROJECTED = {"tinybert"}  # learn a Ds -> Dt projection with the student (different widths allowed)


class StudentWithProjections(nn.Module):
    """The trained module: the student plus TinyBERT's learned projections (student width -> teacher
    width), so both are optimized and synchronized together. Only `student` is saved as the artifact."""

    def __init__(self, student: nn.Module, projections: dict[str, nn.Module]):
        super().__init__()
        self.student = student
        self.projections = nn.ModuleDict(projections)

    def forward(self, batch: dict, **kwargs):
        return forward_on_targets(self.student, batch, **kwargs)


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


def side_hidden(outputs, side: str, layer: int, batch: dict, causal: bool) -> torch.Tensor:
    """Output of layer `layer` on `side` (index 0 of hidden_states is the embeddings)."""
    hidden = hidden_states(outputs, side)[layer + 1]
    return at_target_positions(hidden, batch) if causal and side == "decoder" else hidden


def side_mask(batch: dict, side: str, causal: bool) -> torch.Tensor:
    """[B, L] positions a hidden-state or attention term counts on `side`. On the encoder side, the source tokens
    of rows with a counted target: a filler row that tops up a last batch on several processes (`ignore`, every
    label -100) teaches nothing on any side."""
    if side in ("encoder", "encoder_self"):
        return batch["attention_mask"].bool() & (batch["labels"] != -100).any(1)[:, None]
    if side == "decoder_self" and causal:
        return batch["attention_mask"].bool()
    return batch["labels"] != -100


def in_vocabulary(logits: Tensor, width: int | None) -> Tensor:
    """[..., V] logits cut to the tokenizer's `width` ids: a vocabulary padded to a multiple of 8 or 128 (T5's
    32,128 rows for 32,100 tokens) adds rows no token maps to, and a student and teacher padded differently
    must still compare distributions over the same ids."""
    return logits if width is None or logits.shape[-1] <= width else logits[..., :width]


def make_loss(cfg, teachers: list[nn.Module], causal: bool, soft_targets=None, vocab_width: int | None = None):
    """compute_loss(model, batch, normalizer) -> (loss, logs) for the loop. `soft_targets(batch)`, when
    given, adds teacher_topk_ids / teacher_topk_logprobs to each batch (cross_tokenizer), like a cache.
    `vocab_width`: the shared tokenizer's size; wider logits are cut to it (`in_vocabulary`)."""
    kwargs = {}
    if cfg.hidden is not None:
        kwargs["output_hidden_states"] = True
    if cfg.attention is not None and cfg.attention.loss == "tinybert":
        kwargs["output_attentions"] = True
    minilm = cfg.attention is not None and cfg.attention.loss == "minilm"

    def compute_loss(model, batch, normalizer):
        if soft_targets is not None:
            batch = {**batch, **soft_targets(batch)}
        if (cfg.pt_schedule == "all_together" or "student_rows_from" in batch) and not causal:
            batch = with_shared_sources(batch)  # the student and the teachers encode each source once
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
            s_logits = in_vocabulary(s_logits, vocab_width)
            t_logits, t_outs = [], []
            # no_grad rather than inference_mode: teacher tensors are read by the student's backward
            with torch.no_grad():
                for teacher in teachers:
                    logits, out = forward_on_targets(teacher, batch, **kwargs)
                    t_logits.append(in_vocabulary(logits, vocab_width))
                    t_outs.append(out)
            loss, logs = word_level_terms(cfg, batch, s_logits, t_logits, normalizer)
            # mean-per-position terms are weighted by this batch's share of the window's tokens
            share = (batch["labels"] != -100).sum() / normalizer
            if cfg.hidden is not None:
                term = hidden_term(cfg.hidden, unwrapped, s_out, t_outs[0], batch, causal)
                logs["hidden"] = term.detach()
                loss = loss + cfg.hidden.weight * share * term
            if cfg.attention is not None:
                # MiniLM reads the Q/K/V captured by the hooks; TinyBERT the attention probabilities outputs hold
                seen = (s_cap, t_caps[0]) if minilm else (s_out, t_outs[0])
                term = ATTENTION_LOSSES[cfg.attention.loss](cfg.attention, *seen, batch, causal)
                logs["attention"] = term.detach()
                loss = loss + cfg.attention.weight * share * term
        return loss, {k: float(v) for k, v in logs.items()}

    return compute_loss


def word_level_terms(cfg, batch: dict, s_logits: Tensor, t_logits: list[Tensor], normalizer) -> tuple[Tensor, dict]:
    """(loss, logs) of the word-level part: gold cross-entropy mixed by `alpha` with the objective (from the
    teachers' logits, or a top-k cache in the batch); on a Joint-Teaching student prefix the objective alone."""
    if "student_rows_from" in batch:
        return both_prefix_kinds(cfg, batch, s_logits, t_logits, normalizer)
    mask = batch["labels"] != -100
    logs = {}
    on_student_prefix = bool(batch.get("student_prefix", False))
    ce = None
    if not on_student_prefix:  # gold cross-entropy; meaningless on the student's own samples
        ce = cross_entropy_loss(s_logits, batch["labels"], num_tokens=normalizer, label_smoothing=cfg.label_smoothing)
        logs["ce"] = ce.detach()
    if "teacher_topk_ids" in batch:
        # KD from a top-k cache: no teacher forward at all
        word = sparse_kd_loss(s_logits, batch["teacher_topk_logprobs"], batch["teacher_topk_ids"], mask,
                              temperature=cfg.temperature, tail=cfg.cache_tail, num_tokens=normalizer,
                              chunk_size=cfg.kd_chunk_size)
        logs[cfg.objective] = word.detach()
        agree = (s_logits.argmax(-1) == batch["teacher_topk_ids"][..., 0]) & mask
        logs["agreement"] = agree.sum() / normalizer
        return (1 - cfg.alpha) * word + cfg.alpha * ce, logs
    if on_student_prefix:
        # Joint-Teaching: the targets are the student's own samples, so gold cross-entropy on them means
        # nothing; the teacher's word-level distribution is the only signal
        word = OBJECTIVES[cfg.objective](s_logits, t_logits, mask, normalizer, cfg)
        logs["kd_student_prefix"] = word.detach()
        with torch.no_grad():
            logs["teacher_nll_student_pt"] = cross_entropy_loss(t_logits[0], batch["labels"], num_tokens=normalizer)
        return word, logs
    if OBJECTIVES[cfg.objective] is None:
        return ce, logs
    word = OBJECTIVES[cfg.objective](s_logits, t_logits, mask, normalizer, cfg)
    logs[cfg.objective] = word.detach()
    if cfg.joint_teaching is not None:
        logs["kd_teacher_prefix"] = word.detach()
    agree = (s_logits.argmax(-1) == t_logits[0].argmax(-1)) & mask
    logs["agreement"] = agree.sum() / normalizer
    return (1 - cfg.alpha) * word + cfg.alpha * ce, logs


def both_prefix_kinds(cfg, batch: dict, s_logits: Tensor, t_logits: list[Tensor], normalizer) -> tuple[Tensor, dict]:
    """Joint-Teaching `mix: rows`: rows [:n] hold the data's targets, rows [n:] the student's prefixes of the same
    sources (n = batch["student_rows_from"]); logits [2n, T, V]. The first kind trains as a teacher step would,
    (1 - alpha) KD + alpha CE, the second with KD alone, each term summed over its tokens and divided by the
    window's token count: the sum of what the two kinds of step would give over the same tokens. The logs are
    each kind's per-token means over the window (`kind_tokens`: its token counts of each kind), as in `mix: steps`,
    and `student_token_share` (logged by the Joint-Teaching hook) says how the loss weighs them."""
    n = batch["student_rows_from"]
    labels = batch["labels"]
    mask = labels != -100
    own_t, drawn_t = [t[:n] for t in t_logits], [t[n:] for t in t_logits]
    kd_own = OBJECTIVES[cfg.objective](s_logits[:n], own_t, mask[:n], normalizer, cfg)
    kd_drawn = OBJECTIVES[cfg.objective](s_logits[n:], drawn_t, mask[n:], normalizer, cfg)
    ce = cross_entropy_loss(s_logits[:n], labels[:n], num_tokens=normalizer, label_smoothing=cfg.label_smoothing)
    own_tokens, drawn_tokens = (max(1, count) for count in batch["kind_tokens"])
    with torch.no_grad():
        agree = ((s_logits[:n].argmax(-1) == own_t[0].argmax(-1)) & mask[:n]).sum() / own_tokens
        nll = cross_entropy_loss(drawn_t[0], labels[n:], num_tokens=drawn_tokens)
    own_mean, drawn_mean = normalizer / own_tokens, normalizer / drawn_tokens  # window sums -> per-token means
    logs = {"ce": ce.detach() * own_mean, "kd_teacher_prefix": kd_own.detach() * own_mean,
            "kd_student_prefix": kd_drawn.detach() * drawn_mean, "agreement": agree, "teacher_nll_student_pt": nll}
    return (1 - cfg.alpha) * kd_own + cfg.alpha * ce + kd_drawn, logs


def make_loss_by_task(cfg, teachers: list[nn.Module], task_teachers: list[list[int]], vocab_width: int | None = None):
    """compute_loss for multi-task data with per-task teachers (MT-DNN distillation): the rows of each
    task are distilled from that task's teachers (several: their distributions averaged), mixed with gold
    cross-entropy by `alpha`; rows of a task without teachers train on gold cross-entropy alone. Every
    term sums over tokens and divides by the window's token count, so the task groups add up exactly."""

    def compute_loss(model, batch, normalizer):
        s_logits = in_vocabulary(model(batch)[0], vocab_width)
        mask = batch["labels"] != -100
        word_total = s_logits.new_zeros(())
        ce_total = s_logits.new_zeros(())
        loss = s_logits.new_zeros(())
        agree = s_logits.new_zeros(())
        for task, indices in enumerate(task_teachers):
            rows = (batch["task_index"] == task).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            ce = cross_entropy_loss(s_logits[rows], batch["labels"][rows], num_tokens=normalizer,
                                    label_smoothing=cfg.label_smoothing)
            ce_total = ce_total + ce.detach()
            if not indices:
                loss = loss + ce
                continue
            sub = {k: v[rows] for k, v in batch.items() if torch.is_tensor(v)}
            with torch.no_grad():  # not inference_mode: teacher tensors are read by the student's backward
                t_logits = [in_vocabulary(forward_on_targets(teachers[i], sub)[0], vocab_width) for i in indices]
            word = OBJECTIVES[cfg.objective](s_logits[rows], t_logits, mask[rows], normalizer, cfg)
            word_total = word_total + word.detach()
            loss = loss + (1 - cfg.alpha) * word + cfg.alpha * ce
            agree = agree + ((s_logits[rows].argmax(-1) == t_logits[0].argmax(-1)) & mask[rows]).sum() / normalizer
        logs = {"ce": ce_total, cfg.objective: word_total, "agreement": agree}
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
            if spec.loss in HIDDEN_PROJECTED:
                s_h = module.projections[f"{side}_{s_layer}"](s_h)
            terms.append(HIDDEN_LOSSES[spec.loss](s_h, t_h, mask))
    return torch.stack(terms).mean()


def minilm_attention_term(spec, s_cap, t_cap, batch, causal) -> torch.Tensor:
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


def tinybert_attention_term(spec, s_out, t_out, batch, causal) -> torch.Tensor:
    """TinyBERT: MSE between the attention probabilities of the chosen student and teacher layers."""
    terms = []
    for side in spec.sides:
        s_att = attentions(s_out, side)[spec.student_layer]
        t_att = attentions(t_out, side)[spec.teacher_layer].to(s_att.dtype)
        q_mask = side_mask(batch, side, causal)
        k_mask = batch["attention_mask"].bool() if side in ("encoder_self", "cross") or causal else q_mask
        terms.append(attention_score_mse(s_att, t_att, q_mask, k_mask))
    return torch.stack(terms).mean()


# Attention losses (`attention.loss:`): (spec, student's and teacher's captures or outputs, batch, causal) -> scalar.
ATTENTION_LOSSES = {"minilm": minilm_attention_term, "tinybert": tinybert_attention_term}
