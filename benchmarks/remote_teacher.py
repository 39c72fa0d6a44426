"""A student step against a served teacher (`distill serve` on loopback) vs the same teacher in-process.

Run (default size, about 10 minutes on 2 cores):
    .venv/bin/python benchmarks/remote_teacher.py
Small smoke run (CI, tests/test_benchmarks.py):
    .venv/bin/python benchmarks/remote_teacher.py --tiny

Each configuration is a real `distill train` run (the smoke architecture scaled up, top-k targets), timed from its
own metrics.jsonl (`tokens_per_second` of every step after the first `--warmup` ones, median):

  local      the teacher in-process (teacher.engine=replicated): teacher forward, then the student's step
  remote     teacher.engine=remote against `distill serve` on 127.0.0.1: the next step's targets are fetched while
             this step computes (teacher.prefetch=true, the default)
  no-overlap the same, teacher.prefetch=false: each micro-batch's targets are fetched when the loss needs them

ratio = local tokens/s / remote tokens/s (target <= 1.15 on loopback, docs/design.md). A served teacher runs on its
own devices, so the benchmark gives each side its own core (taskset): the student job core 0, the server core 1,
and the in-process run core 0 alone, one thread each (OMP_NUM_THREADS=1). Then the server's forward overlaps the
student's step only through prefetching, which the no-overlap row shows. Two micro-batch sizes; the three runs of
a size alternate `--repeats` times and the medians are reported with their range (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

SYSTEMS = ("local", "remote", "no-overlap")


def sizes(args: argparse.Namespace) -> list[str]:
    t, s = args.teacher, args.student
    return [
        f"teacher.arch={{family: llama, hidden_size: {t}, num_layers: {args.teacher_layers}, num_heads: 4, "
        f"max_position_embeddings: {args.seq_len}}}",
        f"student.arch={{family: llama, hidden_size: {s}, num_layers: 2, num_heads: 2, "
        f"max_position_embeddings: {args.seq_len}}}",
        f"data.seq_len={args.seq_len}",
        f"distill.top_k={args.top_k}",
        "data.max_documents=80",
        "logging.progress=false",
        "logging.wandb.mode=disabled",
        "train.log_every=1",
        "train.eval_every=0",
        "train.save_every=0",
    ]


def distill(core: int, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    cmd = ["taskset", "-c", str(core), sys.executable, "-m", "distributed_distill.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def step_rate(run: Path, warmup: int) -> float:
    """The median tokens/s of the steps after the first `warmup` (metrics.jsonl through rundir's reader)."""
    from distributed_distill.rundir import METRICS, read_records

    records, _ = read_records(run / METRICS)
    rates = [r["tokens_per_second"] for r in records if "loss" in r and r["step"] > warmup]
    return statistics.median(rates)


def measure(args: argparse.Namespace, micro: int, work: Path) -> dict:
    from distributed_distill.serve import running

    common = [*sizes(args), f"train.micro_batch_size={micro}", f"train.max_steps={args.steps}"]
    rates = {name: [] for name in SYSTEMS}
    serve = ["taskset", "-c", "1", sys.executable, "-m", "distributed_distill.cli", "serve"]
    address = work / f"server-{micro}.address"
    # The server holds the teacher the local runs build (the same config: arch and seed), so the runs are equal.
    server = [*serve, "--config", str(ROOT / "configs" / "smoke.yaml"), *common, "serve.port=0"]
    with running([*server, f"serve.address_file={address}"], address, cwd=ROOT) as (url, _):
        for repeat in range(args.repeats):
            for name in SYSTEMS:
                out = work / f"{name}-{micro}-{repeat}"
                engine = [] if name == "local" else ["teacher.engine=remote", f"teacher.url={url}"]
                if name == "no-overlap":
                    engine.append("teacher.prefetch=false")
                distill(
                    0, "train", "--config", str(ROOT / "configs" / "smoke.yaml"), f"output_dir={out}", *common, *engine
                )
                rates[name].append(step_rate(out, args.warmup))
    med = {name: statistics.median(v) for name, v in rates.items()}
    return {
        "micro_batch_size": micro,
        "tokens_per_step": micro * (args.seq_len - 1),
        "tokens_per_second": med,
        "range": {name: [min(v), max(v)] for name, v in rates.items()},
        "ratio_remote": med["local"] / med["remote"],
        "ratio_no_overlap": med["local"] / med["no-overlap"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=int, default=256, help="teacher hidden size")
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--student", type=int, default=64, help="student hidden size")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--micro", type=int, nargs="+", default=[4, 16], help="micro-batch sizes")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps not timed at the start of each run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="CI size: seconds")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.tiny:
        args.teacher, args.teacher_layers, args.student, args.seq_len = 64, 2, 32, 64
        args.micro, args.steps, args.warmup, args.repeats = [2], 5, 2, 1
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every process: one core each (taskset)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="remote-teacher-") as tmp:
        results = [measure(args, micro, Path(tmp)) for micro in args.micro]
    summary = {"results": results, "seconds": time.perf_counter() - started, "args": vars(args)}
    print(json.dumps(summary, indent=2))  # first, then the table (tests/test_benchmarks.py reads both)
    print("| micro-batch | tokens/step | local tok/s | remote tok/s | no-overlap tok/s | remote | no-overlap |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        t = r["tokens_per_second"]
        print(
            f"| {r['micro_batch_size']} | {r['tokens_per_step']} | {t['local']:.0f} | {t['remote']:.0f} | "
            f"{t['no-overlap']:.0f} | {r['ratio_remote']:.3f}x | {r['ratio_no_overlap']:.3f}x |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
