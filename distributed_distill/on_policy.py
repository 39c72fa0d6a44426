"""On-policy distillation (GKD's lambda, `distill.on_policy`): on a share of the optimizer steps the student writes
the completions itself, and the teacher scores every token it wrote (docs/on_policy.md).

    fit: next_batches -> [on-policy step: StudentSampler.sample] -> train_step(ce_weight=0 on samples) -> log

On an on-policy step every row's prompt (its tokens before the completion the data gives) is continued by the
current student (`generation.generate`: batched, KV cache, no gradient, the module unwrapped from DDP; a ZeRO-3 or
FSDP student steps in lockstep on every rank), and the data's completion is replaced by the sample. The ordinary
step follows: the teacher (any online engine) scores the whole sampled sequence, the KD loss covers the sampled
completion tokens only (prompt and padding after the stop are labelled -100), normalised by the global count of
those tokens. CE on the samples is off (it would teach the student its own output); the step's logged `ce_loss` is
the student's negative log-likelihood of its samples, `teacher_logprob` the teacher's mean log-probability of them
(a teacher with another tokenizer: of their aligned text, `sample_teacher_logprob`; docs/cross_tokenizer.md).

Exactness: which steps are on-policy is a pure function of (seed, step), the same on every rank, and each row
samples from a generator of its own seeded by (seed, the row's global data position), which fixes the step, the
rank, the micro-batch and the row. Generation touches no other random state (the student samples in eval mode),
so a run killed at any step and resumed draws the same samples and ends bit-identical.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from .config import Config
from .data.batching import IGNORE_INDEX
from .data.documents import DocKind
from .errors import DistillError
from .generation import Sampling, generate, sampling_setup


def _hash63(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def is_on_policy(seed: int, step: int, share: float) -> bool:
    """Whether optimizer step `step` (1-based, as logged) samples from the student: a pure function of (seed, step),
    so every rank and every resumed run decides the same; over many steps a share `share` of them."""
    if share <= 0.0 or share >= 1.0:
        return share >= 1.0
    return _hash63("on-policy-step", seed, step) / 2.0**63 < share


def row_seed(seed: int, position: int) -> int:
    """The sampling seed of the row at global data position `position` (micro-step, rank, row: see `positions`)."""
    return _hash63("on-policy-row", seed, position)


def positions(micro_step: int, world: int, rank: int, micro_batch: int) -> list[int]:
    """Global data positions of the rows of one rank's micro-batch: the order `data.train_indices` reads, so they are
    unique over the run and the same for any split of the global batch into processes and micro-batches."""
    start = (micro_step * world + rank) * micro_batch
    return list(range(start, start + micro_batch))


def prompt_lengths(labels: torch.Tensor) -> list[int]:
    """Per row, where its last learned span starts: the prompt is everything before it (prompt/completion rows:
    bos + prompt; conversations: the turns up to the last assistant answer, its header included)."""
    learned = labels != IGNORE_INDEX
    starts = learned & ~torch.nn.functional.pad(learned, (1, 0))[:, :-1]
    lengths = []
    for row, row_starts in enumerate(starts):
        where = row_starts.nonzero()
        if len(where) == 0:
            raise DistillError(f"on-policy step: row {row} of a micro-batch has no completion to replace")
        lengths.append(int(where[-1]))
    return lengths


def sampled_batch(input_ids: torch.Tensor, prompt_lens: list[int], completions: list[list[int]], pad_id: int) -> dict:
    """Prompt + sampled completion per row, right-padded: labels are the completion (its stop token included), -100
    on the prompt and the padding, so only sampled tokens carry loss."""
    rows = [input_ids[i, :n].tolist() + list(c) for i, (n, c) in enumerate(zip(prompt_lens, completions))]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, prompt_lens)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, n : len(row)] = ids[i, n : len(row)]
    return {"input_ids": ids, "labels": labels}


@dataclass
class Sampled:
    """What an on-policy step's sampling produced on this rank, for its metrics record."""

    samples: int
    generated_tokens: int
    seconds: float

    def record(self, accelerator, step_seconds: float, res_stats: dict, ce_loss: float) -> dict:
        """The step's on-policy metrics: sums over every rank (a collective: every rank calls it)."""
        totals = torch.tensor([self.samples, self.generated_tokens], dtype=torch.float64, device=accelerator.device)
        samples, tokens = accelerator.reduce(totals, reduction="sum").tolist()
        out = {
            "generated_tokens": int(tokens),
            "mean_sample_length": tokens / max(samples, 1.0),
            "generation_time_share": self.seconds / step_seconds,
            "sample_student_logprob": -ce_loss,
        }
        if "teacher_logprob" in res_stats:
            out["sample_teacher_logprob"] = res_stats["teacher_logprob"]
        elif "span_teacher_logprob" in res_stats and res_stats["unaligned_fraction"] < 1.0:
            # Another tokenizer (distill.cross_tokenizer): the teacher's log-probability of the aligned text (its own
            # tokens, the chain rule), per student token of that text; both stats are per counted student token.
            aligned = 1.0 - res_stats["unaligned_fraction"]
            out["sample_teacher_logprob"] = res_stats["span_teacher_logprob"] / aligned
        return out


@dataclass
class StudentSampler:
    """The student's sampling on on-policy steps, built once by the trainer."""

    sampling: Sampling  # distill.sampling with the tokenizer's end tokens, padding and decoding (sampling_setup)
    seed: int
    synced: bool  # a sharded student (ZeRO-3, FSDP): every rank steps until all are done

    @classmethod
    def build(cls, cfg: Config, tokenizer, kind: DocKind | None, synced: bool) -> StudentSampler | None:
        """The sampler of a run whose training documents are of `kind`; None when no step is on-policy."""
        if cfg.distill.on_policy <= 0:
            return None
        chat = kind is not None and kind.is_chat
        return cls(sampling_setup(cfg.distill.sampling, tokenizer, chat, "distill.sampling"), cfg.train.seed, synced)

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, micro_batches: list[dict], rows: list[list[int]]) -> tuple[list, Sampled]:
        """This rank's micro-batches with their completions sampled by `model` (unwrapped: no DDP hooks); `rows`
        holds each micro-batch's global data positions (`positions`)."""
        started = time.perf_counter()
        was_training = model.training
        model.eval()  # no dropout: the samples depend on the weights and the row seeds only
        out, samples, tokens = [], 0, 0
        try:
            for mb, where in zip(micro_batches, rows):
                lengths = prompt_lengths(mb["labels"])
                prompts = [mb["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]
                # CPU generators: the draws are the same on any device (generation.sample_tokens)
                generators = [torch.Generator().manual_seed(row_seed(self.seed, p)) for p in where]
                result = generate(model, prompts, generators, self.sampling, synced=self.synced)
                completions = [list(map(int, c)) for c in result.completions]
                out.append(sampled_batch(mb["input_ids"], lengths, completions, self.sampling.pad_id))
                samples += len(completions)
                tokens += sum(len(c) for c in completions)
        finally:
            model.train(was_training)
        return out, Sampled(samples, tokens, time.perf_counter() - started)
