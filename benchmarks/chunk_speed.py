"""Small vocabulary: the KD step at two `distill.chunk_size` settings, side by side.

Run (the demo's sizes: student 128 x 2 layers, teacher 256 x 4, vocabulary 4096, 16 x 128 tokens; ~1 minute):
    .venv/bin/python benchmarks/chunk_speed.py --settings 8192,1024 --repeats 15   # one chunk vs 1024 rows
    .venv/bin/python benchmarks/chunk_speed.py --loss-only --repeats 25    # the loss alone, at the same shapes
(`auto` is one of the settings by default; it gives 1024 rows here on CPU.) The memory side of `auto` at V=128k is
benchmarks/loss_memory.py. Here both settings run the same online KD step (`trainer.train_step`, forward_kl,
alpha 0.5, float32, CPU) on the same batch from identical starting weights, alternating, `--repeats` rounds after
one warm-up round; medians of wall and CPU time and their ratios are printed."""

from __future__ import annotations

import argparse
import json
import statistics

from online_overhead import add_size_args, alternate, build


def loss_step(args: argparse.Namespace, rows: int):
    """The KD + CE loss of one micro-batch from hidden states, forward and backward, without the models."""
    import torch

    from distributed_distill.losses import chunked_distill_loss

    g = torch.Generator().manual_seed(0)
    n, h, ht, v = args.batch * (args.seq_len - 1), args.student_hidden, args.teacher_hidden, args.vocab
    hidden = torch.randn(n, h, generator=g).requires_grad_(True)
    weight = torch.nn.Parameter(torch.randn(v, h, generator=g) * h**-0.5)
    t_hidden, t_weight = torch.randn(n, ht, generator=g), torch.randn(v, ht, generator=g) * ht**-0.5
    labels = torch.randint(0, v, (n,), generator=g)

    def step() -> None:
        hidden.grad, weight.grad = None, None
        out = chunked_distill_loss(hidden, weight, labels, teacher_hidden=t_hidden, teacher_weight=t_weight,
                                   chunk_size=rows, kd_weight=0.5, ce_weight=0.5)  # fmt: skip
        (0.5 * out.kd_sum + 0.5 * out.ce_sum).backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # the demo's sizes (configs/demo.yaml, configs/demo_teacher.yaml)
    add_size_args(
        parser, vocab=4096, student_hidden=128, student_layers=2, teacher_hidden=256, teacher_layers=4, seq_len=128,
        batch=16,
    )  # fmt: skip
    parser.add_argument("--settings", default="auto,1024", help="two distill.chunk_size values, the first compared")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--loss-only", action="store_true", help="time chunked_distill_loss fwd+bwd alone, at the step's shapes"
    )
    args = parser.parse_args()

    from distributed_distill.trainer import train_step

    settings = args.settings.split(",")
    runs = {}
    for setting in settings:
        accelerator, kd_cfg, _, teacher, students, batch = build(args, setting)
        student, head, optimizer = students["kd"]
        runs[setting] = (accelerator, student, head, teacher, optimizer, [batch], kd_cfg)
        step = loss_step(args, kd_cfg.distill.chunk_size) if args.loss_only else lambda r=runs[setting]: train_step(*r)
        runs[setting] = (*runs[setting], step)
    times, cpu = alternate({setting: runs[setting][-1] for setting in settings}, args.repeats)
    med = {s: statistics.median(ts) for s, ts in times.items()}
    med_cpu = {s: statistics.median(ts) for s, ts in cpu.items()}
    first, second = settings
    paired = [a / b for a, b in zip(times[first], times[second])]
    result = {
        "config": vars(args),
        "rows": {s: runs[s][-2].distill.chunk_size for s in settings},
        "seconds_median": med,
        "seconds_all": {s: [round(t, 4) for t in ts] for s, ts in times.items()},
        "cpu_seconds_median": med_cpu,
        "cpu_seconds_all": {s: [round(t, 4) for t in ts] for s, ts in cpu.items()},
        "ratio": med[first] / med[second],
        "cpu_ratio": med_cpu[first] / med_cpu[second],
        "rounds_first_faster": sum(r < 1 for r in paired),
    }
    print(json.dumps(result, indent=2))
    print()
    what = "KD + CE loss fwd+bwd" if args.loss_only else "KD step"
    print(f"| distill.chunk_size | rows | {what}: wall, median of {args.repeats} (s) | CPU time, median (s) |")
    print("|---|---|---|---|")
    for s in settings:
        print(f"| {s} | {result['rows'][s]} | {med[s]:.3f} | {med_cpu[s]:.3f} |")
    print(f"| **{first} / {second}** | | **{result['ratio']:.3f}x** | **{result['cpu_ratio']:.3f}x** |")
    print(f"{first} was faster in {result['rounds_first_faster']} of {args.repeats} paired rounds (wall time)")


if __name__ == "__main__":
    main()
