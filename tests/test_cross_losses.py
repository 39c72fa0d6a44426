"""Cross-tokenizer losses (losses/cross.py) against a plain float64 reference: values and gradients of uld and hybrid
over aligned spans, dense and top-k teachers, chunking, the same-tokenizer limit (today's forward KL), the top-1
statistic, and a memory check of the chunked path.

Run: .venv/bin/python -m pytest tests/test_cross_losses.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distributed_distill.losses import SpanIndex, TeacherSpans, cross, cross_tokenizer_loss, kd_loss, teacher_spans

VS, VT = 37, 53  # student and teacher vocabularies
HS, HT = 8, 6  # hidden sizes
TOP_K = 5
# Two float32 computations of one value agree to this. The absolute part is for entries whose exact value cancels to
# ~0 (a span whose student mass exceeds the teacher's at every rank: the first row's exact gradient is 0), which keep
# the rounding of their O(1) terms.
F32 = dict(rtol=1e-6, atol=1e-6)


def assert_close(actual, expected, rtol, atol, what=""):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# a random aligned problem


def make_side(g, vocab, width, lengths, unused):
    """One side: hidden [N, width], weight [vocab, width], bias, labels [N] and the SpanIndex of spans with the given
    token counts, their rows scattered over N = sum(lengths) + unused rows; the unused rows are labelled -100."""
    n = sum(lengths) + unused
    order = torch.randperm(n, generator=g).tolist()
    labels = torch.randint(0, vocab, (n,), generator=g)
    first, rest, rest_span, pos = [], [], [], 0
    for j, m in enumerate(lengths):
        rows = order[pos : pos + m]
        pos += m
        first.append(rows[0])
        rest += rows[1:]
        rest_span += [j] * (m - 1)
    labels[order[pos:]] = -100
    spans = SpanIndex(torch.tensor(first), torch.tensor(rest, dtype=torch.long), torch.tensor(rest_span).long())
    hidden = torch.randn(n, width, generator=g)
    weight = torch.randn(vocab, width, generator=g) * 0.8
    bias = torch.randn(vocab, generator=g) * 0.3
    return hidden, weight, bias, labels, spans


def make_problem(seed, num_spans=7, vs=VS, vt=VT, mapped=25, hs=HS):
    g = torch.Generator().manual_seed(seed)
    ms = torch.randint(1, 5, (num_spans,), generator=g).tolist()  # 1..4 tokens per span on each side
    ns = torch.randint(1, 5, (num_spans,), generator=g).tolist()
    student = make_side(g, vs, hs, ms, unused=3)
    teacher = make_side(g, vt, HT, ns, unused=2)
    vocab_map = torch.full((vt,), -1, dtype=torch.long)
    vocab_map[torch.randperm(vt, generator=g)[:mapped]] = torch.randperm(vs, generator=g)[:mapped]
    return student, teacher, vocab_map


def run(student, teacher, vocab_map, kind, temperature, top_k=None, chunk_size=4, **kw):
    """The package's loss on float32 leaves; returns (loss, stats, grads of hidden, weight, bias)."""
    hidden, weight, bias, labels, spans = (
        x.clone().float().requires_grad_() if i < 3 else x for i, x in enumerate(student)
    )
    t_hidden, t_weight, t_bias, t_labels, t_spans = teacher
    targets = teacher_spans(
        t_hidden, t_weight, t_bias, t_labels, t_spans, temperature=temperature, top_k=top_k, chunk_size=chunk_size
    )
    out = cross_tokenizer_loss(
        hidden, weight, bias, labels, spans, targets, kind=kind, vocab_map=vocab_map, temperature=temperature,
        chunk_size=chunk_size, **kw,
    )  # fmt: skip
    out.loss_sum.backward()
    return out.loss_sum.detach(), out.stats, (hidden.grad, weight.grad, bias.grad)


# --------------------------------------------------------------------------------------------
# float64 reference: per span, in python, from full log-softmax rows; no shared code with the package


def ref_span_logmass(logits, labels, spans, temperature):
    """[N, V] logits -> per span the [V] log P of the chain-rule merge."""
    lp = torch.log_softmax(logits / temperature, -1)
    out = []
    for j in range(spans.first.shape[0]):
        rest = sum((lp[r, labels[r]] for r, s in zip(spans.rest.tolist(), spans.rest_span.tolist()) if s == j), 0.0)
        out.append(lp[spans.first[j]] + rest)
    return out


def ref_sorted_l1(a, b):
    """sum over ranks of |a_r - b_r|, a, b sorted descending, the shorter padded with zeros."""
    a, b = a.sort(descending=True).values, b.sort(descending=True).values
    width = max(a.numel(), b.numel())
    a = torch.cat([a, a.new_zeros(width - a.numel())])
    b = torch.cat([b, b.new_zeros(width - b.numel())])
    return (a - b).abs().sum()


def ref_uld(ls, lt, kept):
    """ULD of one span. ls [Vs], lt [Vt] log P; kept: the teacher ids given (None: dense)."""
    ps, pt = ls.exp(), lt.exp()
    if kept is None:
        return ref_sorted_l1(ps, pt)
    k = len(kept)
    a = ps.sort(descending=True).values
    b = pt[kept].sort(descending=True).values
    a_top = torch.cat([a[:k], a.new_zeros(max(0, k - a.numel()))])
    tail = sum(pt[v] for v in range(pt.numel()) if v not in kept)
    return (a_top - b).abs().sum() + (a[k:].sum() - tail).abs()


def ref_hybrid(ls, lt, kept, vocab_map):
    """(matched, unmatched) of one span; kept: the teacher ids given (None: dense, all of them)."""
    ps, pt = ls.exp(), lt.exp()
    vmap = vocab_map.tolist()
    teacher_ids = range(pt.numel()) if kept is None else kept
    matched = sum((pt[v] * (lt[v] - ls[vmap[v]]) for v in teacher_ids if vmap[v] >= 0), ls.new_zeros(()))
    image = {u for u in vmap if u >= 0}
    t_unmapped = [v for v in teacher_ids if vmap[v] < 0]
    s_unmapped = [u for u in range(ps.numel()) if u not in image]
    if kept is None:
        return matched, ref_sorted_l1(ps[s_unmapped], pt[t_unmapped])
    # top-k: the teacher's unmapped entries rank by rank against the student's largest unmapped ones; then everything
    # compared nowhere, on each side, as one remainder
    k_u = len(t_unmapped)
    order = sorted(s_unmapped, key=lambda u: -float(ps[u].detach()))
    compared_s = order[:k_u]
    a = torch.stack([ps[u] for u in compared_s] + [ps.new_zeros(())] * (k_u - len(compared_s) + 1))[:k_u]
    b = pt[t_unmapped].sort(descending=True).values
    used_s = set(compared_s) | {vmap[v] for v in kept if vmap[v] >= 0}
    remainder_s = sum((ps[u] for u in range(ps.numel()) if u not in used_s), ps.new_zeros(()))
    tail = sum(pt[v] for v in range(pt.numel()) if v not in kept)
    return matched, (a - b).abs().sum() + (remainder_s - tail).abs()


def ref_loss(student, teacher, vocab_map, kind, temperature, top_k=None, matched_weight=1.0, unmatched_weight=1.0):
    """(loss * T^2, grads of hidden, weight, bias) in float64."""
    hidden, weight, bias = (x.double().requires_grad_() for x in student[:3])
    labels, spans = student[3], student[4]
    t_hidden, t_weight, t_bias, t_labels, t_spans = teacher
    t_logits = t_hidden.double() @ t_weight.double().T + t_bias.double()
    ls_spans = ref_span_logmass(hidden @ weight.T + bias, labels, spans, temperature)
    lt_spans = ref_span_logmass(t_logits, t_labels, t_spans, temperature)
    total = hidden.new_zeros(())
    for ls, lt in zip(ls_spans, lt_spans):
        kept = None if top_k is None else lt.topk(min(top_k, lt.numel())).indices.tolist()
        if kind == "uld":
            total = total + ref_uld(ls, lt, kept)
        else:
            matched, unmatched = ref_hybrid(ls, lt, kept, vocab_map)
            total = total + matched_weight * matched + unmatched_weight * unmatched
    total = total * temperature**2
    total.backward()
    return total.detach(), (hidden.grad, weight.grad, bias.grad)


# --------------------------------------------------------------------------------------------
# against the reference


@pytest.mark.parametrize("seed", [0, 7])  # 7: a span whose top k are all mapped (no unmapped teacher entry)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("top_k", [None, TOP_K], ids=["dense", "sparse"])
@pytest.mark.parametrize("kind", ["uld", "hybrid"])
def test_matches_float64_reference(kind, top_k, temperature, seed):
    student, teacher, vocab_map = make_problem(seed)
    assert (student[3] == -100).sum() == 3 and not bool((student[3][student[4].rest] < 0).any())
    got, stats, got_grads = run(student, teacher, vocab_map, kind, temperature, top_k=top_k, chunk_size=3)
    want, want_grads = ref_loss(student, teacher, vocab_map, kind, temperature, top_k=top_k)
    assert_close(got, want, rtol=1e-5, atol=1e-6, what="value")
    for name, g, w in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        assert_close(g, w, rtol=1e-5, atol=1e-6, what=f"grad {name}")
    assert stats["spans"] == 7
    if kind == "hybrid":
        assert_close(stats["matched_kl"] + stats["unmatched_uld"], got, rtol=1e-6, atol=1e-6, what="parts")


@pytest.mark.parametrize("top_k", [None, TOP_K], ids=["dense", "sparse"])
@pytest.mark.parametrize("kind", ["uld", "hybrid"])
def test_chunked_equals_unchunked(kind, top_k):
    student, teacher, vocab_map = make_problem(3, num_spans=9)
    whole, whole_stats, whole_grads = run(student, teacher, vocab_map, kind, 2.0, top_k=top_k, chunk_size=0)
    for chunk in (3, 1):
        got, stats, grads = run(student, teacher, vocab_map, kind, 2.0, top_k=top_k, chunk_size=chunk)
        assert_close(got, whole, **F32, what=f"value, chunk {chunk}")
        for name, g, w in zip(("hidden", "weight", "bias"), grads, whole_grads):
            assert_close(g, w, **F32, what=f"grad {name}, chunk {chunk}")
        for name in whole_stats:
            assert_close(stats[name], whole_stats[name], **F32, what=name)


@pytest.mark.parametrize("kind", ["uld", "hybrid"])
def test_dense_teacher_equals_sparse_at_full_k(kind):
    student, teacher, vocab_map = make_problem(4)
    dense, _, dense_grads = run(student, teacher, vocab_map, kind, 1.0)
    sparse, _, sparse_grads = run(student, teacher, vocab_map, kind, 1.0, top_k=VT)
    assert_close(sparse, dense, **F32, what="value")
    for name, g, w in zip(("hidden", "weight", "bias"), sparse_grads, dense_grads):
        assert_close(g, w, **F32, what=f"grad {name}")


def test_sparse_tail_recomputed_when_not_given():
    student, teacher, vocab_map = make_problem(5)
    targets = teacher_spans(*teacher, temperature=1.0, top_k=TOP_K)
    without = TeacherSpans(rest_logsum=targets.rest_logsum, ids=targets.ids, logprobs=targets.logprobs)
    a = cross_tokenizer_loss(*student, targets, kind="hybrid", vocab_map=vocab_map).loss_sum
    b = cross_tokenizer_loss(*student, without, kind="hybrid", vocab_map=vocab_map).loss_sum
    assert_close(b, a, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# one tokenizer on both sides: today's forward KL


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_same_tokenizer_hybrid_is_forward_kl(temperature):
    g = torch.Generator().manual_seed(6)
    vocab, n = 29, 12
    student = make_side(g, vocab, HS, [1] * 10, unused=2)
    teacher = make_side(g, vocab, HT, [1] * 10, unused=2)
    (hidden, weight, bias, labels, spans), (t_hidden, t_weight, t_bias, _, t_spans) = student, teacher
    assert hidden.shape[0] == n and spans.rest.numel() == 0
    targets = teacher_spans(*teacher, temperature=temperature)
    out = cross_tokenizer_loss(
        hidden, weight, bias, labels, spans, targets, kind="hybrid", vocab_map=torch.arange(vocab),
        temperature=temperature,
    )  # fmt: skip
    s_logits = (hidden @ weight.T + bias)[spans.first]
    t_logits = (t_hidden @ t_weight.T + t_bias)[t_spans.first]
    want = kd_loss(s_logits, t_logits, kind="forward_kl", temperature=temperature, reduction="sum")
    assert_close(out.loss_sum, want, rtol=1e-6, atol=1e-6)
    assert_close(out.stats["matched_kl"], want, rtol=1e-6, atol=1e-6)
    assert float(out.stats["unmatched_uld"]) == 0.0


def test_weights_scale_the_two_parts():
    student, teacher, vocab_map = make_problem(7)
    _, stats, _ = run(student, teacher, vocab_map, "hybrid", 1.0)
    assert float(stats["matched_kl"]) > 0 and float(stats["unmatched_uld"]) > 0
    got, stats2, grads = run(student, teacher, vocab_map, "hybrid", 1.0, matched_weight=0.3, unmatched_weight=2.0)
    assert_close(got, 0.3 * stats["matched_kl"] + 2.0 * stats["unmatched_uld"], **F32)
    for name in ("matched_kl", "unmatched_uld"):  # the stats are the unweighted parts
        assert_close(stats2[name], stats[name], **F32, what=name)
    _, _, matched_grads = run(student, teacher, vocab_map, "hybrid", 1.0, matched_weight=1.0, unmatched_weight=0.0)
    _, _, unmatched_grads = run(student, teacher, vocab_map, "hybrid", 1.0, matched_weight=0.0, unmatched_weight=1.0)
    for g, gm, gu in zip(grads, matched_grads, unmatched_grads):
        assert_close(g, 0.3 * gm + 2.0 * gu, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# statistics, edge cases, refusals


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "sparse"])
def test_top1_agreement_counts_mapped_argmax_matches(top_k):
    # teacher id -> student id; teacher id 2 has no student counterpart
    vocab_map = torch.tensor([2, 0, -1, 1, 3])
    student_top, teacher_top = [2, 1, 0, 3], [0, 3, 2, 1]  # map: 0->2 yes, 3->1 yes, 2->-1 no, 1->0 but 3: no
    spans = SpanIndex(torch.arange(4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    hidden = torch.nn.functional.one_hot(torch.tensor(student_top), 4).float()
    t_hidden = torch.nn.functional.one_hot(torch.tensor(teacher_top), 5).float()
    labels = torch.zeros(4, dtype=torch.long)
    targets = teacher_spans(t_hidden, 5 * torch.eye(5), None, labels, spans, top_k=top_k)
    for kind in ("uld", "hybrid"):
        out = cross_tokenizer_loss(
            hidden, 5 * torch.eye(4), None, labels, spans, targets, kind=kind, vocab_map=vocab_map
        )
        assert float(out.stats["top1_agreement"]) == 2.0
        # span_weights weigh what each span's agreement counts (the objective passes its student token count)
        weighted = cross_tokenizer_loss(
            hidden, 5 * torch.eye(4), None, labels, spans, targets, kind=kind, vocab_map=vocab_map,
            span_weights=torch.tensor([1.0, 2.0, 3.0, 4.0]),
        )  # fmt: skip
        assert float(weighted.stats["top1_agreement"]) == 3.0
        assert_close(weighted.loss_sum, out.loss_sum, **F32)
    out = cross_tokenizer_loss(hidden, 5 * torch.eye(4), None, labels, spans, targets, kind="uld")
    assert set(out.stats) == {"spans"}


@pytest.mark.parametrize("top_k", [None, TOP_K], ids=["dense", "sparse"])
def test_uld_reports_the_matched_kl_as_a_diagnostic(top_k):
    """With a vocab_map, uld's stats carry hybrid's matched part (not optimised by uld), so both kinds log it."""
    student, teacher, vocab_map = make_problem(12)
    uld, uld_stats, _ = run(student, teacher, vocab_map, "uld", 2.0, top_k=top_k)
    _, hybrid_stats, _ = run(student, teacher, vocab_map, "hybrid", 2.0, top_k=top_k)
    assert_close(uld_stats["matched_kl"], hybrid_stats["matched_kl"], **F32)
    assert "unmatched_uld" not in uld_stats
    want, _ = ref_loss(student, teacher, vocab_map, "uld", 2.0, top_k=top_k)
    assert_close(uld, want, rtol=1e-5, atol=1e-6)


def test_no_spans_is_a_connected_zero():
    student, teacher, vocab_map = make_problem(8)
    empty = SpanIndex(*(torch.zeros(0, dtype=torch.long) for _ in range(3)))
    hidden, weight, bias = (x.clone().requires_grad_() for x in student[:3])
    targets = teacher_spans(*teacher[:4], empty, top_k=TOP_K)
    out = cross_tokenizer_loss(hidden, weight, bias, student[3], empty, targets, vocab_map=vocab_map)
    out.loss_sum.backward()
    assert float(out.loss_sum) == 0.0 and float(out.stats["spans"]) == 0.0
    assert hidden.grad is not None and not hidden.grad.any() and not weight.grad.any()


def test_evaluation_under_no_grad_gives_the_same_value():
    student, teacher, vocab_map = make_problem(9)
    got, _, _ = run(student, teacher, vocab_map, "hybrid", 1.0, chunk_size=2)
    targets = teacher_spans(*teacher, chunk_size=2)
    with torch.no_grad():
        out = cross_tokenizer_loss(*student, targets, vocab_map=vocab_map, chunk_size=2)
    assert_close(out.loss_sum, got, **F32)


def test_refusals():
    student, teacher, vocab_map = make_problem(10)
    targets = teacher_spans(*teacher)
    with pytest.raises(ValueError, match="needs vocab_map"):
        cross_tokenizer_loss(*student, targets, kind="hybrid")
    with pytest.raises(ValueError, match="unknown cross-tokenizer loss kind"):
        cross_tokenizer_loss(*student, targets, kind="kl", vocab_map=vocab_map)
    hidden, weight, bias, labels, spans = student
    bad = labels.clone()
    bad[spans.rest[0]] = -100
    with pytest.raises(ValueError, match="rest rows"):
        cross_tokenizer_loss(hidden, weight, bias, bad, spans, targets, vocab_map=vocab_map)
    with pytest.raises(ValueError, match="same alignment"):
        fewer = SpanIndex(spans.first[:-1], spans.rest[:0], spans.rest_span[:0])
        cross_tokenizer_loss(hidden, weight, bias, labels, fewer, targets, vocab_map=vocab_map)
    with pytest.raises(ValueError, match=r"vocab_map \(4,\) must be \[Vt\]"):
        cross_tokenizer_loss(*student, targets, vocab_map=vocab_map[:4])


# --------------------------------------------------------------------------------------------
# memory: nothing [S, V] is created, nor kept for the backward


class _AllocationRecorder(TorchDispatchMode):
    """The element counts of the tensors each aten op creates (views of its inputs excluded), forward and backward."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
        }
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(o.numel())
        return out


MEMORY_VOCAB, MEMORY_SPANS, MEMORY_CHUNK = 32768, 64, 8


def _memory(kind: str, chunk_size: int, backward: bool = True) -> tuple[int, int]:
    """(elements of the largest tensor any op creates in the loss's forward and backward, bytes the autograd graph
    keeps for the backward), at Vs = Vt = 32768 over 64 spans. The kept bytes count each storage once and leave out
    the caller's tensors (the graph only refers to them: the weights, the hidden states, the teacher's spans)."""
    student, teacher, vocab_map = make_problem(
        11, num_spans=MEMORY_SPANS, vs=MEMORY_VOCAB, vt=MEMORY_VOCAB, mapped=MEMORY_VOCAB // 2, hs=4
    )  # hidden sizes 4 and 6: the [V, H] weights and their gradients stay below one chunk's [8, V]
    hidden, weight, bias = (x.clone().requires_grad_() for x in student[:3])
    recorder = _AllocationRecorder()
    with recorder:
        targets = teacher_spans(*teacher, chunk_size=chunk_size)
    callers = [hidden, weight, bias, student[3], vocab_map, *(t for t in vars(targets).values() if t is not None)]
    callers = {t.untyped_storage().data_ptr() for t in callers}
    kept: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in callers:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with recorder:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = cross_tokenizer_loss(
                hidden, weight, bias, student[3], student[4], targets, kind=kind, vocab_map=vocab_map,
                chunk_size=chunk_size,
            )  # fmt: skip
        if backward:
            out.loss_sum.backward()
            assert torch.isfinite(weight.grad).all() and weight.grad.any()
    return max(recorder.sizes), sum(kept.values())


@pytest.mark.parametrize("kind", ["uld", "hybrid"])
def test_chunked_path_creates_and_keeps_no_span_by_vocab_tensor(kind, monkeypatch):
    one_chunk, all_spans = MEMORY_CHUNK * MEMORY_VOCAB, MEMORY_SPANS * MEMORY_VOCAB  # [8, V] and [S, V], elements
    largest, kept = _memory(kind, MEMORY_CHUNK)
    assert largest <= one_chunk, f"an op created a tensor of {largest} elements (one chunk's logits: {one_chunk})"
    # The whole graph keeps less than one chunk's float32 logits (each chunk's are recomputed in the backward).
    assert kept < 4 * one_chunk, f"the graph keeps {kept} bytes for the backward"
    # The checks can fail. Unchunked: [S, V] tensors are created and kept.
    largest, kept = _memory(kind, 0, backward=False)
    assert largest >= all_spans and kept >= 4 * all_spans
    # Chunked without the checkpoints: no tensor is [S, V], but every chunk's [8, V] ones pile up in the graph.
    monkeypatch.setattr(cross, "_call", lambda fn, checkpointed, *args: fn(*args))
    largest, kept = _memory(kind, MEMORY_CHUNK, backward=False)
    assert largest <= one_chunk and kept >= 4 * all_spans
