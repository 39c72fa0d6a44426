"""The teacher signal: one interface, whatever produces it.

The training step asks a teacher source for the `TeacherTargets` of a micro-batch and hands them to the
loss; it never knows whether they came from a model running now (online) or from disk (offline), dense
or top-k. Online sources are called by every rank exactly once per micro-batch, in the same order, so a
teacher sharded across the ranks (ZeRO-3) can never deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import models
from .config import Config


@dataclass
class TeacherTargets:
    """The teacher's signal for the N = B * (S - 1) next-token positions of a micro-batch, as rows.

    Exactly one form is set:
      dense, projected lazily: `hidden` [N, H] with the output layer `weight` [V, H] (and `bias` [V]); the
        chunked loss computes logits chunk by chunk, so no [N, V] tensor exists;
      dense, materialised: `logits` [N, V];
      sparse top-k: `ids` [N, k], `logprobs` [N, k] (log-softmax at the teacher temperature), optionally
        `tail_logmass` [N] (log of the probability outside the top k).
    """

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    tail_logmass: torch.Tensor | None = None

    @property
    def sparse(self) -> bool:
        return self.ids is not None

    def loss_kwargs(self) -> dict:
        """Keyword arguments of `losses.chunked_distill_loss` for this signal."""
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


def final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The last hidden states [B, S, H] (after the final norm), without computing [B, S, V] logits."""
    out = model(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


@torch.no_grad()
def topk_targets(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    temperature: float,
    chunk_size: int = 1024,
    store_dtype: torch.dtype | None = None,
) -> TeacherTargets:
    """Sparse targets from final hidden states [N, H]: per row the k most likely ids, their log-probs under
    softmax(logits / T), and the log of the mass outside them. Logits are formed chunk_size rows at a time.

    `store_dtype` rounds the log-probs as the offline store keeps them (float16), so an online run with
    the same k trains on exactly the values an offline run reads back.
    """
    ids, logprobs, tails = [], [], []
    for start in range(0, hidden.shape[0], max(1, chunk_size)):
        logits = F.linear(
            hidden[start : start + chunk_size].float(), weight.float(), None if bias is None else bias.float()
        )
        logp = torch.log_softmax(logits / temperature, dim=-1)
        top, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
        # log(1 - sum(top)) from the complement directly: exact even when the top-k hold almost all mass.
        tail = logp.scatter(-1, idx, float("-inf")).logsumexp(-1)
        ids.append(idx)
        logprobs.append(top)
        tails.append(tail)
    logprobs_t, tail_t = torch.cat(logprobs), torch.cat(tails)
    if store_dtype is not None:
        logprobs_t, tail_t = logprobs_t.to(store_dtype).float(), tail_t.to(store_dtype).float()
    return TeacherTargets(ids=torch.cat(ids), logprobs=logprobs_t, tail_logmass=tail_t)


class OnlineTeacher:
    """A frozen model run on every micro-batch: eval mode, no gradients, no optimizer, never passed to
    `accelerator.prepare` (so never part of a checkpoint).

    With `top_k`, it emits the same sparse targets an offline store holds (see `topk_targets`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        identity: dict,
        top_k: int | None = None,
        temperature: float = 1.0,
        chunk_size: int = 1024,
    ):
        self.model = model.eval().requires_grad_(False)
        self.identity = identity
        self.top_k, self.temperature, self.chunk_size = top_k, temperature, chunk_size

    @torch.no_grad()
    def targets(self, batch: dict) -> TeacherTargets:
        hidden = final_hidden(self.model, batch["input_ids"])[:, :-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        head = self.model.get_output_embeddings()
        if self.top_k:
            return topk_targets(
                hidden, head.weight, head.bias, self.top_k, self.temperature, self.chunk_size, store_dtype=torch.float16
            )
        return TeacherTargets(hidden=hidden, weight=head.weight, bias=head.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def setup_teacher(cfg: Config, teacher_config, device: torch.device) -> OnlineTeacher | None:
    if cfg.teacher is None:
        return None
    model = models.load_model(cfg.teacher, teacher_config, seed=cfg.train.seed + 1)
    d = cfg.distill
    return OnlineTeacher(
        model.to(device),
        models.model_identity(cfg.teacher, teacher_config),
        top_k=d.top_k,
        temperature=d.temperature,
        chunk_size=d.chunk_size or 1024,
    )
