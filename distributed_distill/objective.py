"""The objective of one micro-batch: the student's forward, the teacher's targets, and the summed KD and CE losses
(and the hint losses of `distill.hidden`).

Training (`trainer.train_step`) and validation (`evaluate.evaluate`) both call `forward_losses`, so the two
compute the same quantity for the same batch; they normalise the sums differently (the global token count of an
optimizer step, or of the whole validation split).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import DistillConfig
from .data.batching import IGNORE_INDEX
from .hidden import StepHints
from .losses import (
    LossOutput,
    TeacherTargets,
    chunked_distill_loss,
    cross_tokenizer_loss,
    hint_loss,
    kd_loss,
    sampled_kd_loss,
    sparse_kd_loss,
)
from .models import AlignedHead, forward_states
from .teacher import TeacherSource
from .teachers import head_logits, part_sums


def forward_losses(
    student: torch.nn.Module,
    teacher: TeacherSource | None,
    batch: dict,
    dcfg: DistillConfig,
    head: AlignedHead,
    ce_weight: float | None = None,
    on_logits: Callable[[torch.Tensor, torch.Tensor, TeacherTargets | None], None] | None = None,
    kd_weight: float | None = None,
    hints: StepHints | None = None,
) -> LossOutput:
    """Summed KD and CE losses of one micro-batch (next-token aligned), not yet normalised; with `hints`, the hint
    sums too (`LossOutput.hint_sums`, one per layer pair).

    `student` is the (possibly wrapped) module to call, `head` its output layer (unwrapped) restricted to the
    tokenizer's rows (padding rows of the embedding matrix never enter a softmax), `teacher` a teacher source
    (online or offline) or None. The student and the teacher get the same inputs (`models.model_inputs`).
    `kd_weight` and `ce_weight` are the weights the caller gives kd_sum and ce_sum (default alpha and 1 - alpha; CE
    0 on an on-policy step, both 0 during FitNets' first stage): the chunked loss computes the gradient of that
    combination during the forward.

    `on_logits(logits, labels, targets)` (validation, under no_grad) sees the student's logits of the counted rows
    with their labels and the teacher's targets: chunk by chunk on the chunked path, all at once on the naive one;
    so validation's metrics come from this one forward. With it the teacher's targets are taken whatever alpha is.

    Hints (`hints.active`): the student's and the teacher's states of the paired layers come from the same forwards
    (models.forward_states), at the positions the KD loss counts; a step without them (after FitNets' first stage)
    still passes every projection a zero gradient (`HintProjections.untouched`).

    Several teachers (targets with `parts`): the per-teacher diagnostics join the stats (teachers.part_sums), from
    the same forward's hidden states or logits, without a gradient.
    """
    labels = batch["labels"][:, 1:].reshape(-1)
    kd_weight = dcfg.alpha if kd_weight is None else kd_weight
    hinted = hints is not None and hints.active
    want_kd = teacher is not None and (kd_weight > 0 or on_logits is not None or hinted)
    layers = hints.projections.student_layers if hinted else ()
    if want_kd and hinted:
        targets = teacher.targets(batch, hints.projections.teacher_layers)
    else:
        targets = teacher.targets(batch) if want_kd else None
    if want_kd and targets.cross is not None:
        return cross_losses(student, batch, targets.cross, labels, dcfg, head, kd_weight, ce_weight, on_logits)
    kd_args = dict(kind=dcfg.loss, temperature=dcfg.temperature, beta=dcfg.beta, skew=dcfg.skew)
    sparse_args = dict(tail=dcfg.top_k_tail) if want_kd and targets.sparse else {}
    if dcfg.chunk_size > 0:
        final, states = forward_states(student, batch, layers)
        hidden = final[:, :-1]
        # The weights tell the fused backward which combination will be differentiated, so the gradients it
        # computes during the forward pass are the ones needed (no recomputation).
        out = chunked_distill_loss(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            labels,
            student_bias=head.bias,
            chunk_size=dcfg.chunk_size,
            kd_weight=kd_weight if want_kd else 0.0,
            ce_weight=1 - dcfg.alpha if ce_weight is None else ce_weight,
            on_chunk=on_logits,
            **kd_args,
            **sparse_args,
            **(targets.loss_kwargs() if want_kd else {}),
        )
        out.hint_sums = hint_sums(hints, states, targets, labels, hidden)
        if want_kd and targets.parts:
            logits_of = head_logits(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias)
            out.stats.update(part_sums(logits_of, labels, targets.parts, dcfg, dcfg.chunk_size))
        return out
    # Naive path: full [tokens, V] logits; for models or strategies where the head cannot be used directly.
    logits, states = forward_states(student, batch, layers, logits=True)
    out_hints = hint_sums(hints, states, targets, labels, logits)
    logits = logits[:, :-1, : head.vocab]
    logits = logits.reshape(-1, logits.shape[-1])  # not head.weight.shape: a ZeRO-3 student holds only a shard
    if on_logits is not None:
        on_logits(logits, labels, targets)
    ce_sum = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    kd_sum = logits.new_zeros((), dtype=torch.float32)
    stats = {}
    if want_kd and targets.sampled:
        kd_sum = sampled_kd_loss(
            logits,
            targets.ids,
            targets.counts,
            labels,
            teacher_entropy=targets.entropy,
            kind=dcfg.loss,
            temperature=dcfg.temperature,
            reduction="sum",
        )
    elif want_kd and targets.sparse:
        kd_sum = sparse_kd_loss(
            logits,
            targets.ids,
            targets.logprobs,
            labels,
            reduction="sum",
            teacher_tail_logmass=targets.tail_logmass,
            **sparse_args,
            **kd_args,
        )
    elif want_kd:
        dense = targets.dense_logits()
        kd_sum = kd_loss(logits, dense, labels, reduction="sum", **kd_args)
        stats["teacher_logprob"] = label_logprob_sum(dense, labels)  # as the chunked loss reports it
        del dense
    if want_kd and targets.parts:
        stats.update(part_sums(lambda rows: logits.detach().index_select(0, rows), labels, targets.parts, dcfg, 1024))
    del targets
    n = (labels != IGNORE_INDEX).sum()
    return LossOutput(kd_sum=kd_sum, ce_sum=ce_sum, num_tokens=n, stats=stats, hint_sums=out_hints)


def cross_losses(
    student: torch.nn.Module,
    batch: dict,
    cross,
    labels: torch.Tensor,
    dcfg: DistillConfig,
    head: AlignedHead,
    kd_weight: float,
    ce_weight: float | None,
    on_logits: Callable | None = None,
) -> LossOutput:
    """A teacher with another tokenizer (`cross`: cross_teacher.CrossTargets): CE on the student's own tokens as
    always (the chunked loss, KD weight 0), and the KD sum over the aligned spans (losses.cross_tokenizer_loss, chunked
    over spans, its gradient by autograd). Its diagnostics are sums per counted student token like STATS.
    `on_logits` (validation) sees the CE loss's chunks of student logits without teacher rows, as in a CE-only run
    (the teacher's rows are in another vocabulary; the span diagnostics stand for them)."""
    xcfg = dcfg.cross_tokenizer
    final, _ = forward_states(student, batch, ())
    hidden = final[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    rows = dcfg.chunk_size if dcfg.chunk_size > 0 else 1024
    out = chunked_distill_loss(
        hidden,
        head.weight,
        labels,
        student_bias=head.bias,
        chunk_size=rows,
        kd_weight=0.0,
        ce_weight=1 - dcfg.alpha if ce_weight is None else ce_weight,
        on_chunk=on_logits,
    )
    crossed = cross_tokenizer_loss(
        hidden,
        head.weight,
        head.bias,
        labels,
        cross.student,
        cross.teacher,
        kind=xcfg.loss,
        vocab_map=cross.vocab_map,
        temperature=dcfg.temperature,
        matched_weight=xcfg.matched_weight,
        unmatched_weight=xcfg.unmatched_weight,
        chunk_size=rows,
        span_weights=span_sizes(cross.student),
    )
    out.kd_sum = crossed.loss_sum if kd_weight > 0 else crossed.loss_sum.detach()
    out.stats = {
        "span_kl": crossed.stats["matched_kl"],
        "span_agreement": crossed.stats["top1_agreement"],
        "unaligned_fraction": torch.tensor(float(cross.unaligned_tokens), device=hidden.device),
    }
    if cross.teacher.text_logprob is not None:  # with on-policy steps: the teacher's log-probability of the spans' text
        out.stats["span_teacher_logprob"] = cross.teacher.text_logprob
    return out


def span_sizes(spans) -> torch.Tensor:
    """[S] float32: each aligned span's student token count (its first token and its rest)."""
    return 1.0 + torch.bincount(spans.rest_span, minlength=spans.num_spans).float()


def hint_sums(
    hints: StepHints | None,
    states: dict[int, torch.Tensor],
    targets: TeacherTargets | None,
    labels: torch.Tensor,
    like: torch.Tensor,
) -> torch.Tensor | None:
    """[P] float32: per layer pair, the hint loss (losses.hint_loss, summed) between the projected student states
    [B, S, Hs] and the teacher's rows [N, Ht], over the counted next-token positions (labels [N], as the KD loss
    counts them: prompt, padding and the boundary of packed documents masked). Only counted rows are projected.
    Without active hints: zeros that touch every projection (`untouched`), or None without hints at all."""
    if hints is None:
        return None
    found = hints.projections
    if not hints.active:
        return found.untouched(like)
    counted = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    sums = []
    for pair, projection in zip(found.pairs, found.maps):
        student = states[pair.student][:, :-1]
        student = student.reshape(-1, student.shape[-1]).index_select(0, counted)
        teacher = targets.hidden_states[pair.teacher].index_select(0, counted)
        sums.append(hint_loss(projection(student), teacher, kind=found.kind, reduction="sum"))
    return torch.stack(sums).float()


@torch.no_grad()
def label_logprob_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over counted positions of log softmax(logits)[label], at temperature 1: [N, V], [N] -> scalar float32."""
    counted = labels != IGNORE_INDEX
    logits = logits[counted].float()
    return (logits.gather(1, labels[counted][:, None]).squeeze(1) - logits.logsumexp(-1)).sum()


def count_tokens(micro_batches: list[dict]) -> torch.Tensor:
    return sum((mb["labels"][:, 1:] != IGNORE_INDEX).sum() for mb in micro_batches)


# Diagnostics the chunked loss returns as sums over counted tokens; logged as per-token means.
STATS = ("teacher_entropy", "top1_agreement", "topk_mass", "teacher_logprob")


def stat_names(teacher: TeacherSource | None) -> tuple[str, ...]:
    """STATS, and a source's own diagnostics summed the same way (several teachers: kd_loss/NAME, agreement/NAME)."""
    return STATS + tuple(getattr(teacher, "stat_names", ()))
