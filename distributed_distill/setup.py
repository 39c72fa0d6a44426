"""What every command sets up before its own work: the accelerator, the seed, the tokenizer, the model configs,
the run directory and the learning-rate schedule.

    distill train      -> setup_run (+ prepare_output_dir, lr_lambda)    trainer.py
    distill precompute -> setup_run                                       precompute.py
    distill eval       -> setup_accelerator, setup_tokenizer              evaluate.py

Nothing here loads weights or data: a mistake in the config, the paths or the launch is reported before any
expensive work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed

from . import data as data_lib
from . import models, samples
from .config import Config, save_config
from .errors import DistillError
from .integrity import atomic_write_text
from .lock import launcher_world_size
from .losses import resolve_chunk_size
from .tracking import METRICS, read_records, wandb_kwargs


def setup_accelerator(cfg: Config) -> Accelerator:
    use_cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise DistillError("train.device=cuda but CUDA is not available on this machine")
    # The timeout bounds every collective: a rank that dies or stops calling a ZeRO-3 teacher fails the job.
    pg = {"timeout": timedelta(seconds=cfg.teacher.collective_timeout if cfg.teacher is not None else 1800)}
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
    # A launcher that starts N processes which do not join one process group gives N students trained alone
    # (torchrun without Accelerator(cpu=True) on CPU; `srun -n 2 python train.py` without torchrun). Refuse.
    name, world = launcher_world_size()
    if accelerator.num_processes != world:
        raise DistillError(
            f"Accelerate sees {accelerator.num_processes} process(es) but the launcher started {name}={world}; "
            "on CPU launch with `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N` or torchrun, "
            "under SLURM run one torchrun/accelerate launch per node"
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
    sharded = student_is_sharded(accelerator)
    if sharded and cfg.student.lora is not None:
        # peft wraps the model after it is built; a ZeRO-3 / FSDP student is partitioned as it is built (and its
        # frozen base weights would still be sharded and gathered like trained ones): not supported here.
        raise DistillError(
            f"student.lora with a {'FSDP' if plugin is None else 'ZeRO-3'} student is not supported; launch LoRA "
            "with launch/accelerate/ddp.yaml or zero2.yaml (the frozen base fits each GPU), or unset student.lora"
        )
    if sharded and cfg.eval.train_prompts:
        raise DistillError(
            f"eval.train_prompts={cfg.eval.train_prompts} generates with the student, which a "
            f"{'FSDP' if plugin is None else 'ZeRO-3'} student holds in shards; set eval.train_prompts=0 and run "
            "`distill eval` on the exported student"
        )
    if sharded and cfg.distill.chunk_size not in (0, "auto"):
        # The chunked loss multiplies by the student's lm_head weight outside its forward, where ZeRO-3 and FSDP
        # hold only a shard of it.
        raise DistillError(
            f"distill.chunk_size={cfg.distill.chunk_size} needs the student's whole output layer, which a "
            f"{'FSDP' if plugin is None else 'ZeRO-3'} student shards; set distill.chunk_size=0 (logits from forward)"
        )
    return accelerator


def student_is_sharded(accelerator: Accelerator) -> bool:
    """ZeRO-3 and FSDP hold only a shard of the student's lm_head weight outside its forward."""
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3)


def resolve_loss_chunks(cfg: Config, student_config, accelerator: Accelerator) -> Config:
    """cfg with `distill.chunk_size: auto` turned into rows for this student and device (an int stays as it is);
    a sharded student takes the naive path (0), the only one that does not need its whole output layer."""
    if cfg.distill.chunk_size != "auto":
        return cfg
    rows = 0
    if not student_is_sharded(accelerator):
        text = student_config.get_text_config()
        rows = resolve_chunk_size("auto", text.vocab_size, text.hidden_size, accelerator.device)
    accelerator.print(f"distill.chunk_size=auto: {rows} tokens per loss chunk" + ("" if rows else " (naive path)"))
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, chunk_size=rows))


def setup_tokenizer(cfg: Config, accelerator: Accelerator):
    """The run's tokenizer, with `tokenizer.chat_template` applied when given."""
    tokenizer = _tokenizer(cfg, accelerator)
    if cfg.tokenizer.chat_template is not None:
        tokenizer.chat_template = Path(cfg.tokenizer.chat_template).expanduser().read_text()
    return tokenizer


def _tokenizer(cfg: Config, accelerator: Accelerator):
    source = models.tokenizer_source(cfg)
    if source is not None:
        path, revision = source
        trust = any(m is not None and m.trust_remote_code for m in (cfg.teacher, cfg.student))
        return models.load_tokenizer(path, revision=revision, trust_remote_code=trust)
    store = samples.training_store(cfg)
    if store is not None:  # training on a sample store: the tokenizer its ids belong to, kept in it
        return models.load_tokenizer(str(store / samples.TOKENIZER))
    # Both models are built from arch: train a BPE tokenizer on the training split, once, cached by the
    # data and vocabulary it was trained on.
    key = json.dumps(
        [
            cfg.data.source,
            cfg.data.max_documents,
            cfg.data.val_fraction,
            cfg.data.text_field,
            cfg.data.prompt_field,
            cfg.data.completion_field,
            cfg.tokenizer.vocab_size,
            cfg.data.messages_field,
            cfg.data.subset,
            cfg.data.split,
            cfg.data.revision,
        ]
    )
    out = data_lib.cache_root(cfg.data) / "tokenizers" / f"bpe-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    with accelerator.main_process_first():
        if not out.is_dir():
            out.parent.mkdir(parents=True, exist_ok=True)
            accelerator.print(f"training a {cfg.tokenizer.vocab_size}-token BPE tokenizer on {cfg.data.source} ...")
            chat = data_lib.is_conversational(cfg.data)
            models.train_bpe_tokenizer(data_lib.texts_for_tokenizer(cfg.data), cfg.tokenizer.vocab_size, out, chat)
    return models.load_tokenizer(str(out))


def setup_run(cfg: Config, accelerator: Accelerator | None = None):
    """What `distill train` and `distill precompute` share: the accelerator, the seed, the tokenizer and the
    checked model configs (no weights loaded yet)."""
    accelerator = accelerator or setup_accelerator(cfg)
    set_seed(cfg.train.seed)
    models.check_paths(cfg)  # a typo in a path fails now, not after a tokenizer has been trained
    tokenizer = setup_tokenizer(cfg, accelerator)
    models.check_tokenizers(cfg, tokenizer)
    student_config, teacher_config = models.resolve_configs(cfg, len(tokenizer))
    return accelerator, tokenizer, student_config, teacher_config


def prepare_output_dir(cfg: Config, accelerator: Accelerator, resume_step: int | None) -> Path:
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        metrics = out / METRICS
        if resume_step is None:
            # Metrics restart with the run; earlier runs' records would make the curve ambiguous.
            metrics.unlink(missing_ok=True)
        elif metrics.is_file():
            # Records written after the checkpoint (before a kill) are replaced by the resumed run's own; a torn
            # line (a kill or a full disk in the middle of an append) is dropped, and said so.
            records, notes = read_records(metrics)
            for note in notes:
                accelerator.print(f"resume: {note}")
            kept = [r for r in records if r["step"] <= resume_step]
            atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in kept))
        save_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()
    return out


def lr_lambda(cfg: Config):
    """Linear warmup, then cosine decay to lr * min_lr_ratio; a multiplier of the peak lr per optimizer step."""
    train = cfg.train

    def schedule(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return schedule
