"""Hidden-state distillation ("hints", `distill.hidden`; docs/hints.md): which layers pair up, the projections that
train with the student, and the hint term's weight at each step.

    plan_run       -> resolve_pairs: the layer pairs, checked against both models' depths and widths (setup.py)
    setup_student  -> attach: the projections become a submodule of the student, so DDP, DeepSpeed (ZeRO-2/3), the
                      optimizer and every checkpoint treat them as part of it (trainer.py)
    fit            -> for_step: this step's StepHints (weight after balancing, FitNets' stage) -> train_step ->
                      objective.forward_losses (the hint sums) -> next_scale (the balance for the next step)
    export         -> projection_state -> output_dir/hints/ (final/ holds the plain student)

A layer index is the model's hidden-state index as transformers numbers it (0 = the embedding output, k = the output
of block k, the number of blocks = the final norm's output, also called `final`).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import HiddenConfig
from .errors import DistillError

SUBMODULE = "distill_hints"  # the student's submodule that holds the projections (and the prefix of their state keys)
FILE = "projections.safetensors"  # in output_dir/hints/ (rundir.HINTS)


@dataclass(frozen=True)
class Pair:
    """One student layer regressed onto one teacher layer (hidden-state indices)."""

    student: int
    teacher: int

    @property
    def name(self) -> str:
        """How metrics.jsonl names the pair: hint_loss/<student>-<teacher>."""
        return f"{self.student}-{self.teacher}"


def blocks(config) -> int:
    return config.get_text_config().num_hidden_layers


def width(config) -> int:
    return config.get_text_config().hidden_size


def uniform_pairs(student_blocks: int, teacher_blocks: int) -> tuple[Pair, ...]:
    """Student layer k of S onto teacher layer round(k * T / S), k = 1..S, rounding halves up (TinyBERT's uniform
    mapping; in 0-based blocks i -> round((i + 1) T / S) - 1): the last onto the last."""
    return tuple(Pair(k, math.floor(k * teacher_blocks / student_blocks + 0.5)) for k in range(1, student_blocks + 1))


def resolve_pairs(hcfg: HiddenConfig, student_config, teacher_config) -> tuple[Pair, ...]:
    """distill.hidden.layers as pairs of indices, checked against both models (before any weights load)."""
    depth = {"student": blocks(student_config), "teacher": blocks(teacher_config)}

    def index(layer: int | str, role: str) -> int:
        if layer == "final":
            return depth[role]
        if layer > depth[role]:
            raise DistillError(
                f"distill.hidden.layers: {role} layer {layer} does not exist: the {role} has {depth[role]} "
                f"block{'s' if depth[role] != 1 else ''}, so its layers are 0 (embeddings) to {depth[role]} (final)"
            )
        return layer

    if hcfg.layers == "uniform":
        pairs = uniform_pairs(depth["student"], depth["teacher"])
    else:
        pairs = tuple(Pair(index(s, "student"), index(t, "teacher")) for s, t in hcfg.layers)
    if len(set(pairs)) < len(pairs):
        raise DistillError(
            f"distill.hidden.layers={hcfg.layers!r} names one pair twice (final is layer {depth['student']} of the "
            f"student and {depth['teacher']} of the teacher)"
        )
    widths = width(student_config), width(teacher_config)
    if hcfg.init == "identity" and widths[0] != widths[1]:
        raise DistillError(
            f"distill.hidden.init=identity needs the student's width ({widths[0]}) to equal the teacher's "
            f"({widths[1]}); use xavier or orthogonal"
        )
    return pairs


class HintProjections(torch.nn.Module):
    """One bias-free linear map per layer pair, from the student's width to the teacher's, trained with the student.

    Called as modules (`maps[i](x)`), never through their weights directly: a ZeRO-3 student's hooks then gather a
    partitioned projection for the call, as they do for the student's own layers."""

    def __init__(
        self,
        pairs: tuple[Pair, ...],
        student_width: int,
        teacher_width: int,
        kind: str,
        init: str,
        seed: int,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.pairs, self.kind = pairs, kind
        self.maps = torch.nn.ModuleList(
            torch.nn.Linear(student_width, teacher_width, bias=False, dtype=dtype) for _ in pairs
        )
        # Its own generator: the student's initialisation (seeded before it) and the data order stay as without hints.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in self.maps:
                if init == "xavier":
                    torch.nn.init.xavier_uniform_(m.weight, generator=generator)
                elif init == "orthogonal":
                    torch.nn.init.orthogonal_(m.weight, generator=generator)
                else:
                    torch.nn.init.eye_(m.weight)

    @property
    def student_layers(self) -> tuple[int, ...]:
        return tuple(sorted({p.student for p in self.pairs}))

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        return tuple(sorted({p.teacher for p in self.pairs}))

    def untouched(self, like: torch.Tensor) -> torch.Tensor:
        """[P] zeros that depend on every projection: a step without hints (after FitNets' first stage) still gives
        them a (zero) gradient, as DDP and DeepSpeed expect of every trainable parameter in every step."""
        probe = like.new_zeros(1, self.maps[0].in_features)
        return torch.stack([m(probe).sum() * 0.0 for m in self.maps]).float()


def attach(student: torch.nn.Module, hcfg: HiddenConfig, pairs, student_config, teacher_config, seed: int) -> None:
    """Give the student (after LoRA: the adapted model, so the projections train beside the adapters) its
    projections, in its parameters' dtype, before the optimizer and Accelerate see it."""
    dtype = next(student.parameters()).dtype
    projections = HintProjections(
        pairs, width(student_config), width(teacher_config), hcfg.loss, hcfg.init, seed, dtype=dtype
    )
    student.add_module(SUBMODULE, projections)


def projections(model: torch.nn.Module) -> HintProjections | None:
    """The projections of an (unwrapped) student, or None without hints."""
    found = model._modules.get(SUBMODULE)  # not getattr: a peft model would look it up in the model it wraps
    return found if isinstance(found, HintProjections) else None


@dataclass(frozen=True)
class StepHints:
    """The hint term of one optimizer step."""

    projections: HintProjections  # the student's (unwrapped)
    weight: float  # the hint term's weight this step, after balancing; 0: no hints this step
    logits: bool  # whether the KD + CE objective trains this step (False during FitNets' first stage)

    @property
    def active(self) -> bool:
        return self.weight > 0


def for_step(hcfg: HiddenConfig | None, found: HintProjections | None, step: int, scale: float | None):
    """The StepHints of optimizer step `step` (1-based), or None without hints. `scale`: the balance carried from the
    previous step (next_scale), None before the first."""
    if hcfg is None or found is None:
        return None
    staged = hcfg.until_step is not None
    if staged and step > hcfg.until_step:
        return StepHints(found, 0.0, logits=True)
    balanced = scale if hcfg.balance == "kd" and scale is not None else 1.0
    return StepHints(found, hcfg.weight * balanced, logits=not staged)


def next_scale(hcfg: HiddenConfig | None, kd_loss: float, hint_losses: list[float] | None, scale: float | None):
    """balance=kd: the ratio of this step's KD loss to its hint loss (mean over pairs), which weights the next step's
    hint term; a step without a usable ratio (no hints, a non-finite or zero loss) keeps the previous one."""
    if hcfg is None or hcfg.balance != "kd" or not hint_losses:
        return scale
    hint = sum(hint_losses) / len(hint_losses)
    ratio = kd_loss / hint if hint > 0 else math.nan
    return ratio if math.isfinite(ratio) and ratio > 0 else scale


def step_metrics(pairs: tuple[Pair, ...], weight: float, hint_losses: list[float] | None) -> dict:
    """The step's hint metrics: the weight after balancing, the hint loss (mean over pairs) and each pair's."""
    out = {"hint_weight": weight}
    if hint_losses:
        out["hint_loss"] = sum(hint_losses) / len(hint_losses)
        out.update({f"hint_loss/{p.name}": v for p, v in zip(pairs, hint_losses)})
    return out


# ----------------------------------------------------------------------------------------------
# Export: beside final/, never in it


def student_state(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """A student's full state dict without its projections: what final/ holds. (None, as a ZeRO-3 student's gathered
    state is on every rank but the first, stays None.)"""
    return None if state is None else {k: v for k, v in state.items() if not k.startswith(SUBMODULE + ".")}


def projection_state(found: HintProjections) -> dict[str, torch.Tensor]:
    """The projections' weights, whole, on the CPU (a collective under ZeRO-3: every rank calls it)."""
    params = list(found.parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather:
        return {k: _whole(v).detach().cpu().clone() for k, v in found.state_dict().items()}


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # an FSDP2 DTensor's shards, gathered


def save_projections(directory: Path, state: dict[str, torch.Tensor], found: HintProjections) -> None:
    """hints/projections.safetensors: the weights ([teacher width, student width] each, `maps.<i>.weight`) and, as
    metadata, the pairs and the loss they were trained with."""
    from safetensors.torch import save_file

    pairs = [[p.student, p.teacher] for p in found.pairs]
    save_file(state, str(directory / FILE), metadata={"pairs": json.dumps(pairs), "loss": found.kind})
