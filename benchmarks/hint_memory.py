"""Peak memory of a hint step (distill.hidden, 2 mapped layers of a 24-layer teacher) against a logit-only KD step.

Run (default size, ~5 minutes on 2 cores):
    .venv/bin/python benchmarks/hint_memory.py
Tiny (tests/test_hints.py runs it):
    .venv/bin/python benchmarks/hint_memory.py --vocab 512 --teacher-hidden 32 --student-hidden 16 --seq-len 32 \
        --batch 2 --repeats 1

Both steps go through the project's own code (`trainer.train_step`, float32, CPU, AdamW, distill.alpha=0.5,
forward KL, the chunked loss): the same student, teacher and batch; the hint step adds the hint term of two layer
pairs (`--pairs`, default the student's middle and last-but-one blocks onto the teacher's 12th and 18th: two states
the teacher would not hold otherwise) and their projections. The target (docs/hints.md): hint / KD <= 1.10.

What is measured, per step kind, in a fresh subprocess (nothing shared between the two; they alternate, `--repeats`
rounds, the minimum of each reported): models and optimizer are built and one step is taken (the optimizer's
state exists, every lazy buffer is made); then the kernel's resident-set high-water mark (VmHWM) is reset through
/proc/self/clear_refs and one more step is taken. `step_peak` = VmHWM - the resident set before that step: every
byte the step touched (both models' activations, the teacher's states, the losses, the gradients); `process_peak` =
VmHWM itself (the weights and optimizer state included). glibc's mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_)
so that freed tensors leave the resident set and the second step's peak is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from benchmarks.loss_memory import _reset_peak, _status_bytes  # noqa: E402 (the same /proc measurement)
from benchmarks.online_overhead import add_size_args, model_overrides  # noqa: E402 (the same models)


def build(args: argparse.Namespace, hints: bool):
    """Accelerator, config, student (with projections for a hint step), optimizer, head, teacher and one batch."""
    import torch

    from distributed_distill import hidden, models
    from distributed_distill.config import load_config
    from distributed_distill.setup import resolve_loss_chunks, setup_accelerator
    from distributed_distill.teacher import OnlineTeacher

    overrides = [*model_overrides(args), "train.device=cpu", "distill.alpha=0.5"]
    if hints:
        overrides.append(f"distill.hidden.layers={args.pairs}")
    cfg = load_config(None, overrides)
    accelerator = setup_accelerator(cfg)
    s_config = models.arch_config(cfg.student.arch, args.vocab)
    t_config = models.arch_config(cfg.teacher.arch, args.vocab)
    cfg = resolve_loss_chunks(cfg, s_config, accelerator)
    student = models.load_model(cfg.student, s_config, seed=0)
    if hints:
        pairs = hidden.resolve_pairs(cfg.distill.hidden, s_config, t_config)
        hidden.attach(student, cfg.distill.hidden, pairs, s_config, t_config, seed=0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    student, optimizer = accelerator.prepare(student, optimizer)
    head = models.AlignedHead(accelerator.unwrap_model(student).get_output_embeddings(), args.vocab)
    teacher = OnlineTeacher(models.load_model(cfg.teacher, t_config, seed=1), identity={})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)
    step_hints = hidden.for_step(cfg.distill.hidden, hidden.projections(accelerator.unwrap_model(student)), 1, None)
    return accelerator, cfg, student, optimizer, head, teacher, {"input_ids": ids, "labels": ids.clone()}, step_hints


def measure(args: argparse.Namespace, kind: str) -> dict:
    """In this (fresh) process: one step to warm up, then the measured one."""
    import gc

    import torch

    from distributed_distill.trainer import train_step

    accelerator, cfg, student, optimizer, head, teacher, batch, hints = build(args, kind == "hints")

    def one_step():
        return train_step(accelerator, student, head, teacher, optimizer, [batch], cfg, hints=hints)

    one_step()
    gc.collect()
    _reset_peak()
    before = _status_bytes("VmRSS")
    result = one_step()
    peak = _status_bytes("VmHWM")
    return {
        "kind": kind,
        "step_peak": peak - before,
        "process_peak": peak,
        "resident_before": before,
        "loss": result.loss,
        "hint_losses": result.hint_losses,
        "torch_threads": torch.get_num_threads(),
    }


def run_child(args: argparse.Namespace, kind: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--child", kind, *sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} step failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_size_args(parser, teacher_layers=24)  # online_overhead.py's sizes, the teacher 24 layers deep
    parser.add_argument(
        "--pairs",
        default=None,
        help="distill.hidden.layers as YAML; default: the student's blocks S/2 and 3S/4 onto the teacher's T/2, 3T/4",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["kd", "hints"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pairs is None:
        s, t = args.student_layers, args.teacher_layers
        args.pairs = f"[[{s // 2},{t // 2}],[{3 * s // 4},{3 * t // 4}]]"
    if args.child:
        print(json.dumps(measure(args, args.child)))
        return
    runs: dict[str, list[dict]] = {"kd": [], "hints": []}
    for _ in range(args.repeats):
        for kind in runs:
            runs[kind].append(run_child(args, kind))
    best = {kind: min(rs, key=lambda r: r["step_peak"]) for kind, rs in runs.items()}
    mib = 2.0**20
    result = {
        "config": {**{k: v for k, v in vars(args).items() if k != "child"}},
        # The exact byte counts the ratios come from (the MiB figures are rounded to 0.01, which at a tiny size is
        # more than 1% of a step's peak).
        "step_peak_bytes": {k: r["step_peak"] for k, r in best.items()},
        "process_peak_bytes": {k: r["process_peak"] for k, r in best.items()},
        "step_peak_mib": {k: round(r["step_peak"] / mib, 2) for k, r in best.items()},
        "process_peak_mib": {k: round(r["process_peak"] / mib, 2) for k, r in best.items()},
        "step_peak_all_mib": {k: [round(r["step_peak"] / mib, 2) for r in rs] for k, rs in runs.items()},
        "ratio": best["hints"]["step_peak"] / best["kd"]["step_peak"],
        "process_ratio": best["hints"]["process_peak"] / best["kd"]["process_peak"],
        "hint_losses": best["hints"]["hint_losses"],
        "target": 1.10,
    }
    print(json.dumps(result, indent=2))
    print()
    print(f"| peak memory (min of {args.repeats}) | the step alone (MiB) | the whole process (MiB) |")
    print("|---|---|---|")
    for kind, title in (("kd", "logit-only KD step"), ("hints", f"hint step, pairs {args.pairs}")):
        print(f"| {title} | {result['step_peak_mib'][kind]:.1f} | {result['process_peak_mib'][kind]:.1f} |")
    print(f"| **hint / KD** | **{result['ratio']:.3f}** | **{result['process_ratio']:.3f}** |")


if __name__ == "__main__":
    main()
