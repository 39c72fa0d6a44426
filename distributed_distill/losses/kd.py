"""Knowledge-distillation objectives: dense, sparse (top-k), sampled and chunked from hidden states.

Four entry points, one set of definitions (docs/losses.md has the formulas and figures):

- ``kd_loss(student_logits, teacher_logits, labels)``: both distributions materialised as logits.
- ``sparse_kd_loss(student_logits, teacher_ids, teacher_logprobs, labels)``: the teacher is given as
  its top-k log-probabilities (offline store, or an online teacher that emits sparse targets).
- ``sampled_kd_loss(student_logits, teacher_ids, teacher_counts, labels)``: the teacher is given as draws
  from p_T, kept as unique ids with normalised counts (Sparse Logit Sampling, Anshumann et al., 2025): an
  unbiased estimate of forward KL, in value and gradient.
- ``chunked_distill_loss(student_hidden, student_weight, labels, ...)``: KD + cross-entropy straight
  from the student's final hidden states and lm_head weight, ``chunk_size`` tokens at a time, so no
  ``[N, V]`` float32 tensor is ever alive, in the forward or the backward pass.

Notation, per counted position: ``p_T = softmax(teacher / T)``, ``p_S = softmax(student / T)``.
Every divergence is summed over the vocabulary, then reduced over counted positions (those whose
label is not ``ignore_index``) and multiplied by ``T**2`` so that gradient magnitudes do not shrink
as the temperature grows (Hinton et al., 2015). All arithmetic is float32 (float64 inputs stay
float64) and in log space, which keeps logits of magnitude 1e4 finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import KINDS

TAILS = ("bucket", "renormalize")
REDUCTIONS = ("mean", "sum")

# Log-probabilities are clamped here instead of being allowed to reach -inf (a masked vocabulary
# entry, or an empty tail bucket): 0 * (-inf - -inf) is NaN, 0 * (finite) is 0, and the clamp
# changes nothing a float32 probability can express (exp of it is exactly 0).
_NEG = torch.finfo(torch.float32).min


# --------------------------------------------------------------------------------------------
# argument checks


def _check_args(kind: str, temperature: float, beta: float, skew: float, reduction: str = "sum") -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown distillation loss kind {kind!r}; expected one of: {', '.join(KINDS)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"kind 'jsd' needs 0 < beta < 1, got beta={beta}")
    if kind.startswith("skew_") and not 0.0 <= skew < 1.0:
        raise ValueError(f"kind {kind!r} needs 0 <= skew < 1, got skew={skew}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_tail(tail: str, kind: str) -> None:
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if kind == "mse":
        raise ValueError("kind 'mse' compares logits and is not defined for sparse (top-k) teacher targets")


def _check_sampled(kind: str) -> None:
    if kind != "forward_kl":
        raise ValueError(
            f"sampled teacher targets support kind 'forward_kl' only, got {kind!r}: the other divergences need p_T "
            "at ids that were not drawn, which samples do not estimate without bias"
        )


def _check_labels(labels: torch.Tensor | None, leading_shape: torch.Size, what: str) -> None:
    if labels is not None and labels.shape != leading_shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {what} shape {tuple(leading_shape)}")


# --------------------------------------------------------------------------------------------
# per-position divergences on log-probabilities


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16/fp16 inputs are upcast (their log_softmax loses too much); float64 stays float64.
    return torch.promote_types(x.dtype, torch.float32)


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[n, V] logits of any float dtype -> [n, V] float32+ log-probabilities of softmax(logits / T)."""
    x = logits.to(_compute_dtype(logits))
    if temperature != 1.0:
        x = x / temperature
    return F.log_softmax(x, dim=-1).clamp_min(_NEG)


def _log(w: float) -> float:
    return math.log(w) if w > 0 else -math.inf


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) from log a, log b: [n, K] -> [n, K], stable for tiny masses."""
    return torch.logaddexp(log_a + _log(w), log_b + _log(1.0 - w))


def _divergence(ls: torch.Tensor, lt: torch.Tensor, kind: str, beta: float, skew: float) -> torch.Tensor:
    """Per-position divergence between the student and teacher distributions.

    ls, lt: [n, K] log-probabilities (student, teacher), each row normalised. Returns [n].
    Written as plain differentiable tensor code; the analytic gradient used by the chunked path is
    ``_divergence_and_grad`` and the tests hold the two against a float64 reference.
    """
    if kind == "forward_kl":
        return (lt.exp() * (lt - ls)).sum(-1)
    if kind == "reverse_kl":
        return (ls.exp() * (ls - lt)).sum(-1)
    if kind == "jsd":
        lm = _log_mix(lt, ls, beta)
        return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    if kind == "skew_forward_kl":
        return (lt.exp() * (lt - _log_mix(lt, ls, skew))).sum(-1)
    if kind == "skew_reverse_kl":
        return (ls.exp() * (ls - _log_mix(ls, lt, skew))).sum(-1)
    if kind == "tvd":
        return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)
    raise ValueError(f"kind {kind!r} is not a divergence between distributions")


def _log_mix_inplace(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """_log_mix for the no-grad chunked path: one temporary instead of two."""
    out = log_a + _log(w)
    return torch.logaddexp(out, log_b + _log(1.0 - w), out=out)


def _rowsum_of_product(a: torch.Tensor, b: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) computed in buf (overwritten): [n, K] x 3 -> [n]."""
    return torch.mul(a, b, out=buf).sum(-1)


def _divergence_and_grad(
    ls: torch.Tensor,
    lt: torch.Tensor,
    kind: str,
    beta: float,
    skew: float,
    pt: torch.Tensor | None = None,
    lt_is_scratch: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Divergence [n] and its gradient [n, K] w.r.t. the student *logits* s with ls = log_softmax(s).

    ls, lt: [n, K] log-probabilities; pt: lt.exp() if the caller already has it. ls is not
    modified; lt is not either unless lt_is_scratch (then forward_kl builds its result in it).
    With h = dD/d(ls) (treating ls as free), the chain rule through log_softmax gives
    dD/ds = h - p_S * sum(h). Closed forms instead of autograd keep a chunk to a few [n, K] buffers
    (autograd would save every intermediate); buffers are reused in place for the same reason.
    """
    if kind in ("forward_kl", "jsd", "skew_forward_kl", "tvd") and pt is None:
        pt = lt.exp()
    if kind == "forward_kl":  # h = -p_T, sum(h) = -1: dD/ds = p_S - p_T
        g = lt.sub_(ls) if lt_is_scratch else lt - ls
        value = g.mul_(pt).sum(-1)
        return value, torch.exp(ls, out=g).sub_(pt)
    ps = ls.exp()
    tmp = torch.empty_like(ls)
    if kind == "reverse_kl":  # h = p_S (ls - lt + 1): dD/ds = p_S (ls - lt - D)
        d = ls - lt
        value = _rowsum_of_product(ps, d, tmp)
        return value, d.sub_(value[:, None]).mul_(ps)
    if kind == "jsd":
        lm = _log_mix_inplace(lt, ls, beta)
        kl_t = _rowsum_of_product(pt, torch.sub(lt, lm, out=tmp), tmp)
        d = lm.neg_().add_(ls)  # ls - lm, in lm's buffer
        kl_s = _rowsum_of_product(ps, d, tmp)
        # h = (1-beta) p_S (ls - lm): the two d(lm) terms cancel because beta p_T + (1-beta) p_S = m.
        return beta * kl_t + (1 - beta) * kl_s, d.sub_(kl_s[:, None]).mul_(ps).mul_(1 - beta)
    if kind == "skew_forward_kl":  # m = a p_T + (1-a) p_S; h = -p_T (1-a) p_S / m
        lm = _log_mix_inplace(lt, ls, skew)
        value = _rowsum_of_product(pt, torch.sub(lt, lm, out=tmp), tmp)
        h = lm.neg_().add_(ls).add_(math.log1p(-skew)).exp_().mul_(pt).neg_()
        return value, h.sub_(ps.mul_(h.sum(-1, keepdim=True)))
    if kind == "skew_reverse_kl":  # m = a p_S + (1-a) p_T; h = p_S (ls - lm + 1 - a p_S / m)
        lm = _log_mix_inplace(ls, lt, skew)
        d = ls - lm
        value = _rowsum_of_product(ps, d, tmp)
        r = lm.neg_().add_(ls).add_(_log(skew)).exp_()  # a p_S / m, in lm's buffer
        h = d.add_(1.0).sub_(r).mul_(ps)
        return value, h.sub_(ps.mul_(h.sum(-1, keepdim=True)))
    if kind == "tvd":  # dD/dp_S = sign(p_S - p_T) / 2, with sign(0) = 0 as autograd's abs has it
        diff = torch.sub(ps, pt, out=tmp)
        value = 0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1)
        gp = diff.sign_().mul_(0.5)
        return value, gp.sub_(_rowsum_of_product(ps, gp, torch.empty_like(ps))[:, None]).mul_(ps)
    raise ValueError(f"kind {kind!r} is not a divergence between distributions")


def _mse_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """mean over the vocabulary of (student/T - teacher/T)^2: [n, V], [n, V] -> [n]."""
    diff = (student.to(_compute_dtype(student)) - teacher.to(_compute_dtype(student))) / temperature
    return diff.square().mean(-1)


# --------------------------------------------------------------------------------------------
# sparse (top-k) targets


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012); x >= 0 gives -inf."""
    x = x.clamp_max(0.0)  # rounding can push a stored top-k mass a hair above 1
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _sparse_teacher_logprobs(
    teacher_logprobs: torch.Tensor, tail: str, vocab_size: int, tail_logmass: torch.Tensor | None
) -> torch.Tensor:
    """Teacher top-k log-probs [n, k] -> the distribution compared: [n, k+1] (bucket) or [n, k]."""
    lt = teacher_logprobs.to(_compute_dtype(teacher_logprobs)).clamp_min(_NEG)
    if tail == "renormalize":
        return (lt - lt.logsumexp(-1, keepdim=True)).clamp_min(_NEG)
    k = lt.shape[-1]
    if k >= vocab_size:
        # The top-k is the whole vocabulary: the student has no mass outside it, so the bucket is
        # empty on both sides, whatever rounding says 1 - sum(p) is.
        lt_tail = torch.full_like(lt[:, 0], _NEG)
    elif tail_logmass is not None:
        lt_tail = tail_logmass.to(lt.dtype)
    else:
        lt_tail = _log1mexp(lt.logsumexp(-1))
    buckets = torch.cat([lt, lt_tail.clamp_min(_NEG)[:, None]], dim=-1)
    # The k + 1 masses sum to 1 up to rounding (stored log-probs are often fp16/bf16) or, with a
    # recorded tail mass, up to the producer's consistency; normalising makes the target a
    # distribution exactly, which the divergences and their closed-form gradients assume.
    return (buckets - buckets.logsumexp(-1, keepdim=True)).clamp_min(_NEG)


def _sparse_student_logits(s: torch.Tensor, ids: torch.Tensor, tail: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Student logits at temperature [n, V] -> the logits of the compared distribution.

    bucket: [n, k+1] = [s[ids], logsumexp(s outside ids)]; log_softmax of it is exactly
    [log p_S[ids], log(1 - sum p_S[ids])] because both normalise by logsumexp(s) over V.
    renormalize: [n, k] = s[ids]. Also returns ``outside`` ([n, V] logits with the ids set to
    _NEG; None for renormalize), which the chunked path reuses for the gradient.
    """
    s_ids = s.gather(-1, ids)
    if tail == "renormalize":
        return s_ids, None
    outside = s.scatter(-1, ids, _NEG)  # _NEG, not -inf: logsumexp's gradient is then NaN-free when k == V
    return torch.cat([s_ids, outside.logsumexp(-1, keepdim=True)], dim=-1), outside


# --------------------------------------------------------------------------------------------
# sampled targets (unique drawn ids with normalised counts)


def _sampled_rows(ls: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, entropy: torch.Tensor | None) -> torch.Tensor:
    """Per-position forward-KL estimate -H - sum_i w_i ls[ids_i]: ls [n, V], ids/w [n, m], entropy [n] -> [n].

    E[w] = p_T over the draws, so E[-sum w ls[ids]] = H(p_T, p_S) and the estimate of KL(p_T || p_S) is unbiased;
    without the entropy it is the cross-entropy estimate (KL + H(p_T): the same gradient, a constant apart).
    Padding entries (w = 0, any valid id) add 0: ls is clamped at _NEG, so 0 * ls is never NaN.
    """
    cross = -(ls.gather(-1, ids) * w).sum(-1)
    return cross if entropy is None else cross - entropy


# --------------------------------------------------------------------------------------------
# public: materialised logits


def _select_counted(labels: torch.Tensor | None, ignore_index: int, *rows: torch.Tensor | None):
    """Keep the rows whose label is not ignore_index. rows: [n, ...] each -> ([m, ...] each, m)."""
    n = rows[0].shape[0]
    if labels is None:
        return rows, n
    keep = labels.reshape(-1) != ignore_index
    if bool(keep.all()):  # the common case: no copy
        return rows, n
    return tuple(None if r is None else r[keep] for r in rows), int(keep.sum())


def _reduce(total: torch.Tensor, count: int, temperature: float, reduction: str) -> torch.Tensor:
    total = total * temperature**2
    return total / max(count, 1) if reduction == "mean" else total


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Distillation loss between two sets of logits.

    student_logits, teacher_logits: [B, S, V] or [N, V] (any float dtype; computed in float32).
    labels: [B, S] or [N], already aligned with the logits; positions equal to ignore_index do not
    count. kind: one of KINDS (see module docstring and docs/losses.md for the formulas).
    Returns a scalar: the sum over counted positions of the per-position divergence, times T^2,
    divided by the number of counted positions for reduction="mean". No counted positions gives 0,
    still connected to student_logits so that backward runs (with a zero gradient).
    """
    _check_args(kind, temperature, beta, skew, reduction)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    _check_labels(labels, student_logits.shape[:-1], "logits")
    vocab = student_logits.shape[-1]
    (s, t), count = _select_counted(
        labels, ignore_index, student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    )
    if kind == "mse":
        rows = _mse_rows(s, t.detach(), temperature)
    else:
        rows = _divergence(_log_softmax(s, temperature), _log_softmax(t.detach(), temperature), kind, beta, skew)
    return _reduce(rows.sum(), count, temperature, reduction)


def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    tail: str = "bucket",
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
    teacher_tail_logmass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distillation loss against a teacher given as its top-k log-probabilities.

    student_logits: [..., V]. teacher_ids: int [..., k], distinct ids per position.
    teacher_logprobs: [..., k], log p_T of those ids where p_T = softmax(teacher / T) at the same
    temperature T passed here. teacher_tail_logmass: optional [...], log(1 - sum p_T[ids]) as
    recorded by the producer (more accurate than recomputing it from rounded top-k values).
    tail="bucket" compares [p[ids], 1 - sum p[ids]] for both (k+1 outcomes); tail="renormalize"
    compares both distributions renormalised over the k ids. When k == V both equal kd_loss.
    Reduction, masking and the T^2 factor as in kd_loss; kind "mse" raises ValueError.
    """
    _check_args(kind, temperature, beta, skew, reduction)
    _check_tail(tail, kind)
    lead = student_logits.shape[:-1]
    if teacher_ids.shape[:-1] != lead or teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs {tuple(teacher_logprobs.shape)} "
            f"must both be [..., k] with leading shape {tuple(lead)}"
        )
    _check_labels(labels, lead, "logits")
    vocab, k = student_logits.shape[-1], teacher_ids.shape[-1]
    tail_rows = None if teacher_tail_logmass is None else teacher_tail_logmass.reshape(-1)
    (s, ids, lt, tail_lm), count = _select_counted(
        labels,
        ignore_index,
        student_logits.reshape(-1, vocab),
        teacher_ids.reshape(-1, k).long(),
        teacher_logprobs.reshape(-1, k),
        tail_rows,
    )
    s = s.to(_compute_dtype(s))
    if temperature != 1.0:
        s = s / temperature
    s_compared, _ = _sparse_student_logits(s, ids, tail)
    ls = F.log_softmax(s_compared, dim=-1).clamp_min(_NEG)
    lt = _sparse_teacher_logprobs(lt.detach(), tail, vocab, tail_lm)
    rows = _divergence(ls, lt.to(ls.dtype), kind, beta, skew)
    return _reduce(rows.sum(), count, temperature, reduction)


def sampled_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_counts: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    teacher_entropy: torch.Tensor | None = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL against a teacher given as draws from p_T = softmax(teacher / T) (Sparse Logit Sampling).

    student_logits: [..., V]. teacher_ids: int [..., m], the unique ids drawn per position; teacher_counts:
    [..., m], their normalised counts w = count / draws (a row with fewer than m unique ids is padded with
    w = 0 and any valid id). teacher_entropy: optional [...], H(p_T) in nats at the same temperature T.
    Per position the value is -H - sum_i w_i log p_S(ids_i), whose expectation over the draws is
    KL(p_T || p_S) exactly, and its gradient w.r.t. the student logits at temperature, p_S * sum(w) - w
    (p_S - w: the weights sum to 1), has expectation p_S - p_T, the dense gradient. Without teacher_entropy
    the value omits -H: the cross-entropy estimate, KL + H(p_T), with the same gradient.
    Only kind "forward_kl" (any other raises ValueError: it needs p_T at ids that were not drawn).
    Reduction, masking and the T^2 factor as in kd_loss. Plain autograd code: the reference of the chunked path.
    """
    _check_args(kind, temperature, 0.5, 0.1, reduction)
    _check_sampled(kind)
    lead = student_logits.shape[:-1]
    if teacher_ids.shape[:-1] != lead or teacher_counts.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_counts {tuple(teacher_counts.shape)} "
            f"must both be [..., m] with leading shape {tuple(lead)}"
        )
    if teacher_entropy is not None and teacher_entropy.shape != lead:
        raise ValueError(f"teacher_entropy {tuple(teacher_entropy.shape)} must have shape {tuple(lead)}")
    _check_labels(labels, lead, "logits")
    vocab, m = student_logits.shape[-1], teacher_ids.shape[-1]
    (s, ids, w, entropy), count = _select_counted(
        labels,
        ignore_index,
        student_logits.reshape(-1, vocab),
        teacher_ids.reshape(-1, m).long(),
        teacher_counts.reshape(-1, m),
        None if teacher_entropy is None else teacher_entropy.reshape(-1),
    )
    ls = _log_softmax(s, temperature)
    entropy = None if entropy is None else entropy.detach().to(ls.dtype)
    rows = _sampled_rows(ls, ids, w.detach().to(ls.dtype), entropy)
    return _reduce(rows.sum(), count, temperature, reduction)


# --------------------------------------------------------------------------------------------
# public: chunked from hidden states


# --------------------------------------------------------------------------------------------
# chunk size

# `distill.chunk_size: auto`, from a memory budget. A forward_kl chunk holds two [c, V] float32 buffers (the
# student's logits, then its gradient, and the teacher's; the other kinds two or three more), so the working set
# grows with c * V; the [V, H] weight gradient, which the loss holds anyway, grows with H. The rule: each [c, V]
# buffer may take CHUNK_BUFFER_BYTES, or an eighth of the [V, H] float32 weight gradient when that is larger (then
# the working set is at most a quarter of memory the step already spends). At T=4096, H=2048, V=128256 this gives
# 256 rows; at V=32k, H=1024 512 rows, which cost 3.6 % more time than 1024 rows and 31 % less peak memory
# (benchmarks/loss_memory.py, docs/losses.md); a small vocabulary (the demo's 4096) takes the device's most rows.
CHUNK_BUFFER_BYTES = 64 * 2**20
# Rows below which the matmuls lose efficiency: a GPU wants whole tensor-core tiles per launch, a CPU core less.
MIN_CHUNK_ROWS = {"cpu": 32, "cuda": 128}
# And above which they gain nothing: on CPU one 8192-row chunk made the demo's whole KD step cost 1.13x the CPU
# time of 1024-row chunks (benchmarks/chunk_speed.py --settings 8192,1024; docs/losses.md), so a small vocabulary
# keeps the 1024 rows it always had there; a GPU takes up to 8192.
MAX_CHUNK_ROWS = {"cpu": 1024, "cuda": 8192}


def auto_chunk_size(vocab_size: int, hidden_size: int, device: str | torch.device = "cpu") -> int:
    """Rows per chunk for `distill.chunk_size: auto`, from the vocabulary, the hidden size and the device
    (see CHUNK_BUFFER_BYTES above): a multiple of 32 between the device's MIN_CHUNK_ROWS and MAX_CHUNK_ROWS."""
    if vocab_size < 1 or hidden_size < 1:
        raise ValueError(f"vocab_size={vocab_size} and hidden_size={hidden_size} must be >= 1")
    kind = torch.device(device).type
    lo = MIN_CHUNK_ROWS.get(kind, MIN_CHUNK_ROWS["cuda"])
    hi = MAX_CHUNK_ROWS.get(kind, MAX_CHUNK_ROWS["cuda"])
    rows = max(CHUNK_BUFFER_BYTES // (4 * vocab_size), hidden_size // 8)
    return max(lo, min(hi, rows // 32 * 32))


def resolve_chunk_size(setting: int | str, vocab_size: int, hidden_size: int, device: str | torch.device) -> int:
    """`distill.chunk_size` as a number of rows: an int is kept (0 = the naive path), "auto" is chosen by
    `auto_chunk_size`. The one place the trainer, the teacher and precompute turn the setting into rows."""
    if setting == "auto":
        return auto_chunk_size(vocab_size, hidden_size, device)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(f"chunk_size must be 'auto' or an int >= 0, got {setting!r}")
    return setting


@dataclass
class LossOutput:
    """Sums over counted positions; the caller divides by the global token count (docs/design.md, normalisation)."""

    kd_sum: torch.Tensor  # scalar float32: sum of per-position divergence * T^2 (0 without a teacher)
    ce_sum: torch.Tensor  # scalar float32: sum of token cross-entropy at temperature 1
    num_tokens: torch.Tensor  # scalar int64: counted positions
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached float32 sums, see chunked_distill_loss
    # [P] float32: per layer pair, the summed hint loss (hints.hint_loss) of the same positions; None without hints
    hint_sums: torch.Tensor | None = None


@dataclass
class TeacherTargets:
    """The teacher's signal for N next-token positions, as rows; every teacher source (online engines, the offline
    store) produces it and every loss entry point accepts it. Exactly one form is set (none: no teacher):

      dense, projected lazily: `hidden` [N, Ht] with the output layer `weight` [V, Ht] (and `bias` [V]); the
        chunked loss computes logits chunk by chunk, so no [N, V] tensor exists;
      dense, materialised: `logits` [N, V];
      sparse top-k: `ids` [N, k], `logprobs` [N, k] (log-softmax at the teacher temperature), optionally
        `tail_logmass` [N] (log of the probability outside the top k);
      sampled (Sparse Logit Sampling): `ids` [N, m], the unique ids of draws from softmax(logits / T), with
        `counts` [N, m] float32, their normalised counts w = count / draws (E[w] = p_T; a row with fewer than m
        unique ids is padded with weight 0 and any valid id), optionally `entropy` [N] float32, H(p_T) in nats at
        the temperature (without it the loss is the cross-entropy estimate: KL + H(p_T), the same gradient).

    Besides any form, an online teacher asked for them carries `hidden_states`: hidden-state index -> [N, Ht], the
    teacher's intermediate states at the same N positions (the hint loss's targets, hints.py). Targets combined from
    several teachers (teachers.py: their mixture, or rows routed to each) carry `parts`: teacher name -> that
    teacher's own targets of the same N positions, for the per-teacher diagnostics; the losses never read them.
    A teacher with another tokenizer (cross_teacher.py) sets `cross` alone: its targets are spans of tokens aligned
    between the two tokenizations, not rows (losses.cross_tokenizer_loss compares them).
    """

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    tail_logmass: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    hidden_states: dict[int, torch.Tensor] | None = None
    parts: dict[str, TeacherTargets] | None = None
    cross: Any = None  # a teacher with another tokenizer: cross_teacher.CrossTargets, spans instead of rows

    @property
    def present(self) -> bool:
        return self.hidden is not None or self.logits is not None or self.ids is not None or self.cross is not None

    @property
    def sparse(self) -> bool:
        """Top-k targets (ids with log-probabilities); sampled ones are not."""
        return self.ids is not None and self.counts is None

    @property
    def sampled(self) -> bool:
        """Sampled targets (ids with normalised counts)."""
        return self.counts is not None

    def loss_kwargs(self) -> dict:
        """Keyword arguments of `chunked_distill_loss` for this signal."""
        if self.sampled:
            return dict(teacher_ids=self.ids, teacher_counts=self.counts, teacher_entropy=self.entropy)
        if self.sparse:
            return dict(teacher_ids=self.ids, teacher_logprobs=self.logprobs, teacher_tail_logmass=self.tail_logmass)
        if self.logits is not None:
            return dict(teacher_logits=self.logits)
        return dict(teacher_hidden=self.hidden, teacher_weight=self.weight, teacher_bias=self.bias)

    def dense_logits(self) -> torch.Tensor:
        """[N, V] logits, for the naive (unchunked) loss path."""
        if self.logits is not None:
            return self.logits
        return F.linear(self.hidden, self.weight, self.bias)


@dataclass(frozen=True)
class _Spec:
    kind: str
    temperature: float
    beta: float
    skew: float
    tail: str
    ignore_index: int
    chunk_size: int
    mm_dtype: torch.dtype  # dtype of the student logits matmul (autocast's, or the promoted input dtypes)
    teacher_mm_dtype: torch.dtype  # the same for the teacher's, so its [V, Ht] weight is never cast per chunk


@dataclass
class _ChunkSums:
    kd: torch.Tensor
    ce: torch.Tensor
    count: int
    stats: dict[str, torch.Tensor]


def _rows(x: torch.Tensor | None, idx: slice | torch.Tensor) -> torch.Tensor | None:
    if x is None:
        return None
    return x[idx] if isinstance(idx, slice) else x.index_select(0, idx)


def _linear_fp32(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, mm_dtype: torch.dtype) -> torch.Tensor:
    """[c, H] @ [V, H]^T (+ [V]) -> [c, V] float32. The matmul runs in mm_dtype (bf16 stays bf16, as
    an HF lm_head would compute it); only the [c, V] result is upcast, never the [V, H] weight."""
    out = h.to(mm_dtype) @ w.to(mm_dtype).T
    if b is not None:
        out = out + b.to(mm_dtype)
    return out.float()


def linear_into(
    out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, mm_dtype: torch.dtype
) -> torch.Tensor:
    """_linear_fp32 written into `out` ([c, V] float32, reused chunk after chunk). A fresh [c, V] result per chunk
    costs its page faults every time: on CPU the allocator hands buffers this large back to the kernel when freed,
    and faulting in 128 MiB took longer than the elementwise work on it (benchmarks/loss_memory.py, docs/losses.md)."""
    if mm_dtype == torch.float32 and w.dtype == torch.float32:
        torch.mm(h.to(mm_dtype), w.T, out=out)
        return out if b is None else out.add_(b.to(mm_dtype))
    return out.copy_(_linear_fp32(h, w, b, mm_dtype))


def softmax_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """softmax of x [n, V] over the last dim, written into out [n, V] (x unchanged); returns logsumexp [n]."""
    m = x.amax(-1, keepdim=True)
    torch.sub(x, m, out=out).exp_()
    total = out.sum(-1, keepdim=True)
    out.div_(total)
    return total.log_().add_(m).squeeze(1)


def _log_softmax_(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """In-place _log_softmax on a float32 [n, V] buffer the caller owns."""
    if temperature != 1.0:
        x.div_(temperature)
    return x.sub_(x.logsumexp(-1, keepdim=True)).clamp_min_(_NEG)


def _teacher_logits_chunk(teacher: TeacherTargets, rows: slice | torch.Tensor, mm_dtype: torch.dtype) -> torch.Tensor:
    """[c, V] float32 teacher logits of the chunk, in a fresh buffer (the caller may modify it)."""
    if teacher.hidden is not None:
        return _linear_fp32(_rows(teacher.hidden, rows), teacher.weight, teacher.bias, mm_dtype)
    # A slice of float32 logits is a view of the caller's tensor: copy it. index_select already copied.
    return _rows(teacher.logits, rows).to(torch.float32, copy=isinstance(rows, slice))


def _entropy(p: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """-sum(p log p) over the last dim: [n, K] -> [n]."""
    return -_rowsum_of_product(p, logp, torch.empty_like(p))


def _chunk_objective(
    z: torch.Tensor,
    y: torch.Tensor,
    teacher: TeacherTargets,
    rows: slice | torch.Tensor,
    spec: _Spec,
    kd_scale: float,
    ce_scale: float,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """KD and CE on one chunk, and the gradient of kd_scale * kd + ce_scale * ce w.r.t. z.

    z: [c, V] float32 student logits, consumed (its buffer becomes the gradient). y: [c] labels.
    rows: the chunk's rows in the teacher tensors. Returns (kd_sum = sum of divergences * T^2,
    ce_sum, dz [c, V] float32 or None, stats sums). The buffers are ordered so that forward_kl
    holds three [c, V] float32 tensors at its peak (z, teacher log-probs, p_T); buffers are reused.
    Sampled targets hold two (z, as log p_S and then the CE gradient, and p_S for the KD gradient).
    """
    vocab, T = z.shape[-1], spec.temperature
    lse = z.logsumexp(-1)
    ce = (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
    kd = torch.zeros((), device=z.device)
    stats: dict[str, torch.Tensor] = {}
    grad_kd = None  # [c, V]: d(sum of divergences)/ds at s = z / T
    grad_at_ids = None  # (ids [c, k], values [c, k]): a sparse part of the same gradient
    z_holds_log_softmax_at_t = False
    if teacher.present:
        student_top1 = z.argmax(-1)
        if teacher.sparse:
            ids = _rows(teacher.ids, rows)
            lt_k = _rows(teacher.logprobs, rows).float()
            lt = _sparse_teacher_logprobs(lt_k, spec.tail, vocab, _rows(teacher.tail_logmass, rows))
            s_compared, outside = _sparse_student_logits(z if T == 1.0 else z / T, ids, spec.tail)
            ls = F.log_softmax(s_compared, dim=-1).clamp_min_(_NEG)
            value, g = _divergence_and_grad(ls, lt, spec.kind, spec.beta, spec.skew)
            k = ids.shape[-1]
            if outside is not None:
                # s_tail = logsumexp(s outside the ids): d s_tail / d s_j = p_j / p_tail there, and
                # exp(_NEG - s_tail) = 0 at the ids (unless k == V, where g[:, k] is 0 itself).
                grad_kd = outside.sub_(s_compared[:, k:]).exp_().mul_(g[:, k:])
            grad_at_ids = (ids, g[:, :k])
            teacher_top1 = ids.gather(1, lt_k.argmax(-1, keepdim=True)).squeeze(1)
            stats["teacher_entropy"] = _entropy(lt.exp(), lt).sum()
            stats["topk_mass"] = lt_k.logsumexp(-1).exp().sum()
        elif teacher.sampled:
            ids = _rows(teacher.ids, rows)
            w = _rows(teacher.counts, rows).float()
            entropy = None if teacher.entropy is None else _rows(teacher.entropy, rows).float()
            teacher_top1 = ids.gather(1, w.argmax(-1, keepdim=True)).squeeze(1)  # the most drawn id
            if entropy is not None:
                stats["teacher_entropy"] = entropy.sum()
            # log_softmax(z / T) in z's own buffer, as the dense path; the CE gradient below recovers softmax(z)
            if T != 1.0:
                z.div_(T)
            lse_t = lse if T == 1.0 else z.logsumexp(-1)
            ls = z.sub_(lse_t[:, None]).clamp_min_(_NEG)
            z_holds_log_softmax_at_t = True
            value = _sampled_rows(ls, ids, w, entropy)
            if want_grad and kd_scale != 0.0:
                # d/ds of -sum_i w_i ls[ids_i] = p_S * sum(w) - w: p_S - w for weights that sum to 1, and exactly
                # the value's gradient whatever rounding left. scatter_add (in the combination below), not
                # scatter: a padding id repeats a real one, and its 0 must add to, not overwrite, that weight.
                grad_kd = torch.exp(ls).mul_(w.sum(-1, keepdim=True))
                grad_at_ids = (ids, w.neg())
        else:
            t = _teacher_logits_chunk(teacher, rows, spec.teacher_mm_dtype)
            teacher_top1 = t.argmax(-1)
            if T != 1.0:  # the teacher's own log-probability of the labels (at T = 1), before t is rescaled
                stats["teacher_logprob"] = (t.gather(1, y[:, None]).squeeze(1) - t.logsumexp(-1)).sum()
            if spec.kind == "mse":
                grad_kd = torch.sub(z, t).div_(T)  # s - t / T
                value = torch.linalg.vector_norm(grad_kd, dim=-1).square_() / vocab
                grad_kd.mul_(2.0 / vocab)
            lt = _log_softmax_(t, T)
            if T == 1.0:
                stats["teacher_logprob"] = lt.gather(1, y[:, None]).sum()
            pt = lt.exp()
            stats["teacher_entropy"] = -pt.mul_(lt).sum()  # the product in pt's buffer, then pt again
            torch.exp(lt, out=pt)
            if spec.kind != "mse":
                # log_softmax(z / T) in z's own buffer; the CE gradient below recovers softmax(z) from it
                if T != 1.0:
                    z.div_(T)
                lse_t = lse if T == 1.0 else z.logsumexp(-1)
                ls = z.sub_(lse_t[:, None]).clamp_min_(_NEG)
                z_holds_log_softmax_at_t = True
                value, grad_kd = _divergence_and_grad(
                    ls, lt, spec.kind, spec.beta, spec.skew, pt=pt, lt_is_scratch=True
                )
            del t, lt, pt
        stats["top1_agreement"] = (student_top1 == teacher_top1).sum().float()
        kd = value.sum() * T**2
    if not want_grad:
        return kd, ce, None, stats

    dz = None
    if ce_scale != 0.0:  # d ce / dz = softmax(z) - onehot(y); z is not needed any more
        if z_holds_log_softmax_at_t:
            # z - lse = T * (z/T - lse_t) + T * lse_t - lse: rounding as in z - lse itself (~eps |z|)
            dz = z.exp_() if T == 1.0 else z.mul_(T).add_((T * lse_t - lse)[:, None]).exp_()
        else:
            dz = z.sub_(lse[:, None]).exp_()
        dz.mul_(ce_scale).scatter_add_(1, y[:, None], torch.full_like(lse[:, None], -ce_scale))
    kd_factor = kd_scale * T  # d(T^2 D(z / T))/dz = T dD/ds
    if kd_factor != 0.0 and teacher.present:
        if grad_kd is not None:
            dz = grad_kd.mul_(kd_factor) if dz is None else dz.add_(grad_kd, alpha=kd_factor)
        if grad_at_ids is not None:
            dz = torch.zeros_like(z) if dz is None else dz
            dz.scatter_add_(1, grad_at_ids[0], grad_at_ids[1] * kd_factor)
    return kd, ce, dz, stats


# Bytes of a [rows, V] float32 block in the fused forward-KL pass (_dense_forward_kl) and precompute's top-k: each
# elementwise step runs over a block of the chunk's buffers and of the scratch buffers. On a CPU small enough to
# stay in cache between the steps; on a GPU, which has no such cache to keep, large enough that the launches of a
# block's dozen kernels cost little beside their work.
BLOCK_BYTES = {"cpu": 2**20, "cuda": 16 * 2**20}


def block_rows(vocab_size: int, device: str | torch.device = "cpu") -> int:
    """Rows per block for a [c, V] float32 buffer on `device` (BLOCK_BYTES)."""
    kind = torch.device(device).type
    return max(1, BLOCK_BYTES.get(kind, BLOCK_BYTES["cuda"]) // (4 * vocab_size))


def _dense_forward_kl(
    z: torch.Tensor,
    t: torch.Tensor | None,
    y: torch.Tensor,
    temperature: float,
    kd_scale: float,
    ce_scale: float,
    want_grad: bool,
    scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """_chunk_objective for dense teacher logits and forward KL (or no teacher: CE only), as one pass over blocks of
    rows. z, t: [c, V] float32 student and teacher logits, both consumed; z's buffer becomes the gradient. scratch:
    three [b, V] float32 buffers (b = block_rows(V)), so the chunk holds its two [c, V] buffers and nothing else
    that large, and every step after the matmuls works on a block that is still in cache. The diagnostics (teacher
    entropy, top-1 agreement, the teacher's log-probability of the label) come from the same blocks.

    Per row, with p_S1 = softmax(z), p_S = softmax(z / T), p_T = softmax(t / T):
      ce = logsumexp(z) - z[y];  kd = T^2 sum p_T (log p_T - log p_S);
      d(ce_scale ce + kd_scale kd)/dz = ce_scale (p_S1 - onehot(y)) + kd_scale T (p_S - p_T).
    """
    c, T = z.shape[0], temperature
    a, k = ce_scale, kd_scale * T
    zy = z.gather(1, y[:, None]).squeeze(1)
    ty = t.gather(1, y[:, None]).squeeze(1) if t is not None and T != 1.0 else None  # the raw logit, at T != 1
    zero = z.new_zeros(())
    kd, ce, entropy, agree, teacher_logprob = zero.clone(), zero.clone(), zero.clone(), zero.clone(), zero.clone()
    rows = scratch[0].shape[0]
    for i in range(0, c, rows):
        zb = z[i : i + rows]
        n = zb.shape[0]
        p1, pt, ps = (x[:n] for x in scratch)  # p_S1, p_T, p_S (p_S is p_S1 at T = 1)
        lse1 = softmax_into(zb, p1)
        ce += (lse1 - zy[i : i + n]).sum()
        if t is None:
            if want_grad:
                torch.mul(p1, a, out=zb)
            continue
        tb = t[i : i + n]
        agree += (zb.argmax(-1) == tb.argmax(-1)).sum()
        if T != 1.0:
            teacher_logprob += (ty[i : i + n] - tb.logsumexp(-1)).sum()  # at T = 1, before t is rescaled
            tb.div_(T)
        tb.sub_(softmax_into(tb, pt)[:, None]).clamp_min_(_NEG)  # log p_T
        if T == 1.0:
            teacher_logprob += tb.gather(1, y[i : i + n, None]).sum()
        entropy -= torch.mul(pt, tb, out=ps).sum()
        if T == 1.0:
            ps, lse = p1, lse1
        else:
            zb.div_(T)
            lse = softmax_into(zb, ps)
        zb.sub_(lse[:, None]).clamp_min_(_NEG).neg_().add_(tb)  # log p_T - log p_S
        kd += zb.mul_(pt).sum()
        if want_grad:
            torch.sub(ps, pt, out=zb).mul_(k)
            if a != 0.0:
                zb.add_(p1, alpha=a)
    stats = {}
    if t is not None:
        stats = {"teacher_entropy": entropy, "top1_agreement": agree, "teacher_logprob": teacher_logprob}
    if not want_grad:
        return kd * T**2, ce, None, stats
    if a != 0.0:
        z.scatter_add_(1, y[:, None], torch.full((c, 1), -a, device=z.device))
    return kd * T**2, ce, z, stats


def _chunk_loop(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    teacher: TeacherTargets,
    spec: _Spec,
    kd_scale: float,
    ce_scale: float,
    needs_grad: tuple[bool, bool, bool],
    on_chunk: Callable[[torch.Tensor, torch.Tensor, TeacherTargets], None] | None = None,
) -> tuple[_ChunkSums, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run the objective over counted rows, chunk_size at a time; accumulate the gradient of
    kd_scale * kd_sum + ce_scale * ce_sum w.r.t. (hidden [N, H], weight [V, H], bias [V]).
    `on_chunk(logits [c, V] float32, labels [c], teacher rows)` sees each chunk's student logits before the
    objective consumes them (evaluation's metrics: no second forward, no [N, V] tensor).

    Peak extra memory: a few [chunk_size, V] float32 buffers, plus the gradients themselves.
    """
    n = hidden.shape[0]
    keep = labels != spec.ignore_index
    count = int(keep.sum())
    if count == n:
        chunks = [slice(i, min(i + spec.chunk_size, n)) for i in range(0, n, spec.chunk_size)]
    else:  # ignored rows never reach a matmul
        valid = keep.nonzero().squeeze(1)
        chunks = [valid[i : i + spec.chunk_size] for i in range(0, count, spec.chunk_size)]

    want_grad = any(needs_grad) and (kd_scale != 0.0 or ce_scale != 0.0)
    grad_h = torch.zeros_like(hidden) if want_grad and needs_grad[0] else None
    # Written by the first chunk's matmul, accumulated into by the others: no separate pass to zero [V, H] first.
    grad_w = torch.empty_like(weight) if want_grad and needs_grad[1] else None
    grad_b = torch.zeros(weight.shape[0], device=weight.device) if want_grad and needs_grad[2] else None
    w_mm = weight.to(spec.mm_dtype)  # one cast for all chunks (no copy when dtypes already agree)

    # Dense forward KL (the default objective) and CE alone (no teacher, whatever the kind) take the fused pass,
    # with every [c, V] buffer allocated once for all chunks; the other kinds and forms keep _chunk_objective's.
    # Evaluation's on_chunk reads each chunk's logits before either consumes them.
    dense = teacher.hidden is not None or teacher.logits is not None
    fused = not teacher.present or (spec.kind == "forward_kl" and dense)
    width = min(spec.chunk_size, count)
    vocab = weight.shape[0]
    z_buf = hidden.new_empty((width, vocab), dtype=torch.float32)
    t_buf = z_buf.new_empty((width, vocab)) if fused and dense else None
    rows_per_block = min(block_rows(vocab, hidden.device), width)
    scratch = tuple(z_buf.new_empty((rows_per_block, vocab)) for _ in range(3)) if fused else ()

    kd_total = torch.zeros((), device=hidden.device)
    ce_total = torch.zeros((), device=hidden.device)
    stats = {name: torch.zeros((), device=hidden.device) for name in _stat_names(teacher)}
    first = True
    for rows in chunks:
        h = _rows(hidden, rows)
        y = _rows(labels, rows)
        z = linear_into(z_buf[: h.shape[0]], h, w_mm, bias, spec.mm_dtype)
        if on_chunk is not None:
            on_chunk(z, y, _chunk_targets(teacher, rows))
        if fused:
            t = None
            if dense and teacher.hidden is not None:
                t_rows = _rows(teacher.hidden, rows)
                t = linear_into(t_buf[: h.shape[0]], t_rows, teacher.weight, teacher.bias, spec.teacher_mm_dtype)
            elif dense:
                t = t_buf[: h.shape[0]].copy_(_rows(teacher.logits, rows))
            kd, ce, dz, chunk_stats = _dense_forward_kl(
                z, t, y, spec.temperature, kd_scale, ce_scale, want_grad, scratch
            )
        else:
            kd, ce, dz, chunk_stats = _chunk_objective(z, y, teacher, rows, spec, kd_scale, ce_scale, want_grad)
        del z
        kd_total += kd
        ce_total += ce
        for name, v in chunk_stats.items():
            stats[name] += v
        if dz is None:
            continue
        if grad_b is not None:
            grad_b += dz.sum(0)
        dz_mm = dz.to(spec.mm_dtype)
        del dz
        if grad_h is not None:
            if isinstance(rows, slice) and grad_h.dtype == spec.mm_dtype:
                torch.mm(dz_mm, w_mm, out=grad_h[rows])  # a slice of rows of [N, H] is contiguous
            else:
                g = (dz_mm @ w_mm).to(hidden.dtype)
                if isinstance(rows, slice):
                    grad_h[rows] = g
                else:
                    grad_h.index_copy_(0, rows, g)
        if grad_w is not None:
            if grad_w.dtype == spec.mm_dtype:
                if first:
                    torch.mm(dz_mm.T, h.to(spec.mm_dtype), out=grad_w)
                else:
                    grad_w.addmm_(dz_mm.T, h.to(spec.mm_dtype))  # accumulates in place, no [V, H] temporary
            else:
                g = dz_mm.T @ h.to(spec.mm_dtype)
                if first:
                    grad_w.copy_(g)
                else:
                    grad_w.add_(g)
        first = False
        del dz_mm  # before the next chunk's logits exist
    if grad_w is not None and first:  # no chunk (every row ignored), or none with a gradient: nothing was written
        grad_w.zero_()
    if grad_b is not None and bias is not None:
        grad_b = grad_b.to(bias.dtype)
    return _ChunkSums(kd_total, ce_total, count, stats), grad_h, grad_w, grad_b


def _chunk_targets(teacher: TeacherTargets, rows: slice | torch.Tensor) -> TeacherTargets:
    """The teacher's signal of a chunk's rows (the output layer, if any, whole)."""
    return TeacherTargets(
        hidden=_rows(teacher.hidden, rows),
        weight=teacher.weight,
        bias=teacher.bias,
        logits=_rows(teacher.logits, rows),
        ids=_rows(teacher.ids, rows),
        logprobs=_rows(teacher.logprobs, rows),
        tail_logmass=_rows(teacher.tail_logmass, rows),
        counts=_rows(teacher.counts, rows),
        entropy=_rows(teacher.entropy, rows),
    )


def _common_scale(a: float, b: float, wa: float, wb: float, rtol: float = 1e-6) -> float | None:
    """s with (a, b) == s * (wa, wb) up to rounding, or None when the pairs are not proportional."""
    if wa == 0.0 and wb == 0.0:
        return 0.0 if a == 0.0 and b == 0.0 else None
    s = a / wa if abs(wa) >= abs(wb) else b / wb
    if math.isclose(a, s * wa, rel_tol=rtol) and math.isclose(b, s * wb, rel_tol=rtol):
        return s
    return None


class _ChunkedDistill(torch.autograd.Function):
    """Forward computes the values and, in the same pass over the chunks, the gradient of
    kd_weight * kd_sum + ce_weight * ce_sum (the Liger "fused linear cross-entropy" idea): the
    [chunk, V] logits are used for the gradient while they exist, so nothing is recomputed.

    backward receives (a, b) = (d loss/d kd_sum, d loss/d ce_sum). When (a, b) is proportional to
    (kd_weight, ce_weight), which is what the training step produces (also after dividing by the
    token count or a loss scale), the stored gradient is scaled in place. Any other (a, b), e.g.
    kd_sum alone, or a second backward through a retained graph, is exact too: the chunks are
    recomputed with (a, b) as the weights.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, teacher: TeacherTargets, spec: _Spec, kd_weight: float, ce_weight: float
    ):
        needs = tuple(ctx.needs_input_grad[:3])
        sums, gh, gw, gb = _chunk_loop(hidden, weight, bias, labels, teacher, spec, kd_weight, ce_weight, needs)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.teacher, ctx.spec, ctx.needs = teacher, spec, needs
        ctx.weights = (kd_weight if teacher.present else 0.0, ce_weight)
        ctx.grads = (gh, gw, gb) if any(g is not None for g in (gh, gw, gb)) else None
        num_tokens = torch.tensor(sums.count, dtype=torch.int64, device=hidden.device)
        stats = tuple(sums.stats[name] for name in _stat_names(teacher))
        ctx.mark_non_differentiable(num_tokens, *stats)
        return (sums.kd, sums.ce, num_tokens, *stats)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kd, grad_ce, *_):
        a, b = float(grad_kd), float(grad_ce)
        wa, wb = ctx.weights  # wa is 0 without a teacher: kd_sum is then constant and a is irrelevant
        scale = _common_scale(a if ctx.teacher.present else 0.0, b, wa, wb)
        if scale == 0.0 and ctx.grads is None:  # both terms weighted 0 (hints alone train): nothing to recompute
            grads = [torch.zeros_like(t) if need else None for t, need in zip(ctx.saved_tensors[:3], ctx.needs)]
        elif scale is not None and ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None  # scaled in place, so usable once; a retained graph recomputes
            for g in grads:
                if g is not None and scale != 1.0:
                    g.mul_(scale)
        else:
            hidden, weight, bias, labels = ctx.saved_tensors
            with torch.autocast(hidden.device.type, enabled=False):
                _, *grads = _chunk_loop(hidden, weight, bias, labels, ctx.teacher, ctx.spec, a, b, ctx.needs)
            if all(g is None for g in grads):  # (a, b) == (0, 0)
                grads = [torch.zeros_like(t) if need else None for t, need in zip((hidden, weight, bias), ctx.needs)]
        gh, gw, gb = grads
        return gh, gw, gb, None, None, None, None, None


def _stat_names(teacher: TeacherTargets) -> tuple[str, ...]:
    if not teacher.present:
        return ()
    if teacher.sampled:  # the given entropy, so none without it (a sum of zeros would read as a certain teacher)
        return (("teacher_entropy",) if teacher.entropy is not None else ()) + ("top1_agreement",)
    return ("teacher_entropy", "top1_agreement") + (("topk_mass",) if teacher.sparse else ("teacher_logprob",))


def _teacher_rows(n: int, t: TeacherTargets) -> TeacherTargets:
    """The teacher's signal checked (at most one form, complete) and flattened to n rows, detached."""
    forms = {"teacher_hidden": t.hidden, "teacher_logits": t.logits, "teacher_ids": t.ids}
    given = [name for name, x in forms.items() if x is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one teacher source, got {', '.join(given)}")
    if t.hidden is not None and t.weight is None:
        raise ValueError("teacher_hidden needs teacher_weight (the teacher's lm_head weight)")
    if t.counts is not None and t.logprobs is not None:
        raise ValueError("give teacher_logprobs (top-k targets) or teacher_counts (sampled targets), not both")
    if t.ids is not None and t.logprobs is None and t.counts is None:
        raise ValueError("teacher_ids need teacher_logprobs (top-k targets) or teacher_counts (sampled targets)")
    if t.ids is None and (t.logprobs is not None or t.counts is not None):
        what = "teacher_logprobs" if t.logprobs is not None else "teacher_counts"
        raise ValueError(f"{what} need teacher_ids")
    if t.counts is not None and t.counts.shape != t.ids.shape:
        raise ValueError(
            f"teacher_counts {tuple(t.counts.shape)} must have the shape of teacher_ids {tuple(t.ids.shape)}"
        )
    if t.entropy is not None and t.counts is None:
        raise ValueError("teacher_entropy is for sampled targets: it needs teacher_ids and teacher_counts")

    def rows(x: torch.Tensor | None, *shape: int) -> torch.Tensor | None:
        return None if x is None else x.detach().reshape(n, *shape)

    k = None if t.ids is None else t.ids.shape[-1]
    return TeacherTargets(
        hidden=rows(t.hidden, -1),
        weight=None if t.weight is None else t.weight.detach(),
        bias=None if t.bias is None else t.bias.detach(),
        logits=rows(t.logits, -1),
        ids=None if t.ids is None else t.ids.reshape(n, k).long(),
        logprobs=rows(t.logprobs, k) if k is not None else None,
        tail_logmass=rows(t.tail_logmass),
        counts=rows(t.counts, k) if k is not None else None,
        entropy=rows(t.entropy),
    )


def chunked_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    teacher_tail_logmass: torch.Tensor | None = None,
    teacher_counts: torch.Tensor | None = None,
    teacher_entropy: torch.Tensor | None = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    tail: str = "bucket",
    ignore_index: int = -100,
    chunk_size: int = 1024,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    on_chunk: Callable[[torch.Tensor, torch.Tensor, TeacherTargets], None] | None = None,
) -> LossOutput:
    """KD and CE sums from the student's final hidden states, chunk_size positions at a time.

    student_hidden: [N, H] or [B, S, H]; student_weight: [V, H] (lm_head); student_bias: [V];
    labels: [N] or [B, S], aligned with the hidden states (the caller shifts).
    Teacher, at most one of: teacher_hidden [N, Ht] + teacher_weight [V, Ht] (+ teacher_bias), whose
    logits are computed per chunk; teacher_logits [N, V]; teacher_ids / teacher_logprobs [N, k]
    (+ teacher_tail_logmass [N]) as in sparse_kd_loss; or teacher_ids / teacher_counts [N, m] (+ teacher_entropy
    [N]) as in sampled_kd_loss (kind forward_kl only). No teacher: kd_sum is 0 (CE only).

    Returns LossOutput with kd_sum == kd_loss(logits, ..., reduction="sum") (or sparse_kd_loss, sampled_kd_loss),
    ce_sum == F.cross_entropy(logits, labels, reduction="sum"), where logits = hidden @ weight.T +
    bias, and stats: detached sums over counted positions of "teacher_entropy" (of the compared
    teacher distribution), "top1_agreement" (student argmax == teacher argmax) and, for sparse
    targets, "topk_mass" (teacher probability inside the top-k), for dense ones "teacher_logprob" (the
    teacher's log-probability of the label at temperature 1); empty without a teacher. Sampled targets give
    "top1_agreement" against the most drawn id (ties: the first of the ids) and "teacher_entropy" (the given
    entropy) only when teacher_entropy is given.

    (a * kd_sum + b * ce_sum).backward() is exact for any a, b; it is cheapest (no recomputation)
    when (a, b) is proportional to (kd_weight, ce_weight), so pass the weights you will use.
    Memory: no [N, V] tensor is created in either pass; see _ChunkedDistill.

    on_chunk (evaluation only, under torch.no_grad): called as on_chunk(logits, labels, teacher) for each chunk of
    counted rows, with its [c, V] float32 student logits (read-only: copy what you keep), labels [c] and the teacher's
    TeacherTargets of those rows: metrics over the same logits the loss sees, without a second forward.
    """
    _check_args(kind, temperature, beta, skew)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"student_weight {tuple(student_weight.shape)} must be [V, H] with H = {student_hidden.shape[-1]}"
        )
    _check_labels(labels, student_hidden.shape[:-1], "hidden")
    n = labels.numel()
    given = TeacherTargets(
        hidden=teacher_hidden,
        weight=teacher_weight,
        bias=teacher_bias,
        logits=teacher_logits,
        ids=teacher_ids,
        logprobs=teacher_logprobs,
        tail_logmass=teacher_tail_logmass,
        counts=teacher_counts,
        entropy=teacher_entropy,
    )
    teacher = _teacher_rows(n, given)
    if teacher.sparse:
        _check_tail(tail, kind)
    if teacher.sampled:
        _check_sampled(kind)
    device = student_hidden.device.type
    autocast_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    mm_dtype = autocast_dtype or torch.promote_types(student_hidden.dtype, student_weight.dtype)
    teacher_mm_dtype = mm_dtype
    if teacher_hidden is not None:
        teacher_mm_dtype = autocast_dtype or torch.promote_types(teacher_hidden.dtype, teacher_weight.dtype)
    spec = _Spec(
        kind=kind,
        temperature=float(temperature),
        beta=float(beta),
        skew=float(skew),
        tail=tail,
        ignore_index=ignore_index,
        chunk_size=int(chunk_size),
        mm_dtype=mm_dtype,
        teacher_mm_dtype=teacher_mm_dtype,
    )
    args = (
        student_hidden.reshape(n, -1),
        student_weight,
        student_bias,
        labels.reshape(n),
        teacher,
        spec,
        float(kd_weight),
        float(ce_weight),
    )
    if not torch.is_grad_enabled():
        # Evaluation: values only. (Inside autograd.Function.forward grad mode is always off, so the
        # function itself cannot tell; computing the fused gradients here would double the cost.)
        with torch.autocast(device, enabled=False):
            sums, *_ = _chunk_loop(*args, (False, False, False), on_chunk)
        num_tokens = torch.tensor(sums.count, dtype=torch.int64, device=student_hidden.device)
        return LossOutput(sums.kd, sums.ce, num_tokens, {name: sums.stats[name] for name in _stat_names(teacher)})
    if on_chunk is not None:
        raise ValueError("on_chunk is for evaluation: call chunked_distill_loss under torch.no_grad()")
    with torch.autocast(device, enabled=False):  # dtypes are chosen explicitly above
        kd_sum, ce_sum, num_tokens, *stats = _ChunkedDistill.apply(*args)
    return LossOutput(kd_sum, ce_sum, num_tokens, dict(zip(_stat_names(teacher), stats)))
