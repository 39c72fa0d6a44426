"""The training loop: setup, step, evaluate, export.

    train(cfg) -> setup_accelerator -> setup_tokenizer -> setup_data -> setup_student / setup_teacher -> fit

One step: the micro-batches of the optimizer step are fetched first, their valid tokens are
counted and summed over ranks, and each micro-batch's summed loss is divided by that global
count. The gradient therefore equals d(mean over every valid token of the global batch), however
the batch is split into micro-batches, accumulation steps and processes, and the logged `loss` is
exactly the optimised quantity.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object, set_seed

from . import checkpoint, models
from . import data as data_lib
from .config import Config, DistillConfig, save_config, to_dict
from .errors import DistillError, Preempted
from .losses import LossOutput, chunked_distill_loss, kd_loss, sparse_kd_loss
from .teacher import final_hidden, parameter_bytes, setup_teacher
from .tracking import Tracker, wandb_kwargs

# ----------------------------------------------------------------------------------------------
# Setup


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
    sharded = accelerator.distributed_type == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3)
    if sharded and cfg.distill.chunk_size > 0:
        # The chunked loss multiplies by the student's lm_head weight outside its forward, where ZeRO-3 and FSDP
        # hold only a shard of it.
        raise DistillError(
            f"distill.chunk_size={cfg.distill.chunk_size} needs the student's whole output layer, which a "
            f"{'FSDP' if plugin is None else 'ZeRO-3'} student shards; set distill.chunk_size=0 (logits from forward)"
        )
    return accelerator


def launcher_world_size() -> tuple[str, int]:
    """How many processes the launcher started, and the variable that says so."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        if os.environ.get(name):
            return name, int(os.environ[name])
    return "WORLD_SIZE", 1


def setup_tokenizer(cfg: Config, accelerator: Accelerator):
    source = models.tokenizer_source(cfg)
    if source is not None:
        trust = any(m is not None and m.trust_remote_code for m in (cfg.teacher, cfg.student))
        return models.load_tokenizer(source, trust_remote_code=trust)
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
        ]
    )
    out = data_lib.cache_root(cfg.data) / "tokenizers" / f"bpe-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    with accelerator.main_process_first():
        if not out.is_dir():
            out.parent.mkdir(parents=True, exist_ok=True)
            accelerator.print(f"training a {cfg.tokenizer.vocab_size}-token BPE tokenizer on {cfg.data.source} ...")
            models.train_bpe_tokenizer(data_lib.texts_for_tokenizer(cfg.data), cfg.tokenizer.vocab_size, out)
    return models.load_tokenizer(str(out))


def setup_run(cfg: Config, accelerator: Accelerator | None = None):
    """What `distill train` and `distill precompute` share: the accelerator, the seed, the tokenizer and the
    checked model configs (no weights loaded yet)."""
    accelerator = accelerator or setup_accelerator(cfg)
    set_seed(cfg.train.seed)
    models.check_paths(cfg)  # a typo in a path fails now, not after a tokenizer has been trained
    tokenizer = setup_tokenizer(cfg, accelerator)
    student_config, teacher_config = models.resolve_configs(cfg, len(tokenizer))
    return accelerator, tokenizer, student_config, teacher_config


def prepare_output_dir(cfg: Config, accelerator: Accelerator, resume_step: int | None) -> Path:
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        metrics = out / "metrics.jsonl"
        if resume_step is None:
            # Metrics restart with the run; earlier runs' records would make the curve ambiguous.
            metrics.unlink(missing_ok=True)
        elif metrics.is_file():
            # Records written after the checkpoint (before a kill) are replaced by the resumed run's own.
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            tmp = metrics.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(metrics)
        save_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()
    return out


def lr_lambda(cfg: Config):
    t = cfg.train

    def schedule(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return schedule


# ----------------------------------------------------------------------------------------------
# Forward and loss


def forward_losses(student, teacher, batch: dict, dcfg: DistillConfig, head) -> LossOutput:
    """Summed KD and CE losses of one micro-batch (next-token aligned), not yet normalised.

    `student` is the (possibly wrapped) module to call, `head` its output layer (unwrapped), `teacher` a
    teacher source (online or offline) or None.
    """
    labels = batch["labels"][:, 1:].reshape(-1)
    want_kd = teacher is not None and dcfg.alpha > 0
    targets = teacher.targets(batch) if want_kd else None
    kd_args = dict(kind=dcfg.loss, temperature=dcfg.temperature, beta=dcfg.beta, skew=dcfg.skew)
    sparse_args = dict(tail=dcfg.top_k_tail) if want_kd and targets.sparse else {}
    if dcfg.chunk_size > 0:
        hidden = final_hidden(student, batch["input_ids"])[:, :-1]
        # The weights tell the fused backward which combination will be differentiated, so the gradients it
        # computes during the forward pass are the ones needed (no recomputation).
        return chunked_distill_loss(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            labels,
            student_bias=head.bias,
            chunk_size=dcfg.chunk_size,
            kd_weight=dcfg.alpha if want_kd else 0.0,
            ce_weight=1 - dcfg.alpha,
            **kd_args,
            **sparse_args,
            **(targets.loss_kwargs() if want_kd else {}),
        )
    # Naive path: full [tokens, V] logits; for models or strategies where the head cannot be used directly.
    logits = student(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1]
    logits = logits.reshape(-1, logits.shape[-1])  # not head.weight.shape: a ZeRO-3 student holds only a shard
    ce_sum = F.cross_entropy(logits.float(), labels, ignore_index=data_lib.IGNORE_INDEX, reduction="sum")
    kd_sum = logits.new_zeros((), dtype=torch.float32)
    if want_kd and targets.sparse:
        kd_sum = sparse_kd_loss(
            logits,
            targets.ids,
            targets.logprobs,
            labels,
            reduction="sum",
            teacher_tail_logmass=targets.tail_logmass,
            **sparse_args,
            **kd_args,
        )
    elif want_kd:
        kd_sum = kd_loss(logits, targets.dense_logits(), labels, reduction="sum", **kd_args)
    del targets
    n = (labels != data_lib.IGNORE_INDEX).sum()
    return LossOutput(kd_sum=kd_sum, ce_sum=ce_sum, num_tokens=n, stats={})


def count_tokens(micro_batches: list[dict]) -> torch.Tensor:
    return sum((mb["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum() for mb in micro_batches)


# Diagnostics the chunked loss returns as sums over counted tokens; logged as per-token means.
STATS = ("teacher_entropy", "top1_agreement", "topk_mass")


@dataclass
class StepResult:
    loss: float
    kd_loss: float
    ce_loss: float
    num_tokens: int
    grad_norm: float
    stats: dict[str, float]
    skipped: bool = False  # non-finite loss or gradient: the optimizer step was not applied


def train_step(accelerator, student, head, teacher, optimizer, micro_batches: list[dict], cfg: Config) -> StepResult:
    """One optimizer step over this rank's micro-batches; shared by 1- and N-process runs alike.

    A non-finite loss or gradient norm (the same verdict on every rank: both are global) skips the step: the
    gradients are dropped and the weights and optimizer state stay as they were. A DeepSpeed student steps
    inside `backward`; DeepSpeed skips such a step itself (an invalid gradient norm counts as an overflow).
    """
    alpha = cfg.distill.alpha
    local_tokens = count_tokens(micro_batches).to(accelerator.device)
    global_tokens = accelerator.reduce(local_tokens.clone(), reduction="sum").clamp(min=1).float()
    # accelerator.backward divides by the accumulation steps and DDP averages over processes; undo both so
    # each micro-batch contributes exactly (its summed loss) / (valid tokens in the global step).
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / global_tokens
    sums = torch.zeros(2 + len(STATS), device=accelerator.device)
    present: set[str] = set()
    engine = _deepspeed_engine(student)
    skipped_before = engine.skipped_steps if engine is not None else 0
    for mb in micro_batches:
        mb = {k: v.to(accelerator.device) for k, v in mb.items()}
        with accelerator.accumulate(student):
            out = forward_losses(student, teacher, mb, cfg.distill, head=head)
            loss = alpha * out.kd_sum + (1 - alpha) * out.ce_sum
            accelerator.backward(loss * scale)
            stats = [out.stats.get(name, torch.zeros((), device=sums.device)).float() for name in STATS]
            sums += torch.stack([out.kd_sum.detach().float(), out.ce_sum.detach().float(), *stats])
            present.update(out.stats)
            if accelerator.sync_gradients:
                sums = accelerator.reduce(sums, reduction="sum")
                max_norm = cfg.train.max_grad_norm or float("inf")
                grad_norm = float(accelerator.clip_grad_norm_(student.parameters(), max_norm))
                finite = bool(torch.isfinite(sums[:2]).all()) and math.isfinite(grad_norm)
                if finite:
                    optimizer.step()
                elif engine is not None and engine.skipped_steps == skipped_before:
                    raise DistillError(
                        "DeepSpeed applied an optimizer step with a non-finite loss or gradient; enable its check "
                        "(bf16.check_grad_overflow: true, or gradient_clipping > 0 in fp32)"
                    )
            optimizer.zero_grad(set_to_none=True)
    kd, ce, *stats = (sums / global_tokens).tolist()
    return StepResult(
        loss=alpha * kd + (1 - alpha) * ce,
        kd_loss=kd,
        ce_loss=ce,
        num_tokens=int(global_tokens.item()),
        grad_norm=grad_norm,
        stats={name: value for name, value in zip(STATS, stats) if name in present},
        skipped=not finite,
    )


def _deepspeed_engine(model):
    return model if hasattr(model, "skipped_steps") and hasattr(model, "checkpoint_engine") else None


@torch.no_grad()
def evaluate(accelerator, model, head, teacher, val_ds, cfg: Config) -> dict:
    """Validation CE (and KD against the teacher, if any) over the split, token-weighted across ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=accelerator.device)
    batches = data_lib.eval_batches(
        val_ds, cfg.train.micro_batch_size, accelerator.num_processes, accelerator.process_index, cfg.train.eval_batches
    )
    for mb in batches:
        mb = {k: v.to(accelerator.device) for k, v in mb.items()}
        with accelerator.autocast():
            out = forward_losses(model, teacher, mb, cfg.distill, head=head)
        sums += torch.stack([out.ce_sum.float(), out.kd_sum.float(), out.num_tokens.float()])
    ce, kd, n = accelerator.reduce(sums, reduction="sum").tolist()
    model.train(was_training)
    n = max(n, 1.0)
    result = {"val_loss": ce / n, "val_ppl": math.exp(min(ce / n, 50.0)), "val_tokens": int(n)}
    if teacher is not None and cfg.distill.alpha > 0:
        result["val_kd_loss"] = kd / n
    return result


# ----------------------------------------------------------------------------------------------
# The run


def train(cfg: Config) -> dict:
    with checkpoint.StopRequest() as stop:  # SIGTERM/SIGUSR1 from here on: finish the step, checkpoint, exit
        return _train(cfg, stop)


def _train(cfg: Config, stop: checkpoint.StopRequest) -> dict:
    given = cfg
    accelerator = setup_accelerator(cfg)
    models.check_paths(cfg)  # a mistyped path is named as such, before a checkpoint is compared against it
    # Which checkpoint to continue from is settled (and a wrong one refused) before any data or model is loaded.
    resume_path, resume = checkpoint.choose_resume(cfg, accelerator)
    accelerator, tokenizer, student_config, teacher_config = setup_run(cfg, accelerator)
    offline = None
    if cfg.distill.signal == "offline":
        # The logit store stands in for the data pipeline and the teacher: checked against this run, then streamed.
        from .store import offline_config, open_offline

        offline = open_offline(cfg, tokenizer, student_config, accelerator)
        if resume is not None and resume["store"] != offline.manifest["config_hash"]:
            raise checkpoint.CheckpointError(
                f"checkpoint {resume_path} was trained from store {resume['store'][:12]} but distill.store="
                f"{cfg.distill.store} holds store {offline.manifest['config_hash'][:12]}"
            )
        train_ds, val_ds = offline.train, offline.val
        cfg = offline_config(cfg)  # no teacher model is loaded
    else:
        with accelerator.main_process_first():
            train_ds, val_ds = data_lib.build_datasets(cfg.data, tokenizer)
    out_dir = prepare_output_dir(cfg, accelerator, resume["step"] if resume else None)
    student = models.load_model(cfg.student, student_config, seed=cfg.train.seed)
    teacher = setup_teacher(cfg, teacher_config, accelerator.device)  # every rank: ZeRO-3 partitions over all
    if offline is not None:
        teacher = offline.teacher
    if teacher is not None and accelerator.is_main_process:
        (out_dir / "teacher.json").write_text(json.dumps(teacher.identity, indent=2))
    optimizer = torch.optim.AdamW(
        student.parameters(),
        lr=cfg.train.lr,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        weight_decay=cfg.train.weight_decay,
    )
    # The scheduler is stepped by hand once per optimizer step: Accelerate's prepared scheduler would
    # step num_processes times per call and make the schedule depend on the world size.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    student, optimizer = accelerator.prepare(student, optimizer)
    head = accelerator.unwrap_model(student).get_output_embeddings()
    accelerator.print(
        f"train {len(train_ds)} x {cfg.data.seq_len} tokens, validation {len(val_ds)}; "
        f"{accelerator.num_processes} process(es) on {accelerator.device}; "
        f"student {parameter_bytes(student)[2]:,} params"
        + (f", teacher {teacher.num_parameters():,} params" if teacher is not None else "")
    )
    memory_report(accelerator, student, teacher)
    # The config as given (an offline run trains with the teacher section dropped): what resume compares against.
    progress = Progress(store=offline.manifest["config_hash"] if offline else None, config=to_dict(given))
    if resume is not None:
        checkpoint.load(accelerator, resume_path)
        progress.restore(resume, scheduler, accelerator.process_index)

    loop = Loop(cfg, accelerator, student, head, teacher, optimizer, scheduler, progress, stop)
    final = fit(loop, train_ds, val_ds)
    export(accelerator, student, tokenizer, out_dir / "final")
    return final


def memory_report(accelerator: Accelerator, student, teacher) -> None:
    """Print (main process) the engines chosen and the parameter bytes each rank holds: a collective."""
    plugin = accelerator.state.deepspeed_plugin
    strategy = accelerator.distributed_type.value.lower() + (f" zero{plugin.zero_stage}" if plugin else "")
    s_local, s_full, _ = parameter_bytes(student)
    t_local, t_full, _ = parameter_bytes(teacher.model) if teacher is not None else (0, 0, 0)
    held = accelerator.gather(torch.tensor([[s_local, t_local]], dtype=torch.float64, device=accelerator.device))
    mib = 2.0**20
    lines = [f"memory: student strategy {strategy}, teacher engine {teacher.engine if teacher else 'none'}"]
    for rank, (s, t) in enumerate(held.tolist()):
        line = f"  rank {rank}: student params {s / mib:.2f} MiB of {s_full / mib:.2f}"
        if teacher is not None:
            line += f", teacher params {t / mib:.2f} MiB of {t_full / mib:.2f} ({t / max(t_full, 1):.2f}x)"
        lines.append(line)
    accelerator.print("\n".join(lines))


@dataclass
class Progress:
    """The recipe state a checkpoint carries besides weights, optimizer and RNG (checkpoint.json)."""

    step: int = 0
    micro_batches: int = 0  # this rank's data position: micro-batches consumed (the stream skips them on resume)
    tokens_seen: int = 0
    bad_steps: int = 0  # consecutive steps skipped for a non-finite loss or gradient
    skipped_steps: int = 0
    wandb_run_id: str | None = None
    store: str | None = None  # content hash of the offline store trained from
    seen: list[int] | None = None  # this rank's first sample indices (the ranks/ record)
    config: dict | None = None  # the resolved config the run was started with

    def restore(self, meta: dict, scheduler, rank: int) -> None:
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.bad_steps, self.skipped_steps = meta["bad_steps"], meta["skipped_steps"]
        self.wandb_run_id = meta["wandb_run_id"]
        position = meta["data_position"][rank]
        self.micro_batches, self.seen = position["micro_batches"], position["first_sample_indices"]
        scheduler.load_state_dict(meta["scheduler"])


@dataclass
class Loop:
    cfg: Config
    accelerator: Accelerator
    student: torch.nn.Module
    head: torch.nn.Module
    teacher: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    progress: Progress
    stop: checkpoint.StopRequest


def fit(loop: Loop, train_ds, val_ds) -> dict:
    cfg, accelerator, progress = loop.cfg, loop.accelerator, loop.progress
    t = cfg.train
    world, rank = accelerator.num_processes, accelerator.process_index
    tracker = Tracker(cfg, accelerator, start_step=progress.step, run_id=progress.wandb_run_id)
    progress.wandb_run_id = tracker.run_id
    progress.seen = progress.seen or []
    loop.student.train()
    result = {}
    # Offline: this rank's share of the store, streamed (split across ranks inside, never by Accelerate), from
    # where the checkpoint left it. Online: the batch order is a pure function of the micro-step.
    offline = cfg.distill.signal == "offline"
    stream = train_ds.micro_batches(t.micro_batch_size, world, rank, skip=progress.micro_batches) if offline else None
    saved_at = progress.step
    while progress.step < t.max_steps:
        if loop.stop.agreed(accelerator):
            break
        started = time.perf_counter()
        micro_steps = range(progress.micro_batches, progress.micro_batches + t.grad_accum_steps)
        if stream is not None:
            batches = [next(stream) for _ in micro_steps]
            indices = [b.pop("index").tolist() for b in batches]
        else:
            indices = [
                data_lib.train_indices(len(train_ds), t.micro_batch_size, world, rank, t.seed, m) for m in micro_steps
            ]
            batches = [data_lib.collate(train_ds, idx) for idx in indices]
        progress.seen.extend(i for idx in indices for i in idx if len(progress.seen) < 256)
        lr = loop.scheduler.get_last_lr()[0]
        res = train_step(accelerator, loop.student, loop.head, loop.teacher, loop.optimizer, batches, cfg)
        loop.scheduler.step()
        progress.step += 1
        progress.micro_batches += t.grad_accum_steps
        progress.tokens_seen += res.num_tokens
        elapsed = time.perf_counter() - started
        tokens = t.micro_batch_size * t.grad_accum_steps * world * cfg.data.seq_len
        record = {
            "step": progress.step,
            "loss": res.loss,
            "kd_loss": res.kd_loss,
            "ce_loss": res.ce_loss,
            "lr": lr,
            "grad_norm": res.grad_norm,
            "num_tokens": res.num_tokens,
            "tokens_per_second": tokens / elapsed,
            **res.stats,
        }
        if res.skipped:
            progress.bad_steps += 1
            progress.skipped_steps += 1
            record.update(skipped=True, skipped_steps=progress.skipped_steps)
            accelerator.print(f"step {progress.step}: non-finite loss or gradient, step skipped")
            if progress.bad_steps >= t.max_bad_steps:
                tracker.log(record)
                tracker.close()
                good = checkpoint.list_checkpoints(Path(cfg.output_dir))
                raise DistillError(
                    f"{progress.bad_steps} consecutive steps (up to step {progress.step}) had a non-finite loss or "
                    f"gradient (train.max_bad_steps={t.max_bad_steps}); stopped without applying them; "
                    f"last good checkpoint: {good[0][1] if good else 'none'}"
                )
        else:
            progress.bad_steps = 0
        last = progress.step == t.max_steps
        if (t.eval_every and progress.step % t.eval_every == 0) or last:
            result = evaluate(accelerator, loop.student, loop.head, loop.teacher, val_ds, cfg)
            record.update(result)
        if progress.step % t.log_every == 0 or last or "val_loss" in record or res.skipped:
            tracker.log(record)
        tracker.progress(progress.step, res.loss, record["tokens_per_second"])
        if t.save_every and progress.step % t.save_every == 0 and not res.skipped:  # checkpoints hold good steps
            save_checkpoint(loop)
            saved_at = progress.step
    if progress.step < t.max_steps:  # stopped by SIGTERM/SIGUSR1
        path = save_checkpoint(loop) if saved_at != progress.step else checkpoint_path(cfg, progress.step)
        tracker.close()
        # Stopped before any step since the last checkpoint (or since the start): nothing new to save.
        saved = f"checkpoint {path} written" if path.is_dir() else "no step trained yet, nothing to save"
        raise Preempted(
            f"preempted at step {progress.step}: {saved}; run the same command again (train.resume=auto) to continue"
        )
    tracker.close()
    _write_rank_record(cfg, accelerator, progress.seen)
    return result


def checkpoint_path(cfg: Config, step: int) -> Path:
    return Path(cfg.output_dir) / checkpoint.step_name(step)


def save_checkpoint(loop: Loop) -> Path:
    """Every rank: the recipe state (with each rank's data position) goes into the marker the main process writes."""
    cfg, accelerator, progress = loop.cfg, loop.accelerator, loop.progress
    positions = gather_object(
        [
            {
                "rank": accelerator.process_index,
                "micro_batches": progress.micro_batches,
                "first_sample_indices": progress.seen,
            }
        ]
    )
    state = {
        "tokens_seen": progress.tokens_seen,
        "bad_steps": progress.bad_steps,
        "skipped_steps": progress.skipped_steps,
        "world_size": accelerator.num_processes,
        "scheduler": loop.scheduler.state_dict(),
        "data_position": sorted(positions, key=lambda p: p["rank"]),
        "wandb_run_id": progress.wandb_run_id,
        "store": progress.store,
        "config": progress.config,
    }
    return checkpoint.save(accelerator, loop.student, Path(cfg.output_dir), progress.step, state, cfg.train.keep_last)


def _write_rank_record(cfg: Config, accelerator: Accelerator, seen: list[int]) -> None:
    path = Path(cfg.output_dir) / "ranks" / f"rank-{accelerator.process_index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {"rank": accelerator.process_index, "world_size": accelerator.num_processes, "first_sample_indices": seen}
        )
    )


def export(accelerator: Accelerator, model, tokenizer, out: Path) -> None:
    """Save the student with `save_pretrained` (safetensors) and its tokenizer: loadable without this package."""
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)  # gathers sharded (ZeRO-3 / FSDP) weights
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        out,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=state,
        safe_serialization=True,
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(out)
    accelerator.wait_for_everyone()
