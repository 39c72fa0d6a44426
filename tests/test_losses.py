"""Distillation losses against a plain float64 reference: values, gradients, masks, sparse and chunked paths.

Run: .venv/bin/python -m pytest tests/test_losses.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distributed_distill.losses import (
    CHUNK_BUFFER_BYTES,
    KINDS,
    LossOutput,
    auto_chunk_size,
    chunked_distill_loss,
    kd_loss,
    resolve_chunk_size,
    sparse_kd_loss,
)

DIVERGENCES = tuple(k for k in KINDS if k != "mse")
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
MASKS = ("all", "none", "some")  # which positions are counted
TINY = torch.finfo(torch.float64).tiny


# --------------------------------------------------------------------------------------------
# float64 reference: textbook formulas on probabilities, no shared code with the package


def ref_divergence(lq: torch.Tensor, lp: torch.Tensor, kind: str, beta: float = 0.5, skew: float = 0.1):
    """Student log-probs lq, teacher log-probs lp: [n, K] float64 -> [n]."""
    q, p = lq.exp(), lp.exp()

    def kl(a, log_a, log_b):  # sum_v a (log a - log b); a = 0 terms are 0
        return (a * (log_a - log_b)).sum(-1)

    def log_mix(w, a, b):
        return torch.log((w * a + (1 - w) * b).clamp_min(TINY))

    if kind == "forward_kl":
        return kl(p, lp, lq)
    if kind == "reverse_kl":
        return kl(q, lq, lp)
    if kind == "jsd":
        lm = log_mix(beta, p, q)
        return beta * kl(p, lp, lm) + (1 - beta) * kl(q, lq, lm)
    if kind == "skew_forward_kl":
        return kl(p, lp, log_mix(skew, p, q))
    if kind == "skew_reverse_kl":
        return kl(q, lq, log_mix(skew, q, p))
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(kind)


def ref_rows(student, teacher, kind, temperature, beta=0.5, skew=0.1):
    """[n, V] logits (float64) -> [n] per-position loss, before the T^2 factor."""
    if kind == "mse":
        return ((student - teacher) / temperature).square().mean(-1)
    lq = torch.log_softmax(student / temperature, -1)
    lp = torch.log_softmax(teacher / temperature, -1)
    return ref_divergence(lq, lp, kind, beta, skew)


def ref_kd(student, teacher, labels, kind, temperature, reduction="mean", ignore_index=-100, **kw):
    V = student.shape[-1]
    s, t = student.reshape(-1, V).double(), teacher.reshape(-1, V).double()
    keep = torch.ones(s.shape[0], dtype=torch.bool) if labels is None else labels.reshape(-1) != ignore_index
    total = ref_rows(s[keep], t[keep], kind, temperature, **kw).sum() * temperature**2
    return total / max(int(keep.sum()), 1) if reduction == "mean" else total


def ref_sparse(student, ids, teacher_logprobs, tail, kind, temperature, tail_logmass=None, **kw):
    """Reference for sparse targets, built from the probabilities (float64), all positions counted."""
    q = torch.softmax(student.double() / temperature, -1)
    q_k = q.gather(-1, ids)
    p_k = teacher_logprobs.double().exp()
    if tail == "renormalize":
        q_c, p_c = q_k / q_k.sum(-1, keepdim=True), p_k / p_k.sum(-1, keepdim=True)
    else:
        p_tail = 1 - p_k.sum(-1, keepdim=True) if tail_logmass is None else tail_logmass.double().exp()[:, None]
        q_c = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
        p_c = torch.cat([p_k, p_tail], -1)
        p_c = p_c / p_c.sum(-1, keepdim=True)  # a recorded tail mass need not complete the top-k to exactly 1
    return ref_divergence(q_c.log(), p_c.log(), kind, **kw).sum() * temperature**2 / student.shape[0]


# --------------------------------------------------------------------------------------------
# helpers


def make_logits(n, v, *, scale=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    return s, t


def make_labels(n, v, mask: str, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, v, (n,), generator=g)
    if mask == "none":
        labels[:] = -100
    elif mask == "some":
        labels[torch.rand(n, generator=g) < 0.4] = -100
        labels[0] = -100
        labels[1] = 0  # at least one counted and one ignored
    return labels


def value_and_grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad(out, x)
    return out.detach(), grad


def assert_close(actual, expected, rtol, atol, what=""):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# kd_loss against the reference


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", KINDS)
def test_kd_loss_matches_reference(kind, temperature, mask):
    n, v = 13, 37
    s, t = make_logits(n, v, seed=KINDS.index(kind) * 100 + TEMPERATURES.index(temperature) * 10 + MASKS.index(mask))
    labels = make_labels(n, v, mask)
    got, got_grad = value_and_grad(lambda x: kd_loss(x, t, labels, kind=kind, temperature=temperature), s)
    want, want_grad = value_and_grad(lambda x: ref_kd(x, t.double(), labels, kind, temperature), s.double())
    assert got.dtype == torch.float32 and got.dim() == 0
    assert_close(got, want, rtol=1e-5, atol=1e-6, what="value")
    assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7, what="grad")
    if mask == "none":
        assert got.item() == 0.0 and got_grad.abs().max().item() == 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("v", [1, 50_000])
def test_kd_loss_vocab_extremes(kind, v):
    n = 3
    s, t = make_logits(n, v, seed=v)
    labels = make_labels(n, v, "all")
    got, got_grad = value_and_grad(lambda x: kd_loss(x, t, labels, kind=kind, temperature=2.0), s)
    want, want_grad = value_and_grad(lambda x: ref_kd(x, t.double(), labels, kind, 2.0), s.double())
    assert_close(got, want, rtol=1e-5, atol=1e-6, what="value")
    assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-8, what="grad")
    if v == 1 and kind != "mse":  # one outcome: both distributions are [1]
        assert abs(got.item()) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_batched_shape_equals_flat(kind, temperature):
    b, seq, v = 3, 5, 11
    s, t = make_logits(b * seq, v, seed=3)
    labels = make_labels(b * seq, v, "some")
    flat = kd_loss(s, t, labels, kind=kind, temperature=temperature)
    batched = kd_loss(s.view(b, seq, v), t.view(b, seq, v), labels.view(b, seq), kind=kind, temperature=temperature)
    assert_close(batched, flat, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["close", "independent"])
def test_kd_loss_large_logits_are_finite_and_accurate(kind, mode):
    # |logits| ~ 1e4: softmax underflows for almost every entry, log(softmax) would be -inf.
    n, v, temperature = 6, 300, 2.0
    s, t = make_logits(n, v, scale=1e4, seed=7)
    if mode == "close":  # teacher and student agree up to a few units: a small, finite divergence
        t = s + torch.randn(n, v, generator=torch.Generator().manual_seed(8)) * 3
    labels = make_labels(n, v, "some")
    got, got_grad = value_and_grad(lambda x: kd_loss(x, t, labels, kind=kind, temperature=temperature), s)
    want, want_grad = value_and_grad(lambda x: ref_kd(x, t.double(), labels, kind, temperature), s.double())
    assert torch.isfinite(got) and torch.isfinite(got_grad).all()
    # float32 log_softmax of values ~5e3 carries absolute errors ~5e3 * 6e-8 = 3e-4 per log-prob.
    assert_close(got, want, rtol=1e-4, atol=1e-2, what="value")
    assert_close(got_grad, want_grad, rtol=1e-3, atol=1e-3, what="grad")


@pytest.mark.parametrize("kind", KINDS)
def test_kd_loss_bf16_inputs(kind):
    n, v = 16, 64
    s, t = make_logits(n, v, seed=11, dtype=torch.bfloat16)
    labels = make_labels(n, v, "some")
    got, got_grad = value_and_grad(lambda x: kd_loss(x, t, labels, kind=kind, temperature=2.0), s)
    want, want_grad = value_and_grad(lambda x: ref_kd(x, t.double(), labels, kind, 2.0), s.double())
    assert got.dtype == torch.float32  # computed in float32 whatever the input dtype
    assert got_grad.dtype == torch.bfloat16
    assert_close(got, want, rtol=1e-3, atol=1e-4, what="value")
    assert_close(got_grad, want_grad, rtol=2e-2, atol=1e-3, what="grad")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", KINDS)
def test_kd_loss_reductions(kind, reduction):
    s, t = make_logits(20, 9, seed=5)
    labels = make_labels(20, 9, "some")
    got = kd_loss(s, t, labels, kind=kind, temperature=2.0, reduction=reduction)
    assert_close(got, ref_kd(s, t, labels, kind, 2.0, reduction=reduction), rtol=1e-5, atol=1e-6)
    count = int((labels != -100).sum())
    mean = kd_loss(s, t, labels, kind=kind, temperature=2.0, reduction="mean")
    total = kd_loss(s, t, labels, kind=kind, temperature=2.0, reduction="sum")
    assert_close(total, mean * count, rtol=1e-5, atol=1e-6)


def test_kd_loss_custom_ignore_index_and_no_labels():
    s, t = make_logits(10, 6, seed=2)
    labels = make_labels(10, 6, "some")
    assert_close(kd_loss(s, t), ref_kd(s, t, None, "forward_kl", 1.0), rtol=1e-5, atol=1e-6)
    custom = torch.where(labels == -100, torch.full_like(labels, 7), labels)
    assert_close(kd_loss(s, t, custom, ignore_index=7), kd_loss(s, t, labels), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_counted_positions_gives_connected_zero(kind, reduction):
    s, t = make_logits(4, 8, seed=1)
    s.requires_grad_(True)
    loss = kd_loss(s, t, torch.full((4,), -100), kind=kind, reduction=reduction)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert s.grad is not None and s.grad.abs().max().item() == 0.0


# --------------------------------------------------------------------------------------------
# identities


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("kind", KINDS)
def test_divergence_of_a_distribution_with_itself_is_zero(kind, temperature):
    s, _ = make_logits(8, 40, seed=4)
    loss = kd_loss(s, s.clone(), kind=kind, temperature=temperature)
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_half_is_symmetric_and_bounded(temperature):
    s, t = make_logits(16, 30, scale=4.0, seed=9)
    ab = kd_loss(s, t, kind="jsd", beta=0.5, temperature=temperature)
    ba = kd_loss(t, s, kind="jsd", beta=0.5, temperature=temperature)
    assert_close(ab, ba, rtol=1e-5, atol=1e-7)
    # Disjoint, confident distributions reach the bound ln 2 (per position, before T^2).
    far_s = torch.full((4, 30), -1e4)
    far_t = far_s.clone()
    far_s[:, 0], far_t[:, 1] = 1e4, 1e4
    bound = math.log(2) * temperature**2
    far = kd_loss(far_s, far_t, kind="jsd", beta=0.5, temperature=temperature)
    assert ab.item() <= bound
    assert far.item() <= bound * (1 + 1e-6) and far.item() == pytest.approx(bound, rel=1e-5)


def test_tvd_is_between_zero_and_one():
    for scale, seed in [(0.1, 0), (3.0, 1), (1e3, 2)]:
        s, t = make_logits(16, 30, scale=scale, seed=seed)
        value = kd_loss(s, t, kind="tvd").item()
        assert 0.0 <= value <= 1.0
    far_s, far_t = torch.zeros(2, 5), torch.zeros(2, 5)
    far_s[:, 0], far_t[:, 1] = 1e4, 1e4
    assert kd_loss(far_s, far_t, kind="tvd").item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "skew_kind, plain_kind", [("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")]
)
def test_skew_zero_is_plain_kl(skew_kind, plain_kind):
    s, t = make_logits(8, 20, seed=6)
    got, got_grad = value_and_grad(lambda x: kd_loss(x, t, kind=skew_kind, skew=0.0, temperature=2.0), s)
    want, want_grad = value_and_grad(lambda x: kd_loss(x, t, kind=plain_kind, temperature=2.0), s)
    assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "kl"},
        {"kind": "jsd", "beta": 0.0},
        {"kind": "jsd", "beta": 1.0},
        {"kind": "jsd", "beta": -0.5},
        {"kind": "skew_forward_kl", "skew": 1.0},
        {"kind": "skew_reverse_kl", "skew": -0.1},
        {"temperature": 0.0},
        {"reduction": "none"},
    ],
)
def test_bad_arguments_raise_value_error(kwargs):
    s, t = make_logits(2, 5)
    with pytest.raises(ValueError):
        kd_loss(s, t, **kwargs)
    if "reduction" not in kwargs:
        with pytest.raises(ValueError):
            chunked_distill_loss(torch.randn(2, 3), torch.randn(5, 3), torch.zeros(2, dtype=torch.long), **kwargs)


def test_shape_mismatches_raise_value_error():
    s, t = make_logits(4, 5)
    with pytest.raises(ValueError):
        kd_loss(s, t[:, :4])
    with pytest.raises(ValueError):
        kd_loss(s, t, torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# sparse (top-k) targets


def topk_targets(t, k, temperature):
    lp = torch.log_softmax(t.double() / temperature, -1)
    logprobs, ids = lp.topk(k, dim=-1)
    return ids, logprobs.float()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sparse_with_full_vocab_equals_dense(kind, tail, temperature):
    n, v = 12, 23
    s, t = make_logits(n, v, seed=21)
    labels = make_labels(n, v, "some")
    ids, logprobs = topk_targets(t, v, temperature)
    ids = ids.flip(-1)  # any order of the ids
    logprobs = logprobs.flip(-1)
    got, got_grad = value_and_grad(
        lambda x: sparse_kd_loss(x, ids, logprobs, labels, tail=tail, kind=kind, temperature=temperature), s
    )
    want, want_grad = value_and_grad(lambda x: kd_loss(x, t, labels, kind=kind, temperature=temperature), s)
    assert_close(got, want, rtol=1e-5, atol=1e-6, what="value")
    assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7, what="grad")


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sparse_tails_match_reference(kind, tail, temperature):
    n, v, k = 9, 40, 6
    s, t = make_logits(n, v, seed=31)
    ids, logprobs = topk_targets(t, k, temperature)
    got, got_grad = value_and_grad(
        lambda x: sparse_kd_loss(x, ids, logprobs, tail=tail, kind=kind, temperature=temperature), s
    )
    want, want_grad = value_and_grad(lambda x: ref_sparse(x, ids, logprobs, tail, kind, temperature), s.double())
    assert_close(got, want, rtol=1e-5, atol=1e-6, what="value")
    assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7, what="grad")


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sparse_bucket_uses_given_tail_mass(kind):
    n, v, k = 7, 30, 5
    s, t = make_logits(n, v, seed=41)
    ids, logprobs = topk_targets(t, k, 1.0)
    # A producer may record the true tail mass; here a deliberately different one, so using it is visible.
    tail_logmass = torch.full((n,), math.log(0.3))
    got = sparse_kd_loss(s, ids, logprobs, kind=kind, teacher_tail_logmass=tail_logmass)
    want = ref_sparse(s, ids, logprobs, "bucket", kind, 1.0, tail_logmass=tail_logmass)
    recomputed = sparse_kd_loss(s, ids, logprobs, kind=kind)
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert abs(got.item() - recomputed.item()) > 1e-3


def test_sparse_masks_and_batched_shapes():
    b, seq, v, k = 2, 4, 30, 5
    s, t = make_logits(b * seq, v, seed=51)
    labels = make_labels(b * seq, v, "some")
    ids, logprobs = topk_targets(t, k, 1.0)
    ids[labels == -100] = -1  # garbage at ignored positions must never be indexed
    flat = sparse_kd_loss(s, ids, logprobs, labels)
    batched = sparse_kd_loss(s.view(b, seq, v), ids.view(b, seq, k), logprobs.view(b, seq, k), labels.view(b, seq))
    keep = labels != -100
    want = ref_sparse(s[keep], ids[keep], logprobs[keep], "bucket", "forward_kl", 1.0)
    assert_close(flat, want, rtol=1e-5, atol=1e-6)
    assert_close(batched, flat, rtol=1e-6, atol=0)


def test_sparse_rejects_mse_and_bad_tail():
    s, t = make_logits(3, 10)
    ids, logprobs = topk_targets(t, 4, 1.0)
    with pytest.raises(ValueError):
        sparse_kd_loss(s, ids, logprobs, kind="mse")
    with pytest.raises(ValueError):
        sparse_kd_loss(s, ids, logprobs, tail="drop")


# --------------------------------------------------------------------------------------------
# chunked from hidden states == naive (full logits, kd_loss / sparse_kd_loss, cross-entropy)

N, H, HT, V = 37, 16, 12, 50


def make_problem(seed, n=N, v=V, mask="some", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    p = {
        "hidden": rand(n, H).requires_grad_(True),
        "weight": torch.nn.Parameter(rand(v, H, scale=0.5)),
        "bias": torch.nn.Parameter(rand(v, scale=0.5)),
        "teacher_hidden": rand(n, HT),
        "teacher_weight": rand(v, HT, scale=0.5),
        "teacher_bias": rand(v, scale=0.5),
        "labels": make_labels(n, v, mask, seed=seed),
    }
    return p


def naive(p, source, kind, temperature, tail="bucket", k=8):
    """Returns (kd_sum, ce_sum) computed the plain way, and the source kwargs for the chunked call."""
    logits = p["hidden"] @ p["weight"].T + p["bias"]
    teacher_logits = p["teacher_hidden"] @ p["teacher_weight"].T + p["teacher_bias"]
    ce = F.cross_entropy(logits.float(), p["labels"], reduction="sum")
    common = {"kind": kind, "temperature": temperature, "reduction": "sum"}
    if source == "none":
        return torch.zeros(()), ce, {}
    if source == "hidden":
        kwargs = {k_: p[k_] for k_ in ("teacher_hidden", "teacher_weight", "teacher_bias")}
        return kd_loss(logits, teacher_logits, p["labels"], **common), ce, kwargs
    if source == "logits":
        return kd_loss(logits, teacher_logits, p["labels"], **common), ce, {"teacher_logits": teacher_logits}
    ids, logprobs = topk_targets(teacher_logits, k, temperature)
    kd = sparse_kd_loss(logits, ids, logprobs, p["labels"], tail=tail, **common)
    return kd, ce, {"teacher_ids": ids, "teacher_logprobs": logprobs, "tail": tail}


def grads(loss, p):
    return torch.autograd.grad(loss, (p["hidden"], p["weight"], p["bias"]))


def chunked(p, source_kwargs, **kw):
    return chunked_distill_loss(p["hidden"], p["weight"], p["labels"], student_bias=p["bias"], **source_kwargs, **kw)


SOURCES = ["hidden", "logits", "sparse-bucket", "sparse-renormalize", "none"]


@pytest.mark.parametrize(
    "kind, source",
    # mse compares logits, so it has no sparse form (test_chunked_rejects_bad_sources)
    [(kind, source) for kind in KINDS for source in SOURCES if not (kind == "mse" and source.startswith("sparse"))],
)
def test_chunked_equals_naive(kind, source):
    p = make_problem(seed=KINDS.index(kind) * 10 + SOURCES.index(source))
    temperature = 2.0
    tail = source.split("-")[1] if source.startswith("sparse") else "bucket"
    kd, ce, source_kwargs = naive(p, source.split("-")[0], kind, temperature, tail=tail)
    kd_w, ce_w = 0.7, 0.3
    want = grads(kd_w * kd + ce_w * ce, p) if source != "none" else grads(ce_w * ce, p)

    out = chunked(p, source_kwargs, kind=kind, temperature=temperature, chunk_size=5, kd_weight=kd_w, ce_weight=ce_w)
    assert isinstance(out, LossOutput)
    assert out.num_tokens.dtype == torch.int64 and out.num_tokens.item() == int((p["labels"] != -100).sum())
    assert_close(out.kd_sum, kd, rtol=1e-5, atol=1e-5, what="kd_sum")
    assert_close(out.ce_sum, ce, rtol=1e-5, atol=1e-5, what="ce_sum")
    got = grads(kd_w * out.kd_sum + ce_w * out.ce_sum, p)
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_close(g, w, rtol=1e-5, atol=1e-5, what=f"grad {name}")
    if source == "none":
        assert out.kd_sum.item() == 0.0 and out.stats == {}
    else:
        expected = {"teacher_entropy", "top1_agreement"} | (
            {"topk_mass"} if source.startswith("sparse") else {"teacher_logprob"}
        )
        assert set(out.stats) == expected
        assert all(not v.requires_grad for v in out.stats.values())


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 37, 1024])
@pytest.mark.parametrize("source", ["hidden", "sparse-bucket"])
def test_chunked_chunk_sizes(chunk_size, source):
    p = make_problem(seed=chunk_size)
    kd, ce, kw = naive(p, source.split("-")[0], "jsd", 1.5)
    want = grads(kd + ce, p)
    out = chunked(p, kw, kind="jsd", temperature=1.5, chunk_size=chunk_size)
    assert_close(out.kd_sum, kd, rtol=1e-5, atol=1e-5)
    assert_close(out.ce_sum, ce, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads(out.kd_sum + out.ce_sum, p), want):
        assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("a, b", [(1.0, 1.0), (0.25, 0.75), (1.0, 0.0), (0.0, 1.0), (2.0, -0.5), (0.0, 0.0)])
def test_chunked_backward_is_exact_for_any_combination(a, b):
    # The forward pass precomputes the gradient for (kd_weight, ce_weight) = (0.5, 1.5); other
    # combinations are recomputed, proportional ones (0.25, 0.75) reuse it.
    p = make_problem(seed=3)
    kd, ce, kw = naive(p, "hidden", "reverse_kl", 2.0)
    want = grads(a * kd + b * ce, p)
    out = chunked(p, kw, kind="reverse_kl", temperature=2.0, chunk_size=6, kd_weight=0.5, ce_weight=1.5)
    for g, w in zip(grads(a * out.kd_sum + b * out.ce_sum, p), want):
        assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_sparse_with_given_tail_mass(temperature):
    p = make_problem(seed=13)
    logits = p["hidden"] @ p["weight"].T + p["bias"]
    ids, logprobs = topk_targets(p["teacher_hidden"] @ p["teacher_weight"].T, 6, temperature)
    tail_logmass = torch.rand(N, generator=torch.Generator().manual_seed(0)).mul(0.5).add(0.1).log()
    kw = {"teacher_ids": ids, "teacher_logprobs": logprobs, "teacher_tail_logmass": tail_logmass}
    kd = sparse_kd_loss(logits, labels=p["labels"], temperature=temperature, reduction="sum", **kw)
    want = grads(kd, p)
    out = chunked(p, kw, temperature=temperature, chunk_size=7, ce_weight=0.0)
    assert_close(out.kd_sum, kd, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads(out.kd_sum, p), want):
        assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_chunked_backward_twice_through_retained_graph():
    p = make_problem(seed=4)
    kd, ce, kw = naive(p, "logits", "forward_kl", 1.0)
    want = grads(kd + 2 * ce, p)
    out = chunked(p, kw, chunk_size=8, ce_weight=2.0)
    loss = out.kd_sum + 2 * out.ce_sum
    first = torch.autograd.grad(loss, (p["hidden"], p["weight"], p["bias"]), retain_graph=True)
    second = torch.autograd.grad(loss, (p["hidden"], p["weight"], p["bias"]))
    for g1, g2, w in zip(first, second, want):
        assert_close(g1, w, rtol=1e-5, atol=1e-5)
        assert_close(g2, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["hidden", "logits", "sparse-bucket", "none"])
def test_chunked_all_masked_gives_connected_zeros(source):
    p = make_problem(seed=5, mask="none")
    _, _, kw = naive(p, source.split("-")[0], "forward_kl", 1.0)
    out = chunked(p, kw, chunk_size=4)
    assert out.kd_sum.item() == 0.0 and out.ce_sum.item() == 0.0 and out.num_tokens.item() == 0
    (out.kd_sum + out.ce_sum).backward()
    for t in (p["hidden"], p["weight"], p["bias"]):
        assert t.grad is not None and t.grad.abs().max().item() == 0.0


def test_chunked_batched_hidden_and_no_bias():
    p = make_problem(seed=6)
    b, seq = 1, N
    logits = p["hidden"] @ p["weight"].T
    want_ce = F.cross_entropy(logits, p["labels"], reduction="sum")
    out = chunked_distill_loss(p["hidden"].view(b, seq, H), p["weight"], p["labels"].view(b, seq), chunk_size=8)
    assert_close(out.ce_sum, want_ce, rtol=1e-5, atol=1e-5)
    (g_hidden,) = torch.autograd.grad(out.ce_sum, p["hidden"])
    (w_hidden,) = torch.autograd.grad(want_ce, p["hidden"])
    assert_close(g_hidden, w_hidden, rtol=1e-5, atol=1e-5)


def test_chunked_stats_are_sums():
    p = make_problem(seed=7)
    kd, _, kw = naive(p, "logits", "forward_kl", 1.0)
    out = chunked(p, kw, chunk_size=5)
    keep = p["labels"] != -100
    t = kw["teacher_logits"][keep].double()
    s = (p["hidden"] @ p["weight"].T + p["bias"])[keep]
    lp = torch.log_softmax(t, -1)
    assert_close(out.stats["teacher_entropy"], -(lp.exp() * lp).sum(), rtol=1e-5, atol=1e-4)
    assert out.stats["top1_agreement"].item() == (s.argmax(-1) == t.argmax(-1)).sum().item()
    # The teacher's log-probability of the labels, at temperature 1 whatever the distillation temperature.
    want = lp.gather(1, p["labels"][keep][:, None]).sum()
    assert_close(out.stats["teacher_logprob"], want, rtol=1e-5, atol=1e-4)
    assert_close(chunked(p, kw, chunk_size=5, temperature=2.0).stats["teacher_logprob"], want, rtol=1e-5, atol=1e-4)

    ids, logprobs = topk_targets(kw["teacher_logits"], 8, 1.0)
    sparse = chunked(p, {"teacher_ids": ids, "teacher_logprobs": logprobs}, chunk_size=5)
    assert_close(sparse.stats["topk_mass"], logprobs[keep].double().exp().sum(), rtol=1e-5, atol=1e-5)


def test_chunked_bf16_inputs():
    p32 = make_problem(seed=8)
    p16 = {
        k: (v.detach().bfloat16().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
        for k, v in p32.items()
    }
    _, _, kw32 = naive(p32, "hidden", "forward_kl", 2.0)
    _, _, kw16 = naive(p16, "hidden", "forward_kl", 2.0)
    out32 = chunked(p32, kw32, temperature=2.0, chunk_size=8)
    out16 = chunked(p16, kw16, temperature=2.0, chunk_size=8)
    assert out16.kd_sum.dtype == torch.float32
    assert_close(out16.kd_sum, out32.kd_sum, rtol=3e-2, atol=1e-2)
    assert_close(out16.ce_sum, out32.ce_sum, rtol=1e-2, atol=1e-2)
    g16 = grads(out16.kd_sum + out16.ce_sum, p16)
    g32 = grads(out32.kd_sum + out32.ce_sum, p32)
    for a, b in zip(g16, g32):
        assert a.dtype == torch.bfloat16
        assert_close(a, b, rtol=5e-2, atol=5e-2)


def test_chunked_under_bf16_autocast():
    # Mixed precision: float32 parameters, matmuls in bf16 as autocast would run them; grads stay float32.
    p = make_problem(seed=12)
    _, _, kw = naive(p, "hidden", "reverse_kl", 2.0)
    ref = chunked(p, kw, kind="reverse_kl", temperature=2.0, chunk_size=8)
    ref_grads = grads(ref.kd_sum + ref.ce_sum, p)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked(p, kw, kind="reverse_kl", temperature=2.0, chunk_size=8)
    assert out.kd_sum.dtype == torch.float32
    assert_close(out.kd_sum, ref.kd_sum, rtol=3e-2, atol=1e-2)
    assert_close(out.ce_sum, ref.ce_sum, rtol=1e-2, atol=1e-2)
    for g, r in zip(grads(out.kd_sum + out.ce_sum, p), ref_grads):
        assert g.dtype == torch.float32
        assert_close(g, r, rtol=5e-2, atol=5e-2)
    assert (out.kd_sum - ref.kd_sum).abs().item() > 0  # the bf16 matmul was really used


def test_chunked_rejects_bad_sources():
    p = make_problem(seed=9)
    _, _, kw = naive(p, "sparse", "forward_kl", 1.0)
    with pytest.raises(ValueError):
        chunked(p, kw, kind="mse")
    with pytest.raises(ValueError):
        chunked(p, {**kw, "teacher_logits": torch.zeros(N, V)})
    with pytest.raises(ValueError):
        chunked(p, {"teacher_hidden": p["teacher_hidden"]})
    with pytest.raises(ValueError):
        chunked(p, {}, chunk_size=0)


def test_auto_chunk_size_follows_vocabulary_hidden_size_and_device():
    # V=128k: a [c, V] float32 buffer of an eighth of the [V, H] gradient -> 256 rows (docs/losses.md)
    assert auto_chunk_size(128256, 2048, "cpu") == 256
    assert auto_chunk_size(32000, 1024, "cpu") == 512  # 64 MiB a buffer
    assert auto_chunk_size(32000, 8192, "cpu") == 1024  # H / 8
    assert auto_chunk_size(4096, 128, "cpu") == 1024  # a small vocabulary: the device's most rows
    assert auto_chunk_size(4096, 128, "cuda") == 4096  # 64 MiB a buffer (a GPU may take up to 8192 rows)
    assert auto_chunk_size(2048, 128, "cuda") == 8192
    assert auto_chunk_size(128256, 8192, "cpu") == 1024  # a wide model: H / 8 rows (its [V, H] grad is larger)
    assert auto_chunk_size(2_000_000, 64, "cpu") == 32  # never fewer rows than the device's minimum
    assert auto_chunk_size(2_000_000, 64, "cuda") == 128
    for v, h in [(128256, 2048), (151936, 1536), (50257, 768), (260, 16)]:
        rows = auto_chunk_size(v, h)
        assert rows % 32 == 0 and (rows * v * 4 <= max(CHUNK_BUFFER_BYTES, v * h * 4 // 8) or rows == 32)
    assert resolve_chunk_size("auto", 128256, 2048, torch.device("cpu")) == 256
    assert resolve_chunk_size(0, 128256, 2048, "cpu") == 0 and resolve_chunk_size(7, 10, 10, "cpu") == 7
    for bad in ("big", -1, 1.5, True):
        with pytest.raises(ValueError):
            resolve_chunk_size(bad, 128256, 2048, "cpu")


class _AllocationRecorder(TorchDispatchMode):
    """Records every tensor an aten op creates (views of its inputs excluded), forward and backward."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []
        self.calls: list[tuple[str, tuple[int, ...]]] = []  # every op's output, also one written into a given `out`

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += [(str(func), tuple(o.shape)) for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        inputs = {
            a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
        }
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.shapes.append((str(func), tuple(o.shape)))
        return out

    def largest(self) -> int:
        return max(math.prod(shape) for _, shape in self.shapes)


@pytest.mark.parametrize(
    "source, a, b",
    # (1, 1) reuses the gradient of the forward pass, (1, 0) recomputes the chunks in backward
    [("hidden", 1.0, 1.0), ("logits", 1.0, 1.0), ("sparse-bucket", 1.0, 1.0), ("none", 1.0, 1.0), ("hidden", 1.0, 0.0)],
)
def test_chunked_never_creates_a_full_logits_tensor(source, a, b):
    n, v, chunk = 32, 1000, 8  # the gradient of the weight ([V, H] = 16k) is smaller than [N, V] = 32k
    p = make_problem(seed=10, n=n, v=v)
    _, _, kw = naive(p, source.split("-")[0], "forward_kl", 1.0, tail="bucket")
    kw = {k: (x.detach() if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
    with _AllocationRecorder() as rec:
        out = chunked(p, kw, chunk_size=chunk)
        (a * out.kd_sum + b * out.ce_sum).backward()
    assert rec.largest() <= max(v * H, chunk * v), sorted(rec.shapes, key=lambda x: -math.prod(x[1]))[:3]
    with _AllocationRecorder() as naive_rec:  # the recorder does see the naive path's [N, V] logits
        (p["hidden"] @ p["weight"].T).sum().backward()
    assert naive_rec.largest() >= n * v


def test_chunked_skips_ignored_positions():
    p = make_problem(seed=11, n=40, v=V, mask="all")
    p["labels"][3:] = -100
    _, _, kw = naive(p, "hidden", "forward_kl", 1.0)
    with _AllocationRecorder() as rec:
        out = chunked(p, kw, chunk_size=16)
    rows = sum(shape[0] for func, shape in rec.calls if func.startswith("aten.mm.") and shape[-1] == V)
    assert out.num_tokens.item() == 3
    assert rows == 2 * 3  # student and teacher logits, for the 3 counted positions only


def test_chunked_under_no_grad_gives_the_same_values_without_gradients():
    torch.manual_seed(0)
    n, h, v = 13, 8, 50
    hidden, weight = torch.randn(n, h), torch.randn(v, h, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    labels[3] = -100
    t_hidden, t_weight = torch.randn(n, h), torch.randn(v, h)
    kwargs = dict(teacher_hidden=t_hidden, teacher_weight=t_weight, chunk_size=4, kd_weight=0.5, ce_weight=0.5)
    with_grad = chunked_distill_loss(hidden, weight, labels, **kwargs)
    with torch.no_grad():
        without = chunked_distill_loss(hidden, weight, labels, **kwargs)
    assert without.kd_sum.grad_fn is None and without.ce_sum.grad_fn is None
    torch.testing.assert_close(without.kd_sum, with_grad.kd_sum.detach())
    torch.testing.assert_close(without.ce_sum, with_grad.ce_sum.detach())
    assert int(without.num_tokens) == n - 1
    assert without.stats.keys() == with_grad.stats.keys()
