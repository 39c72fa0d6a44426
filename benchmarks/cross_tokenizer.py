"""A teacher with another tokenizer: what cross-tokenizer distillation buys over the same student without a teacher.

    python benchmarks/cross_tokenizer.py                      # the docs/cross_tokenizer.md table (3 seeds)
    python benchmarks/cross_tokenizer.py --tiny               # the slow test's size: 1 seed, a few steps

One teacher trained with plain CE on the built-in corpus with its own BPE tokenizer (--teacher-vocab tokens); then,
for every seed, the same student with ANOTHER BPE tokenizer trained on the same corpus (--student-vocab tokens),
trained four ways by real `distill train` processes: CE only, and distilled from the teacher through
`distill.cross_tokenizer` with the ULD loss, the hybrid loss, and ULD at distill.alpha = 0.1 (the others 0.5).
All the students share the student's tokenizer and the validation split, so their validation losses compare
directly; each row reports the paired difference to the CE-only student of the same seed (a seed fixes the
initialisation and the data order).

Prints a JSON record, then the table; writes cross_tokenizer.json and cross_tokenizer.md into --output-dir.
Finished runs are kept: a rerun trains only what is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from distributed_distill.demo import CONFIGS, run_distill

RECIPES = {
    "CE only (student's tokenizer)": ["teacher=null", "distill.alpha=0"],
    "cross-tokenizer ULD": ["distill.cross_tokenizer.loss=uld"],
    "cross-tokenizer hybrid": ["distill.cross_tokenizer.loss=hybrid"],
    # ULD matches the shape of the distributions, not which token is which: a smaller share of the objective.
    "cross-tokenizer ULD, alpha 0.1": ["distill.cross_tokenizer.loss=uld", "distill.alpha=0.1"],
}
BASELINE = "CE only (student's tokenizer)"

FULL = dict(
    seeds=3, teacher_steps=300, student_steps=150, max_documents=300, teacher_width=192, teacher_layers=3,
    student_width=64, student_layers=2, teacher_vocab=2048, student_vocab=1280, seq_len=128, micro_batch=16,
)  # fmt: skip
TINY = dict(
    seeds=1, teacher_steps=6, student_steps=3, max_documents=24, teacher_width=64, teacher_layers=2,
    student_width=32, student_layers=1, teacher_vocab=512, student_vocab=384, seq_len=64, micro_batch=4,
)  # fmt: skip


def last_validation(run: Path) -> dict:
    """The run's final validation record (metrics.jsonl), the figures the table reports."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next(r for r in reversed(records) if "val_loss" in r)


def train(out: Path, config: Path, overrides: list[str]) -> Path:
    if not (out / "final" / "config.json").is_file():
        run_distill(["train", "--config", str(config), f"output_dir={out}", *overrides])
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/cross_tokenizer"))
    parser.add_argument("--tiny", action="store_true", help="the slow test's size")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every training run")
    args = parser.parse_args(argv)
    size = {
        k: getattr(args, k) if getattr(args, k) is not None else v for k, v in (TINY if args.tiny else FULL).items()
    }
    out = args.output_dir
    data = [f"data.max_documents={size['max_documents']}", f"data.seq_len={size['seq_len']}", "logging.progress=false"]
    data += [f"train.micro_batch_size={size['micro_batch']}", *args.overrides]
    teacher = train(
        out / "teacher",
        CONFIGS / "demo_teacher.yaml",
        [
            *data,
            f"tokenizer.vocab_size={size['teacher_vocab']}",
            f"student.arch.hidden_size={size['teacher_width']}",
            f"student.arch.num_layers={size['teacher_layers']}",
            f"train.max_steps={size['teacher_steps']}",
            f"train.warmup_steps={min(size['teacher_steps'], 20)}",
        ],
    )
    student = [
        *data,
        f"tokenizer.vocab_size={size['student_vocab']}",
        f"student.arch.hidden_size={size['student_width']}",
        f"student.arch.num_layers={size['student_layers']}",
        f"train.max_steps={size['student_steps']}",
        f"train.warmup_steps={min(size['student_steps'], 10)}",
        f"teacher.path={teacher / 'final'}",
    ]
    rows = []
    for seed in range(size["seeds"]):
        for name, recipe in RECIPES.items():
            slug = name.split(" (")[0].replace(", ", "_").replace(" ", "_").replace("-", "_").replace(".", "").lower()
            run = train(out / "students" / slug / f"seed{seed}", CONFIGS / "demo.yaml", [*student, *recipe,
                        f"train.seed={seed}"])  # fmt: skip
            v = last_validation(run)
            row = {"recipe": name, "seed": seed, "val_loss": v["val_loss"], "run": str(run)}
            row.update({k: v[k] for k in ("val_span_kl", "val_span_agreement", "val_unaligned_fraction") if k in v})
            rows.append(row)
    base = {r["seed"]: r["val_loss"] for r in rows if r["recipe"] == BASELINE}
    for r in rows:
        if r["recipe"] != BASELINE:
            r["val_loss_vs_ce"] = r["val_loss"] - base[r["seed"]]
    summary = []
    for name in RECIPES:
        mine = [r for r in rows if r["recipe"] == name]
        entry = {"recipe": name, "seeds": len(mine), "val_loss": _spread([r["val_loss"] for r in mine])}
        if name != BASELINE:
            deltas = [r["val_loss_vs_ce"] for r in mine]
            entry["val_loss_vs_ce"] = _spread(deltas)
            entry["beats_ce_every_seed"] = all(d < 0 for d in deltas)
        if "val_unaligned_fraction" in mine[0]:
            entry["unaligned_fraction"] = _spread([r["val_unaligned_fraction"] for r in mine])
        summary.append(entry)
    record = {"size": size, "teacher": str(teacher), "rows": rows, "summary": summary}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cross_tokenizer.json").write_text(json.dumps(record, indent=2) + "\n")
    table = markdown(summary, size)
    (out / "cross_tokenizer.md").write_text(table)
    print(json.dumps(record, indent=2))
    print(table, end="")
    return record


def _spread(values: list[float]) -> dict:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "values": values}


def markdown(summary: list[dict], size: dict) -> str:
    lines = [
        f"teacher tokenizer {size['teacher_vocab']} tokens, student tokenizer {size['student_vocab']}; "
        f"{size['seeds']} seeds (mean ± sd)",
        "",
        "| student | val loss | Δ val loss vs CE only, same seed | every seed better | unaligned tokens |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        loss = f"{s['val_loss']['mean']:.4f} ± {s['val_loss']['sd']:.4f}"
        delta = f"{s['val_loss_vs_ce']['mean']:+.4f} ± {s['val_loss_vs_ce']['sd']:.4f}" if "val_loss_vs_ce" in s else ""
        every = {True: "yes", False: "no"}.get(s.get("beats_ce_every_seed"), "")
        unaligned = f"{s['unaligned_fraction']['mean']:.2%}" if "unaligned_fraction" in s else ""
        lines.append(f"| {s['recipe']} | {loss} | {delta} | {every} | {unaligned} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
