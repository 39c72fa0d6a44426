"""`distill generate`: the teacher samples completions of a prompt set into a sample store (samples.py).

    distill generate --config configs/generate.yaml generate.store=stores/samples [generate.top_k=64]
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m distributed_distill.cli \\
        generate --config configs/generate.yaml generate.store=stores/samples
    torchrun --nproc_per_node 8 -m distributed_distill.cli generate --config ... teacher.engine=zero3
    DISTILL_STORE_PART=1/4 distill generate --config ...     # the second quarter of the shards (a job array task)

Prompts come from the data section: a prompt field (data.prompt_field, rendered as prompt/completion training
renders it: bos + prompt), a conversation (data.messages_field: the turns up to its last user turn, through the
chat template with the generation prompt), the built-in `python-stdlib-chat` conversations, or windows of plain
text (generate.prefix_tokens: a text LM continues them).

The work is a fixed list of shards (generate.shard_prompts prompts each, with all their samples; train prompts,
then validation prompts) dealt round-robin to the ranks, exactly as `distill precompute` deals its shards: every
rank writes its own shards and sidecars, a shard counts as done once its sidecar's checksum matches, a killed run
started again redoes only unfinished shards, parts of a job array (DISTILL_STORE_PART) fill one store, and the
manifest is written last. A sample's random draws come from a generator seeded by (generate.seed, split, prompt
index, sample index) alone, and a shard's batches are the same whatever the layout, so 1 process, N processes, a
resumed run and a job array write byte-identical stores.

With `teacher.engine: zero3` every rank runs every generation step in lockstep (`generation.generate(synced=True)`;
ranks with fewer batches run filler ones), so a teacher sharded across the ranks can sample.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
from pathlib import Path

import torch

from . import data as data_lib
from . import models, precompute, samples
from . import store as store_lib
from .config import Config
from .errors import DistillError
from .generation import Sampling, generate, sampling_setup
from .integrity import publish_dir
from .setup import setup_run
from .teacher import setup_teacher, topk_of_logits

# ----------------------------------------------------------------------------------------------
# Prompts


def read_prompts(cfg: Config, tokenizer, teacher_config) -> tuple[dict[str, list[list[int]]], str, dict]:
    """The prompt token ids of each split (in document order, at most generate.max_prompts), the prompt kind, and
    how many were dropped (a conversation without a user turn, or a prompt with no room for max_new_tokens)."""
    dcfg, gen = cfg.data, cfg.generate
    docs = data_lib.load_documents(dcfg)
    kind = data_lib.document_kind(docs.column_names, dcfg, docs.features)
    if kind == "text" and gen.prefix_tokens is None:
        raise DistillError(
            f"data.source={dcfg.source} holds plain text, not prompts: set generate.prefix_tokens (continue windows "
            "of the text), data.prompt_field (and completion_field), use conversational data (data.messages_field), "
            f"or data.source={data_lib.BUILTIN_CHAT}"
        )
    if kind not in ("prompt", "text"):
        data_lib.check_chat_template(tokenizer, dcfg)
    limit = models.max_positions(teacher_config)
    new = gen.sampling.max_new_tokens
    room = None if limit is None else limit - new
    if room is not None and room < 1:
        raise DistillError(
            f"generate.sampling.max_new_tokens={new} leaves no room for a prompt in the teacher's {limit} positions"
        )
    out, dropped = {}, {}
    for split, ds in zip(store_lib.SPLITS, data_lib.split_documents(docs, dcfg)):
        if kind == "text":
            ids = [w for row in ds for w in text_windows(row[dcfg.text_field], tokenizer, gen)]
        else:
            ids = [prompt_ids(row, kind, dcfg, tokenizer) for row in ds]
        kept = [p for p in ids if p and (room is None or len(p) <= room)]
        dropped[split] = len(ids) - len(kept)
        out[split] = kept[: gen.max_prompts]
        if not out[split]:
            raise DistillError(f"data.source={dcfg.source}: no usable prompt in the {split} split")
    return out, kind, dropped


def prompt_ids(row: dict, kind: str, dcfg, tokenizer) -> list[int] | None:
    """A document's prompt, tokenized as training renders it; None when it has no prompt (no user turn)."""
    if kind == "prompt":
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + tokenizer(row[dcfg.prompt_field], add_special_tokens=False)["input_ids"]
    messages = list(row[dcfg.prompt_field]) if kind == "chat_prompt" else list(row[dcfg.messages_field])
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


def sample_plan(
    cfg: Config, tokenizer, teacher_config, prompts: dict, kind: str, sampling: Sampling, eos: list[int]
) -> dict:
    gen = cfg.generate
    fingerprint = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    top_k = None if gen.top_k is None else min(gen.top_k, len(tokenizer))
    return {
        "format": samples.FORMAT,
        "version": samples.VERSION,
        "teacher": precompute.teacher_identity(cfg, teacher_config),
        "tokenizer_sha256": models.tokenizer_hash(tokenizer),
        "vocab_size": len(tokenizer),
        "teacher_vocab_rows": teacher_config.vocab_size,
        "sampling": {
            **dataclasses.asdict(sampling),
            "samples_per_prompt": gen.samples_per_prompt,
            "seed": seed_of(cfg),
            "eos_ids": eos,
        },
        # The stored top-k: from the logits the sampler used, at the distillation temperature.
        "top_k": top_k,
        "temperature": cfg.distill.temperature if top_k else None,
        "logprob_dtype": "float16",
        "id_dtype": store_lib.id_dtype(len(tokenizer)).name,
        "prompts": {
            "kind": kind,
            "data": {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "cache_dir"},
            "max_prompts": gen.max_prompts,
            "prefix_tokens": gen.prefix_tokens if kind == "text" else None,
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


def sample_layout(counts: dict[str, int], per_prompt: int, shard_prompts: int) -> list[tuple[str, list]]:
    """(shard name, [(prompt index, sample index), ...]) of every shard: train prompts, then validation prompts."""
    layout = []
    for split in store_lib.SPLITS:
        for number, start in enumerate(range(0, counts[split], shard_prompts)):
            prompts = range(start, min(start + shard_prompts, counts[split]))
            layout.append((store_lib.shard_name(split, number), [(p, s) for p in prompts for s in range(per_prompt)]))
    return layout


def shard_batches(pairs: list, prompts: list[list[int]], batch_size: int) -> list[list]:
    """A shard's batches: its samples by prompt length (less padding), then in chunks; fixed by the shard alone."""
    ordered = sorted(pairs, key=lambda pair: len(prompts[pair[0]]))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


# ----------------------------------------------------------------------------------------------
# The command


def generate_store(cfg: Config, part: tuple[int, int] | None = None) -> dict:
    """Write (or finish) the sample store; `part` (default: DISTILL_STORE_PART) restricts this run to part I of N."""
    return precompute.write_locked(cfg, part, cfg.generate.store, "generate.store", "generate", _generate_store)


def _generate_store(cfg: Config, part: tuple[int, int] | None, accelerator) -> dict:
    gen = cfg.generate
    started = time.perf_counter()
    accelerator, tokenizer, _, teacher_config = setup_run(cfg, accelerator)
    with accelerator.main_process_first():
        prompts, kind, dropped = read_prompts(cfg, tokenizer, teacher_config)
    sampling, eos = sampling_setup(cfg.generate.sampling, tokenizer, kind, "generate.sampling")
    plan = sample_plan(cfg, tokenizer, teacher_config, prompts, kind, sampling, eos)
    config_hash = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()
    root = Path(gen.store)
    complete = precompute.check_store_dir(root, config_hash, "generate.store", samples.FORMAT)
    accelerator.wait_for_everyone()
    if complete:
        accelerator.print(f"sample store {root} is already complete (config hash {config_hash[:12]})")
        return {"store": str(root), "complete": True, "shards_written": 0}
    if any(dropped.values()):
        accelerator.print(f"prompts dropped (no user turn, or longer than the teacher allows): {dropped}")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        # The plan first: a run killed before the tokenizer is saved then finds a store to resume, not foreign files.
        precompute.publish_json(root / store_lib.PLAN, {"config_hash": config_hash, **plan})
        save_tokenizer(tokenizer, root / samples.TOKENIZER)
    accelerator.wait_for_everyone()

    layout = sample_layout(plan["prompts"]["counts"], gen.samples_per_prompt, gen.shard_prompts)
    mine = precompute.part_of(layout, part)
    world, rank = accelerator.num_processes, accelerator.process_index
    todo = [
        (name, pairs)
        for name, pairs in mine[rank::world]
        if store_lib.finished_shard(root, name, config_hash, len(pairs)) is None
    ]
    sampler = Sampler(cfg, tokenizer, plan, sampling, eos)
    my_calls = sum(len(shard_batches(pairs, prompts[name.split("/")[0]], gen.batch_size)) for name, pairs in todo)
    # A sharded (ZeRO-3) teacher needs every rank in every forward: ranks with fewer batches run filler ones.
    all_calls = int(accelerator.gather(torch.tensor([my_calls], device=accelerator.device)).max())
    if all_calls:  # (nothing left to sample: no teacher loaded)
        no_topk = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, top_k=None))
        sampler.teacher = setup_teacher(no_topk, teacher_config, accelerator.device, len(tokenizer))
    tokens = 0
    for name, pairs in todo:
        split = name.split("/")[0]
        rows = []
        for batch in shard_batches(pairs, prompts[split], gen.batch_size):
            rows += sampler.sample(split, batch, prompts[split])
        rows.sort(key=lambda r: (r["index"], r["sample"]))
        table = samples.encode_rows(rows, len(tokenizer), plan["top_k"])
        counts = samples.shard_counts(table)
        store_lib.write_shard(root, name, table, config_hash, counts, samples.PARQUET_OPTIONS)
        tokens += counts["target_tokens"]
    for _ in range(all_calls - my_calls):
        sampler.filler()
    return precompute.finish_store(accelerator, root, plan, config_hash, layout, part, mine, tokens, len(todo), started)


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


class Sampler:
    """The teacher sampling batches of (prompt index, sample index): each sample with its own generator, the
    top-k of every completion position kept when the plan asks for it."""

    def __init__(self, cfg: Config, tokenizer, plan: dict, sampling: Sampling, eos: list[int]):
        self.tokenizer, self.plan, self.sampling, self.eos = tokenizer, plan, sampling, eos
        self.seed = seed_of(cfg)
        self.synced = cfg.teacher.engine == "zero3"
        self.teacher = None

    def _generate(self, prompts: list[list[int]], generators: list, on_step=None):
        return generate(
            self.teacher.runner,
            prompts,
            generators,
            self.sampling,
            pad_id=self.tokenizer.pad_token_id,
            eos_ids=self.eos,
            synced=self.synced,
            on_step=on_step,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            vocab=self.plan["vocab_size"],
        )

    def sample(self, split: str, batch: list[tuple[int, int]], prompts: list[list[int]]) -> list[dict]:
        k, steps = self.plan["top_k"], []

        def keep_topk(logits: torch.Tensor, tokens: torch.Tensor) -> None:
            # The logits the sampler used, before its temperature: at the distillation temperature instead.
            top = topk_of_logits(logits.to(torch.float32, copy=True), k, self.plan["temperature"])
            steps.append((top.ids.cpu(), top.logprobs.cpu(), top.tail_logmass.cpu()))

        gens = [sample_generator(self.seed, split, p, s) for p, s in batch]
        out = self._generate([prompts[p] for p, _ in batch], gens, keep_topk if k else None)
        stacked = [torch.stack(parts, dim=1) for parts in zip(*steps)] if k else []
        rows = []
        for i, (p, s) in enumerate(batch):
            completion = out.completions[i]
            row = {
                "index": p,
                "sample": s,
                "prompt_ids": prompts[p],
                "prompt": self.tokenizer.decode(prompts[p]),
                "completion_ids": completion,
                "completion": self.tokenizer.decode(completion, skip_special_tokens=True),
                "finish_reason": out.finish_reasons[i],
                "token_logprobs": out.logprobs[i],
            }
            if k:
                n = len(completion)
                row.update(
                    teacher_ids=stacked[0][i, :n].numpy(),
                    teacher_logprobs=stacked[1][i, :n].numpy(),
                    teacher_tail=stacked[2][i, :n].numpy(),
                )
            rows.append(row)
        return rows

    def filler(self) -> None:
        """A batch of nothing that joins every collective forward of the other ranks (ZeRO-3 lockstep)."""
        self._generate([], [])
