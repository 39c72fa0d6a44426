"""`distill precompute`: run the teacher once over the data and keep its targets (top-k, or sampled draws) in a
logit store.

    distill precompute --config configs/smoke.yaml distill.store=stores/smoke [distill.store_top_k=64]
    distill precompute --config ... distill.store_samples=16 distill.store_encoding=packed   # sampled, packed
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m distributed_distill.cli \\
        precompute --config configs/smoke.yaml distill.store=stores/smoke
    torchrun --nproc_per_node 8 -m distributed_distill.cli precompute --config ... # one per node under SLURM
    DISTILL_STORE_PART=1/4 distill precompute --config ...   # the second quarter of the shards (a job array task)

The work is a fixed list of shards (train rows in the seeded permutation order that training uses, then the
validation rows), dealt round-robin to the ranks by the store writer (store/writer.py: resume, parts, lockstep,
the manifest); this module holds only the plan (what determines the store's content) and the work of one shard.
Each shard is computed from the same batches whatever the number of processes, so the store is byte-identical.

The targets come from the same teacher source an online run uses (`teacher.setup_teacher` with `distill.top_k` or
`distill.samples`), so an offline run with a plain store and an online run with that top_k (or samples) see the
same values; a packed store adds only its stated rounding (store/encoding.py). From several teachers (`teachers:`)
the store holds their mixture (or routed rows) at distill.top_k, exactly the targets an online run of those teachers
trains on (teachers.py), and its manifest's `teacher` lists them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa

from .config import Config
from .cross_teacher import row_targets
from .data.batching import collate, train_indices
from .data.packed import build_datasets
from .setup import RunPlan, store_run
from .store import format as store_format
from .store import writer
from .store.logits import LOGIT_FORMAT, LOGIT_VERSION, encode_logit_rows, logit_counts
from .teacher import identity, setup_teacher
from .teachers import expected_identity, setup_teachers
from .tokenizer import tokenizer_hash


def precompute(cfg: Config, part: tuple[int, int] | None = None) -> dict:
    """Write (or finish) the store; `part` (default: DISTILL_STORE_PART) restricts this run to part I of N."""
    with store_run(cfg, cfg.distill.store, "distill.store", "precompute", part) as (plan, part, started):
        accelerator = plan.accelerator
        with accelerator.main_process_first():  # distill.cross_tokenizer: the teacher's tokenization (cross_store.py)
            train_ds, val_ds, _ = build_datasets(plan.documents(), plan.teacher_side_tokenizer, cfg.data)
        content = logit_store_plan(plan, len(train_ds), len(val_ds))
        distill = cfg.distill
        layout = shard_layout(
            len(train_ds), len(val_ds), cfg.train.seed, distill.store_shard_rows, distill.store_max_rows
        )
        kind = CrossTargetsWork if plan.teacher_tokenizer is not None else TargetsWork
        work = kind(plan, {"train": train_ds, "validation": val_ds}, content)
        job = writer.StoreJob(accelerator, Path(distill.store), "distill.store", content, layout, part, started)
        return job.run(work)


def logit_store_plan(plan: RunPlan, n_train: int, n_val: int) -> dict:
    """Everything that determines the store's content; its hash names the store and guards resumes."""
    cfg, tokenizer, distill = plan.cfg, plan.teacher_side_tokenizer, plan.cfg.distill
    crossed = {"label_logprobs": True} if plan.teacher_tokenizer is not None else {}
    return {
        "format": LOGIT_FORMAT,
        "version": LOGIT_VERSION,
        "teacher": teacher_record(plan),
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        # The aligned vocabulary: the tokenizer's tokens, the rows both models are compared over (the teacher's
        # padding rows beyond them never enter the top-k).
        "vocab_size": len(tokenizer),
        "teacher_vocab_rows": plan.teacher_config.vocab_size,
        **store_targets_plan(distill, len(tokenizer)),
        "temperature": distill.temperature,
        "seq_len": cfg.data.seq_len,
        "logprob_dtype": "float16",
        "id_dtype": store_format.id_dtype(len(tokenizer)).name,
        "data": {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "cache_dir"},
        "order_seed": cfg.train.seed,
        "batch_size": cfg.train.micro_batch_size,
        "shard_rows": distill.store_shard_rows,
        "split_rows": {"train": min(n_train, distill.store_max_rows or n_train), "validation": n_val},
        **crossed,
    }


def teacher_record(plan: RunPlan) -> dict:
    """What the manifest records about the teacher: its identity, or several teachers' (teachers.named_identity)."""
    cfg = plan.cfg
    if cfg.teachers:
        return expected_identity(cfg, plan.teacher_configs)
    return identity(cfg.teacher, plan.teacher_config, cfg.train.seed)


def store_targets_plan(distill, vocab_size: int) -> dict:
    """What the store keeps (format version 2, encoding.py): sampled draws when distill.samples (or, for precompute
    alone, distill.store_samples) is set and distill.top_k is not, else the top-k; in distill.store_encoding. The
    draws are seeded by train.seed and each row's token ids (teacher.draw_seed)."""
    draws = distill.samples or (None if distill.top_k else distill.store_samples)
    if draws:
        return {"targets": "sampled", "samples": draws, "top_k": None, "encoding": distill.store_encoding}
    k = min(distill.top_k or distill.store_top_k, vocab_size)
    return {"targets": "top_k", "top_k": k, "samples": None, "encoding": distill.store_encoding}


def shard_layout(
    n_train: int, n_val: int, seed: int, shard_rows: int, max_rows: int | None = None
) -> list[tuple[str, list[int]]]:
    """(shard name, row indices) of every shard. Training rows go in the order training reads them with this
    seed (`train_indices`, epoch 0), so an offline run without a shuffle buffer sees the online batches;
    `max_rows` keeps the first rows of that order."""
    train_order = train_indices(n_train, n_train, 1, 0, seed, 0)[:max_rows]
    orders = {"train": train_order, "validation": list(range(n_val))}
    layout = []
    for split in store_format.SPLITS:
        order = orders[split]
        for number, start in enumerate(range(0, len(order), shard_rows)):
            layout.append((store_format.shard_name(split, number), order[start : start + shard_rows]))
    return layout


class TargetsWork:
    """The work of one logit-store shard: the teacher's targets (top-k or sampled) of its packed rows, a micro-batch
    at a time."""

    counted = "tokens"

    def __init__(self, plan: RunPlan, splits: dict, content: dict):
        self.plan, self.splits = plan, splits
        self.top_k, self.samples, self.encoding = content["top_k"], content["samples"], content["encoding"]
        self.batch_size = plan.cfg.train.micro_batch_size
        self.device = plan.accelerator.device
        self.teacher = None

    def calls(self, name: str, rows: list[int]) -> int:
        return -(-len(rows) // self.batch_size)

    def load(self) -> None:
        cfg = self.plan.cfg
        self.teacher = setup_teachers(
            cfg,
            self.plan.teacher_configs,
            self.device,
            vocab=self.plan.vocab,
            top_k=self.top_k,
            temperature=cfg.distill.temperature,
            chunk_size=self.plan.given.distill.chunk_size,
            samples=self.samples,
        )

    def shard(self, name: str, rows: list[int]) -> tuple[pa.Table, dict]:
        ds = self.splits[name.split("/")[0]]
        tables = []
        for start in range(0, len(rows), self.batch_size):
            batch_rows = rows[start : start + self.batch_size]
            tables.append(self.encode(batch_rows, collate(ds, batch_rows)))
        table = pa.concat_tables(tables)
        return table, logit_counts(table)

    def encode(self, batch_rows: list[int], batch: dict) -> pa.Table:
        """One micro-batch's store rows: the teacher's targets of its packed rows."""
        targets = self.teacher.targets({k: v.to(self.device) for k, v in batch.items()})
        return encode_logit_rows(
            batch_rows,
            batch["input_ids"],
            batch["labels"],
            targets,
            self.plan.vocab,
            batch.get("position_ids"),
            self.encoding,
            self.samples,
        )

    def filler(self) -> None:
        batch = collate(self.splits["train"], [0] * self.batch_size)
        self.teacher.targets({k: v.to(self.device) for k, v in batch.items()})


class CrossTargetsWork(TargetsWork):
    """A logit-store shard for students of any tokenizer (distill.cross_tokenizer): rows in the teacher's own
    tokenization, the teacher run dense over its vocabulary, and per position its top-k plus the log-prob of the
    label (cross_teacher.row_targets: the reduction the online cross-tokenizer teacher applies to spans)."""

    def load(self) -> None:
        cfg, plan = self.plan.cfg, self.plan
        self.teacher = setup_teacher(
            cfg.teacher,
            plan.teacher_configs[0],
            self.device,
            seed=cfg.train.seed,
            vocab=len(plan.teacher_tokenizer),
            temperature=cfg.distill.temperature,
            chunk_size=plan.given.distill.chunk_size,
        )

    def encode(self, batch_rows: list[int], batch: dict) -> pa.Table:
        """One micro-batch's store rows: per position the top-k and the label's log-prob (row_targets)."""
        found = self.teacher.targets({k: v.to(self.device) for k, v in batch.items()})
        labels = batch["labels"][:, 1:].reshape(-1).to(self.device)
        temperature = self.plan.cfg.distill.temperature
        targets, label_logprobs = row_targets(found, labels, self.top_k, temperature, self.teacher.chunk_size)
        vocab = len(self.plan.teacher_tokenizer)
        return encode_logit_rows(
            batch_rows, batch["input_ids"], batch["labels"], targets, vocab, batch.get("position_ids"), self.encoding,
            label_logprobs=label_logprobs,
        )  # fmt: skip
