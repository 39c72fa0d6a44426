"""The built-in demo: train a teacher, distill a student from it, train the same student without it.

    make demo        # or: distill demo [--output-dir runs/demo] [section.key=value ...]

Three runs of `distill train` on the built-in `python-stdlib` corpus, each a real subprocess as a user
would launch it, then `distill eval` of all three on the same validation tokens. The student runs share
seed, data order and step count; only the teacher signal differs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .cli import format_table

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _run(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "distributed_distill.cli", *args]
    print("$ distill " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def run_demo(out: Path, overrides: list[str]) -> list[dict]:
    started = time.perf_counter()
    teacher_dir, kd_dir, ce_dir = out / "teacher", out / "student_kd", out / "student_ce"
    student_cfg = str(CONFIGS / "demo.yaml")
    _run(["train", "--config", str(CONFIGS / "demo_teacher.yaml"), f"output_dir={teacher_dir}", *overrides])
    teacher = f"teacher.path={teacher_dir / 'final'}"
    _run(["train", "--config", student_cfg, f"output_dir={kd_dir}", teacher, *overrides])
    _run(
        [
            "train",
            "--config",
            student_cfg,
            f"output_dir={ce_dir}",
            "teacher=null",
            "distill.alpha=0",
            f"tokenizer.path={teacher_dir / 'final'}",
            *overrides,
        ]
    )
    results = out / "results.json"
    _run(
        [
            "eval",
            "--config",
            student_cfg,
            teacher,
            "--json",
            str(results),
            "--model",
            f"teacher={teacher_dir / 'final'}",
            "--model",
            f"student (distilled)={kd_dir / 'final'}",
            "--model",
            f"student (CE only)={ce_dir / 'final'}",
            *overrides,
        ]
    )
    rows = json.loads(results.read_text())
    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    print(
        f"\nvalidation on held-out stdlib files ({rows[0]['val_tokens']:,} tokens), "
        f"demo took {time.perf_counter() - started:.0f} s:\n{table}"
    )
    return rows
