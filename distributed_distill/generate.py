"""`distill generate`: the teacher samples completions of a prompt set into a sample store (store/samples.py).

    distill generate --config configs/generate.yaml generate.store=stores/samples [generate.top_k=64]
    distill generate --config configs/generate.yaml generate.store=stores/sampled generate.top_k=null \\
        generate.samples=32
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m distributed_distill.cli \\
        generate --config configs/generate.yaml generate.store=stores/samples
    torchrun --nproc_per_node 8 -m distributed_distill.cli generate --config ... teacher.engine=zero3
    DISTILL_STORE_PART=1/4 distill generate --config ...     # the second quarter of the shards (a job array task)

Prompts come from the data section: a prompt field (data.prompt_field, rendered as prompt/completion training
renders it: bos + prompt), a conversation (data.messages_field: the turns up to its last user turn, through the
chat template with the generation prompt), the built-in `python-stdlib-chat` conversations, or windows of plain
text (generate.prefix_tokens: a text LM continues them).

The work is a fixed list of shards (generate.shard_prompts prompts each, with all their samples; train prompts,
then validation prompts), written by the store writer `distill precompute` uses too (store/writer.py: resume,
parts, lockstep, the manifest); this module holds the prompts, the plan and the work of one shard. A sample's
random draws come from a generator seeded by (generate.seed, split, prompt index, sample index) alone, and a shard's
batches are the same whatever the layout, so 1 process, N processes, a resumed run and a job array sample the same
tokens (docs/generate.md says exactly what is byte-identical).

With `teacher.engine: zero3` every rank runs every generation step in lockstep (`generation.generate(synced=True)`;
ranks with fewer batches run filler ones), so a teacher sharded across the ranks can sample.

With distill.cross_tokenizer (a student of another tokenizer) the teacher samples in its own tokens and the store
keeps its tokenizer: the store the teacher's own config writes; the student re-tokenizes the samples when it trains
on them (cross_samples.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import socket
from pathlib import Path

import pyarrow as pa
import torch

from . import models
from .config import Config
from .data.chat import check_chat_template
from .data.documents import BUILTIN_CHAT, DocKind, Documents
from .errors import DistillError
from .generation import Sampling, generate, sampling_setup
from .integrity import publish_dir
from .setup import RunPlan, store_run
from .store import format as store_format
from .store import writer
from .store.samples import SAMPLE_FORMAT, SAMPLE_VERSION, TOKENIZER, encode_sample_rows, sample_counts
from .teacher import draw_from_logits, identity, setup_teacher, topk_of_logits
from .tokenizer import tokenizer_hash

# ----------------------------------------------------------------------------------------------
# The command


def generate_store(cfg: Config, part: tuple[int, int] | None = None) -> dict:
    """Write (or finish) the sample store; `part` (default: DISTILL_STORE_PART) restricts this run to part I of N."""
    with store_run(cfg, cfg.generate.store, "generate.store", "generate", part) as (plan, part, started):
        # The teacher samples in its own tokens: with distill.cross_tokenizer its tokenizer, not the student's (a
        # student of another tokenizer re-tokenizes the samples when it trains on them: cross_samples.py).
        accelerator, tokenizer = plan.accelerator, plan.teacher_side_tokenizer
        with accelerator.main_process_first():
            docs = plan.documents()
            prompts, dropped = read_prompts(cfg, docs, tokenizer, plan.teacher_config)
        sampling = sampling_setup(cfg.generate.sampling, tokenizer, docs.kind.is_chat, "generate.sampling")
        # Stop strings are matched in the completion's text as the store keeps it: special tokens skipped.
        text = functools.partial(tokenizer.decode, skip_special_tokens=True)
        sampling = dataclasses.replace(sampling, decode=text)
        content = sample_store_plan(plan, prompts, docs.kind, sampling)
        if any(dropped.values()):
            accelerator.print(f"prompts dropped (no user turn, or longer than the teacher allows): {dropped}")
        gen = cfg.generate
        layout = sample_layout(content["prompts"]["counts"], gen.samples_per_prompt, gen.shard_prompts)
        work = TeacherSampling(plan, content, sampling, prompts)
        job = writer.StoreJob(accelerator, Path(gen.store), "generate.store", content, layout, part, started)
        return job.run(work, publish=lambda root: save_tokenizer(tokenizer, root / TOKENIZER))


# ----------------------------------------------------------------------------------------------
# Prompts


def read_prompts(cfg: Config, docs: Documents, tokenizer, teacher_config) -> tuple[dict[str, list[list[int]]], dict]:
    """The prompt token ids of each split (in document order, at most generate.max_prompts), and how many were
    dropped (a conversation without a user turn, or a prompt with no room for max_new_tokens)."""
    dcfg, gen = cfg.data, cfg.generate
    if docs.kind is DocKind.MIXED:
        raise DistillError(
            f"data.source={dcfg.source} mixes plain text and conversations, which distill generate prompts "
            f"differently: use data.source={BUILTIN_CHAT}, or python-stdlib with generate.prefix_tokens"
        )
    if docs.kind is DocKind.TEXT and gen.prefix_tokens is None:
        raise DistillError(
            f"data.source={dcfg.source} holds plain text, not prompts: set generate.prefix_tokens (continue windows "
            "of the text), data.prompt_field (and completion_field), use conversational data (data.messages_field), "
            f"or data.source={BUILTIN_CHAT}"
        )
    if docs.kind.is_chat:
        check_chat_template(tokenizer, dcfg)
    limit = models.max_positions(teacher_config)
    new = gen.sampling.max_new_tokens
    room = None if limit is None else limit - new
    if room is not None and room < 1:
        raise DistillError(
            f"generate.sampling.max_new_tokens={new} leaves no room for a prompt in the teacher's {limit} positions"
        )
    out, dropped = {}, {}
    for split, ds in zip(store_format.SPLITS, (docs.train, docs.val)):
        if docs.kind is DocKind.TEXT:
            ids = [w for row in ds for w in text_windows(row[dcfg.text_field], tokenizer, gen)]
        else:
            ids = [prompt_ids(row, docs.kind, dcfg, tokenizer) for row in ds]
        kept = [p for p in ids if p and (room is None or len(p) <= room)]
        dropped[split] = len(ids) - len(kept)
        out[split] = kept[: gen.max_prompts]
        if not out[split]:
            no_user = sum(not p for p in ids)
            too_long = len(ids) - len(kept) - no_user
            raise DistillError(
                f"data.source={dcfg.source}: no usable prompt in the {split} split: of {len(ids)} prompts, {too_long} "
                f"are longer than the {room} tokens the teacher's {limit} positions leave beside generate.sampling."
                f"max_new_tokens={new}, {no_user} have no user turn; lower generate.sampling.max_new_tokens or use "
                "shorter prompts"
                if room is not None
                else f"data.source={dcfg.source}: no usable prompt in the {split} split: of {len(ids)} prompts, "
                f"{no_user} have no user turn"
            )
    return out, dropped


def prompt_ids(row: dict, kind: DocKind, dcfg, tokenizer) -> list[int] | None:
    """A document's prompt, tokenized as training renders it; None when it has no prompt (no user turn)."""
    if kind is DocKind.PROMPT:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + tokenizer(row[dcfg.prompt_field], add_special_tokens=False)["input_ids"]
    messages = list(row[dcfg.prompt_field]) if kind is DocKind.CHAT_PROMPT else list(row[dcfg.messages_field])
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        return None
    messages = [{"role": m["role"], "content": m["content"]} for m in messages[: users[-1] + 1]]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def text_windows(text: str, tokenizer, gen) -> list[list[int]]:
    """Prompts of a plain-text document: the first generate.prefix_tokens tokens of each consecutive window of
    prefix_tokens + sampling.max_new_tokens tokens (the first starts with bos, as the document does in training)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + tokenizer(text, add_special_tokens=False)["input_ids"]
    width = gen.prefix_tokens + gen.sampling.max_new_tokens
    return [ids[start : start + gen.prefix_tokens] for start in range(0, len(ids) - gen.prefix_tokens, width)]


# ----------------------------------------------------------------------------------------------
# The plan: what determines the store's content


def sample_store_plan(plan: RunPlan, prompts: dict, kind: DocKind, sampling: Sampling) -> dict:
    cfg, tokenizer, gen = plan.cfg, plan.teacher_side_tokenizer, plan.cfg.generate
    fingerprint = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    top_k = None if gen.top_k is None else min(gen.top_k, len(tokenizer))
    targets = bool(top_k or gen.samples)
    return {
        "format": SAMPLE_FORMAT,
        "version": SAMPLE_VERSION,
        "teacher": identity(cfg.teacher, plan.teacher_config, cfg.train.seed),
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "vocab_size": len(tokenizer),
        "teacher_vocab_rows": plan.teacher_config.vocab_size,
        "sampling": {
            **sampling.settings(),
            "samples_per_prompt": gen.samples_per_prompt,
            "seed": seed_of(cfg),
            "eos_ids": list(sampling.eos_ids),
        },
        # The stored top-k or sampled targets: from the logits the sampler used, at the distillation temperature.
        "top_k": top_k,
        "samples": gen.samples,
        "temperature": cfg.distill.temperature if targets else None,
        "logprob_dtype": "float16",
        "id_dtype": store_format.id_dtype(len(tokenizer)).name,
        "prompts": {
            "kind": str(kind),
            "data": {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "cache_dir"},
            "max_prompts": gen.max_prompts,
            "prefix_tokens": gen.prefix_tokens if kind is DocKind.TEXT else None,
            "fingerprint": fingerprint,
            "counts": {split: len(p) for split, p in prompts.items()},
        },
        "batch_size": gen.batch_size,
        "shard_prompts": gen.shard_prompts,
    }


def seed_of(cfg: Config) -> int:
    return cfg.train.seed if cfg.generate.seed is None else cfg.generate.seed


def sample_generator(seed: int, split: str, index: int, sample: int) -> torch.Generator:
    """The generator of one sample: a function of (seed, split, prompt index, sample index) only."""
    digest = hashlib.blake2b(f"{seed}/{split}/{index}/{sample}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def target_generator(seed: int, split: str, index: int, sample: int) -> torch.Generator:
    """The generator of one sample's sampled-target draws (generate.samples): a function of (seed, split, prompt
    index, sample index) only, and another stream than `sample_generator`'s, so keeping sampled targets never
    changes which tokens are sampled."""
    digest = hashlib.blake2b(f"{seed}/{split}/{index}/{sample}/targets".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def sample_layout(counts: dict[str, int], per_prompt: int, shard_prompts: int) -> list[tuple[str, list]]:
    """(shard name, [(prompt index, sample index), ...]) of every shard: train prompts, then validation prompts."""
    layout = []
    for split in store_format.SPLITS:
        for number, start in enumerate(range(0, counts[split], shard_prompts)):
            prompts = range(start, min(start + shard_prompts, counts[split]))
            layout.append(
                (store_format.shard_name(split, number), [(p, s) for p in prompts for s in range(per_prompt)])
            )
    return layout


def shard_batches(pairs: list, prompts: list[list[int]], batch_size: int) -> list[list]:
    """A shard's batches: its samples by prompt length (less padding), then in chunks; fixed by the shard alone."""
    ordered = sorted(pairs, key=lambda pair: len(prompts[pair[0]]))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def save_tokenizer(tokenizer, out: Path) -> None:
    """The tokenizer the sample ids belong to, kept in the store (training on the store loads it from there)."""
    if out.is_dir():
        return
    tmp = out.with_name(f"{out.name}.tmp.{socket.gethostname()}.{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    # transformers records how this process reached the hub (HF_HUB_OFFLINE); the store's bytes must not.
    config = tmp / "tokenizer_config.json"
    if config.is_file():
        settings = json.loads(config.read_text())
        settings.pop("local_files_only", None)
        config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    try:
        publish_dir(tmp, out)
    except OSError:  # another part published it first (the same tokenizer: the plan's hash covers it)
        if not out.is_dir():
            raise


# ----------------------------------------------------------------------------------------------
# The work of one shard


class TeacherSampling:
    """The work of one sample-store shard: the teacher samples its (prompt index, sample index) pairs in batches,
    each sample with its own generator, keeping the top-k or sampled targets of every completion position when the
    plan asks for them."""

    counted = "target_tokens"

    def __init__(self, plan: RunPlan, content: dict, sampling: Sampling, prompts: dict[str, list[list[int]]]):
        self.plan, self.content, self.sampling, self.prompts = plan, content, sampling, prompts
        self.seed = seed_of(plan.cfg)
        self.batch_size = plan.cfg.generate.batch_size
        self.synced = plan.cfg.teacher.engine == "zero3"
        self.teacher = None

    def calls(self, name: str, pairs: list) -> int:
        return len(shard_batches(pairs, self.prompts[name.split("/")[0]], self.batch_size))

    def load(self) -> None:
        cfg = self.plan.cfg
        self.teacher = setup_teacher(
            cfg.teacher,
            self.plan.teacher_config,
            self.plan.accelerator.device,
            seed=cfg.train.seed,
            vocab=self.content["vocab_size"],
            temperature=cfg.distill.temperature,
            chunk_size=self.plan.given.distill.chunk_size,
        )

    def shard(self, name: str, pairs: list) -> tuple[pa.Table, dict]:
        split = name.split("/")[0]
        rows = []
        for batch in shard_batches(pairs, self.prompts[split], self.batch_size):
            rows += self.sample(split, batch, self.prompts[split])
        rows.sort(key=lambda r: (r["index"], r["sample"]))
        table = encode_sample_rows(rows, self.content["vocab_size"], self.content["top_k"], self.content["samples"])
        return table, sample_counts(table)

    def _generate(self, prompts: list[list[int]], generators: list, on_step=None):
        return generate(
            self.teacher.runner,
            prompts,
            generators,
            self.sampling,
            synced=self.synced,
            on_step=on_step,
            vocab=self.content["vocab_size"],
        )

    def sample(self, split: str, batch: list[tuple[int, int]], prompts: list[list[int]]) -> list[dict]:
        tokenizer = self.plan.teacher_side_tokenizer
        keeper = self._keeper(split, batch)
        gens = [sample_generator(self.seed, split, p, s) for p, s in batch]
        out = self._generate([prompts[p] for p, _ in batch], gens, keeper.on_step if keeper is not None else None)
        rows = []
        for i, (p, s) in enumerate(batch):
            completion = out.completions[i]
            row = {
                "index": p,
                "sample": s,
                "prompt_ids": prompts[p],
                "prompt": tokenizer.decode(prompts[p]),
                "completion_ids": completion,
                "completion": tokenizer.decode(completion, skip_special_tokens=True),
                "finish_reason": out.finish_reasons[i],
                "token_logprobs": out.logprobs[i],
            }
            if keeper is not None:
                row.update(keeper.row(i, len(completion)))
            rows.append(row)
        return rows

    def _keeper(self, split: str, batch: list[tuple[int, int]]) -> KeepTopk | KeepSampled | None:
        """What keeps the per-token targets of a batch (the plan's top-k or sampled targets); None for neither."""
        temperature = self.content["temperature"]
        if self.content["top_k"]:
            return KeepTopk(self.content["top_k"], temperature)
        if self.content["samples"]:
            gens = [target_generator(self.seed, split, p, s) for p, s in batch]
            return KeepSampled(self.content["samples"], temperature, gens)
        return None

    def filler(self) -> None:
        """A batch of nothing that joins every collective forward of the other ranks (ZeRO-3 lockstep)."""
        self._generate([], [])


# ----------------------------------------------------------------------------------------------
# Per-token targets: called at every generation step with the logits the sampler used (before its temperature)


class _Keeper:
    """A batch's per-step targets on the CPU; `stacked()` gives them per row ([B, steps, ...]), stacked once."""

    steps: list[tuple[torch.Tensor, ...]]  # per step: [B, ...] tensors
    _rows: list[torch.Tensor] | None = None

    def stacked(self) -> list[torch.Tensor]:
        if self._rows is None:  # (generation is over once the first row is asked for)
            self._rows = [torch.stack(parts, dim=1) for parts in zip(*self.steps)]
        return self._rows


class KeepTopk(_Keeper):
    """generate.top_k: the top-k ids, their log-probs and the tail's log-mass at the distillation temperature."""

    def __init__(self, k: int, temperature: float):
        self.k, self.temperature, self.steps = k, temperature, []

    def on_step(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """logits [B, V] (the model's dtype): copied, at the distillation temperature instead of the sampler's."""
        top = topk_of_logits(logits.to(torch.float32, copy=True), self.k, self.temperature)
        self.steps.append((top.ids.cpu(), top.logprobs.cpu(), top.tail_logmass.cpu()))

    def row(self, i: int, n: int) -> dict:
        """Row i's first n steps: teacher_ids, teacher_logprobs [n, k] and teacher_tail [n]."""
        ids, logprobs, tail = (x[i, :n] for x in self.stacked())
        return {"teacher_ids": ids.numpy(), "teacher_logprobs": logprobs.numpy(), "teacher_tail": tail.numpy()}


class KeepSampled(_Keeper):
    """generate.samples: `draws` ids per token drawn from softmax(logits / distill.temperature), kept as the unique
    ids with their counts, and the distribution's entropy (`teacher.draw_from_logits`, what precompute draws with).

    Each row's uniforms come from its own generator (`target_generator`: never the sampler's, so the sampled tokens
    are the same with or without targets), one `torch.rand(draws)` per step whether the row is finished or not, so
    step t of a sample always uses its generator's t-th draws: independent of the batch, the rank and the layout."""

    def __init__(self, draws: int, temperature: float, generators: list[torch.Generator]):
        self.draws, self.temperature, self.generators, self.steps = draws, temperature, generators, []

    def on_step(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """logits [B, V] (the model's dtype) -> per row ids [draws], integer counts [draws] (0: padding), entropy."""
        uniforms = torch.stack([torch.rand(self.draws, generator=g, dtype=torch.float64) for g in self.generators])
        found = draw_from_logits(logits.to(torch.float32, copy=True), self.temperature, uniforms)
        counts = (found.counts * self.draws).round_().to(torch.uint8)  # exact: the counts are c / draws
        self.steps.append((found.ids.cpu(), counts.cpu(), found.entropy.cpu()))

    def row(self, i: int, n: int) -> dict:
        """Row i's first n steps: teacher_ids [U] and teacher_counts [U] (position by position, ids ascending),
        teacher_unique [n] (U = its sum) and teacher_entropy [n]."""
        ids, counts, entropy = (x[i, :n] for x in self.stacked())
        kept = counts > 0  # row-major: the unique ids of each position come first in their row
        return {
            "teacher_ids": ids[kept].numpy(),
            "teacher_counts": counts[kept].numpy(),
            "teacher_unique": kept.sum(-1).to(torch.uint8).numpy(),
            "teacher_entropy": entropy.to(torch.float16).numpy(),
        }
