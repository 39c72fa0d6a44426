"""The training loop: `train(cfg)` sets up, `fit` loops, `train_step` takes one optimizer step, `export` saves.

    train -> setup_accelerator -> checks, resume choice -> plan_run (setup.py) -> training_data -> student, teacher
          -> fit -> export
    fit: next_batches -> [a served teacher: this step's targets ready, the next step's sent] -> train_step -> advance
         -> [evaluate] -> log -> [save_checkpoint]

One step: the micro-batches of the optimizer step are fetched first, their valid tokens are
counted and summed over ranks, and each micro-batch's summed loss is divided by that global
count. The gradient therefore equals d(mean over every valid token of the global batch), however
the batch is split into micro-batches, accumulation steps and processes, and the logged `loss` is
exactly the optimised quantity (docs/design.md, normalisation).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from . import checkpoint, hidden, lock, models, on_policy, preflight, rundir, teachers
from .config import Config, to_dict
from .data.batching import collate, train_indices
from .errors import DistillError, Interrupted, Preempted, RankError, WriteError
from .eval.evaluate import HeldOut, evaluate, held_out_prompts
from .heartbeat import Heartbeat
from .objective import count_tokens, forward_losses, stat_names
from .setup import RunPlan, lr_lambda, plan_run, setup_accelerator
from .teacher import TeacherSource
from .tracking import Tracker
from .training_data import TrainingData, training_data

# ----------------------------------------------------------------------------------------------
# The run


def train(cfg: Config) -> dict:
    # SIGTERM/SIGUSR1/SIGINT from here on: finish the step, checkpoint, exit.
    with checkpoint.StopRequest(Path(cfg.output_dir)) as stop:
        try:
            return _train(cfg, stop)
        except checkpoint.AlreadyFinished as e:  # the same run, finished before: nothing changed
            return e.result
        finally:
            lock.release(cfg.output_dir)


def _train(cfg: Config, stop: checkpoint.StopRequest) -> dict:
    accelerator = setup_accelerator(cfg)  # the launch checked (preflight.check_launch)
    # One job per run directory, for the life of this one; taken before anything there is read or written (and
    # the first write: a directory that cannot be written fails here).
    lock.hold(cfg.output_dir, "output_dir", accelerator)
    preflight.check_models(cfg, accelerator)  # paths, model files, room for a checkpoint
    # Which checkpoint to continue from is settled (and a wrong one refused) before any data or model is loaded.
    resume = checkpoint.choose_resume(cfg, accelerator)
    plan = plan_run(cfg, accelerator, resume)
    data = training_data(plan)
    checkpoint.check_store(resume, data.store_hash, cfg.distill.store)
    preflight.check_data(plan.cfg, data.kind, data.sequences, accelerator.num_processes, data.unprompted)
    if resume is not None:
        teachers.check_resumed(plan)  # several teachers: the ones teacher.json recorded, or refused
    out_dir = rundir.prepare(plan.recorded, accelerator, resume.step if resume else None)
    student, optimizer, scheduler, head = setup_student(plan)
    teacher = data.teacher or setup_online_teacher(plan)
    if teacher is not None and accelerator.is_main_process:
        rundir.write_teacher(out_dir, teacher.identity)
    print_summary(plan, data, student, teacher)
    progress = Progress(store=data.store_hash, config=to_dict(plan.recorded))
    if resume is not None:
        checkpoint.load(accelerator, resume.path, resume.meta)
        progress.restore(resume.meta, scheduler, accelerator)
        # Accelerate syncs gradients when its micro-step counter (restored from the checkpoint) divides by the
        # accumulation: counted in this run's micro-batches, or a resume on other process counts syncs mid-step.
        accelerator.step = progress.micro_batches
    sampler = on_policy.StudentSampler.build(
        plan.cfg, plan.tokenizer, data.kind, synced=models.student_is_sharded(accelerator)
    )
    held_out = None
    if cfg.eval.train_prompts:  # generation metrics at every evaluation (eval.train_prompts)
        with accelerator.main_process_first():
            held_out = held_out_prompts(plan.cfg, plan.documents(), plan.tokenizer, cfg.eval.train_prompts)
    loop = Loop(plan.cfg, accelerator, student, head, teacher, optimizer, scheduler, progress, stop, sampler, held_out)
    final = fit_naming_lost_ranks(loop, data)
    export(accelerator, student, plan.tokenizer, out_dir / rundir.FINAL)
    return final


def setup_student(plan: RunPlan):
    """The student (gradient checkpointing, LoRA adapters, the hint projections), its optimizer and LR schedule,
    prepared by Accelerate; and its output layer, unwrapped, restricted to the tokenizer's rows."""
    cfg, accelerator = plan.cfg, plan.accelerator
    student = models.load_model(cfg.student, plan.student_config, seed=cfg.train.seed)
    student = models.prepare_student(student, cfg.student)
    if plan.hint_pairs:  # distill.hidden: the projections, part of the student from here on (hidden.py)
        hidden.attach(
            student, cfg.distill.hidden, plan.hint_pairs, plan.student_config, plan.teacher_config, cfg.train.seed
        )
    trainable = [p for p in student.parameters() if p.requires_grad]  # with LoRA: the adapters (and projections)
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.train.lr,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        weight_decay=cfg.train.weight_decay,
    )
    # The scheduler is stepped by hand once per optimizer step: Accelerate's prepared scheduler would
    # step num_processes times per call and make the schedule depend on the world size.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    student, optimizer = accelerator.prepare(student, optimizer)
    head = models.AlignedHead(accelerator.unwrap_model(student).get_output_embeddings(), plan.vocab)
    return student, optimizer, scheduler, head


def setup_online_teacher(plan: RunPlan) -> TeacherSource | None:
    """The online teacher (every rank: a ZeRO-3 one is sharded across them), several teachers as one source
    (teachers.MultiTeacher), or None for CE-only training."""
    cfg = plan.cfg
    return teachers.setup_teachers(
        cfg,
        plan.teacher_configs,
        plan.accelerator.device,
        vocab=plan.vocab,
        top_k=cfg.distill.top_k,
        temperature=cfg.distill.temperature,
        chunk_size=cfg.distill.chunk_size,
        samples=cfg.distill.samples,
        tokenizers=(plan.tokenizer, plan.teacher_tokenizer),
    )


def print_summary(plan: RunPlan, data: TrainingData, student: torch.nn.Module, teacher: TeacherSource | None) -> None:
    """The startup summary (main process): the loss chunks, the data, the processes, the models and their memory."""
    cfg, accelerator = plan.cfg, plan.accelerator
    if plan.given.distill.chunk_size == "auto":
        rows = cfg.distill.chunk_size
        accelerator.print(f"distill.chunk_size=auto: {rows} tokens per loss chunk" + ("" if rows else " (naive path)"))
    accelerator.print(data.line)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    accelerator.print(
        f"train {'streamed' if data.sequences is None else data.sequences} x {cfg.data.seq_len} tokens, "
        f"validation {len(data.val)}; "
        f"{accelerator.num_processes} process(es) on {accelerator.device}; "
        f"student {models.parameter_bytes(student)[2]:,} params"
        + (f" ({trainable:,} trainable: LoRA)" if cfg.student.lora else "")
        + (f", teacher {teacher_size(teacher)}" if teacher is not None else "")
    )
    memory_report(accelerator, student, teacher)


def teacher_size(teacher: TeacherSource) -> str:
    if teacher.engine == "remote":  # no model here (serving.client.RemoteTeacher): where it runs
        return f"served at {teacher.urls()}"
    return f"{teacher.num_parameters():,} params"


def fit_naming_lost_ranks(loop: Loop, data: TrainingData) -> dict:
    """`fit`, with a heartbeat per rank: a collective that fails because a rank died ends the job with one line
    naming that rank (heartbeat.py) instead of a connection error."""
    accelerator = loop.accelerator
    heartbeat = Heartbeat.start(accelerator.process_index, accelerator.num_processes)
    try:
        return fit(loop, data)
    except (RuntimeError, DistillError) as e:  # a collective that failed (or timed out) because a rank died?
        lost = heartbeat.lost() if heartbeat is not None else None
        if lost is None:
            raise
        newest = next(iter(checkpoint.complete_checkpoints(Path(loop.cfg.output_dir))), None)
        said_by = RankError if heartbeat.reporter else DistillError  # one survivor says it (cli.main)
        raise said_by(
            f"lost {lost} during step {loop.progress.step + 1}: that process stopped (its node or launcher died, or "
            f"it failed: see its own error), so this job ends; newest complete checkpoint: {newest or 'none'}; "
            "submit the job again to resume (on fewer nodes if one is down: docs/cluster.md)"
        ) from e
    finally:
        if heartbeat is not None:
            heartbeat.close()


def memory_report(accelerator: Accelerator, student: torch.nn.Module, teacher: TeacherSource | None) -> None:
    """Print (main process) the engines chosen and the parameter bytes each rank holds: a collective."""
    plugin = accelerator.state.deepspeed_plugin
    strategy = accelerator.distributed_type.value.lower() + (f" zero{plugin.zero_stage}" if plugin else "")
    s_local, s_full, _ = models.parameter_bytes(student)
    t_local, t_full = teacher.parameter_bytes() if teacher is not None else (0, 0)
    held = accelerator.gather(torch.tensor([[s_local, t_local]], dtype=torch.float64, device=accelerator.device))
    mib = 2.0**20
    engine = teacher.engine if teacher else "none"
    served = teacher is not None and teacher.engine == "remote"
    if served:
        engine += f" at {teacher.urls()} (no teacher parameters in this job)"
    lines = [f"memory: student strategy {strategy}, teacher engine {engine}"]
    for rank, (s, t) in enumerate(held.tolist()):
        line = f"  rank {rank}: student params {s / mib:.2f} MiB of {s_full / mib:.2f}"
        if teacher is not None and not served:
            line += f", teacher params {t / mib:.2f} MiB of {t_full / mib:.2f} ({t / max(t_full, 1):.2f}x)"
        lines.append(line)
    accelerator.print("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class Progress:
    """The recipe state a checkpoint carries besides weights, optimizer and RNG (checkpoint.json)."""

    step: int = 0
    micro_batches: int = 0  # micro-steps taken by every rank: x processes x micro = the global data position
    tokens_seen: int = 0
    bad_steps: int = 0  # consecutive steps skipped for a non-finite loss or gradient
    skipped_steps: int = 0
    wandb_run_id: str | None = None
    store: str | None = None  # content hash of the offline store trained from
    first_sample_indices: list[int] = field(default_factory=list)  # this rank's first 256 samples (ranks/ record)
    config: dict | None = None  # the resolved config the run was started with
    hint_scale: float | None = None  # distill.hidden.balance=kd: the KD / hint ratio the next step weights hints by

    def restore(self, meta: dict, scheduler: torch.optim.lr_scheduler.LRScheduler, accelerator: Accelerator) -> None:
        """The state of `meta` on this rank. The data position is global: the checkpoint's ranks consumed
        micro_batches x world x micro sequences together (every rank the same count), which this run's ranks
        continue from whatever their number, so no sample is trained twice or skipped."""
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.bad_steps, self.skipped_steps = meta["bad_steps"], meta["skipped_steps"]
        self.wandb_run_id = meta["wandb_run_id"]
        self.hint_scale = meta.get("hint_scale")
        positions, rank = meta["data_position"], accelerator.process_index
        sequences = positions[0]["micro_batches"] * meta["world_size"] * meta["config"]["train"]["micro_batch_size"]
        micro = self.config["train"]["micro_batch_size"]  # this run's (config as resumed)
        self.micro_batches = sequences // (accelerator.num_processes * micro)  # a whole number of global batches
        self.first_sample_indices = positions[rank]["first_sample_indices"] if rank < len(positions) else []
        scheduler.load_state_dict(meta["scheduler"])


@dataclass
class Loop:
    """Everything a step needs, built once by `_train`."""

    cfg: Config
    accelerator: Accelerator
    student: torch.nn.Module  # as prepared by Accelerate: plain, DDP-wrapped, or a DeepSpeed engine
    head: models.AlignedHead  # the student's output layer, unwrapped, restricted to the tokenizer's rows
    teacher: TeacherSource | None  # online engine or offline store; None for CE-only training
    optimizer: torch.optim.Optimizer  # Accelerate's wrapper (steps only when gradients sync)
    scheduler: torch.optim.lr_scheduler.LambdaLR  # stepped once per optimizer step, by the loop
    progress: Progress
    stop: checkpoint.StopRequest
    sampler: on_policy.StudentSampler | None = None  # distill.on_policy > 0: the student's sampling on on-policy steps
    held_out: HeldOut | None = None  # held-out prompts for the generation metrics (eval.train_prompts)

    def step_hints(self) -> hidden.StepHints | None:
        """distill.hidden: the hint term of the next step (its weight after balancing, FitNets' stage), else None."""
        found = hidden.projections(self.accelerator.unwrap_model(self.student))
        return hidden.for_step(self.cfg.distill.hidden, found, self.progress.step + 1, self.progress.hint_scale)


def fit(loop: Loop, data: TrainingData) -> dict:
    """Train from `loop.progress` to `train.max_steps`; returns the last evaluation."""
    cfg, accelerator, progress = loop.cfg, loop.accelerator, loop.progress
    tracker = Tracker(cfg, accelerator, start_step=progress.step, run_id=progress.wandb_run_id)
    progress.wandb_run_id = tracker.run_id
    stream = data_stream(loop, data)
    loop.student.train()
    result, saved_at = {}, progress.step
    batches = next_batches(loop, data.train, stream)
    # Every rank asks (one all-reduce) whether any rank was signalled, so all stop after the same step.
    while progress.step < cfg.train.max_steps and not loop.stop.agreed(accelerator):
        started = time.perf_counter()
        micro_batches, sampled = sample_completions(loop, take(progress, batches))
        lr, hints = loop.scheduler.get_last_lr()[0], loop.step_hints()
        lost = remote_targets_ready(loop, micro_batches, hints)  # a served teacher: on every rank, or all stop
        if lost is not None:
            stop_preempted(loop, tracker, saved_at, because=lost)
        if progress.step + 1 < cfg.train.max_steps:  # read ahead: a served teacher computes them during this step
            batches = next_batches(loop, data.train, stream, ahead=1)
            prefetch_remote_targets(loop, batches, hints)
        res = train_step(
            accelerator,
            loop.student,
            loop.head,
            loop.teacher,
            loop.optimizer,
            micro_batches,
            cfg,
            sampled is None,
            hints,
        )
        loop.scheduler.step()
        record = advance(loop, res, lr, time.perf_counter() - started)
        if loop.sampler is not None:
            record["on_policy"] = sampled is not None
        if sampled is not None:
            record.update(sampled.record(accelerator, time.perf_counter() - started, res.stats, res.ce_loss))
        if res.skipped:
            handle_bad_step(loop, tracker, record)
        last = progress.step == cfg.train.max_steps
        if (cfg.train.eval_every and progress.step % cfg.train.eval_every == 0) or last:
            result = evaluate(accelerator, loop.student, loop.head, loop.teacher, data.val, cfg, loop.held_out)
            record.update(result)
        if progress.step % cfg.train.log_every == 0 or last or "val_loss" in record or res.skipped:
            tracker.log(record)
        tracker.progress(progress.step, res.loss, record["tokens_per_second"], record.get("on_policy"))
        if cfg.train.save_every and progress.step % cfg.train.save_every == 0 and not res.skipped:
            save_checkpoint(loop)  # checkpoints hold good steps only
            saved_at = progress.step
    # A signal during the last step (its final evaluation, say) still stops the run with a checkpoint, as any
    # other step's does; the rerun then exports. (One more all-reduce: every rank asks, as in the loop.)
    if progress.step < cfg.train.max_steps or loop.stop.agreed(accelerator):
        stop_preempted(loop, tracker, saved_at)
    tracker.close()
    out = Path(cfg.output_dir)
    rundir.write_rank_record(out, accelerator.process_index, accelerator.num_processes, progress.first_sample_indices)
    # A run resumed at its last step trains nothing more: its result is the evaluation it logged then.
    return result or rundir.last_evaluation(out)


def data_stream(loop: Loop, data: TrainingData) -> Iterator[dict] | None:
    """Offline and data.streaming: this rank's share of the store / corpus, streamed (split across ranks inside,
    never by Accelerate), from where the checkpoint left it. Otherwise None (the batch order is a pure function of
    the micro-step)."""
    if not data.streamed:
        return None
    accelerator, train = loop.accelerator, loop.cfg.train
    return data.train.micro_batches(
        train.micro_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        skip=loop.progress.micro_batches,
    )


def sample_completions(loop: Loop, micro_batches: list[dict]) -> tuple[list[dict], on_policy.Sampled | None]:
    """On an on-policy step (`on_policy.is_on_policy`), the student (unwrapped from DDP / DeepSpeed) continues the
    prompts of this rank's micro-batches, each row from its own generator (the data positions `next_batches` read);
    on any other step the micro-batches stay as they are (None)."""
    cfg, progress = loop.cfg, loop.progress
    if not is_on_policy_step(loop, progress.step + 1):
        return micro_batches, None
    accelerator, train, first = loop.accelerator, cfg.train, progress.micro_batches
    world, rank = accelerator.num_processes, accelerator.process_index
    rows = [on_policy.positions(first + j, world, rank, train.micro_batch_size) for j in range(len(micro_batches))]
    return loop.sampler.sample(accelerator.unwrap_model(loop.student), micro_batches, rows)


def is_on_policy_step(loop: Loop, step: int) -> bool:
    """Whether optimizer step `step` (1-based) samples its sequences from the student (distill.on_policy)."""
    cfg = loop.cfg
    return loop.sampler is not None and on_policy.is_on_policy(cfg.train.seed, step, cfg.distill.on_policy)


def next_batches(loop: Loop, train_ds, stream: Iterator[dict] | None, ahead: int = 0) -> list[dict]:
    """This rank's micro-batches of the next optimizer step (`ahead`=1: of the one after), at the data position
    `loop.progress` holds; a stream is read in order (each step once). Each batch carries its sample indices
    ("index") until the step takes it (`take`)."""
    train, progress, accelerator = loop.cfg.train, loop.progress, loop.accelerator
    first = progress.micro_batches + ahead * train.grad_accum_steps
    micro_steps = range(first, first + train.grad_accum_steps)
    if stream is not None:
        return [next(stream) for _ in micro_steps]
    world, rank = accelerator.num_processes, accelerator.process_index
    batches = []
    for m in micro_steps:
        idx = train_indices(len(train_ds), train.micro_batch_size, world, rank, train.seed, m)
        batches.append({**collate(train_ds, idx), "index": torch.tensor(idx)})
    return batches


def take(progress: Progress, batches: list[dict]) -> list[dict]:
    """The micro-batches of the step about to be trained, their sample indices recorded (this rank's first 256:
    recorded when trained, not when read ahead, so a checkpoint holds exactly the samples trained)."""
    seen = progress.first_sample_indices
    for b in batches:
        seen.extend(i for i in b.pop("index").tolist() if len(seen) < 256)
    return batches


def teacher_layers(cfg: Config, hints: hidden.StepHints | None) -> tuple[int, ...] | None:
    """The teacher's hidden-state indices a training step asks for (as forward_losses calls it), or None when the
    step does not call the teacher (distill.alpha 0 without active hints)."""
    hinted = hints is not None and hints.active
    if not hinted and (cfg.distill.alpha == 0 or (hints is not None and not hints.logits)):
        return None
    return tuple(hints.projections.teacher_layers) if hinted else ()


def remote_targets_ready(loop: Loop, micro_batches: list[dict], hints: hidden.StepHints | None) -> str | None:
    """A served teacher (serving.client): this step's targets fetched on every rank before its forward (most were
    sent while the last step computed), and the ranks' verdicts agreed; returns None, or the line of a server that
    stayed away past teacher.collective_timeout (every rank then stops before this step, no half step)."""
    layers = teacher_layers(loop.cfg, hints)
    if not hasattr(loop.teacher, "ready") or layers is None:  # a RemoteTeacher, or several teachers (teachers.py)
        return None
    return loop.teacher.ready(micro_batches, layers)


def prefetch_remote_targets(loop: Loop, batches: list[dict], hints: hidden.StepHints | None) -> None:
    """A served teacher: send the next step's micro-batches now, so the server computes them while this step does
    (not those of an on-policy step, whose sequences the student has not sampled yet: fetched when ready)."""
    layers = teacher_layers(loop.cfg, hints)
    if getattr(loop.teacher, "ahead", False) and layers is not None:  # teacher.prefetch of a served teacher
        if not is_on_policy_step(loop, loop.progress.step + 2):
            loop.teacher.prefetch(batches, layers)


def advance(loop: Loop, res: StepResult, lr: float, seconds: float) -> dict:
    """Move the counters past the step just taken; returns its metrics record."""
    cfg, progress = loop.cfg, loop.progress
    progress.step += 1
    progress.micro_batches += cfg.train.grad_accum_steps
    progress.tokens_seen += res.num_tokens
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * loop.accelerator.num_processes
    record = {
        "step": progress.step,
        "loss": res.loss,
        "kd_loss": res.kd_loss,
        "ce_loss": res.ce_loss,
        "lr": lr,
        "grad_norm": res.grad_norm,
        "num_tokens": res.num_tokens,
        "tokens_seen": progress.tokens_seen,  # target tokens trained on so far (the x axis of `distill report`)
        "tokens_per_second": tokens * cfg.data.seq_len / seconds,
        **res.stats,
    }
    if res.hints is not None:
        record.update(hidden.step_metrics(res.hints.projections.pairs, res.hints.weight, res.hint_losses))
        if not res.skipped:
            progress.hint_scale = hidden.next_scale(
                cfg.distill.hidden, res.kd_loss, res.hint_losses, progress.hint_scale
            )
    if res.skipped:
        progress.bad_steps += 1
        progress.skipped_steps += 1
        record.update(skipped=True, skipped_steps=progress.skipped_steps)
    else:
        progress.bad_steps = 0
    return record


def handle_bad_step(loop: Loop, tracker: Tracker, record: dict) -> None:
    """A skipped step is reported; `train.max_bad_steps` of them in a row stop the run (nothing is checkpointed)."""
    cfg, progress = loop.cfg, loop.progress
    loop.accelerator.print(f"step {progress.step}: non-finite loss or gradient, step skipped")
    if progress.bad_steps < cfg.train.max_bad_steps:
        return
    tracker.log(record)
    tracker.close()
    good = checkpoint.newest_complete(Path(cfg.output_dir))
    raise DistillError(
        f"{progress.bad_steps} consecutive steps (up to step {progress.step}) had a non-finite loss or "
        f"gradient (train.max_bad_steps={cfg.train.max_bad_steps}); stopped without applying them; "
        f"last good checkpoint: {good or 'none'}"
    )


def stop_preempted(loop: Loop, tracker: Tracker, saved_at: int, because: str | None = None) -> NoReturn:
    """Stopped by SIGTERM/SIGUSR1 (`Preempted`, exit 75) or Ctrl-C (`Interrupted`, exit 130), or `because` of a
    served teacher that stayed away (Preempted, the line naming it first): checkpoint the last step (unless it just
    was), then exit. A checkpoint that cannot be written still exits with that status."""
    cfg, progress = loop.cfg, loop.progress
    stopped = Interrupted if loop.stop.received == signal.SIGINT and because is None else Preempted
    said = f"{because}: " if because else ""
    try:
        path = save_checkpoint(loop) if saved_at != progress.step else checkpoint_path(cfg, progress.step)
    except WriteError as e:
        raise stopped(f"{said}{stopped.verb} at step {progress.step}: {e}; run the same command again") from None
    finally:
        tracker.close()
    # Stopped before any step since the last checkpoint (or since the start): nothing new to save.
    saved = f"checkpoint {path} written" if path.is_dir() else "no step trained yet, nothing to save"
    raise stopped(
        f"{said}{stopped.verb} at step {progress.step}: {saved}; run the same command again (train.resume=auto) to "
        "continue"
    )


# ----------------------------------------------------------------------------------------------
# One optimizer step


@dataclass
class StepResult:
    loss: float
    kd_loss: float
    ce_loss: float
    num_tokens: int
    grad_norm: float
    stats: dict[str, float]
    skipped: bool = False  # non-finite loss or gradient: the optimizer step was not applied
    hints: hidden.StepHints | None = None  # the step's hint term (distill.hidden)
    hint_losses: list[float] | None = None  # per layer pair, the hint loss (a mean over the step's tokens)


def train_step(
    accelerator: Accelerator,
    student: torch.nn.Module,
    head: torch.nn.Module,
    teacher: TeacherSource | None,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict],
    cfg: Config,
    ce: bool = True,
    hints: hidden.StepHints | None = None,
) -> StepResult:
    """One optimizer step over this rank's micro-batches; shared by 1- and N-process runs alike. `ce=False` (an
    on-policy step, whose completions the student sampled) trains on alpha * KD alone; ce_sum is still reported.
    `hints` (distill.hidden): the hint term, weight x the mean over layer pairs of each pair's hint loss, normalised
    by the same global token count; during FitNets' first stage (`hints.logits` False) it trains alone.

    A non-finite loss or gradient norm (the same verdict on every rank: both are global) skips the step: the
    gradients are dropped and the weights and optimizer state stay as they were. A DeepSpeed student steps
    inside `backward`; DeepSpeed skips such a step itself (an invalid gradient norm counts as an overflow).
    """
    logit_objective = hints is None or hints.logits
    alpha = cfg.distill.alpha if logit_objective else 0.0
    ce_weight = 1 - cfg.distill.alpha if ce and logit_objective else 0.0
    pairs = len(hints.projections.pairs) if hints is not None else 0
    hint_weight = hints.weight / pairs if hints is not None else 0.0  # weight x the mean over pairs
    local_tokens = count_tokens(micro_batches).to(accelerator.device)
    global_tokens = accelerator.reduce(local_tokens.clone(), reduction="sum").clamp(min=1).float()
    # accelerator.backward divides by the accumulation steps and DDP averages over processes; undo both so
    # each micro-batch contributes exactly (its summed loss) / (valid tokens in the global step).
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / global_tokens
    names = stat_names(teacher)  # objective.STATS, and several teachers' kd_loss/NAME, agreement/NAME
    sums = torch.zeros(2 + len(names) + pairs, device=accelerator.device)  # kd, ce, the stats, each pair's hints
    present: set[str] = set()
    engine = _deepspeed_engine(student)
    skipped_before = engine.skipped_steps if engine is not None else 0
    for mb in micro_batches:
        mb = {k: v.to(accelerator.device) for k, v in mb.items()}
        with accelerator.accumulate(student):
            # The loss runs under the same autocast as validation: the chunked loss picks its matmul dtype from
            # the active autocast, so train and eval compute the same loss for the same batch (bf16 too).
            with accelerator.autocast():
                out = forward_losses(
                    student, teacher, mb, cfg.distill, head=head, ce_weight=ce_weight, kd_weight=alpha, hints=hints
                )
            loss = alpha * out.kd_sum + ce_weight * out.ce_sum
            hint_sums = out.hint_sums if out.hint_sums is not None else sums.new_zeros(0)
            if hints is not None:
                loss = loss + hint_weight * hint_sums.sum()
            accelerator.backward(loss * scale)
            stats = [out.stats.get(name, torch.zeros((), device=sums.device)).float() for name in names]
            detached = torch.stack([out.kd_sum.detach().float(), out.ce_sum.detach().float(), *stats])
            sums += torch.cat([detached, hint_sums.detach()])
            present.update(out.stats)
            if accelerator.sync_gradients:
                sums = accelerator.reduce(sums, reduction="sum")
                max_norm = cfg.train.max_grad_norm or float("inf")
                grad_norm = float(accelerator.clip_grad_norm_(student.parameters(), max_norm))
                losses = torch.cat([sums[:2], sums[2 + len(names) :]])
                finite = bool(torch.isfinite(losses).all()) and math.isfinite(grad_norm)
                if finite:
                    optimizer.step()
                elif engine is not None and engine.skipped_steps == skipped_before:
                    raise DistillError(
                        "DeepSpeed applied an optimizer step with a non-finite loss or gradient; enable its check "
                        "(bf16.check_grad_overflow: true, or gradient_clipping > 0 in fp32)"
                    )
            optimizer.zero_grad(set_to_none=True)
    kd, ce_loss, *rest = (sums / global_tokens).tolist()
    stats, hint_losses = rest[: len(names)], rest[len(names) :]
    active = hints is not None and hints.active
    return StepResult(
        loss=alpha * kd + ce_weight * ce_loss + (hint_weight * sum(hint_losses) if active else 0.0),
        kd_loss=kd,
        ce_loss=ce_loss,
        num_tokens=int(global_tokens.item()),
        grad_norm=grad_norm,
        stats={name: value for name, value in zip(names, stats) if name in present},
        skipped=not finite,
        hints=hints,
        hint_losses=hint_losses if active else None,
    )


def _deepspeed_engine(model: torch.nn.Module):
    return model if hasattr(model, "skipped_steps") and hasattr(model, "checkpoint_engine") else None


# ----------------------------------------------------------------------------------------------
# Checkpoints and export


def checkpoint_path(cfg: Config, step: int) -> Path:
    return Path(cfg.output_dir) / rundir.step_name(step)


def save_checkpoint(loop: Loop) -> Path:
    """Every rank: the recipe state (with each rank's data position) goes into the marker the main process writes."""
    cfg, accelerator, progress = loop.cfg, loop.accelerator, loop.progress
    positions = gather_object(
        [
            {
                "rank": accelerator.process_index,
                "micro_batches": progress.micro_batches,
                "first_sample_indices": progress.first_sample_indices,
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
        "hint_scale": progress.hint_scale,
        "store": progress.store,
        "config": progress.config,
    }
    return checkpoint.save(accelerator, loop.student, Path(cfg.output_dir), progress.step, state, cfg.train.keep_last)


def export(accelerator: Accelerator, model: torch.nn.Module, tokenizer, out: Path) -> None:
    """Save the student with `save_pretrained` (safetensors) and its tokenizer: loadable without this package.

    A LoRA student is saved twice: its adapter alone in `final/adapter` (peft), then merged into the base weights
    in `final/` itself, which plain transformers loads. The hint projections (distill.hidden) are never in final/:
    they go beside it, to `hints/` (first, so a finished run always has them). Written like a checkpoint (a
    temporary directory renamed into place): a failed export leaves the old `final/` or none."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    found = hidden.projections(unwrapped)
    if found is not None:
        projections = hidden.projection_state(found)  # every rank: gathered under ZeRO-3

        def write_hints(tmp: Path) -> None:
            if accelerator.is_main_process:
                hidden.save_projections(tmp, projections, found)

        checkpoint.write_atomically(accelerator, out.parent / rundir.HINTS, "the hint projections", write_hints)

    def write(tmp: Path) -> None:
        merged, merged_model = unwrapped, model
        if getattr(unwrapped, "peft_config", None) is not None:
            if accelerator.is_main_process:
                unwrapped.save_pretrained(tmp / "adapter", safe_serialization=True)
            merged = merged_model = unwrapped.merge_and_unload()  # in place: the run is over
        state = hidden.student_state(accelerator.get_state_dict(merged_model))  # gathers sharded (ZeRO-3 / FSDP)
        merged.save_pretrained(
            tmp,
            is_main_process=accelerator.is_main_process,
            save_function=accelerator.save,
            state_dict=state,
            safe_serialization=True,
        )
        if accelerator.is_main_process:
            tokenizer.save_pretrained(tmp)

    checkpoint.write_atomically(accelerator, out, "the exported student", write)
