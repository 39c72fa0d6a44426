"""On- vs off-policy students on the built-in conversations, judged by the teacher on the students' own samples.

Run (the default size; the figures in docs/on_policy.md come from it):
    .venv/bin/python benchmarks/on_policy_demo.py --output-dir runs/on_policy_demo
Reduced (a smoke run):
    .venv/bin/python benchmarks/on_policy_demo.py --output-dir /tmp/opd --teacher-steps 40 --student-steps 20 \
        --eval-prompts 16

Phases, each a real `distill train` subprocess with configs/on_policy.yaml (a rerun keeps the runs that finished):
  1. the teacher: a larger llama trained with CE on python-stdlib-chat (no teacher of its own);
  2. the off-policy student: distill.on_policy=0, KD (reverse KL) + CE on the dataset's answers;
  3. the on-policy student: the same, with distill.on_policy=--share (the student answers on that share of the
     steps, the teacher scores every token it wrote);
  4. (--continue-steps) both continue from the off-policy student's weights for as many steps again, one
     off-policy, one fully on-policy (distill.on_policy=1): on-policy training of a student that already learned
     from the data, the setting of GKD and the 2025 recipe;
  then, in this process, each model answers the held-out prompts (the validation split's conversations, sampled as
  on-policy steps sample: temperature 1, 64 new tokens, a seed per prompt) and the teacher scores the answers: its
  per-token NLL of the model's own samples. The teacher's own samples are the floor. Same seed, data order and steps
  for both students; the table also gives their validation loss on the dataset's answers (teacher forcing).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
CONFIG = ROOT / "configs" / "on_policy.yaml"
TEACHER_ARCH = "{family: llama, hidden_size: 128, num_layers: 4, num_heads: 4, max_position_embeddings: 320}"


def distill(run: Path, *args: str) -> None:
    """`distill train` into `run`, unless an earlier invocation already finished it (its final/ exists)."""
    if (run / "final").is_dir():
        print(f"{run}: finished earlier, kept", flush=True)
        return
    args = ("train", "--config", str(CONFIG), f"output_dir={run}", *args)
    print("$ distill " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "distributed_distill.cli", *args], check=True, cwd=ROOT)


def last_val_loss(run: Path) -> float:
    from distributed_distill.rundir import read_records

    records, _ = read_records(run / "metrics.jsonl")
    return [r for r in records if "val_loss" in r][-1]["val_loss"]


def score(out: Path, runs: dict[str, Path], teacher_dir: Path, prompts_n: int, overrides: list[str]) -> list[dict]:
    """The teacher's per-token NLL of each model's samples on the first `prompts_n` held-out prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    from distributed_distill import on_policy
    from distributed_distill.config import load_config
    from distributed_distill.data.documents import documents
    from distributed_distill.data.packed import build_datasets
    from distributed_distill.eval.evaluate import teacher_nll_of_samples
    from distributed_distill.tokenizer import load_tokenizer

    cfg = load_config(CONFIG, [f"teacher.path={teacher_dir}", *overrides])
    tokenizer = load_tokenizer(str(teacher_dir))
    docs = documents(cfg.data)
    _, val, _ = build_datasets(docs, tokenizer, cfg.data)
    rows = val[: min(prompts_n, len(val))]
    lengths = on_policy.prompt_lengths(rows["labels"].long())
    prompts = [rows["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]
    sampler = on_policy.StudentSampler.build(cfg, tokenizer, docs.kind, synced=False)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    table = []
    for name, run in runs.items():
        model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
        torch.manual_seed(0)
        result = teacher_nll_of_samples(model, teacher, prompts, sampler)
        table.append({"model": name, **result, "val_loss": last_val_loss(run), "prompts": len(prompts)})
    (out / "results.json").write_text(json.dumps(table, indent=2))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "on_policy_demo")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--share", type=float, default=0.5, help="distill.on_policy of the on-policy student")
    parser.add_argument(
        "--continue-steps",
        type=int,
        default=150,
        help="then continue the off-policy student for this many more steps, off-policy and fully on-policy (0: skip)",
    )
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="section.key=value for every run (e.g. train.seed=1)")
    args = parser.parse_args()
    started = time.perf_counter()
    out = args.output_dir
    teacher, off, on = out / "teacher", out / "student_off_policy", out / "student_on_policy"
    distill(
        teacher, "teacher=null", "distill.alpha=0", "distill.on_policy=0", f"student.arch={TEACHER_ARCH}",
        f"train.max_steps={args.teacher_steps}", f"train.warmup_steps={min(30, args.teacher_steps // 10)}",
        *args.overrides,
    )  # fmt: skip
    students = [f"teacher.path={teacher / 'final'}", f"train.max_steps={args.student_steps}"]
    students += [f"train.warmup_steps={min(10, args.student_steps // 10)}", *args.overrides]
    distill(off, "distill.on_policy=0", *students)
    distill(on, f"distill.on_policy={args.share}", *students)
    runs = {"teacher": teacher, "student, off-policy": off, f"student, on-policy {args.share:g}": on}
    if args.continue_steps:
        # The literature's setting: on-policy training of a student that already learned from the data.
        n = args.continue_steps
        warm = [f"teacher.path={teacher / 'final'}", "student.arch=null", f"student.path={off / 'final'}"]
        warm += [f"train.max_steps={n}", f"train.warmup_steps={min(10, n // 10)}", *args.overrides]
        more_off, more_on = out / "continued_off_policy", out / "continued_on_policy"
        distill(more_off, "distill.on_policy=0", *warm)
        distill(more_on, "distill.on_policy=1", *warm)
        runs[f"off-policy student + {n} off-policy steps"] = more_off
        runs[f"off-policy student + {n} on-policy steps"] = more_on
    table = score(out, runs, teacher / "final", args.eval_prompts, args.overrides)
    lines = [
        "| model | teacher NLL / token of its own samples | mean sample length | val loss (dataset answers) |",
        "|---|---:|---:|---:|",
        *(
            f"| {r['model']} | {r['teacher_nll']:.3f} | {r['mean_sample_length']:.1f} | {r['val_loss']:.3f} |"
            for r in table
        ),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"\n{table[0]['prompts']} held-out prompts, took {time.perf_counter() - started:.0f} s:\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
