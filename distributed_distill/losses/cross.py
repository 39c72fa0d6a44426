"""Cross-tokenizer distillation: a teacher and a student with different tokenizers (vocabularies), compared over
aligned token spans.

Both tokenizers encode the same text; the alignment (not this module) cuts it into S spans where both sides' token
boundaries meet. Span j is x_1..x_m on the student's side (m >= 1) and y_1..y_n on the teacher's (n >= 1). Every
tensor is flat over a batch's next-token rows: row i predicts the next token, ``labels[i]``. Per side a `SpanIndex`
gives ``first`` [S] (the row predicting the span's first token) and ``rest`` [R] with ``rest_span`` [R] (the rows
predicting its later tokens, and the span of each); the labels at rest rows are the actual later tokens.

Merged span distributions (the chain rule, as TRL's GOLD "observed" merge). At temperature T, with
``log p[i] = log_softmax(logits[i] / T)``, for every vocabulary id u of that side::

    log P(u) = log p[first_j](u) + sum over the rest rows r of span j of log p[r](labels[r])

The span's actual text, u = x_1, gets its exact chain-rule probability P(x_1..x_m). Every other entry is the first
position's probability scaled by the same factor, the probability of the actual continuation *given x_1*. That is a
known bias: a counterfactual first token u would have its own continuation, which is not computed; the vector is
unnormalised (it sums to P(x_2..x_m | x_1) <= 1) and keeps the first position's ranking. Both sides carry the same
bias. The student's rest sum is differentiable (it depends on the student's parameters); the teacher's never is.

Per span, summed over spans and multiplied by T^2 (as `kd.py`'s losses are):

- ``uld`` (Universal Logit Distillation, Boizard et al., 2024): sum over ranks r of
  ``|sortdesc(P_s)_r - sortdesc(P_t)_r|``, the shorter vector padded with zeros. No vocabulary mapping.
- ``hybrid``: with ``vocab_map`` [Vt] (the student id of the token with the same string, -1 where none), the mapped
  part is compared entry by entry, ``matched = sum over mapped v of P_t(v) (log P_t(v) - log P_s(map[v]))`` (forward
  KL on the unnormalised span vectors), and the rest by ULD, ``unmatched`` = ``uld`` between the teacher's unmapped
  entries and the student's unmapped ones (student ids that no teacher id maps to), each sorted. The loss is
  ``matched_weight * matched + unmatched_weight * unmatched``. With one tokenizer on both sides (identity map, one
  token per span) it is exactly today's forward KL, and ``unmatched`` is 0. The map is meant to be injective (token
  strings are unique in a vocabulary); where two teacher ids share a student id, each is compared with it.

A sparse teacher (top-k ids, log-probs and the log of the mass outside them, per span's first row) is compared on
what it has. ``uld``: ranks 1..k entry by entry, and the ranks beyond k by their total mass,
``|sum_{r>k} sortdesc(P_s)_r - exp(tail + rest_t)|``. ``hybrid``: the matched sum runs over the mapped ids among
the top k, the unmatched ranks over the unmapped ids among them, and everything else is one remainder on each side:
the teacher's tail mass against the student's mass on the ids neither part compared (its unmapped ids beyond those
ranks, and the images of the mapped teacher ids outside the top k, whose teacher mass is in the tail). With k = Vt
both sparse forms equal the dense ones.

Memory: the loss is computed ``chunk_size`` spans at a time; each chunk's [C, Vs] and [C, Vt] float32 tensors exist
for that chunk only, in the forward and in the backward (each chunk runs under activation checkpointing, so the
backward recomputes its logits instead of keeping them: about one more forward of the loss, no [S, V] tensor). The
student's rest sums are chunked over rest rows the same way. Arithmetic is float32, whatever the input dtype (the
matmuls run in the inputs' or autocast's dtype, as in `kd.chunked_distill_loss`). Nothing else of the package is
imported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import CROSS_KINDS
from .kd import _NEG, _linear_fp32, _log1mexp


@dataclass
class SpanIndex:
    """One side's rows of S aligned spans, as indices into that side's flat next-token rows.

    first: [S] long, the row predicting each span's first token; rest: [R] long, the rows predicting the spans' later
    tokens (a one-token span has none); rest_span: [R] long, the span index (in [0, S)) of each rest row.
    """

    first: torch.Tensor
    rest: torch.Tensor
    rest_span: torch.Tensor

    def __post_init__(self) -> None:
        if self.first.dim() != 1 or self.rest.dim() != 1 or self.rest.shape != self.rest_span.shape:
            raise ValueError(
                f"SpanIndex needs 1-D first [S], rest [R] and rest_span [R], got first {tuple(self.first.shape)}, "
                f"rest {tuple(self.rest.shape)}, rest_span {tuple(self.rest_span.shape)}"
            )

    @property
    def num_spans(self) -> int:
        return self.first.shape[0]


@dataclass
class TeacherSpans:
    """The teacher's side of S spans (`teacher_spans` builds it, without gradients). Exactly one form is set:

      dense, projected lazily: `hidden` [S, Ht], the hidden states of the spans' first rows, with the output layer
        `weight` [Vt, Ht] (and `bias` [Vt]); the loss computes the logits a chunk of spans at a time;
      sparse top-k: `ids` [S, k], `logprobs` [S, k] (log-softmax at the temperature, of the first rows), and
        `tail_logmass` [S], the log of the probability outside the k (None: recomputed from the logprobs).

    rest_logsum: [S] float32, per span the sum of log p_t(actual later token) at the temperature over its rest rows
    (0 for a one-token span).
    text_logprob: scalar float32 or None (`teacher_spans(score_text=True)`), the log-probability at temperature 1 of
    every span's text, the sum over its first and later tokens of log p_t(token | everything before it).
    """

    rest_logsum: torch.Tensor
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    tail_logmass: torch.Tensor | None = None
    text_logprob: torch.Tensor | None = None

    @property
    def num_spans(self) -> int:
        return self.rest_logsum.shape[0]

    @property
    def sparse(self) -> bool:
        return self.ids is not None


@dataclass
class CrossLossOutput:
    """loss_sum: scalar float32, the sum over spans of the per-span loss * T^2, differentiable w.r.t. the student's
    hidden states, weight and bias; the caller normalises. stats: detached float32 sums over spans (see
    `cross_tokenizer_loss`)."""

    loss_sum: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class _Spec:
    kind: str
    temperature: float
    matched_weight: float
    unmatched_weight: float
    mm_dtype: torch.dtype  # of the student's matmul (autocast's, or the promoted input dtypes)
    teacher_mm_dtype: torch.dtype


# --------------------------------------------------------------------------------------------
# per-chunk pieces


def _merged(logits: torch.Tensor, rest: torch.Tensor, temperature: float) -> torch.Tensor:
    """[C, V] first-row logits (float32) and [C] rest sums -> [C, V] log P of the merged span vectors. Clamped at
    _NEG (a zero probability, or a rest sum that overflowed to -inf) so that 0 * (log P_t - log P_s) stays 0."""
    x = logits if temperature == 1.0 else logits / temperature
    return (F.log_softmax(x, dim=-1) + rest[:, None]).clamp_min(_NEG)


def _label_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    mm_dtype: torch.dtype,
) -> torch.Tensor:
    """log p(labels) at temperature T of rows hidden [c, H] under the output layer weight [V, H]: [c] float32."""
    z = _linear_fp32(hidden, weight, bias, mm_dtype)
    if temperature != 1.0:
        z = z / temperature
    return (z.gather(1, labels[:, None]).squeeze(1) - z.logsumexp(-1)).clamp_min(_NEG)


def _sorted_l1(
    ls: torch.Tensor,
    lt: torch.Tensor,
    tail: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """ULD between sorted vectors: ls [C, Ks], lt [C, Kt] log-masses sorted in descending order -> [C].

    Without `tail` (a dense teacher): sum over ranks of |exp(ls) - exp(lt)|, the shorter padded with zeros. With
    `tail` [C] (the log of the teacher mass outside lt's entries): the ranks of the teacher's entries, the first
    `counts` [C] of each row (default: all Kt), are compared entry by entry, and the student's mass at the other
    ranks, plus `extra` [C] (student mass compared nowhere else), against exp(tail) as one remainder.
    """
    ps, pt = ls.exp(), lt.exp()
    width = max(ps.shape[1], pt.shape[1])
    if ps.shape[1] < width:
        ps = F.pad(ps, (0, width - ps.shape[1]))
    if pt.shape[1] < width:
        pt = F.pad(pt, (0, width - pt.shape[1]))
    diff = (ps - pt).abs()
    if tail is None:
        return diff.sum(-1)
    limit = lt.shape[1] if counts is None else counts[:, None]
    compared = torch.arange(width, device=ps.device) < limit
    remainder = ps.masked_fill(compared, 0.0).sum(-1)
    if extra is not None:
        remainder = remainder + extra
    return diff.masked_fill(~compared, 0.0).sum(-1) + (remainder - tail.exp()).abs()


def _descending(x: torch.Tensor) -> torch.Tensor:
    return x.sort(dim=-1, descending=True).values


def _matched_kl(
    lps: torch.Tensor, lpt: torch.Tensor, ids: torch.Tensor | None, vocab_map: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward KL of the mapped entries per span, [C]; and which teacher entries are mapped, and their student
    ids (clamped to 0 where none), for `_hybrid`. Shapes as `_hybrid`'s."""
    to_student = vocab_map if ids is None else vocab_map[ids]  # [Vt] or [C, k]
    mapped = to_student >= 0
    target = to_student.clamp_min(0)
    ls_at = lps.index_select(1, target) if ids is None else lps.gather(1, target)
    return torch.where(mapped, lpt.exp() * (lpt - ls_at), 0.0).sum(-1), mapped, target


def _hybrid(
    lps: torch.Tensor,
    lpt: torch.Tensor,
    ids: torch.Tensor | None,
    tail: torch.Tensor | None,
    vocab_map: torch.Tensor,
    image: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hybrid loss's two parts per span, [C] each: the matched forward KL and the unmatched ULD.

    lps: [C, Vs] student log P; lpt: [C, Vt] (dense, ids None) or [C, k] teacher log P at `ids` [C, k] with `tail`
    [C] (the log of the teacher mass outside them); vocab_map: [Vt]; image: [Vs] bool, the student ids some teacher
    id maps to.
    """
    matched, mapped, target = _matched_kl(lps, lpt, ids, vocab_map)
    lt_unmapped = _descending(lpt.masked_fill(mapped, _NEG))  # the mapped entries sort last, with mass 0
    ls_unmapped = _descending(lps.masked_fill(image, _NEG))
    if ids is None:  # every teacher entry is present: the zero masses pad, as plain ULD
        return matched, _sorted_l1(ls_unmapped, lt_unmapped)
    with torch.no_grad():  # the student ids compared by the matched sum of this row
        covered = torch.zeros_like(lps).scatter_add_(1, target, mapped.to(lps.dtype)) > 0
    # The images of mapped teacher ids outside the top k: their teacher mass is in the tail, so theirs joins the
    # student's remainder (k = Vt leaves none).
    extra = lps.exp().masked_fill(covered | ~image, 0.0).sum(-1)
    unmatched = _sorted_l1(ls_unmapped, lt_unmapped, tail, (~mapped).sum(-1), extra)
    return matched, unmatched


def _span_chunk(
    spec: _Spec,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rest_s: torch.Tensor,
    rest_t: torch.Tensor,
    t_hidden: torch.Tensor | None,
    t_weight: torch.Tensor | None,
    t_bias: torch.Tensor | None,
    t_ids: torch.Tensor | None,
    t_logprobs: torch.Tensor | None,
    t_tail: torch.Tensor | None,
    vocab_map: torch.Tensor | None,
    image: torch.Tensor | None,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of C spans: hidden [C, H] (the student's first rows), rest_s [C] (differentiable), the teacher's
    rest_t [C] and first rows (t_hidden [C, Ht] with the output layer, or t_ids / t_logprobs [C, k] with t_tail
    [C]), weights [C] (what a top-1 agreement counts, per span). Returns (loss * T^2, matched * T^2, unmatched * T^2,
    the weighted top-1 agreements), the last three detached; with "uld" and a vocab_map, matched is the diagnostic
    forward KL of the mapped entries (not part of the loss) and unmatched 0."""
    T = spec.temperature
    z = _linear_fp32(hidden, weight, bias, spec.mm_dtype)
    lps = _merged(z, rest_s, T)
    with torch.no_grad():
        tail = None
        if t_ids is None:
            tz = _linear_fp32(t_hidden, t_weight, t_bias, spec.teacher_mm_dtype)
            teacher_top1 = tz.argmax(-1)
            lpt = _merged(tz, rest_t, T)
            del tz
        else:
            lt = t_logprobs.float()
            teacher_top1 = t_ids.gather(1, lt.argmax(-1, keepdim=True)).squeeze(1)
            lpt = (lt + rest_t[:, None]).clamp_min(_NEG)
            tail = (t_tail + rest_t).clamp_min(_NEG)
        agree = z.new_zeros(())
        if vocab_map is not None:
            agree = ((z.argmax(-1) == vocab_map[teacher_top1]).float() * weights).sum()
    scale = T**2
    if spec.kind == "uld":
        loss = _sorted_l1(_descending(lps), _descending(lpt), tail).sum() * scale
        zero = loss.new_zeros(())
        with torch.no_grad():
            kl = zero if vocab_map is None else _matched_kl(lps, lpt, t_ids, vocab_map)[0].sum() * scale
        return loss, kl, zero, agree
    matched, unmatched = _hybrid(lps, lpt, t_ids, tail, vocab_map, image)
    matched, unmatched = matched.sum() * scale, unmatched.sum() * scale
    loss = spec.matched_weight * matched + spec.unmatched_weight * unmatched
    return loss, matched.detach(), unmatched.detach(), agree


def _chunks(n: int, chunk_size: int) -> list[slice]:
    """Slices of [0, n), chunk_size at a time (<= 0: one); n = 0 gives one empty slice, so that the loss is still
    built from the inputs (a zero connected to them, for a backward that runs)."""
    size = n if chunk_size <= 0 else chunk_size
    return [slice(i, min(i + size, n)) for i in range(0, n, max(size, 1))] or [slice(0, 0)]


def _call(fn: Callable, checkpointed: bool, *args):
    return checkpoint(fn, *args, use_reentrant=False) if checkpointed else fn(*args)


def _rest_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    spans: SpanIndex,
    temperature: float,
    mm_dtype: torch.dtype,
    chunk_size: int,
    checkpointed: bool,
) -> torch.Tensor:
    """[S] float32: per span the sum of log p(label) over its rest rows, chunk_size rest rows at a time."""
    total = torch.zeros(spans.num_spans, device=hidden.device)
    fn = functools.partial(_label_logprobs, temperature=temperature, mm_dtype=mm_dtype)
    for rows in _chunks(spans.rest.shape[0], chunk_size):
        if rows.stop == rows.start:
            continue
        index = spans.rest[rows]
        logprobs = _call(fn, checkpointed, hidden.index_select(0, index), weight, bias, labels[index])
        total = total.index_add(0, spans.rest_span[rows], logprobs)
    return total


# --------------------------------------------------------------------------------------------
# checks


def _mm_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _check_rows(side: str, spans: SpanIndex, labels: torch.Tensor, num_rows: int, vocab_size: int) -> None:
    for name in ("first", "rest", "rest_span"):
        if getattr(spans, name).dtype != torch.long:
            raise ValueError(f"{side} spans.{name} must be int64 (long), got {getattr(spans, name).dtype}")
    if labels.shape[0] != num_rows:
        raise ValueError(f"{side} labels have {labels.shape[0]} rows, the hidden states {num_rows}")
    if spans.rest.numel():
        y = labels[spans.rest]
        if bool(((y < 0) | (y >= vocab_size)).any()):
            raise ValueError(
                f"{side} labels at the spans' rest rows must be token ids in [0, {vocab_size}) (they are the spans' "
                "later tokens), found an ignored or out-of-range label: check the alignment"
            )


def _check_teacher(teacher: TeacherSpans, num_spans: int) -> None:
    dense, sparse = teacher.hidden is not None, teacher.ids is not None
    if dense == sparse:
        raise ValueError("TeacherSpans needs exactly one form: hidden (+ weight) for dense, or ids + logprobs")
    if dense and teacher.weight is None:
        raise ValueError("TeacherSpans.hidden needs TeacherSpans.weight (the teacher's output layer)")
    if sparse and (teacher.logprobs is None or teacher.logprobs.shape != teacher.ids.shape):
        raise ValueError("TeacherSpans.ids [S, k] need TeacherSpans.logprobs of the same shape")
    rows = teacher.hidden if dense else teacher.ids
    if teacher.num_spans != num_spans or rows.shape[0] != num_spans:
        raise ValueError(
            f"the teacher has {teacher.num_spans} spans (rows {rows.shape[0]}), the student's SpanIndex {num_spans}: "
            "both sides must come from the same alignment"
        )


# --------------------------------------------------------------------------------------------
# public


@torch.no_grad()
def teacher_spans(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    spans: SpanIndex,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    chunk_size: int = 1024,
    score_text: bool = False,
) -> TeacherSpans:
    """The teacher's side of the spans, without gradients.

    hidden: [Nt, Ht] (or [B, L, Ht]) the teacher's final hidden states; weight: [Vt, Ht] its output layer (bias
    [Vt]); labels: [Nt] (or [B, L]) its next tokens, real ids at the spans' rest rows; spans: the teacher's
    SpanIndex. The rest sums are computed chunk_size rest rows at a time (no [Nt, Vt] tensor; <= 0: one chunk).
    top_k None: the dense form (the first rows' hidden states, projected by the loss chunk by chunk); an int: the
    first rows reduced to their top-k ids, log-probs at the temperature and the log of the mass outside (computed
    from the complement, exact also when the top k hold nearly all of it; -inf at k >= Vt). score_text: also the
    spans' text log-probability at temperature 1 (`TeacherSpans.text_logprob`; the chain rule over the actual tokens,
    what an on-policy step reports of the teacher), one more chunked pass over the spans' rows.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None: dense), got {top_k}")
    hidden = hidden.detach().reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    _check_rows("teacher", spans, labels, hidden.shape[0], weight.shape[0])
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    mm_dtype = _mm_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        rest = _rest_sums(hidden, weight, bias, labels, spans, temperature, mm_dtype, chunk_size, False)
        text = None
        if score_text:  # every row of every span as the rest of one span, at T = 1
            every = torch.cat([spans.first, spans.rest])
            whole = SpanIndex(spans.first.new_zeros(1), every, torch.zeros_like(every))
            text = _rest_sums(hidden, weight, bias, labels, whole, 1.0, mm_dtype, chunk_size, False)[0]
        first = hidden.index_select(0, spans.first)
        if top_k is None:
            return TeacherSpans(rest_logsum=rest, hidden=first, weight=weight, bias=bias, text_logprob=text)
        k = min(top_k, weight.shape[0])
        ids, logprobs, tails = [], [], []
        for rows in _chunks(spans.num_spans, chunk_size):
            z = _linear_fp32(first[rows], weight, bias, mm_dtype)
            if temperature != 1.0:
                z.div_(temperature)
            lse = z.logsumexp(-1, keepdim=True)
            top, idx = z.topk(k, dim=-1)
            ids.append(idx)
            logprobs.append(top - lse)
            tails.append(z.sub_(lse).exp_().scatter_(1, idx, 0.0).sum(-1).log())
        return TeacherSpans(
            rest_logsum=rest,
            ids=torch.cat(ids),
            logprobs=torch.cat(logprobs),
            tail_logmass=torch.cat(tails),
            text_logprob=text,
        )


def cross_tokenizer_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    student_labels: torch.Tensor,
    student_spans: SpanIndex,
    teacher: TeacherSpans,
    *,
    kind: str = "hybrid",
    vocab_map: torch.Tensor | None = None,
    temperature: float = 1.0,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
    chunk_size: int = 1024,
    span_weights: torch.Tensor | None = None,
) -> CrossLossOutput:
    """The cross-tokenizer loss of `kind` ("uld" or "hybrid", see the module docstring) over S aligned spans.

    student_hidden: [Ns, H] (or [B, L, H]) the student's final hidden states; student_weight: [Vs, H] its output
    layer (student_bias [Vs]); student_labels: [Ns] (or [B, L]) its next tokens, real ids at the spans' rest rows;
    student_spans: the student's SpanIndex; teacher: the same spans' TeacherSpans (`teacher_spans`) at the same
    temperature. vocab_map: [Vt] long, the student id of each teacher id (-1: none); needed by "hybrid", optional
    for "uld" (then only for the top-1 statistic). matched_weight / unmatched_weight weigh hybrid's two parts.
    chunk_size: spans (and rest rows) per chunk; <= 0 computes everything in one piece, without checkpointing.
    span_weights: [S] float, what each span's top-1 agreement counts (default 1 each; the objective passes the
    span's student token count, so the sum over a batch's learned tokens is a share of tokens).

    Returns CrossLossOutput: loss_sum (scalar float32, sum over spans of the per-span loss * T^2) and stats, detached
    float32 sums over spans: "spans" (their count), "top1_agreement" (spans whose student argmax at the first row is
    vocab_map[teacher argmax], each counted span_weights[j]; with vocab_map only), "matched_kl" (with vocab_map: the
    forward KL of the mapped entries * T^2; for hybrid its first part, for uld a diagnostic), and for hybrid
    "unmatched_uld" (its second part, * T^2: loss_sum = matched_weight * matched_kl + unmatched_weight *
    unmatched_uld).
    """
    if kind not in CROSS_KINDS:
        raise ValueError(f"unknown cross-tokenizer loss kind {kind!r}; expected one of: {', '.join(CROSS_KINDS)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kind == "hybrid" and vocab_map is None:
        raise ValueError("kind 'hybrid' needs vocab_map ([Vt] long: the student id of each teacher id, -1 for none)")
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    labels = student_labels.reshape(-1)
    vocab_s = student_weight.shape[0]
    if student_weight.dim() != 2 or student_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"student_weight {tuple(student_weight.shape)} must be [Vs, H] with H = {hidden.shape[1]}")
    _check_rows("student", student_spans, labels, hidden.shape[0], vocab_s)
    num_spans = student_spans.num_spans
    _check_teacher(teacher, num_spans)
    image = None
    if vocab_map is not None:
        vocab_map = vocab_map.to(hidden.device, torch.long)
        if teacher.weight is not None and vocab_map.shape != (teacher.weight.shape[0],):
            raise ValueError(f"vocab_map {tuple(vocab_map.shape)} must be [Vt] with Vt = {teacher.weight.shape[0]}")
        if bool((vocab_map >= vocab_s).any()):
            raise ValueError(f"vocab_map holds student ids >= the student's vocabulary size {vocab_s}")
        image = torch.zeros(vocab_s, dtype=torch.bool, device=hidden.device)
        image[vocab_map[vocab_map >= 0]] = True

    spec = _Spec(
        kind=kind,
        temperature=float(temperature),
        matched_weight=float(matched_weight),
        unmatched_weight=float(unmatched_weight),
        mm_dtype=_mm_dtype(hidden, student_weight),
        teacher_mm_dtype=_mm_dtype(teacher.hidden, teacher.weight) if teacher.hidden is not None else torch.float32,
    )
    # Checkpointing keeps each chunk's [C, V] tensors out of the graph; without a backward to come it only costs.
    checkpointed = chunk_size > 0 and torch.is_grad_enabled()
    T = spec.temperature
    ids, tail = teacher.ids, teacher.tail_logmass
    if teacher.sparse:
        ids = ids.long()
        if tail is None:
            tail = _log1mexp(teacher.logprobs.float().logsumexp(-1))
        tail = tail.detach().float()

    def rows(x: torch.Tensor | None, part: slice) -> torch.Tensor | None:
        return None if x is None else x[part]

    fn = functools.partial(_span_chunk, spec)
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly above
        rest_s = _rest_sums(
            hidden, student_weight, student_bias, labels, student_spans, T, spec.mm_dtype, chunk_size, checkpointed
        )
        rest_t = teacher.rest_logsum.detach().float()
        weights = hidden.new_ones(num_spans, dtype=torch.float32)
        if span_weights is not None:
            if span_weights.shape != (num_spans,):
                raise ValueError(f"span_weights {tuple(span_weights.shape)} must be [S] with S = {num_spans}")
            weights = span_weights.to(hidden.device, torch.float32)
        total = hidden.new_zeros((), dtype=torch.float32)
        sums = torch.zeros(3, device=hidden.device)
        for part in _chunks(num_spans, chunk_size):
            loss, matched, unmatched, agree = _call(
                fn,
                checkpointed,
                hidden.index_select(0, student_spans.first[part]),
                student_weight,
                student_bias,
                rest_s[part],
                rest_t[part],
                rows(teacher.hidden, part),
                teacher.weight,
                teacher.bias,
                rows(ids, part),
                rows(teacher.logprobs, part),
                rows(tail, part),
                vocab_map,
                image,
                weights[part],
            )
            total = total + loss
            sums += torch.stack([matched, unmatched, agree]).detach()
    stats = {"spans": torch.tensor(float(num_spans), device=hidden.device)}
    if vocab_map is not None:
        stats["top1_agreement"], stats["matched_kl"] = sums[2], sums[0]
    if kind == "hybrid":
        stats["unmatched_uld"] = sums[1]
    return CrossLossOutput(loss_sum=total, stats=stats)
