"""Cost of on-policy distillation: one on-policy step against one off-policy step, same models and prompts.

Run (default size, a few minutes on 2 cores):
    .venv/bin/python benchmarks/on_policy.py
Small smoke run:
    .venv/bin/python benchmarks/on_policy.py --vocab 2048 --prompt-len 32 --new-tokens 32 --repeats 2

The batch holds `--batch` rows of a `--prompt-len`-token prompt and a `--new-tokens`-token completion. Each round
times, through the project's own code (`trainer.train_step`, `on_policy.StudentSampler`, float32, CPU):
  off-policy: the online KD step on the data's completions (distill.alpha=0.5, forward_kl, T=1)
  on-policy:  the student samples the completions (`generation.generate`, KV cache, temperature 1, exactly
              --new-tokens each: no stop token, so both steps train on the same number of tokens), then the KD step
              on the samples (CE off)
and breaks each down into generation, teacher scoring (`teacher.targets` of that step's batch, timed alone) and
student forward/backward + optimizer (the step minus the teacher's share). Medians of `--repeats` rounds after one
warm-up round (the machine is shared; every round is printed too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from online_overhead import add_size_args, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_size_args(parser)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.seq_len = args.prompt_len + args.new_tokens

    import torch

    from distributed_distill import on_policy
    from distributed_distill.generation import Sampling
    from distributed_distill.trainer import train_step

    accelerator, cfg, _, teacher, students, batch = build(args, "auto")
    student, head, optimizer = students["kd"]
    batch["labels"][:, : args.prompt_len] = -100  # the prompt is never a target
    sampler = on_policy.StudentSampler(Sampling(max_new_tokens=args.new_tokens, eos_ids=(), pad_id=0), 0, False)
    rows = [on_policy.positions(0, 1, 0, args.batch)]

    def timed(fn, *fn_args, **kwargs):
        start = time.perf_counter()
        out = fn(*fn_args, **kwargs)
        return out, time.perf_counter() - start

    times: dict[str, list[float]] = {
        k: [] for k in ("off_step", "off_teacher", "on_generation", "on_step", "on_teacher", "generated_tokens")
    }
    for round_ in range(args.repeats + 1):  # round 0 warms up kernels and the allocator
        _, off_teacher = timed(teacher.targets, batch)
        _, off_step = timed(train_step, accelerator, student, head, teacher, optimizer, [batch], cfg)
        (sampled, stats), generation = timed(sampler.sample, accelerator.unwrap_model(student), [batch], rows)
        _, on_teacher = timed(teacher.targets, sampled[0])
        _, on_step = timed(train_step, accelerator, student, head, teacher, optimizer, sampled, cfg, ce=False)
        if round_:
            for name, value in zip(
                times, (off_step, off_teacher, generation, on_step, on_teacher, stats.generated_tokens)
            ):
                times[name].append(value)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    off_total, on_total = med["off_step"], med["on_generation"] + med["on_step"]
    breakdown = {
        "off_policy": {
            "generation": 0.0,
            "teacher_scoring": med["off_teacher"],
            "student_fwd_bwd": med["off_step"] - med["off_teacher"],
            "total": off_total,
        },
        "on_policy": {
            "generation": med["on_generation"],
            "teacher_scoring": med["on_teacher"],
            "student_fwd_bwd": med["on_step"] - med["on_teacher"],
            "total": on_total,
        },
    }
    result = {
        "config": {**vars(args), "chunk_rows": cfg.distill.chunk_size, "torch_threads": torch.get_num_threads()},
        "seconds_median": breakdown,
        "seconds_all": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
        "on_over_off": on_total / off_total,
        "generation_share_of_on_policy_step": med["on_generation"] / on_total,
        "generated_tokens_per_second": med["generated_tokens"] / med["on_generation"],
    }
    print(json.dumps(result, indent=2))
    print()
    print(f"| seconds (median of {args.repeats}) | generation | teacher scoring | student fwd/bwd | step |")
    print("|---|---:|---:|---:|---:|")
    for name, parts in breakdown.items():
        cells = " | ".join(f"{parts[k]:.3f}" for k in ("generation", "teacher_scoring", "student_fwd_bwd", "total"))
        print(f"| {name.replace('_', '-')} | {cells} |")
    print(
        f"\non-policy / off-policy step: {result['on_over_off']:.2f}x; generation "
        f"{result['generation_share_of_on_policy_step']:.0%} of the on-policy step "
        f"({result['generated_tokens_per_second']:,.0f} sampled tokens/s)"
    )


if __name__ == "__main__":
    main()
