"""Cost of the distillation machinery itself: one online KD step against its parts, timed alone.

Run (default size, ~3 minutes on 2 cores):
    .venv/bin/python benchmarks/online_overhead.py
Small smoke run:
    .venv/bin/python benchmarks/online_overhead.py --vocab 2048 --seq-len 64 --repeats 2

Three timings on the same batch, each through the project's own code (`trainer.train_step`, float32, CPU):
  kd:       an online KD step: teacher forward (final hidden states), the chunked KD + CE loss from both
            models' hidden states, student backward, optimizer step (distill.alpha=0.5, forward_kl, T=1)
  ce:       a plain CE step of the same student (distill.alpha=0, no teacher): same chunked path, CE only
  teacher:  the teacher's forward alone, logits included (`model(input_ids).logits`, no_grad)
ratio = kd / (ce + teacher); target <= 1.10 (docs/design.md, performance targets). The three alternate,
`--repeats` rounds after one warm-up round; medians of wall and CPU time are reported (the machine is shared; the
spread is printed too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package


def build(args: argparse.Namespace, chunk_size: str | int):
    """Teacher, a KD and a CE student (identical at the start, each with its optimizer) and one batch."""
    import torch
    from accelerate import Accelerator

    from distributed_distill import models
    from distributed_distill.config import load_config
    from distributed_distill.setup import resolve_loss_chunks
    from distributed_distill.teacher import OnlineTeacher

    overrides = [
        *model_overrides(args),
        f"distill.chunk_size={chunk_size}",
        "train.max_steps=1000",
        "train.warmup_steps=0",
        "train.device=cpu",
    ]
    kd_cfg = load_config(None, overrides + ["distill.alpha=0.5"])
    ce_cfg = load_config(None, overrides + ["distill.alpha=0", "teacher=null"])
    accelerator = Accelerator(cpu=True)
    student_config = models.arch_config(kd_cfg.student.arch, args.vocab)
    teacher_config = models.arch_config(kd_cfg.teacher.arch, args.vocab)
    kd_cfg = resolve_loss_chunks(kd_cfg, student_config, accelerator)
    ce_cfg = resolve_loss_chunks(ce_cfg, student_config, accelerator)
    teacher = OnlineTeacher(models.load_model(kd_cfg.teacher, teacher_config, seed=1), identity={})
    students = {}
    for name in ("kd", "ce"):  # one student and optimizer each, identical at the start
        student = models.load_model(kd_cfg.student, student_config, seed=0)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        student, optimizer = accelerator.prepare(student, optimizer)
        students[name] = (student, accelerator.unwrap_model(student).get_output_embeddings(), optimizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    return accelerator, kd_cfg, ce_cfg, teacher, students, batch


def model_overrides(args: argparse.Namespace) -> list[str]:
    """The models, the sequence length and the batch of `--vocab ... --batch` (add_size_args) as config overrides
    (the vocabulary goes to models.arch_config)."""
    arch = "{{family: llama, hidden_size: {h}, num_layers: {n}, num_heads: {a}, max_position_embeddings: {p}}}"
    return [
        f"student.arch={arch.format(h=args.student_hidden, n=args.student_layers, a=4, p=args.seq_len)}",
        f"teacher.arch={arch.format(h=args.teacher_hidden, n=args.teacher_layers, a=8, p=args.seq_len)}",
        f"data.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.batch}",
    ]


MODEL_SIZES = dict(
    vocab=32000, student_hidden=256, student_layers=4, teacher_hidden=512, teacher_layers=8, seq_len=256, batch=4
)


def add_size_args(parser: argparse.ArgumentParser, **overrides: int) -> None:
    """--vocab, --student-hidden, ... --batch: the models and the batch `build` makes."""
    for key, default in {**MODEL_SIZES, **overrides}.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=default)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_size_args(parser)
    parser.add_argument("--chunk-size", default="auto")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import torch

    from distributed_distill.trainer import train_step

    accelerator, kd_cfg, ce_cfg, teacher, students, batch = build(args, args.chunk_size)

    def kd() -> None:
        student, head, opt = students["kd"]
        train_step(accelerator, student, head, teacher, opt, [batch], kd_cfg)

    def ce() -> None:
        student, head, opt = students["ce"]
        train_step(accelerator, student, head, None, opt, [batch], ce_cfg)

    @torch.no_grad()
    def teacher_forward() -> None:
        assert teacher.model(input_ids=batch["input_ids"], use_cache=False).logits.shape[-1] == args.vocab

    times, cpu = alternate({"kd": kd, "ce": ce, "teacher": teacher_forward}, args.repeats)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    ratios = [k / (c + t) for k, c, t in zip(times["kd"], times["ce"], times["teacher"])]
    result = {
        "config": {**vars(args), "chunk_rows": kd_cfg.distill.chunk_size, "torch_threads": torch.get_num_threads()},
        "seconds_median": med,
        "seconds_all": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
        "cpu_seconds_median": med_cpu,
        "ratio": med["kd"] / (med["ce"] + med["teacher"]),
        "cpu_ratio": med_cpu["kd"] / (med_cpu["ce"] + med_cpu["teacher"]),
        "ratio_per_round": [round(r, 3) for r in ratios],
        "target": 1.10,
    }
    print(json.dumps(result, indent=2))
    print()
    print(f"| timing (median of {args.repeats}) | wall (s) | CPU time (s) |")
    print("|---|---|---|")
    print(f"| online KD step | {med['kd']:.3f} | {med_cpu['kd']:.3f} |")
    print(f"| plain CE step of the same student | {med['ce']:.3f} | {med_cpu['ce']:.3f} |")
    print(f"| teacher forward alone (with logits) | {med['teacher']:.3f} | {med_cpu['teacher']:.3f} |")
    print(
        f"| **KD / (CE + teacher)** | **{result['ratio']:.3f}** (per round {min(ratios):.3f}-{max(ratios):.3f}) "
        f"| **{result['cpu_ratio']:.3f}** |"
    )


def alternate(parts: dict[str, Callable[[], None]], repeats: int) -> tuple[dict, dict]:
    """Runs the parts in turn for `repeats` rounds after one warm-up round (kernels, the allocator); returns the
    wall seconds and this process's CPU seconds (every torch thread, user + system) of each part in each round. On
    a shared machine other jobs stretch the wall time of whichever round they overlap; the CPU time a part needs
    moves much less, so both are reported."""
    wall: dict[str, list[float]] = {name: [] for name in parts}
    cpu: dict[str, list[float]] = {name: [] for name in parts}
    for round_ in range(repeats + 1):
        for name, fn in parts.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            if round_:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


if __name__ == "__main__":
    main()
