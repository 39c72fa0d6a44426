"""The objective of one micro-batch: the student's forward, the teacher's targets, and the summed KD and CE losses.

Training (`trainer.train_step`) and validation (`evaluate.evaluate`) both call `forward_losses`, so the two
compute the same quantity for the same batch; they normalise the sums differently (the global token count of an
optimizer step, or of the whole validation split).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import data as data_lib
from .config import DistillConfig
from .losses import LossOutput, chunked_distill_loss, kd_loss, sparse_kd_loss
from .models import AlignedHead
from .teacher import TeacherSource, final_hidden, model_inputs


def forward_losses(
    student: torch.nn.Module, teacher: TeacherSource | None, batch: dict, dcfg: DistillConfig, head: AlignedHead
) -> LossOutput:
    """Summed KD and CE losses of one micro-batch (next-token aligned), not yet normalised.

    `student` is the (possibly wrapped) module to call, `head` its output layer (unwrapped) restricted to the
    tokenizer's rows (padding rows of the embedding matrix never enter a softmax), `teacher` a teacher source
    (online or offline) or None. The student and the teacher get the same inputs (`teacher.model_inputs`).
    """
    labels = batch["labels"][:, 1:].reshape(-1)
    want_kd = teacher is not None and dcfg.alpha > 0
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
            ce_weight=1 - dcfg.alpha,
            **kd_args,
            **sparse_args,
            **(targets.loss_kwargs() if want_kd else {}),
        )
    # Naive path: full [tokens, V] logits; for models or strategies where the head cannot be used directly.
    logits = student(**model_inputs(student, batch)).logits[:, :-1, : head.vocab]
    logits = logits.reshape(-1, logits.shape[-1])  # not head.weight.shape: a ZeRO-3 student holds only a shard
    ce_sum = F.cross_entropy(logits.float(), labels, ignore_index=data_lib.IGNORE_INDEX, reduction="sum")
    kd_sum = logits.new_zeros((), dtype=torch.float32)
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
        kd_sum = kd_loss(logits, targets.dense_logits(), labels, reduction="sum", **kd_args)
    del targets
    n = (labels != data_lib.IGNORE_INDEX).sum()
    return LossOutput(kd_sum=kd_sum, ce_sum=ce_sum, num_tokens=n, stats={})


def count_tokens(micro_batches: list[dict]) -> torch.Tensor:
    return sum((mb["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum() for mb in micro_batches)


# Diagnostics the chunked loss returns as sums over counted tokens; logged as per-token means.
STATS = ("teacher_entropy", "top1_agreement", "topk_mass")
