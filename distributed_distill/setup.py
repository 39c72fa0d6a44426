"""What every command resolves before its work: the accelerator, then one run plan (`plan_run`).

    distill train      -> setup_accelerator -> [lock, checks, resume choice] -> plan_run     trainer.py
    distill precompute -> setup_accelerator -> [the store's lock] -> plan_run                precompute.py
    distill generate   -> setup_accelerator -> [the store's lock] -> plan_run                generate.py
    distill eval       -> setup_accelerator -> the run's tokenizer                           eval/evaluate.py

A `RunPlan` is one frozen value: the config as given, as resolved and as recorded, the tokenizer, the model configs
and the documents (read on first use, once). Nothing here loads weights or reads training data: a mistake in the
config, the paths or the launch is reported before any expensive work starts (preflight.py names the stages).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from transformers import PretrainedConfig

from . import checkpoint, hidden, models, preflight
from .config import Config
from .data.documents import Documents, documents
from .errors import DistillError
from .losses import resolve_chunk_size
from .rundir import recorded_config
from .store import writer
from .store.samples import TOKENIZER, training_store
from .tokenizer import check_tokenizers, run_tokenizer, teacher_tokenizer, tokenizer_source
from .tracking import wandb_kwargs


def setup_accelerator(cfg: Config) -> Accelerator:
    """The accelerator (and its process group, whose collectives time out after teacher.collective_timeout), with
    the launch checked (preflight.check_launch)."""
    use_cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise DistillError("train.device=cuda but CUDA is not available on this machine")
    # The timeout bounds every collective: a rank that dies or stops calling a ZeRO-3 teacher fails the job.
    timeout = max((t.collective_timeout for t in cfg.teacher_list()), default=1800)
    pg = {"timeout": timedelta(seconds=timeout)}
    deepspeed_student = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if use_cpu and deepspeed_student:
        # A DeepSpeed student on CPU (`accelerate launch --config_file launch/accelerate/zero2.yaml`): with
        # cpu=True Accelerate never selects DeepSpeed, and with cpu=False it finds no backend, initialises
        # DeepSpeed's process group anyway and reports num_processes=1 on every rank. Naming gloo gives it the
        # backend: torch.distributed, Accelerate and DeepSpeed then agree on the world size (see docs/distributed.md).
        use_cpu, pg["backend"] = False, "gloo"
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision="bf16" if cfg.train.precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with="wandb" if wandb_kwargs(cfg) is not None else None,
        kwargs_handlers=[InitProcessGroupKwargs(**pg)],
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        # The trainer feeds its own micro-batches (no prepared DataLoader for Accelerate to read a size from).
        for key, value in (
            ("train_micro_batch_size_per_gpu", cfg.train.micro_batch_size),
            ("gradient_clipping", cfg.train.max_grad_norm),
        ):
            if plugin.is_auto(key):
                plugin.deepspeed_config[key] = value
    preflight.check_launch(cfg, accelerator)
    return accelerator


def resolve_loss_chunks(cfg: Config, student_config, accelerator: Accelerator) -> Config:
    """cfg with `distill.chunk_size: auto` turned into rows for this student and device (an int stays as it is);
    a sharded student takes the naive path (0), the only one that does not need its whole output layer."""
    if cfg.distill.chunk_size != "auto":
        return cfg
    rows = 0
    if not models.student_is_sharded(accelerator):
        text = student_config.get_text_config()
        rows = resolve_chunk_size("auto", text.vocab_size, text.hidden_size, accelerator.device)
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, chunk_size=rows))


@dataclass(frozen=True)
class RunPlan:
    """Everything a command resolved before its work, in one value."""

    given: Config  # as loaded: the YAML and the overrides
    cfg: Config  # as resolved: loss chunks in rows; a resumed run's accumulation on another number of processes
    recorded: Config  # what config.yaml and every checkpoint hold (rundir.recorded_config)
    accelerator: Accelerator
    tokenizer: object  # a transformers tokenizer (tokenizer.run_tokenizer)
    student_config: PretrainedConfig
    teacher_config: PretrainedConfig | None  # the teacher's, or the first of several teachers'
    documents: Callable[[], Documents]  # data.source's documents, read on the first call only
    resume: checkpoint.Resume | None = None
    hint_pairs: tuple[hidden.Pair, ...] = ()  # distill.hidden's layer pairs, checked against both models; () = off
    teacher_configs: tuple[PretrainedConfig, ...] = ()  # every teacher's, in cfg.teacher_list() order
    teacher_tokenizer: object = None  # distill.cross_tokenizer: the teacher's own tokenizer; None = the run's

    @property
    def vocab(self) -> int:
        """The aligned vocabulary: the tokenizer's tokens, the rows of both output layers that are compared."""
        return len(self.tokenizer)

    @property
    def teacher_side_tokenizer(self):
        """The tokenizer of the teacher's own tokens: the teacher's with distill.cross_tokenizer, else the run's (what
        `distill generate` samples in and keeps in its store)."""
        return self.teacher_tokenizer if self.teacher_tokenizer is not None else self.tokenizer


def plan_run(cfg: Config, accelerator: Accelerator, resume: checkpoint.Resume | None = None) -> RunPlan:
    """The run plan: the seed set, the resumed config (`resume`), the tokenizer (checked against the models' own),
    the model configs (checked against each other and the tokenizer), distill.hidden's layer pairs, the loss chunks
    resolved; no weights, no
    training data. The documents are read when first asked for (the tokenizer trainer, the data), by the caller
    inside `accelerator.main_process_first()`."""
    given = cfg
    if resume is not None:
        cfg = checkpoint.resumed_config(cfg, resume, accelerator)
    set_seed(cfg.train.seed)
    models.check_paths(cfg)  # a typo in a path fails now, not after a tokenizer has been trained
    preflight.check_offline_source(cfg)
    preflight.check_lora(cfg)
    # Routed (data.teacher_column): every document's teacher named in `teachers:`, checked when they are read.
    routed = [t.name for t in cfg.teachers] if cfg.data.teacher_column is not None and cfg.teachers else None
    docs = functools.cache(lambda: documents(cfg.data, routed))
    store = training_store(cfg)  # a sample store: its tokenizer, kept in it, is the one its ids belong to
    tokenizer = run_tokenizer(cfg, accelerator, docs, sample_store_tokenizer(cfg, store))
    check_tokenizers(cfg, tokenizer)
    theirs = teacher_tokenizer(cfg)
    student_config, teacher_configs = models.resolve_configs(cfg, len(tokenizer), theirs and len(theirs))
    teacher_config = teacher_configs[0] if teacher_configs else None
    hints = cfg.distill.hidden
    pairs = hidden.resolve_pairs(hints, student_config, teacher_config) if hints is not None else ()
    resolved = resolve_loss_chunks(cfg, student_config, accelerator)
    return RunPlan(
        given=given,
        cfg=resolved,
        recorded=recorded_config(resolved),
        accelerator=accelerator,
        tokenizer=tokenizer,
        student_config=student_config,
        teacher_config=teacher_config,
        documents=docs,
        resume=resume,
        hint_pairs=pairs,
        teacher_configs=tuple(teacher_configs),
        teacher_tokenizer=theirs,
    )


def sample_store_tokenizer(cfg: Config, store: Path | None) -> Path | None:
    """The tokenizer kept in the sample store a run trains on, for a run that names none (tokenizer.path or a model
    path). With distill.cross_tokenizer the store's is the teacher's (its samples are re-tokenized for the student,
    cross_samples.py): None, and the student's must be named."""
    if store is None or cfg.distill.cross_tokenizer is None:
        return store / TOKENIZER if store is not None else None
    if tokenizer_source(cfg) is None:
        raise DistillError(
            f"the sample store {store} with distill.cross_tokenizer: its tokenizer is the teacher's, and the student's "
            "is not named; set tokenizer.path or student.path (the student's tokenizer)"
        )
    return None


@contextlib.contextmanager
def store_run(
    cfg: Config, store: str | None, key: str, command: str, part: tuple[int, int] | None
) -> Iterator[tuple[RunPlan, tuple[int, int] | None, float]]:
    """What `distill precompute` and `distill generate` start with, before their own plan and work: the part of the
    store (`part`, else DISTILL_STORE_PART), the store writer's checks, the accelerator, the store's lock (held for
    the block) and the run plan. Yields (plan, part, the start time)."""
    part = part or writer.parse_part(writer.part_setting())
    preflight.check_store_writer(cfg, store, key, command)
    started = time.perf_counter()
    accelerator = setup_accelerator(cfg)
    with writer.locked(store, key, accelerator, part):
        yield plan_run(cfg, accelerator), part, started


def lr_lambda(cfg: Config):
    """Linear warmup, then cosine decay to lr * min_lr_ratio; a multiplier of the peak lr per optimizer step."""
    train = cfg.train

    def schedule(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return schedule
