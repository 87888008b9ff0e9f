"""Distillation losses: pure functions ``(student, teacher, mask, ...) -> scalar tensor``.

Conventions shared by every function here:

* Shapes: ``B`` batch, ``T``/``L`` sequence length, ``V`` vocabulary, ``D`` hidden size, ``H`` heads.
* ``mask`` is ``[B, T]``; true (or non-zero) marks a position that counts. ``None`` means all count.
* Token-level losses (``kd_loss``, ``sparse_kd_loss``, ``logits_mse_loss``, ``cross_entropy_loss``)
  return ``sum over counted tokens / num_tokens``. Pass ``num_tokens`` (e.g. the token count summed
  over all processes and accumulation micro-batches) to get a mean that does not depend on how the
  batch was split; otherwise the local count is used.
* A batch with no counted position gives ``0.0``, never NaN, still connected to the student's graph.
* Gradients flow to the student only; teacher tensors are never differentiated.

Memory: logits are ``B*T*V`` and the vocabulary is large, so every loss on logits runs over the counted
token rows in chunks, upcasting one chunk at a time to fp32. The gradient with respect to the student
logits is computed analytically in the same pass (``_ChunkedRowLoss``), so autograd keeps no per-chunk
softmax: besides the inputs, the only full-size tensor is the gradient buffer autograd would need
anyway, in the student's dtype.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "kd_loss",
    "sparse_kd_loss",
    "logits_mse_loss",
    "cross_entropy_loss",
]

SPARSE_TAILS = ("renormalize", "bucket")

# Elements (rows * vocab) per chunk when chunk_size is None; a chunk holds about four fp32 temporaries
# of this size. On CPU 1 MiB temporaries stay in cache and the Python loop costs little next to the
# math; on accelerators every kernel launch costs microseconds, so chunks are larger (16 MiB).
_CPU_CHUNK_ELEMENTS = 1 << 18
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 22

# Teacher tail masses below this are float rounding of 1 - sum(top-k probabilities), treated as 0.
_TAIL_EPS = 1e-6

# Float32 stand-in for log(0): exp() of it is 0, and p * (log p - log q) stays finite (0 where p = 0)
# instead of 0 * -inf = NaN; NaN inputs still propagate.
_LOG_FLOOR = torch.finfo(torch.float32).min

# A row function gets the full student logits [B, T, V], the flat indices (b * T + t) of some token
# rows and grad_scale, and returns (sum of those rows' losses as an fp32 scalar, gradient of that sum
# with respect to the rows' raw student logits [n, V] fp32 multiplied by grad_scale, or None when
# grad_scale is None). The row function takes the rows itself so that its copies die early.
RowFn = Callable[[Tensor, Tensor, "float | None"], "tuple[Tensor, Tensor | None]"]


# ----------------------------------------------------------------------------------------------
# chunked machinery
# ----------------------------------------------------------------------------------------------


def _bool_mask(mask: Tensor | None, shape: Sequence[int], device: torch.device, name: str = "mask") -> Tensor:
    if mask is None:
        return torch.ones(tuple(shape), dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    return mask.to(device=device, dtype=torch.bool)


def _rows_per_chunk(chunk_size: int | None, logits: Tensor) -> int:
    if chunk_size is None:
        budget = _CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else _ACCELERATOR_CHUNK_ELEMENTS
        return max(1, budget // max(logits.shape[-1], 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (token rows per chunk), got {chunk_size}")
    return int(chunk_size)


def _denominator(num_tokens: float | None, mask: Tensor) -> float:
    # A Python number on purpose: the loss scale must not depend on autograd.
    if num_tokens is not None:
        return float(num_tokens)
    return float(mask.sum().item())


def _take_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x.flatten(0, 1)[idx]`` for ``x`` of shape ``[B, T, ...]``, copying only those rows.

    A fast ``index_select`` on a view when ``B`` and ``T`` merge without a copy; advanced indexing
    otherwise (e.g. the non-contiguous ``logits[:, :-1]`` of a causal shift).
    """
    if x.stride(0) == x.shape[1] * x.stride(1):
        return x.flatten(0, 1).index_select(0, idx)
    return x[idx // x.shape[1], idx % x.shape[1]]


def _run_chunks(
    student_logits: Tensor, idx: Tensor, row_fn: RowFn, rows_per_chunk: int, denom: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Sum ``row_fn`` over the flat row indices ``idx`` chunk by chunk, divided by ``denom``."""
    total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    # Masked positions get exactly zero gradient, so the buffer starts at zero.
    grad = None
    if need_grad:
        grad = torch.zeros(student_logits.shape, dtype=student_logits.dtype, device=student_logits.device)
    if idx.numel() == 0 or denom == 0:
        return total, grad
    for start in range(0, idx.numel(), rows_per_chunk):
        chunk = idx[start : start + rows_per_chunk]
        loss_sum, grad_rows = row_fn(student_logits, chunk, 1.0 / denom if need_grad else None)
        total += loss_sum
        if need_grad:
            grad.view(-1, grad.shape[-1]).index_copy_(0, chunk, grad_rows.to(grad.dtype))
    return total / denom, grad


def _log_softmax_rows(logits: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """``log_softmax(rows / temperature)`` of the chosen rows as a fresh fp32 ``[n, V]`` tensor.

    The upcast to fp32 happens here, one chunk at a time.
    """
    x = _take_rows(logits, idx).float()
    if temperature != 1.0:
        x.div_(temperature)  # x is a fresh copy
    return F.log_softmax(x, dim=-1)


class _ChunkedRowLoss(torch.autograd.Function):
    """Loss over token rows whose gradient is computed in the forward pass, chunk by chunk.

    Only the gradient buffer (shape and dtype of the student logits) is kept for backward, so peak
    memory does not grow with the number of chunks. The buffer is scaled in place by the upstream
    gradient, hence backward can run only once through this node (no ``retain_graph`` re-use).
    """

    @staticmethod
    def forward(ctx, student_logits, idx, row_fn, rows_per_chunk, denom):  # noqa: D102
        loss, grad = _run_chunks(student_logits, idx, row_fn, rows_per_chunk, denom, need_grad=True)
        ctx.grad = grad
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "nlgkd chunked loss: backward ran twice through the same loss; its gradient is "
                "precomputed and consumed by the first backward (do not use retain_graph through it)"
            )
        ctx.grad = None
        grad.mul_(grad_output.to(grad.dtype))
        return grad, None, None, None, None


def _chunked_loss(
    student_logits: Tensor, mask: Tensor, row_fn: RowFn, chunk_size: int | None, num_tokens: float | None
) -> Tensor:
    idx = mask.flatten().nonzero().squeeze(1)  # flat b * T + t of the counted tokens
    denom = _denominator(num_tokens, mask)
    rows_per_chunk = _rows_per_chunk(chunk_size, student_logits)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        return _ChunkedRowLoss.apply(student_logits, idx, row_fn, rows_per_chunk, denom)
    with torch.no_grad():
        return _run_chunks(student_logits, idx, row_fn, rows_per_chunk, denom, need_grad=False)[0]


def _check_logits(student_logits: Tensor, other: Tensor, other_name: str) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    if other.shape != student_logits.shape:
        hint = ""
        if other.shape[:-1] == student_logits.shape[:-1]:
            hint = " (teacher and student vocabularies differ: align them before distilling)"
        raise ValueError(
            f"{other_name} has shape {tuple(other.shape)}, student_logits {tuple(student_logits.shape)}{hint}"
        )
    if other.device != student_logits.device:
        raise ValueError(f"{other_name} is on {other.device} but student_logits on {student_logits.device}")


def _p_log_ratio(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """``p * (log_p - log_q)`` elementwise, with 0 where ``p == 0`` (avoids 0 * -inf = NaN)."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=p.dtype, device=p.device))


# ----------------------------------------------------------------------------------------------
# logit losses
# ----------------------------------------------------------------------------------------------


# The divergences of `kd_loss`, one per recipe word (distill's `divergence:`). Each takes a chunk of tempered
# log-probabilities, student ``log_ps`` and teacher ``log_pt`` (``[n, V]`` fp32, floored at _LOG_FLOOR; both
# may be overwritten) and returns (the divergence summed over the n rows, and, when ``want_grad``, its
# gradient with respect to the student's tempered logits ``s``, ``[n, V]``). In place where possible: a
# chunk holds about four ``[n, V]`` fp32 tensors at its peak.
def forward_kl(log_ps: Tensor, log_pt: Tensor, want_grad: bool, beta: float) -> tuple[Tensor, Tensor | None]:
    """``KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)``: mode covering (Hinton et al.). ``beta`` unused."""
    p_t = log_pt.exp()
    loss_sum = log_pt.sub_(log_ps).mul_(p_t).sum()
    del log_pt
    grad = log_ps.exp_().sub_(p_t) if want_grad else None  # d/ds KL(p_t || softmax(s)) = p_s - p_t
    return loss_sum, grad


def reverse_kl(log_ps: Tensor, log_pt: Tensor, want_grad: bool, beta: float) -> tuple[Tensor, Tensor | None]:
    """``KL(p_s || p_t)``: mode seeking. ``beta`` unused."""
    p_s = log_ps.exp()
    f = log_pt.neg_().add_(log_ps)  # log p_s - log p_t
    per_row = (p_s * f).sum(-1)
    grad = f.sub_(per_row[:, None]).mul_(p_s) if want_grad else None  # d/ds sum_v p_s f_v = p_s * (f - KL)
    return per_row.sum(), grad


def jsd(log_ps: Tensor, log_pt: Tensor, want_grad: bool, beta: float) -> tuple[Tensor, Tensor | None]:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024):
    ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` with ``m = beta * p_t + (1 - beta) * p_s``."""
    p_s, p_t = log_ps.exp(), log_pt.exp()
    log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log(1.0 - beta))
    kl_t = log_pt.sub_(log_m).mul_(p_t).sum(-1)
    del p_t, log_pt
    log_s_m = log_ps.sub_(log_m)  # log p_s - log m
    del log_m
    kl_s = (p_s * log_s_m).sum(-1)
    loss_sum = (beta * kl_t + (1.0 - beta) * kl_s).sum()
    grad = None
    if want_grad:
        # dJSD/dp_s = (1 - beta) log(p_s / m); through the softmax: p_s * (g - sum_v p_s g_v)
        grad = log_s_m.sub_(kl_s[:, None]).mul_(p_s).mul_(1.0 - beta)
    return loss_sum, grad


DIVERGENCES: dict[str, Callable[[Tensor, Tensor, bool, float], tuple[Tensor, Tensor | None]]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
}


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | Sequence[Tensor],
    mask: Tensor | None,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    num_tokens: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Word-level knowledge distillation on logits (Hinton et al. 2015; Kim & Rush 2016, word-level KD).
    (Long for its docstring, the formula of every option; the code is one chunked pass over the tokens.)

    Args:
        student_logits: ``[B, T, V]``, any float dtype; the only tensor that receives gradients.
        teacher_logits: ``[B, T, V]``, or a list of them for a teacher ensemble (MT-DNN distillation,
            Liu et al. 2019): the target is then the AVERAGE of the teachers' tempered probability
            distributions, ``p_t = mean_i softmax(z_i / T)``. bf16/fp16 is fine (upcast per chunk).
        mask: ``[B, T]``, true where the token counts (``None``: all).
        temperature: ``T``. Both sides use ``softmax(logits / T)``; every divergence is multiplied by
            ``T**2`` so gradient magnitudes do not shrink as ``T`` grows (Hinton et al.).
        divergence, with ``p_s``/``p_t`` the tempered student/teacher distributions over the vocabulary:
            * ``"forward_kl"``: ``KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)`` (mode covering).
            * ``"reverse_kl"``: ``KL(p_s || p_t)`` (mode seeking).
            * ``"jsd"``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, and TRL's
              ``generalized_jsd_loss``): ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` with
              ``m = beta * p_t + (1 - beta) * p_s``; ``beta = 0.5`` is the usual JSD. ``0 < beta < 1``
              is required: at the end points this quantity is identically 0 (use the KLs instead).
        beta: JSD weight, see above.
        num_tokens: denominator (e.g. global token count under DDP); default ``mask.sum()``.
        chunk_size: token rows per chunk; default ``None`` picks ``2**18 // V`` rows on CPU (1 MiB per
            fp32 temporary) and ``2**22 // V`` on accelerators (16 MiB). Never changes the result
            beyond float rounding.

    Returns:
        fp32 scalar: ``T**2 * sum over counted tokens of the divergence / num_tokens``.
    """
    teachers = list(teacher_logits) if isinstance(teacher_logits, (list, tuple)) else [teacher_logits]
    if not teachers:
        raise ValueError("teacher_logits is an empty list")
    for i, t in enumerate(teachers):
        _check_logits(student_logits, t, f"teacher_logits[{i}]" if len(teachers) > 1 else "teacher_logits")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {tuple(DIVERGENCES)}, got {divergence!r}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta} (beta 0 or 1 makes the JSD identically 0)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    mask = _bool_mask(mask, student_logits.shape[:2], student_logits.device)
    teachers = [t.detach() for t in teachers]
    T = float(temperature)
    log_n = math.log(len(teachers))

    def teacher_log_probs(idx: Tensor) -> Tensor:
        log_pt = _log_softmax_rows(teachers[0], idx, T)
        # Ensemble: log of the mean of probabilities, accumulated one teacher chunk at a time.
        for other in teachers[1:]:
            log_pt = torch.logaddexp(log_pt, _log_softmax_rows(other, idx, T))
        return log_pt.sub_(log_n) if len(teachers) > 1 else log_pt

    # In place where possible: a chunk holds about four [n, V] fp32 tensors at its peak. Log-probs are
    # floored at _LOG_FLOOR so that tokens with zero probability contribute 0, not NaN.
    def row_fn(logits: Tensor, idx: Tensor, grad_scale: float | None):
        # passed without a name here, so the divergence can free them as it goes (their only reference)
        loss_sum, grad = DIVERGENCES[divergence](_log_softmax_rows(logits, idx, T).clamp_(min=_LOG_FLOOR),
                                                 teacher_log_probs(idx).clamp_(min=_LOG_FLOOR),
                                                 grad_scale is not None, beta)
        # Loss is T^2 * D(softmax(z / T)); dz = ds / T, so the raw-logit gradient carries T^2 / T = T.
        if grad is not None:
            grad.mul_(T * grad_scale)
        return loss_sum * (T * T), grad

    return _chunked_loss(student_logits, mask, row_fn, chunk_size, num_tokens)


def sparse_kd_loss(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    mask: Tensor | None,
    temperature: float = 1.0,
    tail: str = "renormalize",
    num_tokens: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Word-level KD from a teacher's top-k log-probabilities (cached logits or an API teacher).
    (Long for its docstring, the tail options' formulas; the code is one chunked pass over the tokens.)

    Args:
        student_logits: ``[B, T, V]``.
        teacher_topk_logprobs: ``[B, T, k]`` teacher log-probabilities (at temperature 1) of the kept ids.
        teacher_topk_ids: ``[B, T, k]`` long, student-vocabulary ids; ``-1`` marks padding entries (fewer
            than ``k`` ids available) and is ignored. Ids within a row are assumed distinct.
        mask: ``[B, T]``.
        temperature: ``T``; ``p_s = softmax(z_s / T)`` over the full vocabulary; losses are scaled by ``T**2``.
        tail: what to do with the teacher mass outside the top-k:
            * ``"renormalize"``: the target is the teacher restricted to the kept ids,
              ``q = softmax(logprobs / T)`` over them (exactly the tempered teacher renormalized on those
              ids). Loss ``= T**2 * sum_j q_j (log q_j - log p_s(id_j))``: the cross-entropy against
              ``q`` minus ``q``'s entropy. With ``k = V`` this is exactly ``kd_loss`` forward KL.
            * ``"bucket"``: a KL over ``k + 1`` outcomes, the kept ids plus one "everything else" bucket.
              Teacher: ``softmax([logprobs, log(1 - sum exp(logprobs))] / T)``; the bucket is tempered as
              one lumped outcome because the individual tail probabilities are unknown (exact at
              ``T = 1``); a tail below 1e-6 (rounding of ``1 - sum``) or with no vocabulary entry
              left outside the kept ids counts as 0. Student: ``p_s(id_j)`` and its total mass outside
              the kept ids. Loss ``= T**2 * KL(teacher_{k+1} || student_{k+1})``; a student equal to the
              teacher gives 0 for any ``k``.
        num_tokens: denominator; default ``mask.sum()``.
        chunk_size: token rows per chunk (see ``kd_loss``).

    Returns:
        fp32 scalar.
    """
    if tail not in SPARSE_TAILS:
        raise ValueError(f"tail must be one of {SPARSE_TAILS}, got {tail!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape or teacher_topk_ids.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"teacher_topk_logprobs {tuple(teacher_topk_logprobs.shape)} and teacher_topk_ids "
            f"{tuple(teacher_topk_ids.shape)} must both be [B, T, k] with [B, T] = {tuple(student_logits.shape[:2])}"
        )
    vocab = student_logits.shape[-1]
    if teacher_topk_ids.numel() and int(teacher_topk_ids.max()) >= vocab:
        raise ValueError(f"teacher_topk_ids contains id {int(teacher_topk_ids.max())} >= student vocab size {vocab}")
    mask = _bool_mask(mask, student_logits.shape[:2], student_logits.device)
    all_logprobs = teacher_topk_logprobs.detach().to(student_logits.device)
    all_ids = teacher_topk_ids.detach().to(student_logits.device, torch.long)
    T = float(temperature)

    def row_fn(logits: Tensor, idx: Tensor, grad_scale: float | None):
        need_grad = grad_scale is not None
        log_ps = _log_softmax_rows(logits, idx, T)  # [n, V]
        ids = _take_rows(all_ids, idx)  # [n, k]
        valid = ids >= 0
        safe_ids = ids.clamp(min=0)
        logprobs = _take_rows(all_logprobs, idx).float().masked_fill(~valid, float("-inf"))
        log_ps_k = log_ps.gather(-1, safe_ids)
        zero = torch.zeros((), device=log_ps.device)

        if tail == "renormalize":
            # A row without any valid id gets q = 0 (log_softmax of all -inf is NaN; where() drops it).
            log_q = F.log_softmax(logprobs / T, dim=-1)
            q = torch.where(valid, log_q.exp(), zero)
            per_row = torch.where(q > 0, q * (log_q - log_ps_k), zero).sum(-1)
            grad_s = None
            if need_grad:
                # d/ds [-sum_j q_j log p_s(id_j)] = p_s * sum_j q_j - scatter(q)
                grad_s = log_ps.exp() * q.sum(-1, keepdim=True)
                grad_s.scatter_add_(-1, safe_ids, -q).mul_(T * grad_scale)
            return per_row.sum() * (T * T), grad_s

        # bucket: k kept outcomes + 1 tail outcome.
        # Which vocabulary entries are kept (scatter_add so padding entries pointing at id 0 cannot clear it).
        in_topk = torch.zeros_like(log_ps).scatter_add_(-1, safe_ids, valid.float()) > 0
        teacher_tail = 1.0 - logprobs.exp().sum(-1)
        # Rounding noise in the sum would be amplified by the temperature (1e-7 ** (1/2) = 3e-4), and an
        # empty bucket (the kept ids cover the vocabulary) must have no mass.
        empty = teacher_tail < _TAIL_EPS
        empty |= in_topk.all(-1)
        teacher_tail = teacher_tail.masked_fill(empty, 0.0)
        log_Q = F.log_softmax(torch.cat([logprobs, teacher_tail.log()[:, None]], dim=-1) / T, dim=-1)
        Q = log_Q.exp()  # padding entries are exp(-inf) = 0
        log_ps_tail = torch.logsumexp(log_ps.masked_fill(in_topk, float("-inf")), dim=-1)
        log_P = torch.cat([log_ps_k.masked_fill(~valid, float("-inf")), log_ps_tail[:, None]], dim=-1)
        per_row = torch.where(Q > 0, Q * (log_Q - log_P), zero).sum(-1)
        grad_s = None
        if need_grad:
            # d/ds_v KL = p_s(v) * (sum_o Q_o - Q_o(v) / P_o(v)), with sum_o Q_o = 1:
            # kept id j: p_s(v) - Q_j; tail entry: p_s(v) * (1 - Q_tail / P_tail).
            p_s = log_ps.exp()
            tail_ratio = torch.where(Q[:, -1] > 0, (log_Q[:, -1] - log_ps_tail).exp(), zero)
            grad_s = p_s - torch.where(in_topk, zero, p_s * tail_ratio[:, None])
            grad_s.scatter_add_(-1, safe_ids, -Q[:, :-1]).mul_(T * grad_scale)
        return per_row.sum() * (T * T), grad_s

    return _chunked_loss(student_logits, mask, row_fn, chunk_size, num_tokens)


def logits_mse_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    num_tokens: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Mean squared error between raw logits (Tang et al. 2019, "Distilling task-specific knowledge from
    BERT into simple neural networks").

    Per token: ``sum_v (z_s - z_t)**2 / V`` (the paper sums over classes; dividing by ``V`` keeps the
    scale independent of the vocabulary size). Summed over counted tokens, divided by ``num_tokens``
    (default ``mask.sum()``). Shapes: logits ``[B, T, V]``, mask ``[B, T]``. Returns an fp32 scalar.
    """
    _check_logits(student_logits, teacher_logits, "teacher_logits")
    mask = _bool_mask(mask, student_logits.shape[:2], student_logits.device)
    teacher = teacher_logits.detach()
    vocab = student_logits.shape[-1]

    def row_fn(logits: Tensor, idx: Tensor, grad_scale: float | None):
        diff = _take_rows(logits, idx).float() - _take_rows(teacher, idx).float()
        loss_sum = diff.pow(2).sum() / vocab
        return loss_sum, (diff.mul_(2.0 / vocab * grad_scale) if grad_scale is not None else None)

    return _chunked_loss(student_logits, mask, row_fn, chunk_size, num_tokens)


def cross_entropy_loss(
    logits: Tensor,
    labels: Tensor,
    num_tokens: float | None = None,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Token cross-entropy, ``sum over labelled tokens / num_tokens``. Not ``F.cross_entropy``: that keeps a
    ``[B*T, V]`` fp32 log-softmax for the backward (gigabytes at a 250k vocabulary in bf16 training); this runs
    in chunks like the KD losses and keeps only the gradient (a test checks it equals ``F.cross_entropy``).

    Args:
        logits: ``[B, T, V]`` (computed in fp32 one chunk at a time, like the KD losses).
        labels: ``[B, T]`` long; ``-100`` is ignored.
        num_tokens: denominator; default the number of labels that are not ``-100``.
        label_smoothing: ``eps``; per token ``(1 - eps) * -log p_y + eps * mean_v(-log p_v)``, the same
            definition as ``torch.nn.functional.cross_entropy``.
        chunk_size: token rows per chunk (see ``kd_loss``).

    Returns:
        fp32 scalar (0.0 when every label is ``-100``).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and labels [B, T]; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    labels = labels.to(logits.device)
    mask = labels != -100
    vocab = logits.shape[-1]
    if mask.any() and (int(labels[mask].max()) >= vocab or int(labels[mask].min()) < 0):
        raise ValueError(f"labels must be in [0, {vocab}) or -100")
    eps = float(label_smoothing)

    def row_fn(logits_: Tensor, idx: Tensor, grad_scale: float | None):
        log_p = _log_softmax_rows(logits_, idx, 1.0)
        y = _take_rows(labels, idx)[:, None]
        per_row = -log_p.gather(-1, y).squeeze(-1)
        if eps > 0:
            per_row = (1.0 - eps) * per_row - eps * log_p.mean(-1)
        grad = None
        if grad_scale is not None:
            # d/dz = softmax(z) - target, target = (1 - eps) * onehot(y) + eps / V
            grad = log_p.exp_()
            if eps > 0:
                grad.sub_(eps / vocab)
            grad.scatter_add_(-1, y, torch.full_like(y, -(1.0 - eps), dtype=grad.dtype)).mul_(grad_scale)
        return per_row.sum(), grad

    return _chunked_loss(logits, mask, row_fn, chunk_size, num_tokens)
