"""A teacher with another tokenizer, as a teacher source (distill.cross_tokenizer; docs/cross_tokenizer.md).

    student micro-batch (student ids) --cross_tokenizer.Aligner--> the teacher's batch (the same documents and text,
        the teacher's ids) + spans where both sides' token boundaries meet
    teacher forward (replicated or zero3, dense) --losses.teacher_spans--> each span's first-position distribution
        (dense rows, or top-k at distill.top_k) and the chain-rule sum of its later tokens' log-probs
    -> TeacherTargets(cross=CrossTargets): objective.forward_losses compares spans (losses.cross_tokenizer_loss)

The wrapped engine is the ordinary one, called once per micro-batch on every rank (a zero3 teacher stays in lockstep);
only its input differs. The vocabulary map (tokens with the same bytes on both sides) is built once and cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import Config
from .cross_tokenizer import Aligner, VocabMap, alignment_sample, vocab_map
from .data.batching import IGNORE_INDEX
from .data.documents import cache_root
from .errors import DistillError
from .losses import SpanIndex, TeacherSpans, TeacherTargets, teacher_spans
from .teacher import TeacherSource


@dataclass
class CrossTargets:
    """The teacher's side of one micro-batch's spans, with what the loss needs to compare them."""

    student: SpanIndex  # rows into the student's B * (L - 1) next-token rows
    teacher: TeacherSpans
    vocab_map: torch.Tensor  # [V_teacher] long: the student id of the token with the same bytes, -1 = none
    unaligned_tokens: int  # counted student tokens outside every aligned span (masked, counted in the metrics)


class CrossTokenizerTeacher:
    """`targets(batch)` of a student batch: the inner (dense) teacher run on the re-tokenized batch, reduced to spans.

    Diagnostics summed like objective.STATS (per counted student token): `span_kl` (forward KL over the mapped part
    of each span), `span_agreement` (a span whose student top-1 is the teacher's top-1, weighted by its student
    tokens) and `unaligned_fraction` (counted student tokens no aligned span covers). With `score_text` (a run with
    on-policy steps) also `span_teacher_logprob`: the teacher's log-probability of the aligned spans' text at
    temperature 1 (its own tokens, the chain rule), which on_policy.Sampled turns into `sample_teacher_logprob`."""

    stat_names = ("span_kl", "span_agreement", "unaligned_fraction")

    def __init__(
        self, inner: TeacherSource, aligner: Aligner, vmap: VocabMap, *, top_k, temperature, chunk_size,
        score_text: bool = False, max_positions: int | None = None,
    ):  # fmt: skip
        self.inner, self.aligner, self.vmap = inner, aligner, vmap
        # A document is longer in the teacher's tokens when its vocabulary is smaller (or a broken character costs
        # it three tokens): past its positions a learned position table fails and rotary ones extrapolate.
        self.max_positions = max_positions
        self.top_k, self.temperature, self.chunk_size = top_k, temperature, chunk_size
        self.engine = inner.engine
        self.identity = inner.identity
        self.score_text = score_text
        if score_text:
            self.stat_names = (*CrossTokenizerTeacher.stat_names, "span_teacher_logprob")

    @torch.no_grad()
    def targets(self, batch: dict, layers: Sequence[int] = ()) -> TeacherTargets:
        if layers:
            raise DistillError("distill.cross_tokenizer with hidden-state hints is not supported")
        device = batch["input_ids"].device
        crossed = self.aligner({k: v.cpu() for k, v in batch.items()})
        theirs = {k: v.to(device) for k, v in crossed.teacher_batch.items()}
        longest = int(crossed.teacher_batch["position_ids"].max()) + 1 if theirs["position_ids"].numel() else 0
        if self.max_positions is not None and longest > self.max_positions:
            raise DistillError(
                f"distill.cross_tokenizer: a document of this micro-batch is {longest} tokens long in the teacher's "
                f"tokenization, beyond the teacher's {self.max_positions} positions; lower data.seq_len (or "
                "distill.sampling.max_new_tokens on on-policy steps)"
            )
        found = self.inner.targets(theirs)
        labels = theirs["labels"][:, 1:].reshape(-1)
        spans = teacher_spans(
            found.hidden,
            found.weight,
            found.bias,
            labels,
            _to(crossed.teacher, device),
            temperature=self.temperature,
            top_k=self.top_k,
            chunk_size=self.chunk_size,
            score_text=self.score_text,
        )
        return TeacherTargets(
            cross=CrossTargets(
                student=_to(crossed.student, device),
                teacher=spans,
                vocab_map=self.vmap.teacher_to_student.to(device),
                unaligned_tokens=crossed.counted_tokens - crossed.aligned_tokens,
            )
        )

    def num_parameters(self) -> int:
        return self.inner.num_parameters()

    def parameter_bytes(self) -> tuple[int, int]:
        return self.inner.parameter_bytes()


@torch.no_grad()
def row_targets(
    found: TeacherTargets, labels: torch.Tensor, top_k: int, temperature: float, chunk_size: int
) -> tuple[TeacherTargets, torch.Tensor]:
    """A dense teacher's targets of N next-token rows in its own tokenization (`found`: hidden [N, Ht] and its
    output layer; `labels` [N]) as a store for other tokenizers keeps them: per row the top-k ids, log-probs and
    the log of the mass outside, and the log-prob of the row's label (0 where it is ignored) [N]. Every row is the
    first row of a one-token span and the rest row of its own, through `losses.teacher_spans`, the reduction this
    module's online teacher applies to spans; so a span read back from the store (its first row's top-k, the sum of
    its later rows' label log-probs) holds the online values, up to the store's float16 rounding."""
    rows = torch.arange(labels.shape[0], device=labels.device)
    learned = rows[labels != IGNORE_INDEX]
    spans = teacher_spans(
        found.hidden,
        found.weight,
        found.bias,
        labels,
        SpanIndex(rows, learned, learned),
        temperature=temperature,
        top_k=top_k,
        chunk_size=chunk_size,
    )
    targets = TeacherTargets(ids=spans.ids, logprobs=spans.logprobs, tail_logmass=spans.tail_logmass)
    return targets, spans.rest_logsum


def _to(spans: SpanIndex, device: torch.device) -> SpanIndex:
    return SpanIndex(spans.first.to(device), spans.rest.to(device), spans.rest_span.to(device))


def wrap(cfg: Config, inner: TeacherSource, student_tokenizer, teacher_tokenizer, chunk_size: int, teacher_config=None):
    """The cross-tokenizer source around `inner` (built dense: no top_k, no samples), its map cached under the data
    cache (keyed by both tokenizers' hashes); a run with on-policy steps also scores the spans' text (`score_text`);
    `teacher_config`'s max_position_embeddings bounds the teacher's rows."""
    text = teacher_config.get_text_config() if teacher_config is not None else None
    aligner = Aligner(student_tokenizer, teacher_tokenizer)
    vmap = vocab_map(student_tokenizer, teacher_tokenizer, cache_root(cfg.data) / "vocab_maps")
    return CrossTokenizerTeacher(
        inner, aligner, vmap, top_k=cfg.distill.top_k, temperature=cfg.distill.temperature, chunk_size=chunk_size,
        score_text=cfg.distill.on_policy > 0, max_positions=getattr(text, "max_position_embeddings", None),
    )  # fmt: skip


def startup_check(cfg: Config, student_tokenizer, teacher_tokenizer, train, print_fn=print) -> float:
    """Before any weights load: the alignment on the first distill.cross_tokenizer.sample_batches micro-batches of
    the training rows (`train`, indexable) and the startup summary line (both tokenizers, the vocabulary overlap, the
    share aligned, the loss). A pair whose alignment drops more than distill.cross_tokenizer.max_unaligned of the
    counted tokens is refused in one line with the figure. Returns the share dropped."""
    from .data.batching import collate

    xcfg = cfg.distill.cross_tokenizer
    vmap = vocab_map(student_tokenizer, teacher_tokenizer, cache_root(cfg.data) / "vocab_maps")
    size, rows = cfg.train.micro_batch_size, len(train)
    starts = range(0, min(rows, size * xcfg.sample_batches), size)
    batches = (collate(train, list(range(s, min(rows, s + size)))) for s in starts)
    counted, aligned = alignment_sample(Aligner(student_tokenizer, teacher_tokenizer), batches)
    return report_alignment(cfg, student_tokenizer, teacher_tokenizer, vmap, counted, aligned, print_fn)


def report_alignment(
    cfg: Config,
    student_tokenizer,
    teacher_tokenizer,
    vmap: VocabMap,
    counted: int,
    aligned: int,
    print_fn=print,
    sample: str = "micro-batches",
) -> float:
    """The startup summary line of `counted` learned student tokens, `aligned` of them in aligned spans (of the first
    sample_batches `sample`), and the refusal above distill.cross_tokenizer.max_unaligned; returns the share dropped
    (startup_check, and a store read through the alignment, cross_store.py)."""
    xcfg = cfg.distill.cross_tokenizer
    dropped = 1.0 - aligned / counted if counted else 0.0
    print_fn(
        f"cross-tokenizer: student tokenizer {len(student_tokenizer)} tokens, teacher's {len(teacher_tokenizer)}; "
        f"{vmap.describe()}; aligned spans cover {1 - dropped:.1%} of {counted} counted tokens (first "
        f"{xcfg.sample_batches} {sample}); loss {xcfg.loss}"
    )
    if dropped > xcfg.max_unaligned:
        raise DistillError(
            f"distill.cross_tokenizer: the alignment drops {dropped:.1%} of the counted tokens on a sample of "
            f"{counted} tokens, above distill.cross_tokenizer.max_unaligned={xcfg.max_unaligned}; the tokenizers "
            "normalise this text differently (docs/cross_tokenizer.md, what is lost)"
        )
    return dropped
