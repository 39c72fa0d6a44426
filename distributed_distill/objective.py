"""The objective of one micro-batch: the student's forward, the teacher's targets, and the summed KD and CE losses.

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
from .losses import LossOutput, TeacherTargets, chunked_distill_loss, kd_loss, sparse_kd_loss
from .models import AlignedHead, final_hidden, model_inputs
from .teacher import TeacherSource


def forward_losses(
    student: torch.nn.Module,
    teacher: TeacherSource | None,
    batch: dict,
    dcfg: DistillConfig,
    head: AlignedHead,
    ce_weight: float | None = None,
    on_logits: Callable[[torch.Tensor, torch.Tensor, TeacherTargets | None], None] | None = None,
) -> LossOutput:
    """Summed KD and CE losses of one micro-batch (next-token aligned), not yet normalised.

    `student` is the (possibly wrapped) module to call, `head` its output layer (unwrapped) restricted to the
    tokenizer's rows (padding rows of the embedding matrix never enter a softmax), `teacher` a teacher source
    (online or offline) or None. The student and the teacher get the same inputs (`models.model_inputs`).
    `ce_weight` is the weight the caller gives ce_sum (default 1 - alpha; 0 on an on-policy step): the chunked
    loss computes the gradient of that combination during the forward.

    `on_logits(logits, labels, targets)` (validation, under no_grad) sees the student's logits of the counted rows
    with their labels and the teacher's targets: chunk by chunk on the chunked path, all at once on the naive one;
    so validation's metrics come from this one forward. With it the teacher's targets are taken whatever alpha is.
    """
    labels = batch["labels"][:, 1:].reshape(-1)
    want_kd = teacher is not None and (dcfg.alpha > 0 or on_logits is not None)
    targets = teacher.targets(batch) if want_kd else None
    kd_args = dict(kind=dcfg.loss, temperature=dcfg.temperature, beta=dcfg.beta, skew=dcfg.skew)
    sparse_args = dict(tail=dcfg.top_k_tail) if want_kd and targets.sparse else {}
    if dcfg.chunk_size > 0:
        hidden = final_hidden(student, batch)[:, :-1]
        # The weights tell the fused backward which combination will be differentiated, so the gradients it
        # computes during the forward pass are the ones needed (no recomputation).
        return chunked_distill_loss(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            labels,
            student_bias=head.bias,
            chunk_size=dcfg.chunk_size,
            kd_weight=dcfg.alpha if want_kd else 0.0,
            ce_weight=1 - dcfg.alpha if ce_weight is None else ce_weight,
            on_chunk=on_logits,
            **kd_args,
            **sparse_args,
            **(targets.loss_kwargs() if want_kd else {}),
        )
    # Naive path: full [tokens, V] logits; for models or strategies where the head cannot be used directly.
    logits = student(**model_inputs(student, batch)).logits[:, :-1, : head.vocab]
    logits = logits.reshape(-1, logits.shape[-1])  # not head.weight.shape: a ZeRO-3 student holds only a shard
    if on_logits is not None:
        on_logits(logits, labels, targets)
    ce_sum = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    kd_sum = logits.new_zeros((), dtype=torch.float32)
    stats = {}
    if want_kd and targets.sparse:
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
    del targets
    n = (labels != IGNORE_INDEX).sum()
    return LossOutput(kd_sum=kd_sum, ce_sum=ce_sum, num_tokens=n, stats=stats)


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
