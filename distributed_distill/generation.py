"""The one sampling routine: batched, KV-cached, left-padded, one random generator per row, lockstep across ranks.

`generate` serves `distill generate` (the teacher samples a dataset), on-policy steps (the student samples) and
evaluation. What it guarantees:

- A row's tokens depend only on its prompt, its generator and the sampling settings: never on the other rows of the
  batch, on how much left padding the batch has (position_ids are derived from the attention mask, so a padded row
  sees the positions it would see alone; up to float rounding), or on the device (each row draws one uniform number
  per step from its own generator and picks the token by inverse CDF, so a CPU generator gives the same draws
  whatever device the model runs on).
- `synced=True`: every rank keeps calling the model until every rank's rows are finished (an all-reduce of "anything
  left" per step; finished rows feed the pad token), so a ZeRO-3 model, whose forward is a collective, never hangs
  when the ranks' samples end at different lengths (transformers' `synced_gpus`). A rank with no prompts runs one
  dummy row for the same reason.
- Greedy (temperature 0) is the argmax of the model's logits: `model.generate(do_sample=False)` token for token.

Sampling order is transformers': temperature, then top-k, then top-p (the smallest set of most likely tokens whose
mass reaches top_p). The model sees the KV cache it returns itself (`past_key_values`), so any causal LM of
transformers works: a plain model, a DDP-unwrapped student, a DeepSpeed engine or its `.module`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import DistillError

if TYPE_CHECKING:
    from .config import SamplingConfig

FINISH_REASONS = ("eos", "stop", "length")


@dataclass(frozen=True)
class Sampling:
    """How to sample, whole: the distribution's settings and the tokenizer's part (end tokens, padding, decoding).
    temperature 0 is greedy (top_p / top_k then do nothing). `sampling_setup` makes one from a config section."""

    temperature: float = 1.0
    top_p: float = 1.0  # nucleus: keep the most likely tokens until their mass reaches top_p (1 = all)
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()  # end a row (finish "stop") once it samples one of these; the token is kept
    stop_strings: tuple[str, ...] = ()  # end a row once its decoded completion contains one (needs `decode`)
    eos_ids: tuple[int, ...] = ()  # end a row (finish "eos") once it samples one of these; the token is kept
    pad_id: int = 0  # what left padding and finished rows feed the model
    decode: Callable[[list[int]], str] | None = field(default=None, compare=False, repr=False)  # for stop_strings

    def settings(self) -> dict:
        """The distribution's settings (not the tokenizer's part), as a store's plan records them."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "stop_token_ids": list(self.stop_token_ids),
            "stop_strings": list(self.stop_strings),
        }

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = no top-k filter)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings: an empty string would stop every row at once")
        if self.stop_strings and self.decode is None:
            raise ValueError("stop_strings need decode (e.g. tokenizer.decode)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_setup(settings: SamplingConfig, tokenizer, chat: bool, key: str) -> Sampling:
    """A config's sampling section (`distill.sampling`, `generate.sampling` or evaluation's greedy one, named `key` in
    errors) with the tokenizer's part: its padding, its decoding, and the token ids that end a sample:
    settings.eos_tokens, or the tokenizer's eos token and, for chat prompts (`chat`), the special token that ends an
    assistant turn in the tokenizer's chat template (<|im_end|> for ChatML, <|eot_id|> for Llama 3)."""
    return Sampling(
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        max_new_tokens=settings.max_new_tokens,
        stop_strings=tuple(settings.stop_strings),
        eos_ids=tuple(end_tokens(settings, tokenizer, chat, key)),
        pad_id=tokenizer.pad_token_id,
        decode=tokenizer.decode,
    )


def end_tokens(settings: SamplingConfig, tokenizer, chat: bool, key: str) -> list[int]:
    """The sorted token ids that end a sample (see `sampling_setup`)."""
    if settings.eos_tokens is not None:
        ids = []
        for name in settings.eos_tokens:
            token = tokenizer.convert_tokens_to_ids(name)
            if token is None or (token == tokenizer.unk_token_id and name != tokenizer.unk_token):
                raise DistillError(f"{key}.eos_tokens: {name!r} is not a token of the tokenizer")
            ids.append(token)
        return sorted(set(ids))
    ids = {tokenizer.eos_token_id} - {None}
    if chat and getattr(tokenizer, "chat_template", None):
        marker = "\x00ANSWER\x00"
        turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
        after = tokenizer.apply_chat_template(turn, tokenize=False).split(marker, 1)[-1]
        first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
        ids.update(t for t in first if t in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder))
    return sorted(ids)


@dataclass
class Samples:
    """What `generate` returns, one entry per prompt, in the prompts' order.

    completions[i]: the sampled token ids (the EOS or stop token included when the row ended on one; a stop string's
    tokens included); finish_reasons[i]: "eos", "stop" (a stop token or string) or "length" (max_new_tokens);
    logprobs[i][t]: log-probability of completions[i][t] under the model's own distribution (softmax of the raw
    logits, temperature 1, no top-k / top-p), so sum(logprobs[i]) is the sample's log-probability under the model.
    """

    completions: list[list[int]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, S], attention_mask [B, S]) with each prompt right-aligned (left padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a left-padded mask: 0 at each row's first real token (padding gets 1, never attended)."""
    return (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)


def sample_tokens(logits: torch.Tensor, generators: Sequence[torch.Generator], sampling: Sampling) -> torch.Tensor:
    """One token per row of logits [B, V] (float32), each row drawn with its own generator.

    Each row consumes exactly one uniform number from its generator per call (greedy consumes none), and picks
    the token by inverse CDF over the filtered distribution: independent of the batch and of the device.
    """
    if sampling.greedy:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        logits, order = logits.topk(sampling.top_k, dim=-1)  # sorted, most likely first
    elif sampling.top_p < 1:
        logits, order = logits.sort(dim=-1, descending=True)
    else:
        order = None  # no filter: the inverse CDF works in vocabulary order
    probs = logits.softmax(-1)
    if sampling.top_p < 1:
        # Keep a token while the mass before it is below top_p: the most likely token always stays.
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before >= sampling.top_p, 0.0)
    cdf = probs.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, device=g.device).to(cdf.device) for g in generators])
    total = cdf[:, -1]
    # The first index whose cumulative mass exceeds the draw: a zero-probability entry (filtered, or underflow)
    # never raises the mass, so it is never picked; the draw stays strictly below the total despite rounding.
    draw = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    pick = torch.searchsorted(cdf, draw[:, None], right=True).squeeze(-1)
    return pick if order is None else order.gather(-1, pick[:, None]).squeeze(-1)


def _anything_left(active: torch.Tensor, synced: bool) -> bool:
    left = active.any()
    if synced and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = left.to(torch.int32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
    return bool(left)


def _cache_name(model) -> str:
    """The forward's KV-cache argument: `cache` in transformers >= 5.2x, `past_key_values` before it (and in
    remote-code models), where the new name is not accepted."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):  # a peft (LoRA) model takes **kwargs and hands them to its base model
        inner = inner.get_base_model()
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _model_device(model) -> torch.device:
    inner = getattr(model, "module", model)
    try:
        return next(inner.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    generators: list[torch.Generator],
    sampling: Sampling,
    *,
    synced: bool = False,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    vocab: int | None = None,
) -> Samples:
    """Sample one completion per prompt (token ids, no padding), KV-cached, all rows of the batch at once.

    generators: one per prompt (CPU generators make the draws independent of the device). on_step(logits, tokens),
    when given, is called once per generation step with that step's raw logits [B, V] (the model's dtype, before
    temperature / top-k / top-p) and the tokens chosen [B]; row i's entry at step t belongs to its sample only while
    t < len(completions[i]) (finished rows feed pad tokens). With `synced`, every rank calls the model the same
    number of times (see the module docstring).
    vocab: only the first `vocab` logits are used (the tokenizer's ids; a model's padding rows are never sampled).
    """
    if len(generators) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(generators)} generators: give one generator per prompt")
    if any(not p for p in prompts):
        raise ValueError("an empty prompt: every prompt needs at least one token")
    dummy = not prompts
    if dummy:
        if not synced:
            return Samples()
        # This rank has no work but must join every collective forward of the others (ZeRO-3).
        prompts, generators = [[sampling.pad_id]], [torch.Generator()]
    device, cache = _model_device(model), _cache_name(model)
    pad_id = sampling.pad_id
    ids, mask = left_pad(prompts, pad_id, device)
    b = len(prompts)
    eos = torch.tensor(sorted(set(sampling.eos_ids)), dtype=torch.long, device=device)
    stops = torch.tensor(sorted(set(sampling.stop_token_ids)), dtype=torch.long, device=device)
    # (A dummy row is finished from the start: it only keeps this rank in the collectives while others work.)
    active = torch.full((b,), not dummy, dtype=torch.bool, device=device)
    tokens_per_step, logprobs_per_step = [], []
    reasons = ["length"] * b
    lengths = [0] * b
    texts = [""] * b  # decoded completions so far (stop strings only)

    out = model(
        input_ids=ids, attention_mask=mask, position_ids=padded_positions(mask), use_cache=True, logits_to_keep=1
    )
    last_pos = padded_positions(mask)[:, -1]
    for step in range(sampling.max_new_tokens):
        logits = out.logits[:, -1, :vocab]
        scores = logits.float()
        tokens = sample_tokens(scores, generators, sampling)
        tokens = torch.where(active, tokens, torch.full_like(tokens, pad_id))
        logprob = scores.gather(-1, tokens[:, None]).squeeze(-1) - scores.logsumexp(-1)
        if on_step is not None:
            on_step(logits, tokens)
        tokens_per_step.append(tokens)
        logprobs_per_step.append(logprob)
        was_active = active.clone()
        ended_eos = active & torch.isin(tokens, eos)
        ended_stop = active & ~ended_eos & torch.isin(tokens, stops)
        for i in torch.nonzero(was_active).flatten().tolist():
            lengths[i] += 1
        for i in torch.nonzero(ended_eos).flatten().tolist():
            reasons[i] = "eos"
        for i in torch.nonzero(ended_stop).flatten().tolist():
            reasons[i] = "stop"
        active &= ~(ended_eos | ended_stop)
        if sampling.stop_strings:
            active = _stop_strings(tokens_per_step, active, lengths, texts, reasons, sampling)
        if step + 1 == sampling.max_new_tokens or not _anything_left(active, synced):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        last_pos = last_pos + 1
        out = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=last_pos[:, None],
            **{cache: getattr(out, cache)},
            use_cache=True,
        )
    del out  # the KV cache
    if dummy:
        return Samples()
    toks = torch.stack(tokens_per_step, dim=1).tolist()
    lps = torch.stack(logprobs_per_step, dim=1).tolist()
    return Samples(
        completions=[row[:n] for row, n in zip(toks, lengths)],
        finish_reasons=reasons,
        logprobs=[row[:n] for row, n in zip(lps, lengths)],
    )


def _stop_strings(tokens_per_step, active, lengths, texts, reasons, sampling: Sampling) -> torch.Tensor:
    """End the active rows whose decoded completion now contains a stop string (checked only in the new text)."""
    stop_strings = sampling.stop_strings
    longest = max(len(s) for s in stop_strings)
    active = active.clone()
    for i in torch.nonzero(active).flatten().tolist():
        text = sampling.decode([int(t[i]) for t in tokens_per_step[: lengths[i]]])
        start = max(0, len(texts[i]) - longest + 1)
        texts[i] = text
        if any(text.find(s, start) >= 0 for s in stop_strings):
            active[i] = False
            reasons[i] = "stop"
    return active
