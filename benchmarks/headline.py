"""The headline experiment: what distillation buys over training the same student without a teacher.

    python benchmarks/headline.py               # full size (the README table): 1 teacher + 27 students (docs/eval.md)
    python benchmarks/headline.py --seeds 2 --student-steps 3 --teacher-steps 4 --max-documents 24 \
        --teacher-width 64 --student-width 32 --eval-prompts 2 \
        data.seq_len=64 train.micro_batch_size=4 train.eval_batches=2      # reduced: the slow test (5 recipes)

One teacher (configs/demo_teacher.yaml) trained once; then, for every recipe in RECIPES and every seed, the same
student (configs/demo.yaml: one size, one step budget, one data order per seed) trained by a real `distill train`
process; then one `distill eval` of every student on the same validation tokens and held-out prompts. Writes
into --output-dir: headline.json (every row, and per recipe the mean and spread over seeds), headline.md (the table)
and headline.png (validation loss per recipe, each seed a dot). Positional `section.key=value` overrides apply to
every training run (e.g. train.micro_batch_size=8).

A recipe is one entry of RECIPES: config overrides for `distill train`, and optionally a step that runs before its
training (the offline store). `{teacher}`, `{work}` (the recipe's per-seed directory) and `{hint_steps}` (a quarter
of the student's steps: FitNets' first stage) are filled in. Besides the loss, the table has each recipe's paired
difference to the CE-only student and to the forward-KL student of the same seed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from distributed_distill.config import load_config
from distributed_distill.demo import (
    CONFIGS,
    RECOMMENDED_NAME,
    offline_overrides,
    precompute_store,
    run_distill,
    sample_store,
    samples_overrides,
)


@dataclass
class Recipe:
    overrides: list[str]  # `distill train` overrides; {teacher} = the teacher's final/, {work} = this run's workdir
    # Runs before training: prepare(student_config, teacher_override, work_dir, overrides)
    prepare: Callable[[str, str, Path, list[str]], None] | None = None
    notes: str = ""


def _offline_store(student_cfg: str, teacher: str, work: Path, overrides: list[str]) -> None:
    precompute_store(student_cfg, teacher, work / "store", overrides)


def _samples_store(student_cfg: str, teacher: str, work: Path, overrides: list[str]) -> None:
    # One sample store per seed: the sampling seed follows train.seed, so each seed is its own draw of samples.
    sample_store(student_cfg, teacher, work / "samples", overrides)


OFFLINE = f"offline {RECOMMENDED_NAME} (forward KL)"
HINTS = ["distill.hidden.layers=uniform", "distill.hidden.loss=cosine", "distill.hidden.weight=1"]

# name -> recipe. The rows of the README's headline table, in order; a new student recipe is one more entry.
RECIPES: dict[str, Recipe] = {
    "CE only (no teacher)": Recipe(["teacher=null", "distill.alpha=0", "tokenizer.path={teacher}"]),
    "forward KL": Recipe(["distill.loss=forward_kl"]),
    "reverse KL": Recipe(["distill.loss=reverse_kl"]),
    "JSD (beta 0.5)": Recipe(["distill.loss=jsd", "distill.beta=0.5"]),
    "skew forward KL (0.1)": Recipe(["distill.loss=skew_forward_kl", "distill.skew=0.1"]),
    # Issue 27: the store docs/store.md recommends from benchmarks/store_curve.py (demo.RECOMMENDED_STORE).
    OFFLINE: Recipe(offline_overrides(Path("{work}") / "store"), prepare=_offline_store),
    # Issue 14: the teacher's own samples (configs/demo.yaml, section `generate`), CE on them + KD from their top-64.
    # (On-policy needs prompts, which this plain-text corpus has not: benchmarks/on_policy_demo.py compares on- and
    # off-policy students on the built-in conversations, docs/on_policy.md.)
    "teacher samples, top-64": Recipe(samples_overrides(Path("{work}") / "samples"), prepare=_samples_store),
    # Issue 24 (docs/hints.md): the student's 2 blocks onto the teacher's 2nd and 4th (uniform), cosine hints through a
    # learned projection, with forward KL throughout, or alone for the first quarter of the steps (FitNets' stages).
    "forward KL + hints": Recipe(["distill.loss=forward_kl", *HINTS]),
    "hints, then forward KL": Recipe(["distill.loss=forward_kl", *HINTS, "distill.hidden.until_step={hint_steps}"]),
}

BASELINE = "CE only (no teacher)"  # the student without a teacher, which every other recipe is compared with
KD = "forward KL"  # the logit-only student, which the recipes that add to it are compared with too

# The columns of the table: (title, eval.json key, format); mean +- spread over seeds.
METRICS = (
    ("val loss", "val_loss", ".4f"),
    # Paired by seed: a seed fixes the student's initialisation and data order for every recipe, so the difference
    # to the CE-only student of the same seed removes most of the seed-to-seed spread of the loss itself.
    ("Δ val loss vs CE only, same seed", "val_loss_vs_ce", "+.4f"),
    ("Δ val loss vs forward KL, same seed", "val_loss_vs_kd", "+.4f"),
    ("fwd KL to teacher", "val_forward_kl", ".4f"),
    ("top-1 agreement", "val_top1_agreement", ".3f"),
    ("ECE", "val_ece", ".4f"),
    ("teacher NLL of samples", "gen_teacher_nll", ".3f"),
    # Beside the teacher NLL, which it lowers: a greedy loop of frequent tokens is likely under any teacher.
    ("repetition", "gen_repetition", ".3f"),
    ("ROUGE-L", "gen_rouge_l", ".3f"),
)


@dataclass
class Sizes:
    seeds: int = 3
    teacher_steps: int | None = None  # None: the config's
    student_steps: int | None = None
    max_documents: int | None = None
    teacher_width: int | None = None
    teacher_layers: int | None = None
    student_width: int | None = None
    student_layers: int | None = None
    eval_prompts: int = 16
    overrides: list[str] = field(default_factory=list)
    # Student runs at once. On a 2-core CPU two one-thread runs (OMP_NUM_THREADS=1, set by main) finish sooner than
    # two-thread runs one after the other. The thread count can change a matmul's reduction order, so a run's last
    # bits may differ from the same run with two threads; compare figures measured with the same --jobs.
    jobs: int = 1

    def common(self) -> list[str]:
        """Overrides of every phase (the data: one tokenizer, one split)."""
        out = [f"data.max_documents={self.max_documents}"] if self.max_documents else []
        return out + ["logging.progress=false", *self.overrides]

    def model(self, width: int | None, layers: int | None, steps: int | None) -> list[str]:
        # demo_teacher.yaml trains the teacher as its `student`: both configs size their model as student.arch.
        out = [f"student.arch.hidden_size={width}"] if width else []
        out += [f"student.arch.num_layers={layers}"] if layers else []
        return out + ([f"train.max_steps={steps}", f"train.warmup_steps={min(steps, 10)}"] if steps else [])


def summarise(rows: list[dict], recipes: list[str], seeds: int) -> list[dict]:
    """Per recipe: each metric's mean, sample standard deviation and min / max over the seeds."""
    out = []
    for name in recipes:
        mine = [r for r in rows if r["recipe"] == name]
        entry = {"recipe": name, "seeds": len(mine)}
        for _, key, _ in METRICS:
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:
                entry[key] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values),
                    "max": max(values),
                    "values": values,
                }
        out.append(entry)
    return out


def table(summary: list[dict], teacher: dict | None = None) -> str:
    """Mean ± std per recipe; first, the teacher's own row (one model, no spread) as the reference."""
    columns = [m for m in METRICS if any(m[1] in s for s in summary)]
    lines = ["| student | " + " | ".join(c[0] for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    if teacher is not None:
        cells = [format(teacher[key], fmt) if teacher.get(key) is not None else "-" for _, key, fmt in columns]
        lines.append("| teacher (reference) | " + " | ".join(cells) + " |")
    for s in summary:
        cells = [
            f"{format(s[key]['mean'], fmt)} ± {format(s[key]['std'], fmt.lstrip('+'))}" if key in s else "-"
            for _, key, fmt in columns
        ]
        lines.append(f"| {s['recipe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path, teacher_loss: float | None = None) -> None:
    """Validation loss per recipe: the mean as a bar with a +-1 std error bar, every seed a dot; the teacher's as a
    dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["recipe"] for s in summary]
    means = [s["val_loss"]["mean"] for s in summary]
    stds = [s["val_loss"]["std"] for s in summary]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4), dpi=100)
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.6)
    for i, s in enumerate(summary):
        ax.plot([i] * len(s["val_loss"]["values"]), s["val_loss"]["values"], "o", color="black", markersize=3)
    low = min(min(s["val_loss"]["values"]) for s in summary)
    high = max(max(s["val_loss"]["values"]) for s in summary)
    if teacher_loss is not None:
        ax.axhline(teacher_loss, color="tab:red", linestyle="--", label=f"teacher {teacher_loss:.4f}")
        ax.legend(loc="upper right", fontsize=8)
        low = min(low, teacher_loss)
    ax.set_ylim(low - 0.2 * (high - low + 1e-3), high + 0.2 * (high - low + 1e-3))
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"student validation loss, mean ± std over {summary[0]['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(out: Path, sizes: Sizes, recipes: list[str]) -> list[dict]:
    started = time.perf_counter()
    student_cfg = str(CONFIGS / "demo.yaml")
    teacher_dir = out / "teacher"
    common = sizes.common()
    teacher_model = sizes.model(sizes.teacher_width, sizes.teacher_layers, sizes.teacher_steps)
    if not (teacher_dir / "final").is_dir():  # rerunning continues: finished runs are kept
        run_distill(
            ["train", "--config", str(CONFIGS / "demo_teacher.yaml"), f"output_dir={teacher_dir}", *teacher_model]
            + common
        )
    teacher = f"teacher.path={teacher_dir / 'final'}"
    student = sizes.model(sizes.student_width, sizes.student_layers, sizes.student_steps)
    models = {}
    previous = out / "headline.json"  # a rerun keeps the training times of the runs it does not repeat
    timings = json.loads(previous.read_text()).get("train_seconds", {}) if previous.is_file() else {}

    def train(name: str, seed: int, work: Path) -> None:
        recipe = RECIPES[name]
        overrides = [*student, *common, f"train.seed={seed}"]
        # FitNets' first stage: hints alone for a quarter of the student's steps.
        stage = max(1, load_config(student_cfg, overrides).train.max_steps // 4)
        fill = {"teacher": str(teacher_dir / "final"), "work": str(work), "hint_steps": stage}
        t0 = time.perf_counter()
        if recipe.prepare is not None:
            recipe.prepare(student_cfg, teacher, work, overrides)
        recipe_overrides = [o.format(**fill) for o in recipe.overrides]
        run_distill(["train", "--config", student_cfg, f"output_dir={work}", teacher, *recipe_overrides, *overrides])
        timings[f"{name}/seed{seed}"] = time.perf_counter() - t0

    todo = []
    for seed in range(sizes.seeds):  # seed by seed: an interrupted experiment has whole seeds done
        for name in recipes:
            work = out / "students" / _slug(name) / f"seed{seed}"
            if not (work / "final").is_dir():
                todo.append((name, seed, work))
    with concurrent.futures.ThreadPoolExecutor(max(1, sizes.jobs)) as pool:
        for done in [pool.submit(train, *job) for job in todo]:
            done.result()  # the first failure stops the experiment with its exit status
    for name in recipes:
        for seed in range(sizes.seeds):
            models[f"{name}/seed{seed}"] = (name, seed, out / "students" / _slug(name) / f"seed{seed}" / "final")
    results = out / "eval.json"
    eval_args = ["eval", "--config", student_cfg, teacher, *common, f"eval.prompts={sizes.eval_prompts}"]
    eval_args += ["--json", str(results), "--model", f"teacher={teacher_dir / 'final'}"]  # the reference row
    for label, (_, _, final) in models.items():
        eval_args += ["--model", f"{label}={final}"]
    run_distill(eval_args)
    evaluated = {r["model"]: r for r in json.loads(results.read_text())}
    reference = {k: v for k, v in evaluated["teacher"].items() if k != "completions"}
    rows = []
    for label, (name, seed, _) in models.items():
        row = {k: v for k, v in evaluated[label].items() if k != "completions"}
        rows.append({**row, "recipe": name, "seed": seed})
    for compared_with, key in ((BASELINE, "val_loss_vs_ce"), (KD, "val_loss_vs_kd")):
        paired = {r["seed"]: r["val_loss"] for r in rows if r["recipe"] == compared_with}
        for r in rows:
            if r["recipe"] != compared_with and r["seed"] in paired:
                r[key] = r["val_loss"] - paired[r["seed"]]
    summary = summarise(rows, recipes, sizes.seeds)
    md = table(summary, reference)
    plot(summary, out / "headline.png", reference["val_loss"])
    seconds = time.perf_counter() - started
    record = {"sizes": sizes.__dict__, "seconds": seconds, "train_seconds": timings, "summary": summary, "rows": rows}
    record["teacher"] = reference
    (out / "headline.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "headline.md").write_text(md + "\n")
    print(f"\n{md}\n\n{len(rows)} students, {sizes.seeds} seed(s) each; {seconds:.0f} s; wrote {out}/headline.*")
    return summary


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/headline")
    p.add_argument("--seeds", type=int, default=3, help="student seeds per recipe (init and data order)")
    p.add_argument("--teacher-steps", type=int, help="default: configs/demo_teacher.yaml's train.max_steps")
    p.add_argument("--student-steps", type=int, help="default: configs/demo.yaml's train.max_steps")
    p.add_argument("--max-documents", type=int, help="default: the configs' data.max_documents")
    p.add_argument("--teacher-width", type=int, help="teacher hidden size (default: the config's)")
    p.add_argument("--teacher-layers", type=int)
    p.add_argument("--student-width", type=int, help="student hidden size (default: the config's)")
    p.add_argument("--student-layers", type=int)
    p.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts for the generation metrics")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES), metavar="NAME")
    p.add_argument("--jobs", type=int, default=1, help="student runs at once (each one thread when > 1)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every run")
    a = p.parse_args(argv)
    sizes = Sizes(
        a.seeds,
        a.teacher_steps,
        a.student_steps,
        a.max_documents,
        a.teacher_width,
        a.teacher_layers,
        a.student_width,
        a.student_layers,
        a.eval_prompts,
        a.overrides,
        a.jobs,
    )
    if a.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every `distill` process
    run(Path(a.output_dir), sizes, a.recipes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
