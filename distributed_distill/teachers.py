"""Several teachers in one run (`teachers:`): one teacher source built of named sources, mixed or routed per position.

    teachers:                       # each entry a teacher config (any engine, remote too) + name + weight
      - {name: code, arch: {...}, weight: 2}
      - {name: chat, path: ..., engine: zero3}
    distill: {top_k: 64, teacher_mix: mixture}     # or route, with data.teacher_column

`MultiTeacher` is a `TeacherSource` like any other, so the step, evaluation and precompute take it unchanged. Each
call runs every teacher once, in config order, on every rank (so a ZeRO-3 or remote entry stays in lockstep), takes
their sparse top-k targets (distill.top_k) and combines them into ordinary sparse `TeacherTargets` of the same k:

    mixture  per position, over the union U of the teachers' top-k ids:
               p_mix(v) = sum_i w_i p_i(v)   over the teachers whose top-k holds v,
               tail     = sum_i w_i tail_i   (each teacher's unlisted mass stays in the tail bucket);
             a distribution over U and one tail bucket, exact: a teacher's mass at an id outside its own top-k is
             not known, so it is counted where it is known to be (that teacher's tail), never guessed. The k most
             likely ids of U are kept (sorted, like a single teacher's top-k) and the rest of U's mass joins the
             tail, so the mixture has the k every sparse target of the run has (and a store from it the format's
             k). distill.top_k = the vocabulary size keeps every id: the exact dense mixture.
    route    per position, the targets of the teacher batch["teacher_route"] names ([B, S] int64, the index into
             `teachers` in config order of the teacher that scores the next-token position from that token, built
             from data.teacher_column); -1 (a row without a teacher) takes the mixture.

The mixture is computed in float64 from the teachers' targets and rounded through float16 as a store keeps it, so a
store precomputed from a mixture holds exactly what an online mixture run trains on. The teachers' own targets ride
along (`TeacherTargets.parts`) for the per-teacher diagnostics, `part_sums`: kd_loss/NAME and agreement/NAME.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Config
from .data.batching import IGNORE_INDEX
from .errors import DistillError
from .losses import TeacherTargets, sparse_kd_loss
from .rundir import TEACHER
from .teacher import TeacherSource, identity, setup_teacher


def teacher_seed(run_seed: int, index: int) -> int:
    """The seed teacher `index` of `teachers:` is set up with (teacher.init_seed of it builds an arch teacher): the
    run's own for the first, so one teacher in a list is the teacher `teacher:` would be; one more per entry, so two
    arch teachers of one architecture are two different models."""
    return run_seed + index


def normalised(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    return [w / total for w in weights]


@torch.no_grad()
def mix_targets(parts: Sequence[TeacherTargets], weights: Sequence[float], k: int) -> TeacherTargets:
    """The weighted mixture of sparse top-k targets (module docstring): per row the k most likely ids of the union
    of the parts' ids under p_mix = sum_i w_i p_i (w normalised), their log-probs, and the log of the tail's mass
    (each part's tail, weighted, plus the union's mass beyond the k kept), rounded through float16 as a store keeps
    them. parts: [N, k_i] ids / logprobs (+ [N] tail_logmass, else 1 - sum of the listed mass) each; k <= the union's
    size (every part lists k_i distinct ids, so k <= max k_i always is)."""
    w = normalised(weights)
    ids = torch.cat([p.ids for p in parts], 1)  # [N, K], K = sum k_i; an id may repeat across parts
    q = torch.cat([p.logprobs.double() + math.log(wi) for p, wi in zip(parts, w)], 1).exp_()
    tail = sum(wi * _tail_mass(p) for p, wi in zip(parts, w))
    # Sum the repeats: sort each row's ids, number the distinct ones, add every entry into its id's slot.
    srt, order = ids.sort(-1)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    slot = new.long().cumsum(-1) - 1
    mixed = torch.zeros_like(q).scatter_add_(1, slot, q.gather(1, order))
    union = torch.zeros_like(srt).scatter_(1, slot, srt)  # equal ids write equal values
    unused = torch.arange(ids.shape[1], device=ids.device) >= new.sum(-1, keepdim=True)
    top, pos = mixed.masked_fill(unused, -1.0).topk(k, -1)  # -1: an unused slot never outranks a listed id
    tail = tail + mixed.scatter(1, pos, 0.0).sum(-1)  # the union's mass beyond the k kept (unused slots hold 0)
    return TeacherTargets(
        ids=union.gather(1, pos),
        logprobs=top.log().to(torch.float16).float(),
        tail_logmass=tail.log().to(torch.float16).float(),
    )


def _tail_mass(t: TeacherTargets) -> torch.Tensor:
    """[N] float64: the probability outside a part's top-k (its recorded tail, else 1 - the listed mass)."""
    if t.tail_logmass is not None:
        return t.tail_logmass.double().exp()
    return (1.0 - t.logprobs.double().exp().sum(-1)).clamp_min(0.0)


@torch.no_grad()
def route_targets(parts: Sequence[TeacherTargets], route: torch.Tensor, fallback: TeacherTargets) -> TeacherTargets:
    """Per position the targets of the part `route` names: route [B, S] (batch["teacher_route"]; the token that
    predicts each next-token position: rows of the first S - 1 columns), -1 = `fallback`'s row (the mixture). Parts
    and fallback: sparse targets of B * (S - 1) rows and one k."""
    chosen = route[:, :-1].reshape(-1).to(parts[0].ids.device)
    bad = chosen[(chosen < -1) | (chosen >= len(parts))]
    if bad.numel():
        raise DistillError(
            f"batch teacher_route holds {int(bad[0])}: every value must be -1 (no teacher) or the index of one of the "
            f"{len(parts)} teachers"
        )
    rows = torch.arange(chosen.numel(), device=chosen.device)
    pick = chosen.clamp_min(0)
    routed = chosen >= 0

    def select(name: str) -> torch.Tensor:
        stacked = torch.stack([getattr(p, name) for p in parts])  # [T, N, ...]
        mask = routed.reshape(-1, *([1] * (stacked.dim() - 2)))
        return torch.where(mask, stacked[pick, rows], getattr(fallback, name))

    return TeacherTargets(ids=select("ids"), logprobs=select("logprobs"), tail_logmass=select("tail_logmass"))


class MultiTeacher:
    """Several named teacher sources as one (module docstring): every call runs each of them once, in config order,
    and mixes or routes their sparse targets. The teachers' own targets ride along as `TeacherTargets.parts`."""

    def __init__(self, sources: dict[str, TeacherSource], weights: Sequence[float], mix: str, top_k: int):
        self.sources, self.weights, self.mix, self.top_k = sources, normalised(weights), mix, top_k
        self.engine = ", ".join(f"{name}: {s.engine}" for name, s in sources.items())
        self.identity = named_identity(sources, self.weights, mix, {name: s.identity for name, s in sources.items()})
        # The per-teacher diagnostics the step sums besides objective.STATS (part_sums).
        self.stat_names = tuple(f"kd_loss/{n}" for n in sources) + tuple(f"agreement/{n}" for n in sources)

    @torch.no_grad()
    def targets(self, batch: dict) -> TeacherTargets:
        parts = [source.targets(batch) for source in self.sources.values()]  # each, every call: lockstep
        if any(not p.sparse for p in parts):
            raise DistillError("several teachers need sparse top-k targets from every teacher (distill.top_k)")
        found = mix_targets(parts, self.weights, self.top_k)
        if self.mix == "route":
            if "teacher_route" not in batch:
                raise DistillError(
                    "distill.teacher_mix=route: a batch has no teacher_route (data.teacher_column names each row's "
                    "teacher)"
                )
            found = route_targets(parts, batch["teacher_route"], found)
        found.parts = dict(zip(self.sources, parts))
        return found

    # Served teachers among them (teacher.engine=remote): the trainer's read-ahead and its per-step agreement reach
    # each, in config order on every rank (so their all-reduces pair up), exactly as a single served teacher's.
    @property
    def ahead(self) -> bool:
        return any(getattr(s, "ahead", False) for s in self.sources.values())

    def prefetch(self, batches: Sequence[dict], layers: Sequence[int] = ()) -> None:
        for source in self.sources.values():
            if getattr(source, "ahead", False):
                source.prefetch(batches, layers)

    def ready(self, batches: Sequence[dict], layers: Sequence[int] = ()) -> str | None:
        """The served teachers' `ready` (serving.client.RemoteTeacher): the first line of one that stayed away, or
        None (also when none is served: no collective then, on any rank alike)."""
        lost = [source.ready(batches, layers) for source in self.sources.values() if hasattr(source, "ready")]
        return next((line for line in lost if line is not None), None)

    def num_parameters(self) -> int:
        return sum(s.num_parameters() for s in self.sources.values())

    def parameter_bytes(self) -> tuple[int, int]:
        held = [s.parameter_bytes() for s in self.sources.values()]
        return sum(h[0] for h in held), sum(h[1] for h in held)


def named_identity(names: Sequence[str], weights: Sequence[float], mix: str, identities: dict[str, dict]) -> dict:
    """teacher.json of several teachers (a single teacher's keeps its own form): each teacher's identity with its
    name and normalised weight, in config order, and how they are combined."""
    listed = [{"name": n, "weight": w, **identities[n]} for n, w in zip(names, weights)]
    return {"teachers": listed, "teacher_mix": mix}


def expected_identity(cfg: Config, teacher_configs: Sequence) -> dict:
    """named_identity of `cfg.teachers` from their configs alone (no weights loaded): what a resume compares."""
    seeds = [teacher_seed(cfg.train.seed, i) for i in range(len(cfg.teachers))]
    found = {t.name: identity(t, tc, s) for t, tc, s in zip(cfg.teachers, teacher_configs, seeds)}
    weights = normalised([t.weight for t in cfg.teachers])
    return named_identity([t.name for t in cfg.teachers], weights, cfg.distill.teacher_mix, found)


def check_resumed(plan) -> None:
    """A resumed online run of several teachers (a setup.RunPlan): the teachers its teacher.json recorded must be this
    run's (same names, order, weights and identities), or the resume is refused naming the first that differs."""
    cfg = plan.cfg
    recorded = Path(cfg.output_dir) / TEACHER
    if not cfg.teachers or cfg.distill.signal != "online" or not recorded.is_file():
        return
    expected = expected_identity(cfg, plan.teacher_configs)
    try:
        old = json.loads(recorded.read_text())
    except (OSError, ValueError):
        return  # unreadable: the config check already compared the teachers' configs
    before, now = old.get("teachers", []), expected["teachers"]
    for i in range(max(len(before), len(now))):
        a = before[i] if i < len(before) else None
        b = now[i] if i < len(now) else None
        if a != b:
            said = lambda t: "none" if t is None else f"{t['name']!r} (weight {t['weight']:.4g})"  # noqa: E731
            raise DistillError(
                f"{recorded} records teacher {i} as {said(a)} but this run has {said(b)}"
                + (" with another identity" if a and b and a["name"] == b["name"] else "")
                + "; a resumed run keeps its teachers (use another output_dir to change them)"
            )


def setup_teachers(
    cfg: Config,
    teacher_configs: Sequence,
    device: torch.device,
    *,
    vocab: int | None,
    top_k: int | None,
    temperature: float,
    chunk_size: int | str,
    samples: int | None = None,
    tokenizers: tuple | None = None,
) -> TeacherSource | None:
    """The run's online teacher source: None without a teacher; `teacher:` through teacher.setup_teacher; or a
    MultiTeacher of every `teachers:` entry, each through teacher.setup_teacher (whatever its engine) with its own
    seed (teacher_seed). `teacher_configs`: the model configs, in cfg.teacher_list() order (RunPlan.teacher_configs).
    With distill.cross_tokenizer (`tokenizers`: the student's and the teacher's), the teacher is built dense over its
    own vocabulary and wrapped in cross_teacher.CrossTokenizerTeacher, which applies top_k to the spans itself."""
    args = dict(vocab=vocab, top_k=top_k, temperature=temperature, chunk_size=chunk_size, samples=samples)
    if not cfg.teachers:
        if cfg.teacher is None:
            return None
        if cfg.distill.cross_tokenizer is not None:
            from . import cross_teacher

            student_tok, teacher_tok = tokenizers
            args.update(vocab=len(teacher_tok), top_k=None, samples=None)
            inner = setup_teacher(cfg.teacher, teacher_configs[0], device, seed=cfg.train.seed, **args)
            return cross_teacher.wrap(cfg, inner, student_tok, teacher_tok, inner.chunk_size, teacher_configs[0])
        return setup_teacher(cfg.teacher, teacher_configs[0], device, seed=cfg.train.seed, **args)
    sources = {
        t.name: setup_teacher(t, tc, device, seed=teacher_seed(cfg.train.seed, i), **args)
        for i, (t, tc) in enumerate(zip(cfg.teachers, teacher_configs))
    }
    return MultiTeacher(sources, [t.weight for t in cfg.teachers], cfg.distill.teacher_mix, top_k)


@torch.no_grad()
def part_sums(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    parts: dict[str, TeacherTargets],
    dcfg,
    rows_per_chunk: int,
) -> dict[str, torch.Tensor]:
    """The per-teacher diagnostics of one micro-batch, as sums over its counted positions (the step divides them by
    the global token count, as it divides kd_loss): `kd_loss/NAME`, the student's KD against that teacher alone
    (sparse_kd_loss with the run's kind, temperature and tail), and `agreement/NAME`, student top-1 == that
    teacher's top-1. `logits_of(rows)`: the student's [c, V] logits of those rows (labels [N]), asked for
    rows_per_chunk rows at a time."""
    kd_args = dict(kind=dcfg.loss, temperature=dcfg.temperature, beta=dcfg.beta, skew=dcfg.skew, tail=dcfg.top_k_tail)
    counted = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    zero = torch.zeros((), device=labels.device)
    sums = {f"{what}/{name}": zero.clone() for what in ("kd_loss", "agreement") for name in parts}
    for start in range(0, counted.numel(), max(1, rows_per_chunk)):
        rows = counted[start : start + rows_per_chunk]
        z = logits_of(rows).float()
        top1 = z.argmax(-1)
        for name, t in parts.items():
            ids, lp = t.ids.index_select(0, rows), t.logprobs.index_select(0, rows)
            tail = None if t.tail_logmass is None else t.tail_logmass.index_select(0, rows)
            kd = sparse_kd_loss(z, ids, lp, reduction="sum", teacher_tail_logmass=tail, **kd_args)
            sums[f"kd_loss/{name}"] += kd.float()
            sums[f"agreement/{name}"] += (top1 == ids.gather(1, lp.argmax(-1, keepdim=True)).squeeze(1)).sum()
    return sums


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """`logits_of` for part_sums from the student's next-token hidden states [N, H] and its aligned output layer."""
    h, w = hidden.detach(), weight.detach()

    def logits_of(rows: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.index_select(0, rows).to(w.dtype), w, None if bias is None else bias.detach()).float()

    return logits_of
