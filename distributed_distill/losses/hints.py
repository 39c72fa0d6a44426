"""Hidden-state ("hint") losses: a student's intermediate states, projected to the teacher's width, against the
teacher's states at the same positions (FitNets' hints, TinyBERT's layer mapping, DistilBERT's cosine loss).

One entry point, ``hint_loss(student, teacher, labels)``; the projection is the caller's (a bias-free linear layer
trained with the student), so this function sees two tensors of one width. Per counted position (label not
``ignore_index``), with s the projected student state and t the teacher's, both of width H:

- ``mse``: mean over the H features of (s - t)^2;
- ``cosine``: 1 - cos(s, t), the angle only (the norms are free);
- ``normalized_mse``: ``mse`` between the two states each layer-normalised over its features (zero mean, unit
  variance, no affine): the shape of the state, without the scale of a deep teacher's residual stream.

The values are summed over counted positions (``reduction="sum"``, what training uses: it divides by the token count
of the whole optimizer step) or averaged (``"mean"``). Arithmetic is float32 at least (bf16 inputs are upcast,
float64 stays float64). The teacher's states are never differentiated. Like `kd.py`, nothing else of the package
is imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import HINT_KINDS

_COSINE_EPS = 1e-8  # a zero state has no direction: its norm is clamped here (cosine 0, loss 1)
_NORM_EPS = 1e-5  # layer norm's variance epsilon (torch's default)


def hint_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    kind: str = "mse",
    ignore_index: int = -100,
    reduction: str = "sum",
) -> torch.Tensor:
    """The hint loss of `kind` between student states [..., H] (already projected to the teacher's width) and
    teacher states [..., H], over the positions whose label (labels [...], aligned with the states) is not
    `ignore_index`; every position when labels is None. Returns a scalar (0 when nothing is counted, still connected
    to the student's graph so a backward gives a zero gradient)."""
    if kind not in HINT_KINDS:
        raise ValueError(f"unknown hint loss kind {kind!r}; expected one of: {', '.join(HINT_KINDS)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"student states {tuple(student.shape)} and teacher states {tuple(teacher.shape)} differ")
    width = student.shape[-1]
    dtype = torch.promote_types(student.dtype, torch.float32)
    s, t = student.reshape(-1, width).to(dtype), teacher.detach().reshape(-1, width).to(dtype)
    if labels is not None:
        if labels.numel() != s.shape[0]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match the states' positions {tuple(student.shape)}")
        keep = (labels.reshape(-1) != ignore_index).nonzero().squeeze(1)
        s, t = s.index_select(0, keep), t.index_select(0, keep)
    per_position = hint_values(s, t, kind)
    total = per_position.sum()
    return total / max(per_position.shape[0], 1) if reduction == "mean" else total


def hint_values(s: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position values [n] of `kind` between [n, H] student and teacher states (same dtype)."""
    if kind == "cosine":
        dot = (s * t).sum(-1)
        norms = s.norm(dim=-1).clamp_min(_COSINE_EPS) * t.norm(dim=-1).clamp_min(_COSINE_EPS)
        return 1 - dot / norms
    if kind == "normalized_mse":
        s = F.layer_norm(s, s.shape[-1:], eps=_NORM_EPS)
        t = F.layer_norm(t, t.shape[-1:], eps=_NORM_EPS)
    return (s - t).square().mean(-1)
