"""Small vocabulary: the KD step at `distill.chunk_size: auto` against the old default of 1024 rows, side by side.

Run (the demo's sizes: student 128 x 2 layers, teacher 256 x 4, vocabulary 4096, 16 x 128 tokens; ~1 minute):
    .venv/bin/python benchmarks/chunk_speed.py
The memory side of `auto` at V=128k is benchmarks/loss_memory.py. Here both settings run the same online KD step
(`trainer.train_step`, forward_kl, alpha 0.5, float32, CPU) on the same batch from identical starting weights,
alternating, `--repeats` rounds after one warm-up round; medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from online_overhead import add_size_args, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # the demo's sizes (configs/demo.yaml, configs/demo_teacher.yaml)
    add_size_args(
        parser, vocab=4096, student_hidden=128, student_layers=2, teacher_hidden=256, teacher_layers=4, seq_len=128,
        batch=16,
    )  # fmt: skip
    parser.add_argument("--settings", default="auto,1024", help="two distill.chunk_size values, the first compared")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    from distributed_distill.trainer import train_step

    settings = args.settings.split(",")
    runs = {}
    for setting in settings:
        accelerator, kd_cfg, _, teacher, students, batch = build(args, setting)
        student, head, optimizer = students["kd"]
        runs[setting] = (accelerator, student, head, teacher, optimizer, [batch], kd_cfg)
    times: dict[str, list[float]] = {s: [] for s in settings}
    for round_ in range(args.repeats + 1):
        for setting in settings:
            start = time.perf_counter()
            train_step(*runs[setting])
            if round_:
                times[setting].append(time.perf_counter() - start)
    med = {s: statistics.median(ts) for s, ts in times.items()}
    first, second = settings
    result = {
        "config": vars(args),
        "rows": {s: runs[s][-1].distill.chunk_size for s in settings},
        "seconds_median": med,
        "seconds_all": {s: [round(t, 4) for t in ts] for s, ts in times.items()},
        "ratio": med[first] / med[second],
    }
    print(json.dumps(result, indent=2))
    print()
    print(f"| distill.chunk_size | rows | KD step, median of {args.repeats} (s) |")
    print("|---|---|---|")
    for s in settings:
        print(f"| {s} | {result['rows'][s]} | {med[s]:.3f} |")
    print(f"| **{first} / {second}** | | **{result['ratio']:.3f}x** |")


if __name__ == "__main__":
    main()
