"""Feature-distillation losses: hidden states (PKD, DistilBERT cosine, TinyBERT) and attention (TinyBERT scores,
MiniLM relations), and which teacher layer each student layer learns from. Pure functions with tensor shapes
in their docstrings; the conventions (masks, fp32 scalars, 0 for an empty mask) are those of nlgkd/losses.py,
which holds the losses on logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import _bool_mask, _p_log_ratio

LAYER_MAP_STRATEGIES = ("last", "skip", "uniform")


# ----------------------------------------------------------------------------------------------
# hidden-state losses
# ----------------------------------------------------------------------------------------------


def _masked_position_mean(per_position: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``per_position`` ([B, L]) over masked positions; 0 (with grad_fn) when none."""
    mask = _bool_mask(mask, per_position.shape, per_position.device)
    total = torch.where(mask, per_position, torch.zeros_like(per_position)).sum()
    return total / mask.sum().clamp(min=1)


def _check_hidden(student: Tensor, teacher: Tensor, same_width: bool = True) -> None:
    if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"hidden states must be [B, L, D] with the same B and L; got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if same_width and student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"student hidden size {student.shape[-1]} != teacher hidden size {teacher.shape[-1]}; "
            "project the student first (hidden.loss: tinybert learns the projection)"
        )


def pkd_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None) -> Tensor:
    """Patient KD hidden-state loss (Sun et al. 2019, "Patient Knowledge Distillation for BERT").

    Per position: ``|| h_s / ||h_s|| - h_t / ||h_t|| ||_2^2`` (the paper's squared Euclidean distance
    between L2-normalised vectors, summed over D; equals ``2 - 2 cos``), averaged over masked positions.
    PKD applies it to the [CLS] vector; here every counted token position is used.
    Shapes: hidden ``[B, L, D]``, mask ``[B, L]``. Returns an fp32 scalar.
    """
    _check_hidden(student_hidden, teacher_hidden)
    s = F.normalize(student_hidden.float(), dim=-1)
    t = F.normalize(teacher_hidden.detach().float(), dim=-1)
    return _masked_position_mean((s - t).pow(2).sum(-1), mask)


def cosine_hidden_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None) -> Tensor:
    """DistilBERT cosine embedding loss (Sanh et al. 2019): ``1 - cos(h_s, h_t)`` per position, averaged
    over masked positions. Shapes: hidden ``[B, L, D]``, mask ``[B, L]``. Returns an fp32 scalar."""
    _check_hidden(student_hidden, teacher_hidden)
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.detach().float(), dim=-1)
    return _masked_position_mean(1.0 - cos, mask)


def tinybert_hidden_loss(projected_student: Tensor, teacher_hidden: Tensor, mask: Tensor | None) -> Tensor:
    """TinyBERT hidden-state loss (Jiao et al. 2020): ``MSE(h_s W, h_t)``, W a projection learned with the
    student (the caller applies it, so student and teacher widths may differ).

    Args:
        projected_student: ``[B, L, Dt]``, the student's hidden states times W.
        teacher_hidden: ``[B, L, Dt]``.
        mask: ``[B, L]``.

    Returns:
        fp32 scalar: per position the mean over ``Dt`` of the squared difference, averaged over masked
        positions.
    """
    _check_hidden(projected_student, teacher_hidden)
    per_position = (projected_student.float() - teacher_hidden.detach().float()).pow(2).mean(-1)
    return _masked_position_mean(per_position, mask)


def layer_map(num_student: int, num_teacher: int, strategy: str = "skip") -> list[tuple[int, int]]:
    """Which teacher layer each student layer learns from, as ``[(student_layer, teacher_layer), ...]``.

    Layers are 0-based transformer layers (the output of layer ``i`` is ``hidden_states[i + 1]`` in
    Hugging Face outputs, index 0 being the embeddings). Every student layer is mapped; PKD leaves out
    the last pair because the output is already matched by the logit loss — drop it if you want that.

    * ``"last"`` (PKD-Last, Sun et al. 2019): the teacher's last layers, ``i -> N - M + i``.
      ``layer_map(3, 12, "last") == [(0, 9), (1, 10), (2, 11)]``
    * ``"skip"`` (PKD-Skip; TinyBERT's ``g(m) = m * N / M``): every ``k = N // M``-th layer, ``i -> (i + 1) * k - 1``.
      ``layer_map(3, 12, "skip") == [(0, 3), (1, 7), (2, 11)]``
    * ``"uniform"``: evenly spaced from first to last, ``i -> round(i * (N - 1) / (M - 1))`` (the
      "first + last + evenly spaced" choice used when pruning), ``layer_map(3, 12, "uniform") ==
      [(0, 0), (1, 6), (2, 11)]``; a single student layer maps to the teacher's last.
    """
    if strategy not in LAYER_MAP_STRATEGIES:
        raise ValueError(f"strategy must be one of {LAYER_MAP_STRATEGIES}, got {strategy!r}")
    if not 1 <= num_student <= num_teacher:
        raise ValueError(f"need 1 <= num_student <= num_teacher, got {num_student} and {num_teacher}")
    M, N = num_student, num_teacher
    if strategy == "last":
        return [(i, N - M + i) for i in range(M)]
    if strategy == "skip":
        k = N // M
        return [(i, (i + 1) * k - 1) for i in range(M)]
    if M == 1:
        return [(0, N - 1)]
    # Round half up in integer arithmetic: floor(i * (N - 1) / (M - 1) + 1/2).
    return [(i, (2 * i * (N - 1) + (M - 1)) // (2 * (M - 1))) for i in range(M)]


# ----------------------------------------------------------------------------------------------
# attention losses
# ----------------------------------------------------------------------------------------------


def attention_score_mse(
    student_scores: Tensor,
    teacher_scores: Tensor,
    mask_q: Tensor | None,
    mask_k: Tensor | None,
) -> Tensor:
    """TinyBERT attention-based distillation (Jiao et al. 2020): MSE between attention matrices.

    Args:
        student_scores, teacher_scores: ``[B, H, Lq, Lk]``, same head count (TinyBERT matches head by
            head). Either the pre-softmax scores, as in TinyBERT, or the probabilities Hugging Face
            returns with ``output_attentions=True``.
        mask_q: ``[B, Lq]`` valid query positions; ``mask_k``: ``[B, Lk]`` valid key positions.

    Entries where either score is ``<= -1e4`` (an additive attention mask, e.g. causal) are ignored,
    like TinyBERT's code which zeroes them. Returns the mean squared difference over valid
    ``(query, key)`` pairs and heads, as an fp32 scalar; 0 when nothing is valid.
    """
    if student_scores.dim() != 4 or teacher_scores.dim() != 4:
        raise ValueError(
            f"attention scores must be [B, H, Lq, Lk]; got {tuple(student_scores.shape)} and {tuple(teacher_scores.shape)}"
        )
    if student_scores.shape[1] != teacher_scores.shape[1]:
        raise ValueError(
            f"attention_score_mse needs the same number of heads, got student {student_scores.shape[1]} "
            f"and teacher {teacher_scores.shape[1]}; use relation_kd_loss (MiniLM) for different head counts"
        )
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(f"attention shapes differ: {tuple(student_scores.shape)} vs {tuple(teacher_scores.shape)}")
    B, H, Lq, Lk = student_scores.shape
    s = student_scores.float()
    t = teacher_scores.detach().float()
    valid_q = _bool_mask(mask_q, (B, Lq), s.device, "mask_q")
    valid_k = _bool_mask(mask_k, (B, Lk), s.device, "mask_k")
    valid = (valid_q[:, None, :, None] & valid_k[:, None, None, :]) & (s > -1e4) & (t > -1e4)
    # Zero the ignored entries before subtracting: where() after an inf - inf would leak NaN gradients.
    zero = torch.zeros((), device=s.device)
    diff = torch.where(valid, s, zero) - torch.where(valid, t, zero)
    return diff.pow(2).sum() / valid.sum().clamp(min=1)


def _split_heads(x: Tensor, num_heads: int, name: str) -> Tensor:
    B, L, D = x.shape
    if D % num_heads != 0:
        raise ValueError(f"{name} width {D} is not divisible by num_relation_heads={num_heads}")
    return x.view(B, L, num_heads, D // num_heads).transpose(1, 2)  # [B, H, L, d]


def _log_relation(x: Tensor, y: Tensor, num_heads: int, key_mask: Tensor, name: str) -> Tensor:
    """``log softmax(x_h y_h^T / sqrt(d_h))`` -> ``[B, H, Lx, Ly]``, masked keys at -inf."""
    xh = _split_heads(x.float(), num_heads, f"{name} x")
    yh = _split_heads(y.float(), num_heads, f"{name} y")
    scores = xh @ yh.transpose(-1, -2) / math.sqrt(xh.shape[-1])
    # finfo.min rather than -inf so a row with no valid key stays finite (it is dropped later anyway).
    scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_kd_loss(
    student_x: Tensor,
    teacher_x: Tensor,
    num_relation_heads: int,
    mask: Tensor | None,
    student_y: Tensor | None = None,
    teacher_y: Tensor | None = None,
    mask_y: Tensor | None = None,
) -> Tensor:
    """MiniLM-v2 self-attention relation distillation (Wang et al. 2021, "MiniLMv2").

    Each side's projection output (queries, keys or values of one attention layer) is split into
    ``num_relation_heads`` relation heads, independently of the models' own head counts, so student and
    teacher may differ in width and heads. For each head ``h``:
    ``R = softmax(x_h y_h^T / sqrt(d_h))`` with ``d_h = D / num_relation_heads`` of that side, and
    ``y = x`` by default (query-query, key-key, value-value relations). Pass ``y`` for cross relations,
    e.g. decoder queries against encoder keys of cross-attention.
    Loss: ``KL(R_teacher || R_student)`` per query row, averaged over valid query rows and heads; padded
    key positions are masked out before the softmax.

    Args:
        student_x: ``[B, Lq, Ds]``; teacher_x: ``[B, Lq, Dt]``; ``Ds`` and ``Dt`` divisible by
            ``num_relation_heads``.
        num_relation_heads: number of relation heads.
        mask: ``[B, Lq]`` valid query positions (also the key mask when ``y`` is not given).
        student_y, teacher_y: ``[B, Lk, Ds]`` / ``[B, Lk, Dt]``, optional.
        mask_y: ``[B, Lk]`` valid key positions (default: ``mask`` when ``y`` is ``x``, else all valid).

    Returns:
        fp32 scalar; 0 when no query row is valid.
    """
    if num_relation_heads < 1:
        raise ValueError(f"num_relation_heads must be >= 1, got {num_relation_heads}")
    if (student_y is None) != (teacher_y is None):
        raise ValueError("pass both student_y and teacher_y, or neither")
    _check_hidden(student_x, teacher_x, same_width=False)
    B, Lq = student_x.shape[:2]
    mask_q = _bool_mask(mask, (B, Lq), student_x.device)
    if student_y is None:
        student_y, teacher_y = student_x, teacher_x
        mask_k = mask_q if mask_y is None else _bool_mask(mask_y, (B, Lq), student_x.device, "mask_y")
    else:
        _check_hidden(student_y, teacher_y, same_width=False)
        if student_y.shape[0] != B:
            raise ValueError(f"student_y batch {student_y.shape[0]} != student_x batch {B}")
        mask_k = _bool_mask(mask_y, student_y.shape[:2], student_x.device, "mask_y")

    log_rs = _log_relation(student_x, student_y, num_relation_heads, mask_k, "student")
    log_rt = _log_relation(teacher_x.detach(), teacher_y.detach(), num_relation_heads, mask_k, "teacher")
    r_t = log_rt.exp()
    per_row = _p_log_ratio(r_t, log_rt, log_rs).masked_fill(~mask_k[:, None, None, :], 0.0).sum(-1)  # [B, H, Lq]
    # A query row counts if it is valid and has at least one valid key; every head counts.
    valid_rows = (mask_q[:, None, :] & mask_k.any(-1)[:, None, None]).expand_as(per_row)
    total = torch.where(valid_rows, per_row, torch.zeros((), device=per_row.device)).sum()
    return total / valid_rows.sum().clamp(min=1)
