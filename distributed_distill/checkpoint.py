"""Checkpoints: atomic save, discovery with integrity checks, exact resume, preemption.

    output_dir/step-0000100/
        model.safetensors, optimizer.bin, random_states_{rank}.pkl   (Accelerate's save_state; DeepSpeed and
        pytorch_model/ ...                                            FSDP write their own sharded files here)
        checkpoint.json   written last: step, counters, LR schedule, every rank's data position, wandb run id,
                          the resolved config, and the size and sha256 of every other file

A checkpoint is written into `.tmp-step-NNNNNNN/`, every file flushed to disk, the marker written last, then the
directory renamed into place: a kill at any moment leaves either the previous state or a complete checkpoint.
`train.resume: auto` takes the newest directory whose marker and files check out, says why it skipped any newer
one, and refuses a checkpoint of a different run, naming the field that differs.

Loading is safe with untrusted files: weights are safetensors; optimizer, scheduler and RNG states go through
Accelerate's loader, which uses `torch.load(weights_only=True)`; DeepSpeed's shards are read by a checkpoint engine
that does the same (DeepSpeed's own default unpickles arbitrary objects).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from safetensors import SafetensorError

from .config import Config, to_dict
from .errors import DistillError, RankError, WriteError, on_main, write_failure
from .integrity import atomic_write_text, file_problem, publish_dir, record
from .lock import launch_rank
from .rundir import STEP_DIR, FinishedRun, finished_run, recorded_config, step_name

FORMAT = "distributed_distill-checkpoint"
VERSION = 1
MARKER = "checkpoint.json"
# What may differ between a checkpoint's config and the run that resumes it: where things are written and how
# often, the step budget, and how the (same) teacher is run. Everything else changes what is trained.
MAY_CHANGE = (
    "output_dir",
    "logging.",
    "eval.",
    "train.max_steps",
    "train.eval_every",
    "train.eval_batches",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.resume",
    "train.max_bad_steps",
    "train.device",
    "teacher.engine",
    "teacher.offload",
    "teacher.deepspeed_config",
    "teacher.collective_timeout",
    "teacher.url",  # a served teacher may move (another node or port); its identity is checked at setup
    "teacher.token_file",
    "teacher.prefetch",
    "data.cache_dir",
    "distill.store",  # the store may move; its content hash is compared instead
    "distill.chunk_size",  # how the loss is chunked changes its memory, not the objective (config.yaml holds rows)
)


class CheckpointError(DistillError):
    """A checkpoint that is missing, incomplete, damaged or from another run."""


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Step directories in `out`, newest first (complete or not)."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def complete_checkpoints(out: Path) -> list[Path]:
    """Step directories in `out` whose marker was written (the last act of a save), newest first."""
    return [p for _, p in list_checkpoints(out) if (p / MARKER).is_file()]


def verify(path: Path) -> dict:
    """The checkpoint's marker, after checking that every file it lists is present with its size and sha256."""
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path} is incomplete (no {MARKER}: the run stopped while writing it)")
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{marker} is unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{marker} is not a {FORMAT} marker")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{marker} has format version {meta.get('version')}, this code reads {VERSION}")
    for rel, info in meta["files"].items():
        problem = file_problem(path / rel, info)
        if problem is not None:
            raise CheckpointError(f"{path} is damaged: {rel} {problem}")
    return meta


# ----------------------------------------------------------------------------------------------
# Choosing what to resume


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):  # `teachers`: teachers[I].key
            flat[f"{prefix}{k}"] = len(v)
            for i, x in enumerate(v):
                flat.update(_flatten(x, f"{prefix}{k}[{i}]."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


# The global batch (micro-batch x accumulation x processes) is what a run trains on; how it is split may change
# between a checkpoint and its resume (a job requeued onto fewer nodes), so these two keys are compared through it.
SPLIT = ("train.micro_batch_size", "train.grad_accum_steps")


def first_difference(recorded: dict, cfg: Config) -> str | None:
    """The first config key that matters (not one of MAY_CHANGE, not the split of the global batch) on which a
    recorded config (a checkpoint's, or a finished run's config.yaml) and `cfg` in its recorded form differ."""
    old, new = _flatten(recorded), _flatten(to_dict(recorded_config(cfg)))
    for key in sorted(old.keys() | new.keys()):
        may_change = re.sub(r"^teachers\[\d+\]\.", "teacher.", key).startswith(MAY_CHANGE)  # each teacher's engine...
        if not (may_change or key in SPLIT or old.get(key) == new.get(key)):
            return key
    return None


def _show(config: dict | Config, key: str):
    return _flatten(config if isinstance(config, dict) else to_dict(recorded_config(config))).get(key)


def check_compatible(meta: dict, cfg: Config, world_size: int, where: Path) -> None:
    """Refuse a checkpoint of a different run: the first differing config key that matters is named. The checkpoint
    holds the run's recorded config (`rundir.recorded_config`), and `cfg` is compared in that form too, so a run
    restarted from its own config.yaml resumes."""
    key = first_difference(meta["config"], cfg)
    if key is not None:
        raise CheckpointError(
            f"checkpoint {where} was written with {key}={_show(meta['config'], key)!r} but this run has "
            f"{key}={_show(cfg, key)!r}; only logging, evaluation, checkpointing and the step budget may change on "
            "resume (use another output_dir to start a different run)"
        )
    resume_config(cfg, meta, world_size, where)


class AlreadyFinished(Exception):
    """`distill train` on the output_dir of the same run, already finished: nothing to do; `result` is what the run
    printed when it finished (its last evaluation)."""

    def __init__(self, result: dict):
        super().__init__("finished")
        self.result = result


def _check_finished(done: FinishedRun, cfg: Config, world_size: int) -> None:
    """A finished run without a checkpoint in output_dir is never restarted silently: the same run again (the same
    config and global batch, a step budget it already reached) is a no-op that reports its result (AlreadyFinished);
    another config, another global batch or more steps are refused, naming what differs. Starting over is the
    user's choice: another output_dir, or this one deleted. (With checkpoints, the newest usable one decides.)"""
    out = Path(cfg.output_dir)
    over = f"choose another output_dir, or delete {out} to start over"
    key = first_difference(done.config, cfg)
    if key is not None:
        raise CheckpointError(
            f"output_dir {out} holds a finished run written with {key}={_show(done.config, key)!r} but this run has "
            f"{key}={_show(cfg, key)!r}; {over}"
        )
    meta = {"config": done.config, "world_size": done.world_size}
    if done.world_size is not None and _kept_accumulation(meta, cfg, world_size) is None:
        change = _batch_change(meta, cfg, world_size)
        raise CheckpointError(f"output_dir {out} holds a finished run that {change}; {over}")
    if cfg.train.max_steps <= done.step:
        raise AlreadyFinished(done.result)
    raise CheckpointError(
        f"output_dir {out} holds a finished run of {done.step} steps without a checkpoint to continue from "
        f"(it saved every train.save_every={done.config['train']['save_every']} steps), so train.max_steps="
        f"{cfg.train.max_steps} cannot continue it; {over}"
    )


def global_batch(meta: dict) -> int:
    """Sequences per optimizer step of the run that wrote the checkpoint."""
    train = meta["config"]["train"]
    return train["micro_batch_size"] * train["grad_accum_steps"] * meta["world_size"]


def _kept_accumulation(meta: dict, cfg: Config, world_size: int) -> int | None:
    """The train.grad_accum_steps with which `cfg` on `world_size` processes keeps the global batch of the run `meta`
    describes: cfg's own, or, with the micro-batch and accumulation the run was started with, the one adjusted to
    this process count; None when neither can."""
    old = meta["config"]["train"]
    batch, micro, accum = global_batch(meta), cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    if micro * accum * world_size == batch:
        return accum
    if (micro, accum) == (old["micro_batch_size"], old["grad_accum_steps"]) and batch % (micro * world_size) == 0:
        return batch // (micro * world_size)
    return None


def _batch_change(meta: dict, cfg: Config, world_size: int) -> str:
    """Why `cfg` on `world_size` processes cannot keep the run's global batch (_kept_accumulation is None), as
    'was trained with a global batch of ..., but KEY=VALUE on N process(es) gives M'."""
    old = meta["config"]["train"]
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    key = "train.micro_batch_size" if micro != old["micro_batch_size"] else "train.grad_accum_steps"
    return (
        f"was trained with a global batch of {global_batch(meta)} sequences ({old['micro_batch_size']} x "
        f"{old['grad_accum_steps']} x {meta['world_size']} process(es)), but {key}={getattr(cfg.train, key[6:])} "
        f"on {world_size} process(es) gives {micro * accum * world_size}"
    )


def resume_config(cfg: Config, meta: dict, world_size: int, where: Path | str = "") -> Config:
    """`cfg` with the accumulation that keeps the checkpoint's global batch on `world_size` processes.

    A run resumed on a different number of processes (a job requeued onto fewer or more nodes) keeps its global
    batch: with the micro-batch and accumulation it was started with, the accumulation adjusts (2 processes x 1
    -> 1 process x 2); a micro-batch or accumulation set anew must give the same global batch. Anything else
    would train a different run, and is refused naming the key.
    """
    accum = _kept_accumulation(meta, cfg, world_size)
    if accum is None:
        raise CheckpointError(
            f"checkpoint {where} {_batch_change(meta, cfg, world_size)}; the global batch cannot change on resume: "
            "set train.micro_batch_size and train.grad_accum_steps so that micro x accum x processes = "
            f"{global_batch(meta)}"
        )
    if accum == cfg.train.grad_accum_steps:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum_steps=accum))


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from: its directory and its marker (checkpoint.json, checked)."""

    path: Path
    meta: dict

    @property
    def step(self) -> int:
        return self.meta["step"]


def _choose(cfg: Config, world_size: int) -> tuple[Path | None, dict | None, list[str]]:
    out = Path(cfg.output_dir)
    resume = cfg.train.resume
    existing = list_checkpoints(out)
    done = finished_run(out) if resume in (False, "auto") else None
    if resume is False:  # a fresh start: never over an earlier run
        if existing:
            names = ", ".join(p.name for _, p in existing[:3])
            raise CheckpointError(
                f"output_dir {out} holds checkpoints of an earlier run ({names}); set train.resume=auto to "
                "continue it, or choose another output_dir"
            )
        if done is not None:
            raise CheckpointError(
                f"output_dir {out} holds an earlier run, finished at step {done.step}; choose another output_dir, or "
                f"delete {out} to start over"
            )
        return None, None, []
    if done is not None and not existing:
        _check_finished(done, cfg, world_size)  # always raises: nothing to do, or refused
    notes = []
    if resume == "auto":
        for _, path in existing:
            try:
                meta = verify(path)
            except CheckpointError as e:
                notes.append(f"skipping {e}")
                continue
            check_compatible(meta, cfg, world_size, path)
            if done is not None and cfg.train.max_steps <= done.step:
                raise AlreadyFinished(done.result)  # the same run (its checkpoint says so), finished before
            return path, meta, notes
        if existing:
            raise CheckpointError(
                f"output_dir {out} holds no usable checkpoint ({'; '.join(notes)}); delete the damaged step "
                "directories or choose another output_dir"
            )
        return None, None, []
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"train.resume={resume}: no such checkpoint directory")
    if not (path / MARKER).exists() and list_checkpoints(path):
        path = list_checkpoints(path)[0][1]  # a run directory: its newest checkpoint, which must be sound
    meta = verify(path)
    check_compatible(meta, cfg, world_size, path)
    return path, meta, notes


def choose_resume(cfg: Config, accelerator: Accelerator) -> Resume | None:
    """Decide on the main process which checkpoint to resume (or none), and tell every rank; before any data or
    model is loaded. Damaged newer checkpoints are renamed `step-NNNNNNN.damaged` (kept, never resumed)."""

    def choose() -> tuple[str | None, dict | None]:
        try:
            path, meta, notes = _choose(cfg, accelerator.num_processes)
        except AlreadyFinished as e:
            accelerator.print(
                f"output_dir {cfg.output_dir} holds this run, finished at step {cfg.train.max_steps}: nothing to do "
                "(to train it again, delete the directory or choose another output_dir)"
            )
            return "finished", e.result
        for note in notes:
            accelerator.print(f"resume: {note}")
        if path is None:
            return None, None
        accelerator.print(f"resume: continuing from {path} (step {meta['step']})")
        for step, other in list_checkpoints(Path(cfg.output_dir)):
            if step > meta["step"] and other.parent.resolve() == path.parent.resolve():
                other.rename(other.with_name(other.name + ".damaged"))
        return str(path), meta

    path, meta = on_main(accelerator, choose)
    if path == "finished":
        raise AlreadyFinished(meta)
    return Resume(Path(path), meta) if path else None


def resumed_config(cfg: Config, resume: Resume, accelerator: Accelerator) -> Config:
    """The config a resumed run trains with: the same, except that on a different number of processes the
    accumulation adjusts so the global batch stays what the checkpoint was trained with (docs/cluster.md). A
    data.streaming run cannot move: each rank streams its own share of the documents (split_dataset_by_node, packed
    per rank), so its position in the corpus exists only for the process count that wrote it."""
    meta = resume.meta
    if cfg.data.streaming and meta["world_size"] != accelerator.num_processes:
        raise CheckpointError(
            f"checkpoint of step {meta['step']} was written by {meta['world_size']} process(es); a data.streaming "
            f"run resumes on the same number only (this run has {accelerator.num_processes})"
        )
    cfg = resume_config(cfg, meta, accelerator.num_processes)
    if meta["world_size"] != accelerator.num_processes:
        accelerator.gradient_accumulation_steps = cfg.train.grad_accum_steps
        accelerator.print(
            f"resume: written by {meta['world_size']} process(es), continuing on {accelerator.num_processes}: "
            f"{cfg.train.micro_batch_size} x {cfg.train.grad_accum_steps} accumulation x "
            f"{accelerator.num_processes} = {global_batch(meta)} sequences per step, as before"
        )
    return cfg


def check_store(resume: Resume | None, store_hash: str | None, store: str | None) -> None:
    """An offline run resumes only from the store it was trained from (by content hash: the store may move)."""
    if resume is not None and store_hash is not None and resume.meta["store"] != store_hash:
        raise CheckpointError(
            f"checkpoint {resume.path} was trained from store {resume.meta['store'][:12]} but distill.store="
            f"{store} holds store {store_hash[:12]}"
        )


# ----------------------------------------------------------------------------------------------
# Save and load


def _all_finite(accelerator: Accelerator, model) -> bool:
    """Every rank's (shard of the) weights is finite."""
    bad = torch.zeros((), device=accelerator.device)
    for p in model.parameters():
        if p.numel() and not torch.isfinite(p.detach()).all():
            bad.fill_(1)
            break
    return accelerator.reduce(bad, reduction="sum").item() == 0


def save(accelerator: Accelerator, model, out: Path, step: int, state: dict, keep_last: int) -> Path:
    """Write `step-NNNNNNN/` atomically (all ranks call this); `state` is recorded in the marker."""
    if not _all_finite(accelerator, model):
        raise DistillError(f"the student's weights are not finite at step {step}; no checkpoint written")

    def marker(tmp: Path) -> None:
        files = {str(f.relative_to(tmp)): record(f) for f in sorted(p for p in tmp.rglob("*") if p.is_file())}
        meta = {"format": FORMAT, "version": VERSION, "step": step, **state, "files": files}
        atomic_write_text(tmp / MARKER, json.dumps(meta, indent=1))

    final = out / step_name(step)
    write_atomically(
        accelerator, final, "checkpoint", lambda tmp: accelerator.save_state(str(tmp), safe_serialization=True), marker
    )
    if accelerator.is_main_process:
        prune(out, keep_last)
    return final


def write_atomically(accelerator: Accelerator, final: Path, what: str, write, finish=None) -> None:
    """Every rank: `write(tmp)` into `.tmp-<name>/` beside `final`; then the main process calls `finish(tmp)` (the
    marker) and publishes the directory (fsync, rename), replacing an older `final`. A kill at any moment leaves
    the old `final` or the new one. A write that fails on any rank (a full disk, a read-only file system) removes
    the temporary directory and raises WriteError on every rank, naming what was being written and the newest
    complete checkpoint; an existing `final` is untouched."""
    tmp = final.with_name(f".tmp-{final.name}")
    main = accelerator.is_main_process

    def fresh() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def publish() -> None:
        if finish is not None:
            finish(tmp)
        if final.exists():  # a damaged or abandoned directory of the same name: replaced, never merged
            trash = final.with_name(f".trash-{final.name}")
            shutil.rmtree(trash, ignore_errors=True)
            final.rename(trash)
            shutil.rmtree(trash)
        publish_dir(tmp, final)

    error = _agree(accelerator, _attempt(fresh, final) if main else None)
    if error is None:
        error = _agree(accelerator, _attempt(lambda: write(tmp), final))
    if error is None:
        error = _agree(accelerator, _attempt(publish, final) if main else None)
    if error is not None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        newest = newest_complete(final.parent)
        raise WriteError(f"{error} while writing {what} {final}; the newest complete checkpoint is {newest or 'none'}")


def _attempt(fn, final: Path) -> str | None:
    """Run a write; None if it worked, else what went wrong in a few words (a bug is raised as it is)."""
    try:
        fn()
    except Exception as e:
        cause = write_failure(e, final.parent)
        if cause is None:
            raise
        return cause
    return None


def _agree(accelerator: Accelerator, error: str | None) -> str | None:
    """Every rank's verdict on one write step (a barrier too): the first error any rank had, or None."""
    if accelerator.num_processes == 1:
        return error
    return next((e for e in gather_object([error]) if e is not None), None)


def newest_complete(out: Path) -> Path | None:
    """The newest step directory that has its marker (not verified: for messages)."""
    return next(iter(complete_checkpoints(out)), None)


def prune(out: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last` (0 keeps all), and abandoned temporaries."""
    for leftover in out.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last:
        for old in complete_checkpoints(out)[keep_last:]:
            shutil.rmtree(old)


def load(accelerator: Accelerator, path: Path, meta: dict) -> None:
    """Restore the student, optimizer, gradient scaler and this rank's RNG states from `path` (written by
    `meta["world_size"]` processes: a DeepSpeed student's sharded optimizer state is re-partitioned for this run's)."""
    deepspeed = accelerator.state.deepspeed_plugin is not None
    if deepspeed:
        _use_safe_deepspeed_loader(accelerator)
    rank, written_by = accelerator.process_index, meta["world_size"]
    # Accelerate skips a missing RNG file silently, and the run would not be exact. A rank the checkpoint had no
    # process for (resumed on more processes) keeps the seeded state it started with.
    if rank < written_by and not (path / f"random_states_{rank}.pkl").is_file():
        raise RankError(f"checkpoint {path} has no RNG state for rank {rank}")
    source = path
    if deepspeed and written_by != accelerator.num_processes:
        source = _universal_checkpoint(accelerator, path)
    elif accelerator.distributed_type == DistributedType.FSDP and written_by != accelerator.num_processes:
        raise CheckpointError(
            f"checkpoint {path} holds an FSDP student sharded over {written_by} process(es); resume it on "
            f"{written_by} (re-sharding FSDP checkpoints is not supported yet)"
        )
    try:
        with _universal_load(accelerator, enabled=source != path):
            accelerator.load_state(str(source))
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, KeyError, SafetensorError) as e:
        # weights_only refuses anything but tensors and plain data: a tampered file fails here, it never runs.
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {reason}") from None
    finally:
        if source != path:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shutil.rmtree(source, ignore_errors=True)


def _deepspeed_safe_globals() -> list:
    """The DeepSpeed/torch types its checkpoint files hold besides tensors, numbers and strings."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address, torch.Size]


def _use_safe_deepspeed_loader(accelerator: Accelerator) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine with `weights_only=True`: its shards hold tensors, numbers, strings and a few
        DeepSpeed/torch types that are allowed explicitly."""

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    for model in accelerator._models:
        if hasattr(model, "checkpoint_engine"):
            engine = WeightsOnlyCheckpointEngine()
            model.checkpoint_engine = engine
            if getattr(model, "optimizer", None) is not None and hasattr(model.optimizer, "checkpoint_engine"):
                model.optimizer.checkpoint_engine = engine


@contextlib.contextmanager
def _weights_only_torch_load():
    """DeepSpeed's universal-checkpoint code calls `torch.load(weights_only=False)` directly (no checkpoint
    engine): for its duration every `torch.load` is made `weights_only=True`, with DeepSpeed's types allowed."""
    original, allowed = torch.load, _deepspeed_safe_globals()

    def load(*args, **kwargs):
        with torch.serialization.safe_globals(allowed):  # per call: loaders in between reset the allowed list
            return original(*args, **{**kwargs, "weights_only": True})

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _universal_checkpoint(accelerator: Accelerator, path: Path) -> Path:
    """A copy of checkpoint `path` whose DeepSpeed shards are converted to DeepSpeed's universal checkpoint (one
    file per parameter and optimizer moment, loadable at any data-parallel degree); the main process writes it
    next to `path` as `.universal-step-NNNNNNN/`, the caller removes it after loading."""
    out = path.parent / f".universal-{path.name}"
    if accelerator.is_main_process:
        from deepspeed.checkpoint import ds_to_universal

        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        for f in path.glob("random_states_*.pkl"):
            (out / f.name).symlink_to(f.resolve())
        args = argparse.Namespace(
            input_folder=str(path / "pytorch_model"),
            output_folder=str(out / "pytorch_model"),
            num_extract_workers=1,  # in this process, under the weights-only loader (workers would not see it)
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # the version marker that Megatron-DeepSpeed adds and accelerate does not
        )
        with _weights_only_torch_load(), contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(args)
    accelerator.wait_for_everyone()
    return out


@contextlib.contextmanager
def _universal_load(accelerator: Accelerator, enabled: bool):
    """DeepSpeed engines read the universal layout while this is active."""
    engines = [m for m in accelerator._models if hasattr(m, "load_universal_checkpoint")] if enabled else []
    for engine in engines:
        engine._config.load_universal_checkpoint = True
    try:
        with _weights_only_torch_load() if engines else contextlib.nullcontext():
            yield
    finally:
        for engine in engines:
            engine._config.load_universal_checkpoint = False


# ----------------------------------------------------------------------------------------------
# Preemption: SLURM sends SIGTERM (or the SIGUSR1 a job asks for with --signal) before it kills or requeues a job;
# Ctrl-C (SIGINT) is handled the same way.


class StopRequest:
    """Records SIGTERM/SIGUSR1/SIGINT; the loop finishes its step, checkpoints and exits. Every rank checks the flag
    at the same point of every step (one all-reduce), so ranks signalled at different moments stop at the same
    step. A second Ctrl-C stops the process at once (no checkpoint, no traceback): the newest complete checkpoint
    is named and a rerun continues from it."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, out: Path | None = None) -> None:
        self.out = out
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # After a Ctrl-C the second-Ctrl-C handler stays for the rest of the process: the previous handler would
            # turn a second Ctrl-C during the exit path into a KeyboardInterrupt traceback; cli.main then ignores it.
            if not (sig == signal.SIGINT and self.received == signal.SIGINT):
                signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        talk = launch_rank() == 0  # one line per job, not per rank
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            if talk:
                newest = newest_complete(self.out) if self.out is not None else None
                sys.stderr.write(
                    f"\ninterrupted again: stopped at once without a checkpoint; the newest complete checkpoint is "
                    f"{newest or 'none'}\n"
                )
                sys.stderr.flush()
            os._exit(130)  # at once: no cleanup that could block (a leftover .tmp-* directory is never read)
        if signum == signal.SIGINT and talk:
            sys.stderr.write("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to stop now)\n")
            sys.stderr.flush()
        self.received = signum

    def agreed(self, accelerator: Accelerator) -> bool:
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0
