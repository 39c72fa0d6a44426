"""A logit store that students of any tokenizer read: precomputed in the teacher's own tokenization
(distill.cross_tokenizer with distill.signal=offline; docs/cross_tokenizer.md, from a store).

    distill precompute --config cross.yaml distill.store=S    # the teacher's tokens: its top-k and label log-probs
    distill train --config cross.yaml distill.signal=offline distill.store=S

    a stored micro-batch (the teacher's ids, its top-k and the log-prob of every label, per position)
      --cross_tokenizer.Aligner(teacher -> student), label_counted--> the student's batch (its ids, labels on every
        counted token, per-document positions) and the spans both sides share
      -> each span's teacher side read off the stored rows: its first row's top-k, the sum of its later rows' label
         log-probs (what the online teacher computes, losses.teacher_spans, rounded through float16)
      -> the batch carries its spans (CROSS_KEYS: flat tensors that survive collate and the move to the device);
         OfflineCrossTeacher.targets turns them into TeacherTargets(cross=...), as the online cross teacher returns

The store keeps the teacher's token ids (whose bytes give the text) and no student's, so one store serves every
student tokenizer; the vocabulary map is the student's (cached per pair, as online). A student row is as long as
the student's tokens for the stored row's text: its length varies from batch to batch (padded to the longest).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from .config import Config
from .cross_teacher import CrossTargets, CrossTokenizerTeacher, report_alignment
from .cross_tokenizer import Aligner, vocab_map
from .data.batching import IGNORE_INDEX, eval_batches
from .data.documents import cache_root
from .errors import DistillError
from .losses import SpanIndex, TeacherSpans, TeacherTargets
from .store.logits import LABEL_LOGPROB, open_logit_store
from .store.offline import OfflineSource, OfflineTeacher

# What a student batch read from such a store carries besides its rows: the spans' student rows and their teacher
# side, flat over the batch's spans (data.batching.collate passes every `cross_` key through).
CROSS_KEYS = (
    "cross_first",  # [S] the student's row predicting each span's first token
    "cross_rest",  # [R] the student's rows predicting the spans' later tokens
    "cross_rest_span",  # [R] the span of each
    "cross_teacher_ids",  # [S, k] the teacher's top-k at the span's first row
    "cross_teacher_logprobs",  # [S, k]
    "cross_teacher_tail",  # [S] the log of the teacher mass outside them
    "cross_teacher_rest",  # [S] the sum of the teacher's label log-probs over the span's later rows
)


class StoreAligner:
    """A stored micro-batch (the teacher's tokenization, store/logits.decode_logit_rows) as the student's batch with
    its spans (CROSS_KEYS). `max_positions`: the student's position limit, which a re-tokenized document must fit."""

    def __init__(self, student_tokenizer, teacher_tokenizer, max_positions: int | None):
        self.aligner = Aligner(teacher_tokenizer, student_tokenizer)  # the stored side is the one re-tokenized
        self.max_positions = max_positions

    def __call__(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if LABEL_LOGPROB not in stored:
            raise DistillError("a store row has no teacher label log-probs: precompute it with distill.cross_tokenizer")
        crossed = self.aligner(stored, label_counted=True)
        mine, theirs = crossed.teacher_batch, crossed.student  # the student's batch; the stored rows of the spans
        positions = mine["position_ids"]
        if self.max_positions is not None and positions.numel() and int(positions.max()) >= self.max_positions:
            raise DistillError(
                f"a store row's document is {int(positions.max()) + 1} student tokens long after re-tokenization, "
                f"beyond the student's {self.max_positions} positions; precompute the store with a smaller "
                "data.seq_len"
            )
        k = stored["teacher_ids"].shape[-1]
        rest = torch.zeros(theirs.num_spans).index_add(
            0, theirs.rest_span, stored[LABEL_LOGPROB].reshape(-1).float()[theirs.rest]
        )
        out = {
            **mine,
            "cross_first": crossed.teacher.first,
            "cross_rest": crossed.teacher.rest,
            "cross_rest_span": crossed.teacher.rest_span,
            "cross_teacher_ids": stored["teacher_ids"].reshape(-1, k)[theirs.first],
            "cross_teacher_logprobs": stored["teacher_logprobs"].reshape(-1, k)[theirs.first],
            "cross_teacher_tail": stored["teacher_tail"].reshape(-1)[theirs.first],
            "cross_teacher_rest": rest,
        }
        if "index" in stored:
            out["index"] = stored["index"]
        return out


def stored_cross_targets(batch: dict[str, torch.Tensor], teacher_to_student: torch.Tensor) -> CrossTargets:
    """The CrossTargets of a student batch that carries its spans. Spans whose first student row is not learned
    are dropped (a validation rank past the end gets a batch with every label ignored, data.batching.eval_batches),
    and the unaligned count is the batch's learned tokens outside the spans kept, as the online teacher counts."""
    first, rest, rest_span = batch["cross_first"], batch["cross_rest"], batch["cross_rest_span"]
    labels = batch["labels"][:, 1:].reshape(-1)
    keep = labels[first] != IGNORE_INDEX
    renumbered = keep.long().cumsum(0) - 1
    kept_rest = keep[rest_span]
    student = SpanIndex(first[keep], rest[kept_rest], renumbered[rest_span[kept_rest]])
    teacher = TeacherSpans(
        rest_logsum=batch["cross_teacher_rest"][keep].float(),
        ids=batch["cross_teacher_ids"][keep],
        logprobs=batch["cross_teacher_logprobs"][keep],
        tail_logmass=batch["cross_teacher_tail"][keep],
    )
    counted = int((labels != IGNORE_INDEX).sum())
    aligned = student.num_spans + student.rest.numel()
    return CrossTargets(student, teacher, teacher_to_student.to(labels.device), counted - aligned)


class OfflineCrossTeacher(OfflineTeacher):
    """The offline teacher of a store read by a student of another tokenizer: every batch carries its spans."""

    stat_names = CrossTokenizerTeacher.stat_names

    def __init__(self, manifest: dict, validation, teacher_to_student: torch.Tensor):
        super().__init__(manifest, validation)
        self.teacher_to_student = teacher_to_student

    def targets(self, batch: dict) -> TeacherTargets:
        return TeacherTargets(cross=stored_cross_targets(batch, self.teacher_to_student))


class CrossStream:
    """The store's training stream (logits.TrainStream) with every micro-batch turned into the student's."""

    def __init__(self, stream, convert: StoreAligner):
        self.stream, self.convert = stream, convert

    def __len__(self) -> int:
        return len(self.stream)

    def micro_batches(self, micro_batch: int, world: int, rank: int, skip: int = 0) -> Iterator[dict]:
        for stored in self.stream.micro_batches(micro_batch, world, rank, skip):
            yield self.convert(stored)


class CrossValidation:
    """The store's validation split (logits.ValidationSplit), indexable as data.eval_batches expects, each batch of
    rows turned into the student's."""

    def __init__(self, split, convert: StoreAligner):
        self.split, self.convert = split, convert

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.convert(self.split[list(indices)])


def open_cross_store(
    cfg: Config, student_tokenizer, teacher_tokenizer, accelerator, max_positions: int | None
) -> OfflineSource:
    """Open distill.store for a student of another tokenizer: the logit store's own checks against the teacher's
    tokenizer, its label log-probs present, then the startup summary of the alignment on the first
    distill.cross_tokenizer.sample_batches validation micro-batches (refused above max_unaligned); no model loads."""
    root = Path(cfg.distill.store)
    source = open_logit_store(
        cfg, teacher_tokenizer, accelerator, "precompute it with this config (the teacher's tokenizer)"
    )
    if not source.manifest.get("label_logprobs"):
        raise DistillError(
            f"distill.store={root} was precomputed without distill.cross_tokenizer (its rows keep no teacher label "
            "log-probs, which the spans' chain rule needs); precompute it with this config"
        )
    return cross_source(cfg, source, student_tokenizer, teacher_tokenizer, accelerator, max_positions)


def cross_source(
    cfg: Config, source: OfflineSource, student_tokenizer, teacher_tokenizer, accelerator, max_positions: int | None
) -> OfflineSource:
    """An opened store in the teacher's tokenization (a logit store, or a sample store's top-k: cross_samples.py)
    as the student reads it: every batch re-tokenized with its spans, and the startup summary of the alignment on
    the first distill.cross_tokenizer.sample_batches validation micro-batches (refused above max_unaligned)."""
    convert = StoreAligner(student_tokenizer, teacher_tokenizer, max_positions)
    val = CrossValidation(source.val, convert)
    vmap = vocab_map(student_tokenizer, teacher_tokenizer, cache_root(cfg.data) / "vocab_maps")
    size, sample = cfg.train.micro_batch_size, cfg.distill.cross_tokenizer.sample_batches
    counted = aligned = 0
    for batch in eval_batches(val, size, 1, 0, sample):
        learned = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        counted += learned
        aligned += learned - stored_cross_targets(batch, vmap.teacher_to_student).unaligned_tokens
    report_alignment(
        cfg, student_tokenizer, teacher_tokenizer, vmap, counted, aligned, accelerator.print, "validation micro-batches"
    )
    teacher = OfflineCrossTeacher(source.manifest, val, vmap.teacher_to_student)
    line = f"{source.line}; read through the alignment by the student's tokenizer ({len(student_tokenizer)} tokens)"
    return OfflineSource(CrossStream(source.train, convert), val, teacher, source.manifest, line)
