"""Every loss in nlgkd.losses against a slow, obviously correct reference written here (loops over
tokens, float64), plus the properties a distillation loss must have."""

import math

import pytest
import torch
import torch.nn.functional as F

from nlgkd import feature_losses, losses

B, T, V = 3, 5, 11


def _rand(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _mask(seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    m = torch.rand(B, T, generator=g) > 0.3
    m[0, 0] = True
    m[1, :] = False  # a fully padded sequence
    return m


def _student(seed=0):
    return _rand(B, T, V, seed=seed).requires_grad_(True)


# ------------------------------------------------------------------ reference formulas


def ref_divergence(p_t, p_s, divergence, beta=0.5):
    def kl(p, q):
        return sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in range(len(p)) if p[v] > 0)

    if divergence == "forward_kl":
        return kl(p_t, p_s)
    if divergence == "reverse_kl":
        return kl(p_s, p_t)
    m = [beta * p_t[v] + (1 - beta) * p_s[v] for v in range(len(p_t))]
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


def ref_kd(student, teachers, mask, temperature, divergence, beta=0.5, num_tokens=None):
    """Loop over tokens; ensemble target = average of tempered teacher probabilities."""
    teachers = teachers if isinstance(teachers, list) else [teachers]
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[b, t]:
                continue
            count += 1
            p_s = torch.softmax(student[b, t].double() / temperature, -1).tolist()
            probs = [torch.softmax(te[b, t].double() / temperature, -1) for te in teachers]
            p_t = (sum(probs) / len(probs)).tolist()
            total += ref_divergence(p_t, p_s, divergence, beta) * temperature**2
    denom = num_tokens if num_tokens is not None else count
    return total / denom if denom else 0.0


def ref_kd_autograd(student, teachers, mask, temperature, divergence, beta=0.5):
    """The same formula in plain differentiable torch (float64), for reference gradients."""
    teachers = teachers if isinstance(teachers, list) else [teachers]
    s = student.double()
    log_ps = torch.log_softmax(s / temperature, -1)
    p_t = sum(torch.softmax(te.double() / temperature, -1) for te in teachers) / len(teachers)
    p_s = log_ps.exp()
    if divergence == "forward_kl":
        per = (p_t * (p_t.log() - log_ps)).sum(-1)
    elif divergence == "reverse_kl":
        per = (p_s * (log_ps - p_t.log())).sum(-1)
    else:
        m = beta * p_t + (1 - beta) * p_s
        per = beta * (p_t * (p_t.log() - m.log())).sum(-1) + (1 - beta) * (p_s * (log_ps - m.log())).sum(-1)
    return (per * mask).sum() * temperature**2 / mask.sum()


def _grad(fn, student):
    student.grad = None
    fn().backward()
    return student.grad.clone()


# ------------------------------------------------------------------ kd_loss


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_loss_matches_reference_value_and_grad(divergence, temperature):
    s, t, mask = _student(), _rand(B, T, V, seed=1), _mask()
    got = losses.kd_loss(s, t, mask, temperature=temperature, divergence=divergence, beta=0.3)
    want = ref_kd(s.detach(), t, mask, temperature, divergence, beta=0.3)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    got_grad = _grad(lambda: losses.kd_loss(s, t, mask, temperature, divergence, beta=0.3), s)
    want_grad = _grad(lambda: ref_kd_autograd(s, t, mask, temperature, divergence, beta=0.3), s)
    torch.testing.assert_close(got_grad, want_grad.float(), rtol=1e-4, atol=1e-6)
    assert (got_grad[~mask] == 0).all()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_loss_ensemble_matches_reference(divergence):
    s, mask = _student(), _mask()
    teachers = [_rand(B, T, V, seed=i) for i in (1, 2, 3)]
    got = losses.kd_loss(s, teachers, mask, temperature=2.0, divergence=divergence)
    assert got.item() == pytest.approx(ref_kd(s.detach(), teachers, mask, 2.0, divergence), rel=1e-5)
    got_grad = _grad(lambda: losses.kd_loss(s, teachers, mask, 2.0, divergence), s)
    want_grad = _grad(lambda: ref_kd_autograd(s, teachers, mask, 2.0, divergence), s)
    torch.testing.assert_close(got_grad, want_grad.float(), rtol=1e-4, atol=1e-6)


def test_kd_loss_ensemble_of_identical_teachers_equals_one_teacher():
    s, t, mask = _student(), _rand(B, T, V, seed=1), _mask()
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        one = losses.kd_loss(s, t, mask, 2.0, divergence)
        three = losses.kd_loss(s, [t, t.clone(), t.clone()], mask, 2.0, divergence)
        assert three.item() == pytest.approx(one.item(), rel=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_loss_identical_distributions_give_zero(divergence):
    s, mask = _student(), _mask()
    # Shifted logits give the same softmax.
    loss = losses.kd_loss(s, s.detach() + 7.0, mask, temperature=3.0, divergence=divergence)
    assert abs(loss.item()) < 1e-5
    loss.backward()
    assert s.grad.abs().max() < 1e-5


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_loss_all_masked_is_zero_with_grad_fn(divergence):
    s, t = _student(), _rand(B, T, V, seed=1)
    loss = losses.kd_loss(s, t, torch.zeros(B, T, dtype=torch.bool), divergence=divergence)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert loss.grad_fn is not None
    loss.backward()
    assert s.grad is not None and (s.grad == 0).all()


def test_kd_loss_gradients_reach_student_only():
    s = _student()
    t = _rand(B, T, V, seed=1).requires_grad_(True)
    losses.kd_loss(s, [t, t * 2], _mask(), temperature=2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kd_loss_temperature_scaling():
    # T^2 * KL(softmax(z_t) || softmax(z_s)) with logits scaled by T is the T = 1 loss times T^2.
    s, t, mask = _student(), _rand(B, T, V, seed=1), _mask()
    at_one = losses.kd_loss(s, t, mask, temperature=1.0)
    at_four = losses.kd_loss(s * 4.0, t * 4.0, mask, temperature=4.0)
    assert at_four.item() == pytest.approx(16.0 * at_one.item(), rel=1e-5)
    # A higher temperature flattens both distributions: the unscaled divergence shrinks.
    assert losses.kd_loss(s, t, mask, temperature=10.0).item() / 100.0 < at_one.item()


def test_kd_loss_num_tokens_is_the_denominator():
    s, t, mask = _student(), _rand(B, T, V, seed=1), _mask()
    default = losses.kd_loss(s, t, mask)
    given = losses.kd_loss(s, t, mask, num_tokens=100)
    assert given.item() == pytest.approx(default.item() * mask.sum().item() / 100, rel=1e-6)
    assert given.item() == pytest.approx(ref_kd(s.detach(), t, mask, 1.0, "forward_kl", num_tokens=100), rel=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_loss_chunked_equals_unchunked(divergence):
    s, mask = _student(), _mask()
    teachers = [_rand(B, T, V, seed=1), _rand(B, T, V, seed=2)]
    small = losses.kd_loss(s, teachers, mask, 2.0, divergence, chunk_size=3)
    huge = losses.kd_loss(s, teachers, mask, 2.0, divergence, chunk_size=10**9)
    assert small.item() == pytest.approx(huge.item(), rel=1e-6)
    g_small = _grad(lambda: losses.kd_loss(s, teachers, mask, 2.0, divergence, chunk_size=3), s)
    g_huge = _grad(lambda: losses.kd_loss(s, teachers, mask, 2.0, divergence, chunk_size=10**9), s)
    torch.testing.assert_close(g_small, g_huge)


def test_kd_loss_low_precision_teacher_and_non_contiguous_student():
    s_full, mask = _rand(B, T + 1, V).requires_grad_(True), _mask()
    s = s_full[:, :-1]  # the usual causal shift: a non-contiguous view
    assert not s.is_contiguous()
    t = _rand(B, T, V, seed=1).to(torch.bfloat16)
    got = losses.kd_loss(s, t, mask, temperature=2.0)
    want = ref_kd(s.detach(), t.float(), mask, 2.0, "forward_kl")
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert s_full.grad[:, -1].abs().sum() == 0 and s_full.grad.abs().sum() > 0


def test_kd_loss_bf16_student_gets_bf16_grad_and_fp32_loss():
    s = _rand(B, T, V).to(torch.bfloat16).requires_grad_(True)
    t, mask = _rand(B, T, V, seed=1), _mask()
    loss = losses.kd_loss(s, t, mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_kd(s.detach().float(), t, mask, 1.0, "forward_kl"), rel=1e-5)
    loss.backward()
    assert s.grad.dtype == torch.bfloat16


def test_kd_loss_upstream_gradient_scales_and_no_grad_mode():
    s, t, mask = _student(), _rand(B, T, V, seed=1), _mask()
    g1 = _grad(lambda: losses.kd_loss(s, t, mask), s)
    g3 = _grad(lambda: 3.0 * losses.kd_loss(s, t, mask), s)
    torch.testing.assert_close(g3, 3.0 * g1)
    with torch.no_grad():
        value = losses.kd_loss(s, t, mask)
    assert value.grad_fn is None
    assert value.item() == pytest.approx(losses.kd_loss(s, t, mask).item())


def test_kd_loss_second_backward_is_a_clear_error():
    # The gradient is computed in the forward pass and consumed by the first backward.
    s, t, mask = _student(), _rand(B, T, V, seed=1), _mask()
    loss = losses.kd_loss(s, t, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_kd_loss_rejects_bad_arguments():
    s, t, mask = _student(), _rand(B, T, V, seed=1), _mask()
    with pytest.raises(ValueError, match="divergence"):
        losses.kd_loss(s, t, mask, divergence="kl")
    with pytest.raises(ValueError, match="beta"):
        losses.kd_loss(s, t, mask, divergence="jsd", beta=0.0)
    with pytest.raises(ValueError, match="vocabularies differ"):
        losses.kd_loss(s, _rand(B, T, V + 1), mask)


# ------------------------------------------------------------------ sparse_kd_loss


def _topk(teacher, k, pad_rows=()):
    logprobs = torch.log_softmax(teacher, -1)
    values, ids = logprobs.topk(k, dim=-1)
    for b, t, n_valid in pad_rows:  # fewer than k ids available: -1 padding
        ids[b, t, n_valid:] = -1
        values[b, t, n_valid:] = 0.0
    return values, ids


def ref_sparse(student, logprobs, ids, mask, temperature, tail):
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[b, t]:
                continue
            count += 1
            p_s = torch.softmax(student[b, t].double() / temperature, -1)
            kept = [(int(i), float(lp)) for i, lp in zip(ids[b, t], logprobs[b, t]) if i >= 0]
            if tail == "renormalize":
                w = [math.exp(lp / temperature) for _, lp in kept]
                q = [x / sum(w) for x in w]
                row = sum(qj * (math.log(qj) - math.log(p_s[i])) for qj, (i, _) in zip(q, kept) if qj > 0)
            else:
                tail_mass = max(0.0, 1.0 - sum(math.exp(lp) for _, lp in kept))
                w = [math.exp(lp / temperature) for _, lp in kept] + [tail_mass ** (1 / temperature)]
                Q = [x / sum(w) for x in w]
                P = [float(p_s[i]) for i, _ in kept]
                P.append(1.0 - sum(P))
                row = sum(Qo * (math.log(Qo) - math.log(Po)) for Qo, Po in zip(Q, P) if Qo > 0)
            total += row * temperature**2
    return total / count if count else 0.0


def ref_sparse_autograd(student, logprobs, ids, mask, temperature, tail):
    """Differentiable float64 version (dense scatter of the top-k) for reference gradients."""
    log_ps = torch.log_softmax(student.double() / temperature, -1)
    valid = ids >= 0
    safe = ids.clamp(min=0)
    lp = logprobs.double().masked_fill(~valid, float("-inf"))
    log_ps_k = log_ps.gather(-1, safe)
    if tail == "renormalize":
        q = torch.softmax(lp / temperature, -1)
        per = torch.where(q > 0, q * (q.log() - log_ps_k), torch.zeros(())).sum(-1)
    else:
        tail_mass = (1 - lp.exp().sum(-1)).clamp(min=0)
        Q = torch.softmax(torch.cat([lp, tail_mass.log()[..., None]], -1) / temperature, -1)
        P_k = torch.where(valid, log_ps_k.exp(), torch.zeros(()))
        P = torch.cat([P_k, (1 - P_k.sum(-1, keepdim=True))], -1)
        per = torch.where(Q > 0, Q * (Q.log() - P.clamp_min(1e-300).log()), torch.zeros(())).sum(-1)
    return (per * mask).sum() * temperature**2 / mask.sum()


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kd_matches_reference_with_padding(tail, temperature):
    s, mask = _student(), _mask()
    logprobs, ids = _topk(_rand(B, T, V, seed=1), k=4, pad_rows=[(0, 0, 2), (2, 1, 1)])
    mask[2, 1] = True
    got = losses.sparse_kd_loss(s, logprobs, ids, mask, temperature=temperature, tail=tail)
    want = ref_sparse(s.detach(), logprobs, ids, mask, temperature, tail)
    assert got.item() == pytest.approx(want, rel=1e-5)
    g = _grad(lambda: losses.sparse_kd_loss(s, logprobs, ids, mask, temperature, tail), s)
    g_ref = _grad(lambda: ref_sparse_autograd(s, logprobs, ids, mask, temperature, tail), s)
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_sparse_kd_with_full_vocab_equals_dense_forward_kl(tail):
    s, t, mask = _student(), _rand(B, T, V, seed=1), _mask()
    logprobs, ids = _topk(t, k=V)
    sparse = losses.sparse_kd_loss(s, logprobs, ids, mask, temperature=2.0, tail=tail)
    dense = losses.kd_loss(s, t, mask, temperature=2.0)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)
    g_sparse = _grad(lambda: losses.sparse_kd_loss(s, logprobs, ids, mask, 2.0, tail), s)
    g_dense = _grad(lambda: losses.kd_loss(s, t, mask, 2.0), s)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-6)


def test_sparse_kd_chunked_all_masked_and_student_only():
    s, mask = _student(), _mask()
    logprobs, ids = _topk(_rand(B, T, V, seed=1), k=3, pad_rows=[(0, 0, 1)])
    logprobs.requires_grad_(True)
    for tail in ("renormalize", "bucket"):
        small = _grad(lambda: losses.sparse_kd_loss(s, logprobs, ids, mask, 2.0, tail, chunk_size=3), s)
        huge = _grad(lambda: losses.sparse_kd_loss(s, logprobs, ids, mask, 2.0, tail, chunk_size=10**9), s)
        torch.testing.assert_close(small, huge)
        zero = losses.sparse_kd_loss(s, logprobs, ids, torch.zeros(B, T, dtype=torch.bool), tail=tail)
        assert zero.item() == 0.0 and zero.grad_fn is not None
        zero.backward()
    assert logprobs.grad is None
    with pytest.raises(ValueError, match="tail"):
        losses.sparse_kd_loss(s, logprobs, ids, mask, tail="drop")


def test_sparse_kd_identical_distribution_gives_zero_for_bucket():
    # With the tail as one bucket, a student equal to the teacher has zero loss even for k < V.
    s, mask = _student(), _mask()
    logprobs, ids = _topk(s.detach(), k=3)
    assert abs(losses.sparse_kd_loss(s, logprobs, ids, mask, tail="bucket").item()) < 1e-5


# ------------------------------------------------------------------ logits_mse_loss, cross_entropy_loss


def test_logits_mse_matches_reference_and_chunks():
    s, t, mask = _student(), _rand(B, T, V, seed=1), _mask()
    total, count = 0.0, 0
    for b in range(B):
        for p in range(T):
            if mask[b, p]:
                count += 1
                total += sum((float(s.detach()[b, p, v]) - float(t[b, p, v])) ** 2 for v in range(V)) / V
    assert losses.logits_mse_loss(s, t, mask).item() == pytest.approx(total / count, rel=1e-5)
    g = _grad(lambda: losses.logits_mse_loss(s, t, mask, chunk_size=2), s)
    g_ref = _grad(lambda: (((s - t) ** 2).mean(-1) * mask).sum() / mask.sum(), s)
    torch.testing.assert_close(g, g_ref)
    assert losses.logits_mse_loss(s, s.detach(), mask).item() == 0.0
    assert losses.logits_mse_loss(s, t, torch.zeros(B, T, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(label_smoothing):
    s = _student()
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    labels[~_mask()] = -100
    got = losses.cross_entropy_loss(s, labels, label_smoothing=label_smoothing, chunk_size=2)
    want = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), label_smoothing=label_smoothing)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    g = _grad(lambda: losses.cross_entropy_loss(s, labels, label_smoothing=label_smoothing, chunk_size=2), s)
    g_ref = _grad(lambda: F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), label_smoothing=label_smoothing), s)
    torch.testing.assert_close(g, g_ref)
    # Explicit denominator: sum / num_tokens.
    given = losses.cross_entropy_loss(s, labels, num_tokens=50, label_smoothing=label_smoothing)
    assert given.item() == pytest.approx(want.item() * (labels != -100).sum().item() / 50, rel=1e-5)


def test_cross_entropy_all_ignored_is_zero():
    s = _student()
    loss = losses.cross_entropy_loss(s, torch.full((B, T), -100))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert (s.grad == 0).all()


# ------------------------------------------------------------------ hidden states


L, D = 4, 6


def _hidden(seed, d=D):
    return _rand(B, L, d, seed=seed).requires_grad_(True)


def _hmask():
    m = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    return m


def _position_mean(fn, mask):
    vals = [fn(b, p) for b in range(B) for p in range(L) if mask[b, p]]
    return sum(vals) / len(vals)


def test_pkd_loss_matches_reference():
    hs, ht, mask = _hidden(0), _hidden(1), _hmask()

    def one(b, p):
        s, t = hs[b, p].detach().double(), ht[b, p].detach().double()
        return float(((s / s.norm() - t / t.norm()) ** 2).sum())

    assert feature_losses.pkd_loss(hs, ht, mask).item() == pytest.approx(_position_mean(one, mask), rel=1e-5)
    feature_losses.pkd_loss(hs, ht, mask).backward()
    assert hs.grad is not None and ht.grad is None
    assert hs.grad[1].abs().sum() == 0  # fully masked sequence
    assert feature_losses.pkd_loss(hs, hs.detach() * 5.0, mask).item() < 1e-6  # scale invariant


def test_cosine_hidden_loss_matches_reference():
    hs, ht, mask = _hidden(0), _hidden(1), _hmask()

    def one(b, p):
        s, t = hs[b, p].detach().double(), ht[b, p].detach().double()
        return 1.0 - float(s @ t / (s.norm() * t.norm()))

    assert feature_losses.cosine_hidden_loss(hs, ht, mask).item() == pytest.approx(_position_mean(one, mask), rel=1e-5)
    assert feature_losses.cosine_hidden_loss(hs, hs.detach(), mask).item() == pytest.approx(0.0, abs=1e-6)


def test_tinybert_hidden_loss_matches_reference():
    hs, ht, mask = _hidden(0, d=4), _hidden(1, d=D), _hmask()
    proj = torch.nn.Linear(4, D)

    def one(b, p):
        return float(((proj(hs[b, p]) - ht[b, p]) ** 2).mean().detach())

    assert feature_losses.tinybert_hidden_loss(proj(hs), ht, mask).item() == pytest.approx(_position_mean(one, mask),
                                                                                   rel=1e-5)
    feature_losses.tinybert_hidden_loss(proj(hs), ht, mask).backward()
    assert proj.weight.grad is not None and hs.grad is not None and ht.grad is None


@pytest.mark.parametrize("name", ["pkd_loss", "cosine_hidden_loss"])
def test_hidden_losses_all_masked_give_zero(name):
    hs, ht = _hidden(0), _hidden(1)
    loss = getattr(feature_losses, name)(hs, ht, torch.zeros(B, L, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss = feature_losses.tinybert_hidden_loss(torch.nn.Linear(D, D)(hs), ht, torch.zeros(B, L, dtype=torch.bool))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    with pytest.raises(ValueError, match="hidden.loss: tinybert learns the projection"):
        feature_losses.pkd_loss(hs, _hidden(1, d=D + 2), None)


def test_layer_map_examples():
    assert feature_losses.layer_map(3, 12, "last") == [(0, 9), (1, 10), (2, 11)]
    assert feature_losses.layer_map(3, 12, "skip") == [(0, 3), (1, 7), (2, 11)]
    assert feature_losses.layer_map(3, 12, "uniform") == [(0, 0), (1, 6), (2, 11)]
    assert feature_losses.layer_map(6, 12, "skip") == [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]
    assert feature_losses.layer_map(6, 12, "last") == [(i, 6 + i) for i in range(6)]
    assert feature_losses.layer_map(1, 6, "uniform") == [(0, 5)]
    assert feature_losses.layer_map(4, 4, "uniform") == [(i, i) for i in range(4)]
    assert feature_losses.layer_map(4, 4, "skip") == [(i, i) for i in range(4)]
    with pytest.raises(ValueError, match="strategy"):
        feature_losses.layer_map(3, 12, "random")
    with pytest.raises(ValueError, match="num_student"):
        feature_losses.layer_map(13, 12, "last")


# ------------------------------------------------------------------ attention


def test_attention_score_mse_matches_reference():
    H, Lq, Lk = 2, 3, 4
    s = _rand(B, H, Lq, Lk, seed=0).requires_grad_(True)
    t = _rand(B, H, Lq, Lk, seed=1)
    mask_q = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    mask_k = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
    vals = [
        (float(s.detach()[b, h, i, j]) - float(t[b, h, i, j])) ** 2
        for b in range(B) for h in range(H) for i in range(Lq) for j in range(Lk)
        if mask_q[b, i] and mask_k[b, j]
    ]
    loss = feature_losses.attention_score_mse(s, t, mask_q, mask_k)
    assert loss.item() == pytest.approx(sum(vals) / len(vals), rel=1e-5)
    # Additively masked entries (e.g. causal -inf) are ignored and give no NaN gradient.
    s2 = s.detach().clone()
    s2[0, :, 0, 1] = float("-inf")
    s2.requires_grad_(True)
    loss2 = feature_losses.attention_score_mse(s2, t, mask_q, mask_k)
    loss2.backward()
    assert torch.isfinite(loss2) and torch.isfinite(s2.grad).all()
    assert feature_losses.attention_score_mse(s, t, torch.zeros(B, Lq, dtype=torch.bool), mask_k).item() == 0.0
    with pytest.raises(ValueError, match="same number of heads"):
        feature_losses.attention_score_mse(s, _rand(B, H + 1, Lq, Lk), mask_q, mask_k)


def ref_relation(sx, tx, heads, mask_q, sy=None, ty=None, mask_k=None):
    """Loop over (batch, head, query row); softmax over the valid keys only."""
    sy = sx if sy is None else sy
    ty = tx if ty is None else ty
    mask_k = mask_q if mask_k is None else mask_k
    total, count = 0.0, 0
    for b in range(sx.shape[0]):
        keys = [j for j in range(sy.shape[1]) if mask_k[b, j]]
        for h in range(heads):
            rels = []
            for x, y in ((sx, sy), (tx, ty)):
                d = x.shape[-1] // heads
                xh, yh = x[b, :, h * d : (h + 1) * d].double(), y[b, keys, h * d : (h + 1) * d].double()
                rels.append(torch.softmax(xh @ yh.T / math.sqrt(d), -1))
            r_s, r_t = rels
            for i in range(sx.shape[1]):
                if mask_q[b, i] and keys:
                    count += 1
                    total += float((r_t[i] * (r_t[i].log() - r_s[i].log())).sum())
    return total / count


def test_relation_kd_different_head_counts_matches_reference():
    Lq = 5
    student = _rand(B, Lq, 2 * 8, seed=0).requires_grad_(True)  # 2 attention heads of 8 dims
    teacher = _rand(B, Lq, 4 * 16, seed=1)  # 4 attention heads of 16 dims
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    loss = feature_losses.relation_kd_loss(student, teacher, 4, mask)
    assert loss.item() == pytest.approx(ref_relation(student.detach(), teacher, 4, mask), rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad[2].abs().sum() == 0
    # Same relations on both sides give zero.
    assert feature_losses.relation_kd_loss(student, student.detach(), 4, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_relation_kd_cross_relation_with_key_mask():
    Lq, Lk = 3, 4
    sx, tx = _rand(B, Lq, 8, seed=0), _rand(B, Lq, 12, seed=1)
    sy, ty = _rand(B, Lk, 8, seed=2), _rand(B, Lk, 12, seed=3)
    mask_q = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    mask_k = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    got = feature_losses.relation_kd_loss(sx, tx, 2, mask_q, student_y=sy, teacher_y=ty, mask_y=mask_k)
    assert got.item() == pytest.approx(ref_relation(sx, tx, 2, mask_q, sy, ty, mask_k), rel=1e-5)
    all_masked = feature_losses.relation_kd_loss(sx.requires_grad_(True), tx, 2, torch.zeros(B, Lq, dtype=torch.bool))
    assert all_masked.item() == 0.0 and all_masked.grad_fn is not None
    with pytest.raises(ValueError, match="divisible"):
        feature_losses.relation_kd_loss(sx, tx, 5, mask_q)
