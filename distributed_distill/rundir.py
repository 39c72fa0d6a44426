"""The run directory, the contract code outside the package relies on (docs/design.md):

    output_dir/config.yaml       the recorded config: `distill train --config output_dir/config.yaml` repeats the run
    output_dir/metrics.jsonl     one JSON object per logged step (appended; a torn last line is skipped on reading)
    output_dir/teacher.json      the teacher's identity (never its weights); several teachers: {"teachers": [each
                                 identity with its name and weight], "teacher_mix": ...} (teachers.named_identity)
    output_dir/ranks/rank-K.json the first sample indices each rank trained on
    output_dir/step-NNNNNNN/     checkpoints (checkpoint.py writes them)
    output_dir/final/            the exported student: `from_pretrained` loads it without this package
    output_dir/hints/            distill.hidden's projections (projections.safetensors), beside final/, never in it

Every file here is written through the atomic rules (integrity.py: a temporary name, flushed, renamed), except the
appends to metrics.jsonl, whose torn last line a reader skips (`read_records`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import Config, load_yaml, save_config
from .integrity import atomic_write_text, write_json_atomic
from .store import offline_data_source
from .tokenizer import tokenizer_source

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TEACHER = "teacher.json"
RANKS = "ranks"
FINAL = "final"
HINTS = "hints"
STEP_DIR = re.compile(r"^step-(\d{7,})$")


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def recorded_config(cfg: Config) -> Config:
    """The config a run records, in config.yaml and in every checkpoint, and what a resume is compared by: the
    resolved config, except that an offline run records no teacher (the store replaced it; its content hash is
    compared instead; with distill.cross_tokenizer the teacher stays, its tokenizer is how the store's rows are
    read), the tokenizer it used and, as data.source, what it trained on (the store's source:
    store.offline_data_source). Recording a recorded config changes nothing, so a run restarted from its own
    config.yaml is the same run."""
    if cfg.distill.signal != "offline":
        return cfg
    path, revision = tokenizer_source(cfg) or (None, None)
    tokenizer = dataclasses.replace(cfg.tokenizer, path=path, revision=revision)
    data = dataclasses.replace(cfg.data, source=offline_data_source(cfg) or cfg.data.source)
    teacher = cfg.teacher if cfg.distill.cross_tokenizer is not None else None
    return dataclasses.replace(cfg, teacher=teacher, teachers=None, tokenizer=tokenizer, data=data)


def read_records(path: Path) -> tuple[list[dict], list[str]]:
    """The records of an append-only JSONL file, and a note for each line that is not a complete record: a crash
    or a full disk in the middle of an append leaves a torn last line, which is skipped (never a reason to stop)."""
    records, notes = [], []
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            where = "its last line" if number >= len(lines) - 1 else f"line {number}"
            notes.append(f"{path}: skipped {where} ({len(line)} bytes), not a complete record (a write cut short?)")
            continue
        records.append(record)
    return records, notes


@dataclass(frozen=True)
class FinishedRun:
    """A run directory whose run completed: its student exported and its last record at its train.max_steps."""

    config: dict  # config.yaml, as written
    step: int  # the last step trained
    result: dict  # the last evaluation (val_* and gen_* metrics), as `distill train` printed it
    world_size: int | None  # the processes that trained it (ranks/rank-0.json), None where that record is missing


def finished_run(out: Path) -> FinishedRun | None:
    """The finished run `out` holds, or None (nothing there, or a run that stopped before its max_steps: a resumed
    run trains past an earlier export, so final/ alone does not make a run finished)."""
    if not ((out / FINAL).is_dir() and (out / CONFIG).is_file() and (out / METRICS).is_file()):
        return None
    try:
        config = load_yaml((out / CONFIG).read_text())
        max_steps = config["train"]["max_steps"]
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return None
    records, _ = read_records(out / METRICS)
    if not records or records[-1]["step"] != max_steps:
        return None
    try:
        world_size = int(json.loads(rank_record(out, 0).read_text())["world_size"])
    except (OSError, ValueError, TypeError, KeyError):
        world_size = None
    return FinishedRun(config, max_steps, _evaluation(records), world_size)


def _evaluation(records: list[dict]) -> dict:
    evals = [r for r in records if r.get("val_loss") is not None]
    return {k: v for k, v in evals[-1].items() if k.startswith(("val_", "gen_"))} if evals else {}


def last_evaluation(out: Path) -> dict:
    """The metrics of the last evaluation metrics.jsonl holds ({} if none): a run's result line."""
    return _evaluation(read_records(out / METRICS)[0]) if (out / METRICS).is_file() else {}


def prepare(recorded: Config, accelerator, resume_step: int | None) -> Path:
    """The run directory, ready for this run (the main process writes, every rank waits): config.yaml, and
    metrics.jsonl restarted (a new run) or cut back to the checkpoint's step (a resumed one)."""
    out = Path(recorded.output_dir)
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
        save_config(recorded, out / CONFIG)
    accelerator.wait_for_everyone()
    return out


def write_teacher(out: Path, identity: dict) -> None:
    """teacher.json (the main process): what the run records about its teacher."""
    atomic_write_text(out / TEACHER, json.dumps(identity, indent=2))


def rank_record(out: Path, rank: int) -> Path:
    """ranks/rank-K.json: what rank K of the run's latest job trained on, and the job's world size."""
    return out / RANKS / f"rank-{rank}.json"


def write_rank_record(out: Path, rank: int, world: int, first_sample_indices: list[int]) -> None:
    """ranks/rank-K.json (every rank its own): the first sample indices it trained on."""
    path = rank_record(out, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"rank": rank, "world_size": world, "first_sample_indices": first_sample_indices})
