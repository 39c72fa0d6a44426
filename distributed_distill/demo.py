"""The built-in demo: train a teacher, distill a student from it (online, offline from a precomputed logit store of
sampled targets (RECOMMENDED_STORE), and from the teacher's own samples with their top-64), train the same student
without it.

    make demo        # or: distill demo [--output-dir runs/demo] [section.key=value ...]

Five runs of `distill train`, one of `distill precompute` and one of `distill generate` on the built-in
`python-stdlib` corpus, each a real subprocess as a user would launch it, then `distill eval` of all five models
on the same validation tokens. The student runs share seed and step count; the first three students also share
the data order and differ only in the teacher signal, the fourth learns the teacher's continuations of 16-token
windows of the same training files (configs/demo.yaml, section `generate`) instead of the files themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .config import load_config
from .eval.evaluate import format_table

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run_distill(args: list[str]) -> None:
    """`distill ARGS` as a user runs it: a fresh process, its output shown; a failure stops the experiment with that
    process's exit status (its own `error:` line says what went wrong; no traceback of the demo's on top)."""
    cmd = [sys.executable, "-m", "distributed_distill.cli", *args]
    print("$ distill " + " ".join(args), flush=True)
    code = subprocess.run(cmd).returncode
    if code:
        raise SystemExit(code)


# The offline students' store (the demo's and the headline's): the configuration docs/store.md recommends from the
# quality-against-bytes curve (benchmarks/store_curve.py): 16 sampled draws per token, packed.
RECOMMENDED_STORE = ["distill.store_samples=16", "distill.store_encoding=packed"]
RECOMMENDED_NAME = "sampled 16, packed"
OFFLINE_STUDENT = f"student (distilled offline, {RECOMMENDED_NAME})"  # its row in the demo's table


def offline_overrides(store_dir: Path) -> list[str]:
    """A student trained from the store, in store order: the very batches an online student of the same seed sees."""
    return ["distill.signal=offline", f"distill.store={store_dir}", "distill.shuffle_buffer=0"]


def precompute_store(
    student_cfg: str, teacher: str, store_dir: Path, overrides: list[str], settings: list[str] | None = None
) -> None:
    """The teacher's targets of the rows the run will read (steps x batch, in the run's seeded order), in the store
    `settings` name (default RECOMMENDED_STORE), written once and verified."""
    t = load_config(student_cfg, overrides).train
    rows = f"distill.store_max_rows={t.max_steps * t.micro_batch_size * t.grad_accum_steps}"
    store = RECOMMENDED_STORE if settings is None else settings
    cmd = ["precompute", "--config", student_cfg, teacher, f"distill.store={store_dir}", rows, *store, *overrides]
    run_distill(cmd)
    run_distill(["verify-store", str(store_dir)])


def sample_store(student_cfg: str, teacher: str, store_dir: Path, overrides: list[str]) -> None:
    """The teacher's samples (configs/demo.yaml, section `generate`: continuations of corpus windows, with its
    top-64 at every sampled token), written once and verified."""
    run_distill(["generate", "--config", student_cfg, teacher, f"generate.store={store_dir}", *overrides])
    run_distill(["verify-store", str(store_dir)])


def samples_overrides(store_dir: Path) -> list[str]:
    """A student trained on the teacher's samples: CE on the sampled tokens plus KD from their stored top-64."""
    return ["distill.signal=offline", f"distill.store={store_dir}"]


def run_demo(out: Path, overrides: list[str]) -> list[dict]:
    started = time.perf_counter()
    teacher_dir, kd_dir, ce_dir = out / "teacher", out / "student_kd", out / "student_ce"
    store_dir, offline_dir = out / "store", out / "student_offline"
    student_cfg = str(CONFIGS / "demo.yaml")
    run_distill(["train", "--config", str(CONFIGS / "demo_teacher.yaml"), f"output_dir={teacher_dir}", *overrides])
    teacher = f"teacher.path={teacher_dir / 'final'}"
    run_distill(["train", "--config", student_cfg, f"output_dir={kd_dir}", teacher, *overrides])
    # Offline: the teacher's targets (RECOMMENDED_STORE) precomputed once (only the rows the run will read: steps x
    # batch), then streamed in store order, i.e. the very batches the online student saw.
    offline = offline_overrides(store_dir)
    precompute_store(student_cfg, teacher, store_dir, overrides)
    run_distill(["train", "--config", student_cfg, f"output_dir={offline_dir}", teacher, *offline, *overrides])
    # Teacher samples: continuations of the corpus, with the teacher's top-64 at every sampled token (sequence-level
    # KD on the sampled tokens plus word-level KD from the stored top-64, without the teacher in memory).
    samples_dir, sampled_dir = out / "samples", out / "student_samples"
    sample_store(student_cfg, teacher, samples_dir, overrides)
    sampled = samples_overrides(samples_dir)
    run_distill(["train", "--config", student_cfg, f"output_dir={sampled_dir}", teacher, *sampled, *overrides])
    run_distill(
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
    run_distill(
        [
            "eval",
            "--config",
            student_cfg,
            teacher,
            *overrides,  # argparse takes the positional overrides in one run, before the options
            "--json",
            str(results),
            "--model",
            f"teacher={teacher_dir / 'final'}",
            "--model",
            f"student (distilled online)={kd_dir / 'final'}",
            "--model",
            f"{OFFLINE_STUDENT}={offline_dir / 'final'}",
            "--model",
            f"student (teacher samples, top-64)={sampled_dir / 'final'}",
            "--model",
            f"student (CE only)={ce_dir / 'final'}",
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
