"""Sampled teacher targets (Sparse Logit Sampling, Anshumann et al. 2025): unique drawn ids with normalised counts.

Against a plain float64 formula (values and gradients, the reference `sampled_kd_loss` and the chunked path),
padding, the unbiasedness of the estimate (a tolerance derived from the number of draws), the kinds it rejects,
its buffers, and the objective's naive path and the validation metrics that consume it.

Run: .venv/bin/python -m pytest tests/test_sampled_loss.py -q
"""

from __future__ import annotations

import types
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distributed_distill import objective
from distributed_distill.config import DistillConfig
from distributed_distill.eval import metrics
from distributed_distill.losses import KINDS, TeacherTargets, chunked_distill_loss, kd_loss, sampled_kd_loss
from distributed_distill.models import AlignedHead

N, H, V, DRAWS = 37, 16, 50, 16


# --------------------------------------------------------------------------------------------
# helpers: targets drawn from p_T, and the float64 reference


def draw_targets(teacher_logits: torch.Tensor, draws: int, temperature: float, seed: int, pad: str = "first"):
    """Draws from p_T = softmax(teacher / T) per position -> (ids [..., draws], counts [..., draws] float32,
    entropy [...] float32), the unique ids first (most drawn first), then padding of weight 0: pad="first" repeats
    the row's first id (as the producer does), pad="distinct" uses ids not drawn."""
    lead, vocab = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    logp = torch.log_softmax(teacher_logits.double() / temperature, -1)
    g = torch.Generator().manual_seed(seed)
    drawn = torch.multinomial(logp.exp().reshape(-1, vocab), draws, replacement=True, generator=g)
    full = torch.zeros(drawn.shape[0], vocab, dtype=torch.float64).scatter_add_(
        1, drawn, torch.full(drawn.shape, 1.0 / draws, dtype=torch.float64)
    )
    w, ids = full.topk(draws, -1)  # every drawn id (at most `draws` of them), then ids of weight 0
    if pad == "first":
        ids = torch.where(w > 0, ids, ids[:, :1])
    entropy = -(logp.exp() * logp).sum(-1)
    return ids.reshape(*lead, draws), w.float().reshape(*lead, draws), entropy.float()


def ref_sampled(logits, ids, counts, entropy, labels, temperature, reduction="sum"):
    """T^2 * sum over counted positions of -H - sum_v w_v log softmax(logits / T)_v, the weights scattered densely
    (float64, differentiable in logits)."""
    vocab = logits.shape[-1]
    x = logits.reshape(-1, vocab).double()
    w = torch.zeros_like(x).scatter_add(1, ids.reshape(x.shape[0], -1), counts.reshape(x.shape[0], -1).double())
    rows = -(w * torch.log_softmax(x / temperature, -1)).sum(-1)
    if entropy is not None:
        rows = rows - entropy.reshape(-1).double()
    keep = torch.ones(x.shape[0], dtype=torch.bool) if labels is None else labels.reshape(-1) != -100
    total = rows[keep].sum() * temperature**2
    return total / max(int(keep.sum()), 1) if reduction == "mean" else total


def make_labels(n, seed, mask="some"):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, V, (n,), generator=g)
    if mask == "none":
        labels[:] = -100
    elif mask == "some":
        labels[torch.rand(n, generator=g) < 0.4] = -100
        labels[0], labels[1] = -100, 0  # at least one ignored and one counted
    return labels


def make_problem(seed, n=N, temperature=1.0, dtype=torch.float64, mask="some"):
    g = torch.Generator().manual_seed(seed)
    p = {
        "hidden": torch.randn(n, H, generator=g, dtype=dtype).requires_grad_(True),
        "weight": torch.nn.Parameter(torch.randn(V, H, generator=g, dtype=dtype) * 0.5),
        "bias": torch.nn.Parameter(torch.randn(V, generator=g, dtype=dtype) * 0.5),
        "labels": make_labels(n, seed, mask),
    }
    teacher = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    p["ids"], p["counts"], p["entropy"] = draw_targets(teacher, DRAWS, temperature, seed)
    return p


def logits_of(p):
    return p["hidden"] @ p["weight"].T + p["bias"]


def grads(loss, p, retain_graph=False):
    return torch.autograd.grad(loss, (p["hidden"], p["weight"], p["bias"]), retain_graph=retain_graph)


def chunked(p, entropy=True, **kw):
    return chunked_distill_loss(
        p["hidden"],
        p["weight"],
        p["labels"],
        student_bias=p["bias"],
        teacher_ids=p["ids"],
        teacher_counts=p["counts"],
        teacher_entropy=p["entropy"] if entropy else None,
        **kw,
    )


def assert_close(actual, expected, tol, what=""):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# values and gradients against the float64 formula


@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("mask", ["all", "some", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_kd_loss_matches_reference(temperature, mask, with_entropy):
    p = make_problem(seed=3, temperature=temperature, mask=mask)
    logits = logits_of(p).detach()
    entropy = p["entropy"] if with_entropy else None
    for reduction in ("mean", "sum"):
        x = logits.clone().requires_grad_(True)
        got = sampled_kd_loss(
            x, p["ids"], p["counts"], p["labels"], teacher_entropy=entropy, temperature=temperature, reduction=reduction
        )
        (g,) = torch.autograd.grad(got, x)
        y = logits.clone().requires_grad_(True)
        want = ref_sampled(y, p["ids"], p["counts"], entropy, p["labels"], temperature, reduction)
        (w,) = torch.autograd.grad(want, y)
        assert got.dtype == torch.float64
        assert_close(got, want, 1e-10, f"value {reduction}")
        assert_close(g, w, 1e-10, f"grad {reduction}")
        if mask == "none":
            assert got.item() == 0.0 and g.abs().max().item() == 0.0
    # [B, S, ...] shapes give the flat result
    b, s = 1, N
    flat = sampled_kd_loss(logits, p["ids"], p["counts"], p["labels"], teacher_entropy=entropy, temperature=temperature)
    batched = sampled_kd_loss(
        logits.view(b, s, V),
        p["ids"].view(b, s, DRAWS),
        p["counts"].view(b, s, DRAWS),
        p["labels"].view(b, s),
        teacher_entropy=None if entropy is None else entropy.view(b, s),
        temperature=temperature,
    )
    assert_close(batched, flat, 1e-12, "batched")


@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 5, 7, 37, 1024])
def test_chunked_sampled_matches_reference(chunk_size, temperature, with_entropy):
    p = make_problem(seed=chunk_size, temperature=temperature)
    entropy = p["entropy"] if with_entropy else None
    logits = logits_of(p)
    kd = ref_sampled(logits, p["ids"], p["counts"], entropy, p["labels"], temperature)
    ce = F.cross_entropy(logits, p["labels"], reduction="sum")
    kd_w, ce_w = 0.7, 0.3
    want = grads(kd_w * kd + ce_w * ce, p)
    out = chunked(p, with_entropy, temperature=temperature, chunk_size=chunk_size, kd_weight=kd_w, ce_weight=ce_w)
    assert out.num_tokens.item() == int((p["labels"] != -100).sum())
    assert_close(out.kd_sum, kd, 1e-5, "kd_sum")
    assert_close(out.ce_sum, ce, 1e-5, "ce_sum")
    got = grads(kd_w * out.kd_sum + ce_w * out.ce_sum, p, retain_graph=True)
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_close(g, w, 1e-5, f"grad {name}")
    # chunked == unchunked: the reference function on the full logits
    unchunked = sampled_kd_loss(
        logits_of(p),
        p["ids"],
        p["counts"],
        p["labels"],
        teacher_entropy=entropy,
        temperature=temperature,
        reduction="sum",
    )
    assert_close(out.kd_sum, unchunked, 1e-5, "kd_sum vs sampled_kd_loss")
    for g, w in zip(grads(out.kd_sum, p), grads(unchunked, p)):  # kd alone: recomputed through the retained graph
        assert_close(g, w, 1e-5, "grad vs sampled_kd_loss")


@pytest.mark.parametrize("a, b", [(1.0, 1.0), (0.25, 0.75), (1.0, 0.0), (0.0, 1.0), (2.0, -0.5), (0.0, 0.0)])
def test_chunked_sampled_backward_is_exact_for_any_combination(a, b):
    # The forward pass precomputes the gradient for (kd_weight, ce_weight) = (0.5, 1.5); (0.25, 0.75) reuses it
    # scaled, the others recompute the chunks with (a, b).
    p = make_problem(seed=21, temperature=2.0)
    logits = logits_of(p)
    kd = ref_sampled(logits, p["ids"], p["counts"], p["entropy"], p["labels"], 2.0)
    ce = F.cross_entropy(logits, p["labels"], reduction="sum")
    want = grads(a * kd + b * ce, p)
    out = chunked(p, temperature=2.0, chunk_size=6, kd_weight=0.5, ce_weight=1.5)
    for g, w in zip(grads(a * out.kd_sum + b * out.ce_sum, p), want):
        assert_close(g, w, 1e-5)


def test_sampled_padding_is_harmless():
    # The same draws laid out three ways: padding repeating the row's first (most drawn) id, padding with ids not
    # drawn, and the first layout with extra padding columns. scatter (not scatter_add) would let a repeated id's
    # 0 overwrite the real weight; the values and gradients must not move.
    p = make_problem(seed=5, temperature=2.0)
    teacher = torch.randn(N, V, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    first = draw_targets(teacher, 8, 2.0, seed=1, pad="first")  # 8 draws of 50 ids: most rows have padding
    distinct = draw_targets(teacher, 8, 2.0, seed=1, pad="distinct")
    assert (first[1] == 0).any() and (first[0] != distinct[0]).any()
    extra = (
        torch.cat([first[0], first[0][:, :1].expand(-1, 5)], -1),
        torch.cat([first[1], torch.zeros(N, 5)], -1),
        first[2],
    )
    results = []
    for ids, counts, entropy in (first, distinct, extra):
        q = {**p, "ids": ids, "counts": counts, "entropy": entropy}
        out = chunked(q, temperature=2.0, chunk_size=7)
        naive = sampled_kd_loss(
            logits_of(p), ids, counts, p["labels"], teacher_entropy=entropy, temperature=2.0, reduction="sum"
        )
        results.append((out.kd_sum, grads(out.kd_sum + out.ce_sum, p), naive, grads(naive, p)))
    ref = ref_sampled(logits_of(p), *first, p["labels"], 2.0)
    for kd, kd_grads, naive, naive_grads in results:
        assert_close(kd, ref, 1e-5, "chunked")
        assert_close(naive, ref, 1e-12, "sampled_kd_loss")
        for g, w in zip(kd_grads, results[0][1]):
            assert_close(g, w, 1e-6, "chunked grad")
        for g, w in zip(naive_grads, results[0][3]):
            assert_close(g, w, 1e-12, "sampled_kd_loss grad")


# --------------------------------------------------------------------------------------------
# unbiasedness: the mean over R repetitions of N draws is the dense forward KL, within its standard error


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_estimate_is_unbiased(temperature):
    positions, vocab, draws, reps = 8, 50, 16, 2000
    T = temperature
    g = torch.Generator().manual_seed(int(T * 10))
    s = torch.randn(positions, vocab, generator=g, dtype=torch.float64)
    t = torch.randn(positions, vocab, generator=g, dtype=torch.float64)
    ids, counts, _ = draw_targets(t.repeat(reps, 1), draws, T, seed=int(T * 100))  # [R * P, draws]
    lt = torch.log_softmax(t / T, -1)
    p_t = lt.exp()
    entropy = -(p_t * lt).sum(-1)  # exact, float64

    # Each repetition r is one sampled loss L_r (mean over the P positions); with reduction "mean" over all R * P
    # rows the value is mean_r L_r and its gradient w.r.t. the shared logits mean_r dL_r/ds.
    x = s.clone().requires_grad_(True)
    est = sampled_kd_loss(
        x.repeat(reps, 1), ids, counts, teacher_entropy=entropy.repeat(reps), temperature=T, reduction="mean"
    )
    (est_grad,) = torch.autograd.grad(est, x)
    y = s.clone().requires_grad_(True)
    dense = kd_loss(y, t, kind="forward_kl", temperature=T)
    (dense_grad,) = torch.autograd.grad(dense, y)

    # Standard errors from the exact p_T. Per position the value's draws-average has variance
    # Var_{x~p_T}[log p_S(x)] / N; L_r = T^2 / P * sum_i, so Var(L_r) = T^4 / P^2 * sum_i Var_i / N. The gradient
    # of L_r w.r.t. s_iv is T / P * (p_S - w)_iv with Var(w_iv) = p_T (1 - p_T) / N. The mean of R repetitions has
    # the variance divided by R.
    ls = torch.log_softmax(s / T, -1)
    var_i = (p_t * ls.square()).sum(-1) - (p_t * ls).sum(-1).square()
    value_se = (T**4 / positions**2 * (var_i / draws).sum() / reps).sqrt()
    grad_se = (T**2 / positions**2 * p_t * (1 - p_t) / draws / reps).sqrt()
    assert 5 * value_se < 0.05 * dense  # the test can see a bias of a few percent
    assert (est - dense).abs() <= 5 * value_se, (est.item(), dense.item(), value_se.item())
    dev = (est_grad - dense_grad).abs() / grad_se
    assert dev.max() <= 5, dev.max().item()
    # And a single repetition is a poor estimate: the averaging, not the formula, brings it to the dense value.
    one = sampled_kd_loss(s, ids[:positions], counts[:positions], teacher_entropy=entropy, temperature=T)
    assert (one - dense).abs() > 5 * value_se


# --------------------------------------------------------------------------------------------
# kinds, forms, stats, buffers


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "forward_kl"])
def test_sampled_targets_reject_other_kinds(kind):
    p = make_problem(seed=1)
    with pytest.raises(ValueError, match="forward_kl") as err:
        sampled_kd_loss(logits_of(p), p["ids"], p["counts"], kind=kind)
    assert "\n" not in str(err.value) and "not drawn" in str(err.value)
    with pytest.raises(ValueError, match="forward_kl"):
        chunked(p, kind=kind)


def test_sampled_teacher_targets_form_and_validation():
    p = make_problem(seed=2)
    t = TeacherTargets(ids=p["ids"], counts=p["counts"], entropy=p["entropy"])
    assert t.present and t.sampled and not t.sparse
    assert TeacherTargets(ids=p["ids"], logprobs=p["counts"].log()).sparse
    assert t.loss_kwargs() == dict(teacher_ids=p["ids"], teacher_counts=p["counts"], teacher_entropy=p["entropy"])
    out = chunked_distill_loss(p["hidden"], p["weight"], p["labels"], student_bias=p["bias"], **t.loss_kwargs())
    assert_close(out.kd_sum, chunked(p).kd_sum, 1e-12)
    base = dict(teacher_ids=p["ids"], teacher_counts=p["counts"])
    bad = [
        {**base, "teacher_logprobs": p["counts"].log()},  # counts and logprobs are exclusive
        {**base, "teacher_counts": p["counts"][:, :-1]},  # counts must match the ids' shape
        {"teacher_counts": p["counts"]},  # counts need ids
        {"teacher_ids": p["ids"]},  # ids need logprobs or counts
        {"teacher_ids": p["ids"], "teacher_logprobs": p["counts"], "teacher_entropy": p["entropy"]},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            chunked_distill_loss(p["hidden"], p["weight"], p["labels"], **kwargs)
    with pytest.raises(ValueError):
        sampled_kd_loss(logits_of(p), p["ids"], p["counts"][:, :-1])
    with pytest.raises(ValueError):
        sampled_kd_loss(logits_of(p), p["ids"], p["counts"], teacher_entropy=p["entropy"][:-1])


def test_chunked_sampled_stats_and_no_grad():
    p = make_problem(seed=4)
    out = chunked(p, chunk_size=5)
    keep = p["labels"] != -100
    assert set(out.stats) == {"teacher_entropy", "top1_agreement"}
    assert_close(out.stats["teacher_entropy"], p["entropy"][keep].sum(), 1e-6)
    most_drawn = p["ids"].gather(1, p["counts"].argmax(-1, keepdim=True)).squeeze(1)
    student_top1 = logits_of(p).argmax(-1)
    assert out.stats["top1_agreement"].item() == (student_top1 == most_drawn)[keep].sum().item()
    assert all(not v.requires_grad for v in out.stats.values())
    # Without the entropy there is no entropy to report (a sum of zeros would read as a certain teacher).
    assert set(chunked(p, entropy=False, chunk_size=5).stats) == {"top1_agreement"}
    with torch.no_grad():
        without = chunked(p, chunk_size=5)
    assert without.kd_sum.grad_fn is None and without.stats.keys() == out.stats.keys()
    torch.testing.assert_close(without.kd_sum, out.kd_sum.detach())
    torch.testing.assert_close(without.ce_sum, out.ce_sum.detach())


class _LiveBuffers(TorchDispatchMode):
    """The most tensors of one shape alive at once, among those aten ops create (views of inputs excluded)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.live, self.peak = shape, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
        }
        self.live = [r for r in self.live if r() is not None]
        for o in tree_flatten(out)[0]:
            if (
                isinstance(o, torch.Tensor)
                and tuple(o.shape) == self.shape
                and o.untyped_storage().data_ptr() not in inputs
            ):
                self.live.append(weakref.ref(o))
        self.peak = max(self.peak, len(self.live))
        return out


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_sampled_and_dense_hold_two_chunk_buffers(temperature):
    # Sampled: z (log p_S, then the CE gradient) and p_S (the KD gradient); dense forward_kl two (z and the teacher's
    # logits, then the gradient in z: its other buffers are [rows, V] blocks, 2 rows here, kd.block_rows).
    n, vocab, chunk = 32, 2**17, 8
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, H, generator=g).requires_grad_(True)
    weight = torch.randn(vocab, H, generator=g).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    teacher = torch.randn(n, vocab, generator=g)
    ids, counts, entropy = draw_targets(teacher, DRAWS, temperature, seed=0)
    peaks = {}
    for name, kw in (
        ("sampled", dict(teacher_ids=ids, teacher_counts=counts, teacher_entropy=entropy)),
        ("dense", dict(teacher_logits=teacher)),
    ):
        with _LiveBuffers((chunk, vocab)) as rec:
            out = chunked_distill_loss(hidden, weight, labels, chunk_size=chunk, temperature=temperature, **kw)
            (out.kd_sum + out.ce_sum).backward()
        peaks[name] = rec.peak
    assert peaks["sampled"] <= 2 and peaks["dense"] <= 2, peaks


# --------------------------------------------------------------------------------------------
# consumers: the objective's naive path, the validation metrics


class _TinyLM(torch.nn.Module):
    """Embedding -> tanh -> linear head, answering the two ways models.forward_states asks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, H)
        self.head = torch.nn.Linear(H, V)

    def forward(self, input_ids, use_cache=False, logits_to_keep=None, output_hidden_states=None):
        h = torch.tanh(self.embed(input_ids))
        return types.SimpleNamespace(logits=self.head(h), hidden_states=(h,) if output_hidden_states else None)


class _FixedTeacher:
    def __init__(self, targets: TeacherTargets):
        self._targets = targets

    def targets(self, batch, layers=()):
        return self._targets


@pytest.mark.parametrize("with_entropy", [True, False])
def test_forward_losses_naive_path_equals_chunked_for_sampled_targets(with_entropy):
    b, s = 3, 9
    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, V, (b, s), generator=g)
    labels = input_ids.clone()
    labels[0, :3] = -100
    batch = {"input_ids": input_ids, "labels": labels}
    ids, counts, entropy = draw_targets(torch.randn(b * (s - 1), V, generator=g) * 2, DRAWS, 2.0, seed=3)
    teacher = _FixedTeacher(TeacherTargets(ids=ids, counts=counts, entropy=entropy if with_entropy else None))
    results = []
    for chunk_size in (0, 5):
        model = _TinyLM()
        d = DistillConfig(chunk_size=chunk_size, alpha=0.5, temperature=2.0)
        out = objective.forward_losses(model, teacher, batch, d, AlignedHead(model.head, V))
        (0.5 * out.kd_sum + 0.5 * out.ce_sum).backward()
        results.append((out, [prm.grad for prm in model.parameters()]))
    (naive, naive_grads), (fused, fused_grads) = results
    assert naive.num_tokens.item() == fused.num_tokens.item() == int((labels[:, 1:] != -100).sum())
    assert_close(naive.kd_sum, fused.kd_sum, 1e-5, "kd_sum")
    assert_close(naive.ce_sum, fused.ce_sum, 1e-5, "ce_sum")
    for a, w in zip(naive_grads, fused_grads):
        assert_close(a, w, 1e-5, "grad")


def test_token_metrics_of_sampled_targets():
    bins = 5
    p = make_problem(seed=8)
    s = logits_of(p).detach().float()
    keep = p["labels"] != -100
    n = int(keep.sum())
    t = TeacherTargets(ids=p["ids"], counts=p["counts"], entropy=p["entropy"])
    got = metrics.token_means(metrics.token_sums(s, p["labels"], t, bins).tolist(), bins)
    want_kl = sampled_kd_loss(s, p["ids"], p["counts"], p["labels"], teacher_entropy=p["entropy"])
    assert got["val_forward_kl"] == pytest.approx(want_kl.item(), abs=1e-5)
    assert "val_reverse_kl" not in got  # not estimable from draws: not reported (rather than reported as 0)
    most_drawn = p["ids"].gather(1, p["counts"].argmax(-1, keepdim=True)).squeeze(1)
    assert got["val_top1_agreement"] == pytest.approx((s.argmax(-1) == most_drawn)[keep].sum().item() / n)
    # Without the entropy (a cross-entropy estimate) or at another temperature: no KL, agreement still.
    for targets, temperature in ((TeacherTargets(ids=p["ids"], counts=p["counts"]), 1.0), (t, 2.0)):
        sums = metrics.token_sums(s, p["labels"], targets, bins, teacher_temperature=temperature).tolist()
        got = metrics.token_means(sums, bins)
        assert "val_forward_kl" not in got and "val_reverse_kl" not in got and "val_top1_agreement" in got
