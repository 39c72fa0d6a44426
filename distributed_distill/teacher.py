"""The teacher signal: one interface, whatever produces it.

The training step asks a teacher source for the `TeacherTargets` of a micro-batch and hands them to the
loss; it never knows whether they came from a model running now (online) or from disk (offline), dense
or top-k. Online sources are called by every rank exactly once per micro-batch, in the same order, so a
teacher sharded across the ranks (ZeRO-3) can never deadlock.

Online teacher engines (`teacher.engine`, the table `ENGINES` at the bottom):

    replicated  every rank holds the whole frozen teacher             OnlineTeacher
    zero3       DeepSpeed ZeRO-3 inference: each rank holds 1/N of     Zero3Teacher
                the parameters, gathered layer by layer in the forward
    remote      served by `distill serve` (teacher.url): each rank     serving.client.RemoteTeacher
                sends its rows, the next step's fetched ahead
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import socket
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from . import models
from .config import TeacherConfig
from .errors import DistillError, RankError
from .losses import TeacherTargets, block_rows, linear_into, resolve_chunk_size, softmax_into
from .models import forward_states, parameter_bytes, transformers_zero3


class TeacherSource(Protocol):
    """What the training step, evaluation and the memory report need from a teacher, wherever its signal comes
    from: the online engines below (`OnlineTeacher`, `Zero3Teacher`) and the offline store (`store.OfflineTeacher`).
    """

    engine: str  # "replicated", "zero3", "remote" or "offline store": printed in the memory report
    identity: dict  # what the run records about the teacher (teacher.json); never the weights

    def targets(self, batch: dict) -> TeacherTargets:
        """The signal for the next-token positions of a micro-batch ([B, S] input_ids -> B * (S - 1) rows).
        Online sources are collectives under a sharded engine: every rank calls them in lockstep. The online ones
        also take `layers` (hidden-state indices) and then carry those states too (`TeacherTargets.hidden_states`,
        for the hint loss); an offline store has none (distill.hidden needs distill.signal=online)."""
        ...

    def num_parameters(self) -> int:
        """Parameters of the whole teacher (0 when no model runs in this process)."""
        ...

    def parameter_bytes(self) -> tuple[int, int]:
        """(bytes of teacher parameters this rank holds, bytes of the whole teacher)."""
        ...


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
    softmax(logits / T), and the log of the mass outside them. Logits are formed chunk_size rows at a time, into
    one buffer for all chunks (losses.linear_into), and read in blocks of rows that stay in cache (topk_of_logits).

    `store_dtype` rounds the log-probs as the offline store keeps them (float16), so an online run with
    the same k trains on exactly the values an offline run reads back.
    """
    n, vocab, rows = hidden.shape[0], weight.shape[0], max(1, chunk_size)
    w, b = weight.float(), None if bias is None else bias.float()  # once, not per chunk (a bf16 head is V x H)
    buf = hidden.new_empty((min(rows, n), vocab), dtype=torch.float32)
    ids, logprobs, tails = [], [], []
    for start in range(0, n, rows):
        h = hidden[start : start + rows].float()
        chunk = topk_of_logits(linear_into(buf[: h.shape[0]], h, w, b, torch.float32), k, temperature)
        ids.append(chunk.ids)
        logprobs.append(chunk.logprobs)
        tails.append(chunk.tail_logmass)
    if not ids:  # no rows: empty targets of the right shapes
        return topk_of_logits(buf, k, temperature)
    logprobs_t, tail_t = torch.cat(logprobs), torch.cat(tails)
    if store_dtype is not None:
        logprobs_t, tail_t = logprobs_t.to(store_dtype).float(), tail_t.to(store_dtype).float()
    return TeacherTargets(ids=torch.cat(ids), logprobs=logprobs_t, tail_logmass=tail_t)


@torch.no_grad()
def topk_of_logits(logits: torch.Tensor, k: int, temperature: float) -> TeacherTargets:
    """Sparse targets from logits [N, V] (float32; overwritten: pass a buffer of your own): the k most likely ids,
    their log-probs under softmax(logits / T), and the log of the mass outside them. A block of rows at a time:
    softmax into a [b, V] scratch buffer, the top k of the block, and the tail's mass summed from the complement
    directly (exact even when the top k hold almost all of it), while the block is in cache."""
    n, vocab = logits.shape
    k = min(k, vocab)
    ids = torch.empty((n, k), dtype=torch.long, device=logits.device)
    logprobs, tails = logits.new_empty((n, k)), logits.new_empty(n)
    scratch = logits.new_empty((min(block_rows(vocab, logits.device), max(1, n)), vocab))
    if temperature != 1.0:
        logits.div_(temperature)
    step = scratch.shape[0]
    for i in range(0, n, step):
        x = logits[i : i + step]
        p = scratch[: x.shape[0]]
        lse = softmax_into(x, p)
        top, idx = x.topk(k, dim=-1)
        ids[i : i + x.shape[0]] = idx
        torch.sub(top, lse[:, None], out=logprobs[i : i + x.shape[0]])
        torch.log(p.scatter_(-1, idx, 0.0).sum(-1), out=tails[i : i + x.shape[0]])
    return TeacherTargets(ids=ids, logprobs=logprobs, tail_logmass=tails)


def draw_seed(seed: int, input_ids: torch.Tensor) -> int:
    """The draw seed of one sequence [S]: a pure function of the run's seed and the sequence's token ids (its store
    row hash), so the draws do not depend on the batch, the rank, the process count or whether the row is read from a
    store or scored online."""
    from .store.format import row_hash  # (the format core: numpy and pyarrow only)

    digest = hashlib.blake2b(f"{seed}:{row_hash(input_ids.cpu().numpy())}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@torch.no_grad()
def sampled_targets(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    draws: int,
    temperature: float,
    seeds: Sequence[int],
    chunk_size: int = 1024,
) -> TeacherTargets:
    """Sampled targets (Sparse Logit Sampling, Anshumann et al. 2025) from final hidden states [N, H] of len(seeds)
    sequences of N / len(seeds) positions each: per position `draws` ids drawn with replacement from softmax(logits
    / T), kept as the unique ids (`ids` [N, draws], ascending, padded with the first id) with their normalised counts
    (`counts` [N, draws], summing to 1, 0 for padding), and the distribution's entropy (`entropy` [N], nats).

    Inverse-CDF sampling: the uniforms of a sequence come from a CPU generator seeded with its `seeds` entry
    (`draw_seed`), one row of `draws` per position, and are drawn before any logits exist, so the ids do not depend
    on chunk_size, the batch or the device that computes the logits. Counts are exact; the entropy is rounded
    through float16 as a store keeps it, so an online run trains on the values an offline run reads back."""
    n = hidden.shape[0]
    per_row = n // max(len(seeds), 1)
    if per_row * len(seeds) != n:
        raise ValueError(f"{n} positions are not {len(seeds)} sequences of equal length")
    uniforms = torch.cat(
        [torch.rand(per_row, draws, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
    ).to(hidden.device)
    w, b = weight.float(), None if bias is None else bias.float()
    ids, counts, entropy = [], [], []
    for start in range(0, n, max(1, chunk_size)):
        logits = F.linear(hidden[start : start + chunk_size].float(), w, b)
        chunk = draw_from_logits(logits, temperature, uniforms[start : start + chunk_size])
        ids.append(chunk.ids)
        counts.append(chunk.counts)
        entropy.append(chunk.entropy)
    return TeacherTargets(ids=torch.cat(ids), counts=torch.cat(counts), entropy=torch.cat(entropy))


@torch.no_grad()
def draw_from_logits(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor) -> TeacherTargets:
    """Sampled targets of logits [n, V] (float32; overwritten: pass a buffer of your own) from given uniforms
    [n, draws] in [0, 1) (float64, as `sampled_targets` draws them): per row `draws` ids by inverse CDF of
    softmax(logits / T), kept as the unique ids (`ids` [n, draws], ascending, padded with the first id) and their
    normalised counts (`counts` [n, draws], 0 for padding), and the entropy (`entropy` [n], nats, rounded through
    float16 as a store keeps it).

    The one draw routine of `sampled_targets` (precompute, an online teacher) and `distill generate`: the caller owns
    the uniforms, so the ids depend on its seeding only, never on how the logits were batched."""
    if temperature != 1.0:
        logits.div_(temperature)
    logp = logits.log_softmax(-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    del logp
    cdf = p.cumsum_(-1)  # float32: the last entry is 1 up to ~1e-6, so the uniforms are scaled by it
    u = uniforms.to(device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1)
    del cdf, p
    ids, counts = unique_counts(drawn)
    return TeacherTargets(ids=ids, counts=counts, entropy=entropy.to(torch.float16).float())


def unique_counts(drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of draws [N, d]: the unique ids ascending [N, d] (padded with the row's first id) and their counts / d
    [N, d] float32 (0 for padding)."""
    d = drawn.shape[-1]
    srt = drawn.sort(-1).values
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    slot = new.long().cumsum(-1) - 1  # which unique id each draw is
    ids = srt[:, :1].expand(-1, d).clone()
    ids.scatter_(1, slot, srt)  # every draw writes its id into its slot (equal ids, equal values)
    counts = torch.zeros(srt.shape, dtype=torch.float32, device=srt.device)
    counts.scatter_add_(1, slot, torch.full(srt.shape, 1.0 / d, device=srt.device))
    return ids, counts


class OnlineTeacher:
    """A frozen model run on every micro-batch: eval mode, no gradients, no optimizer, never passed to
    `accelerator.prepare` (so never part of a checkpoint). This is the `replicated` engine: every rank holds
    the whole teacher.

    With `top_k` (or `samples`), it emits the same sparse targets an offline store holds (see `topk_targets`,
    `sampled_targets`).
    """

    engine = "replicated"

    def __init__(
        self,
        model: torch.nn.Module,
        identity: dict,
        top_k: int | None = None,
        temperature: float = 1.0,
        chunk_size: int = 1024,
        vocab: int | None = None,
        samples: int | None = None,
        sample_seed: int = 0,
    ):
        self.model = model.eval().requires_grad_(False)
        # Only the tokenizer's rows of the output layer are compared (models.check_model_configs); None = all rows.
        self.vocab = vocab
        self.runner = self.model  # what the forward calls: the model itself, or an engine wrapping it
        self.identity = identity
        self.top_k, self.temperature, self.chunk_size = top_k, temperature, chunk_size
        self.samples, self.sample_seed = samples, sample_seed

    @torch.no_grad()
    def targets(self, batch: dict, layers: Sequence[int] = ()) -> TeacherTargets:
        """The targets of a micro-batch; with `layers`, also the hidden states of those indices (models.forward_states:
        only those are kept during the forward), as rows like the targets' own."""
        final, states = forward_states(self.runner, batch, layers)

        def rows(x: torch.Tensor) -> torch.Tensor:  # the next-token positions: B * (S - 1) rows
            return x[:, :-1].reshape(-1, x.shape[-1])

        hidden = rows(final)
        hidden_states = {k: hidden if v is final else rows(v) for k, v in states.items()} if layers else None
        with self._head() as (weight, bias):
            if self.top_k:
                found = topk_targets(
                    hidden, weight, bias, self.top_k, self.temperature, self.chunk_size, store_dtype=torch.float16
                )
                found.hidden_states = hidden_states
                return found
            if self.samples:
                seeds = [draw_seed(self.sample_seed, row) for row in batch["input_ids"]]
                found = sampled_targets(hidden, weight, bias, self.samples, self.temperature, seeds, self.chunk_size)
                found.hidden_states = hidden_states
                return found
            return TeacherTargets(hidden=hidden, weight=weight, bias=bias, hidden_states=hidden_states)

    @contextlib.contextmanager
    def _head(self):
        """The output layer's full weight and bias, valid inside the context."""
        head = models.AlignedHead(self.model.get_output_embeddings(), self.vocab)
        yield head.weight, head.bias

    def num_parameters(self) -> int:
        return parameter_bytes(self.model)[2]

    def parameter_bytes(self) -> tuple[int, int]:
        local, full, _ = parameter_bytes(self.model)
        return local, full


class Zero3Teacher(OnlineTeacher):
    """The `zero3` engine: a DeepSpeed ZeRO-3 inference engine (no optimizer). Each rank holds 1/N of every
    matrix; the forward all-gathers one layer at a time, so the peak is one partition plus a layer or two.

    The forward is a collective: every rank must call `targets` the same number of times, in the same order
    (the trainer does, including padding batches of an uneven validation split). A rank that stops calling
    it makes the others wait in an all-gather until `teacher.collective_timeout`, and the job then fails
    with a `DistillError` that says so instead of hanging.

    The output layer is partitioned outside the forward too, but the chunked loss needs its full weight
    (`TeacherTargets(hidden, weight)` projects logits chunk by chunk). `targets` gathers it once per
    micro-batch and hands the loss a copy that lives as long as the targets: one [V, H] matrix per rank
    for the duration of the loss, the same size the forward itself gathers for the head, and never a
    [tokens, V] tensor. With `top_k` the targets are computed inside the gather and no copy is kept.
    """

    engine = "zero3"

    def __init__(self, engine, identity: dict, timeout: int, **kwargs):
        super().__init__(engine.module, identity, **kwargs)
        self.runner, self.timeout = engine, timeout

    @torch.no_grad()
    def targets(self, batch: dict, layers: Sequence[int] = ()) -> TeacherTargets:
        try:
            return super().targets(batch, layers)
        except RuntimeError as e:
            if not _is_collective_failure(e):
                raise  # a bug or an out-of-memory on this rank: its own traceback
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            first = str(e).strip().splitlines()[0][:300]
            raise RankError(
                f"zero3 teacher on rank {rank}: a collective failed or passed teacher.collective_timeout="
                f"{self.timeout}s ({first}); another rank failed or stopped calling the teacher (every rank must "
                "call it once per micro-batch): see that rank's error"
            ) from e

    @contextlib.contextmanager
    def _head(self):
        import deepspeed

        module = self.model.get_output_embeddings()
        params = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
        with deepspeed.zero.GatheredParameters(params):
            head = models.AlignedHead(module, self.vocab)
            if self.top_k or self.samples:
                yield head.weight, head.bias
            else:
                # Copies: the gathered storage is freed when the context exits, before the loss runs.
                yield head.weight.detach().clone(), None if head.bias is None else head.bias.detach().clone()


# How gloo and NCCL report a peer that timed out or went away (as DistBackendError or plain RuntimeError).
_COLLECTIVE_FAILURES = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "watchdog")


def _is_collective_failure(e: RuntimeError) -> bool:
    dist_error = getattr(torch.distributed, "DistError", ())
    return isinstance(e, dist_error) or any(s in str(e).lower() for s in _COLLECTIVE_FAILURES)


# ----------------------------------------------------------------------------------------------
# Engines


def zero3_inference_config(tcfg: TeacherConfig, hidden_size: int, dtype: str | None = None) -> dict:
    """The built-in DeepSpeed config of the `zero3` teacher (launch/deepspeed/teacher_zero3*.json hold it too).

    Inference only: no optimizer, so the batch size keys only satisfy DeepSpeed's config check (the teacher
    is called with whatever micro-batch the trainer has). Sizes are in parameters, from H = hidden_size:
    - vectors up to H elements (norms, biases) stay whole on every rank, every matrix is partitioned (saves
      an all-gather per norm per layer);
    - a parameter is released right after its module ran (`max_reuse_distance` 0): in a forward-only pass
      nothing is reused before the next micro-batch, and DeepSpeed's default (1e9) would keep every layer of
      a teacher under 1e9 parameters gathered until the forward ends, i.e. the whole teacher at the peak;
    - prefetch about one attention block (4 H^2) ahead, and keep at most about two decoder layers (24 H^2)
      live, so the peak is one partition plus a couple of layers (the [V, H] head counts as one of them).
    """
    zero = {
        "stage": 3,
        "stage3_param_persistence_threshold": hidden_size,
        "stage3_prefetch_bucket_size": 4 * hidden_size**2,
        "stage3_max_live_parameters": 24 * hidden_size**2,
        "stage3_max_reuse_distance": 0,
    }
    if tcfg.offload == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}  # page-locked for fast H2D; a no-op on CPU
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": (dtype or tcfg.dtype) == "bfloat16"},
        "fp16": {"enabled": (dtype or tcfg.dtype) == "float16"},
        "wall_clock_breakdown": False,
    }


def _ensure_process_group(device: torch.device) -> None:
    """ZeRO-3 needs a process group even for one process (offloading a teacher bigger than the one GPU)."""
    import deepspeed

    if torch.distributed.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)


def init_seed(run_seed: int) -> int:
    """The seed a teacher built from `arch` is initialised with: the run's seed + 1, never the student's (tests and
    the demo build both from scratch). Such a teacher is only defined with its seed, so its identity records it."""
    return run_seed + 1


def identity(tcfg: TeacherConfig, teacher_config, run_seed: int) -> dict:
    """What a run (teacher.json), a logit store and a sample store record about the teacher: never its weights."""
    found = models.model_identity(tcfg, teacher_config)
    if tcfg.arch is not None:
        found["init_seed"] = init_seed(run_seed)
    return found


def load_replicated(tcfg: TeacherConfig, teacher_config, device: torch.device, seed: int, **kwargs) -> OnlineTeacher:
    with transformers_zero3(None):  # never partitioned by a ZeRO-3 student's zero.Init
        model = models.load_model(tcfg, teacher_config, seed=init_seed(seed), device=device)
    return OnlineTeacher(model.to(device), identity(tcfg, teacher_config, seed), **kwargs)


def load_zero3(tcfg: TeacherConfig, teacher_config, device: torch.device, seed: int, **kwargs) -> Zero3Teacher:
    """A ZeRO-3 inference engine over all ranks.

    A `path` teacher (hub id or local directory, the real case) is loaded by transformers under
    `deepspeed.zero.Init`: each layer is created partitioned and filled from the checkpoint by rank 0 one
    module at a time, so no rank ever holds the whole teacher. An `arch` teacher (tests, the demo: small
    models built from scratch) is built whole with the run's seed, exactly as `replicated` builds it, and
    partitioned by `deepspeed.initialize`, so both engines run identical weights.
    """
    import deepspeed

    if tcfg.deepspeed_config is not None:
        ds_config = json.loads(open(tcfg.deepspeed_config).read())
    else:
        hidden = getattr(teacher_config, "hidden_size", 0) or 0
        ds_config = zero3_inference_config(tcfg, hidden, models.dtype_name(tcfg, device))
    stage = ds_config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise DistillError(f"teacher.deepspeed_config={tcfg.deepspeed_config}: zero_optimization.stage={stage}, need 3")
    _ensure_process_group(device)
    with transformers_zero3(ds_config if tcfg.path is not None else None):
        model = models.load_model(tcfg, teacher_config, seed=init_seed(seed), device=device)
    model.eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=copy.deepcopy(ds_config))
    engine.eval()
    return Zero3Teacher(engine, identity(tcfg, teacher_config, seed), tcfg.collective_timeout, **kwargs)


def load_remote(tcfg: TeacherConfig, teacher_config, device: torch.device, seed: int, **kwargs):
    """A teacher served by `distill serve` (serving/client.py; imported here only when used: httpx)."""
    from .serving.client import connect

    return connect(tcfg, identity(tcfg, teacher_config, seed), device, **kwargs)


# A small string-to-loader table: `teacher.engine` picks one.
ENGINES = {"replicated": load_replicated, "zero3": load_zero3, "remote": load_remote}


def setup_teacher(
    tcfg: TeacherConfig,
    teacher_config,
    device: torch.device,
    *,
    seed: int,
    vocab: int | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
    chunk_size: int | str = "auto",
    samples: int | None = None,
) -> OnlineTeacher:
    """The frozen teacher: eval mode, no gradients, no optimizer, kept out of `accelerator.prepare` (never in a
    checkpoint; its identity goes to the run directory), and called by every rank once per micro-batch.

    `seed`: the run's (an `arch` teacher is built with `init_seed(seed)`); `vocab` (the tokenizer's length): how many
    rows of its output layer are compared with the student's, None = all; `top_k`: emit sparse top-k targets at
    `temperature` (None = dense); `samples`: emit sampled targets of that many draws per position instead (seeded
    per sequence from `seed`, `sampled_targets`); `chunk_size`: distill.chunk_size, rows per chunk of its own
    top-k or sampled projection (chunked even when the loss takes the naive path, 0)."""
    text = teacher_config.get_text_config()
    rows = resolve_chunk_size(chunk_size or "auto", text.vocab_size, text.hidden_size, device)
    return ENGINES[tcfg.engine](
        tcfg,
        teacher_config,
        device,
        seed,
        top_k=top_k,
        temperature=temperature,
        chunk_size=rows,
        vocab=vocab,
        samples=samples,
        sample_seed=seed,
    )
