"""Several teachers, measured: a code teacher and a chat teacher, mixed or routed by the data, against the student
trained without them, on each slice of the mixed data.

    python benchmarks/multi_teacher.py            # the docs/serving.md table ("Several teachers: measured")
    python benchmarks/multi_teacher.py --tiny     # seconds-sized models and steps: the slow test's run

1. One BPE tokenizer (the ChatML markers included) trained on the training documents of the built-in mixed corpus
   (`python-stdlib-mixed`: each standard-library file's text and its "write this function" conversations) and given
   by tokenizer.path to every run: all models share it.
2. Two teachers, each a real `distill train` with CE alone: `code` on `python-stdlib`, `chat` on
   `python-stdlib-chat`. Same files, same val_fraction: neither ever sees a held-out file of the students.
3. Three students of one size, seed, step budget and data order on `python-stdlib-mixed`: CE only; KD from the
   mixture of both teachers (distill.teacher_mix=mixture, equal weights); KD routed by the corpus's teacher_id
   column (code rows by `code`, conversations by `chat`).
4. One `distill eval` per slice: the code slice is python-stdlib's validation split, the chat slice
   python-stdlib-chat's (the held-out files' text and conversations, which python-stdlib-mixed holds out too); the
   teachers are evaluated as references.

Writes --output-dir/multi_teacher.json (every loss, the paired differences to the CE-only student of the same seed)
and multi_teacher.md (the table), and prints the JSON summary, then the table. Positional `section.key=value`
overrides apply to every training run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distributed_distill.config import DataConfig
from distributed_distill.data.documents import (
    BUILTIN_CHAT,
    BUILTIN_CORPUS,
    BUILTIN_MIXED,
    documents,
    texts_for_tokenizer,
)
from distributed_distill.demo import CONFIGS, run_distill
from distributed_distill.tokenizer import train_bpe_tokenizer

SLICES = {"code": BUILTIN_CORPUS, "chat": BUILTIN_CHAT}  # slice (= the teacher trained on it) -> its corpus
CE, MIXTURE, ROUTE = "CE only (no teacher)", "mixture of both teachers", "routed by teacher_id"


@dataclass
class Sizes:
    seeds: int = 2
    max_documents: int | None = 800  # evenly spaced standard-library files; None: all of them
    val_fraction: float = 0.1
    seq_len: int = 256
    vocab: int = 2048
    teacher_width: int = 128
    teacher_layers: int = 2
    teacher_steps: int = 200
    student_width: int = 64
    student_layers: int = 1
    student_steps: int = 100
    micro_batch: int = 16
    top_k: int = 64
    jobs: int = 2  # runs at once (each one thread when > 1)
    overrides: list[str] = field(default_factory=list)


TINY = Sizes(
    seeds=1,
    max_documents=120,
    val_fraction=0.2,
    seq_len=256,
    vocab=512,
    teacher_width=32,
    teacher_layers=1,
    teacher_steps=6,
    student_width=16,
    student_layers=1,
    student_steps=4,
    micro_batch=4,
    top_k=16,
)


def data_args(s: Sizes, source: str) -> list[str]:
    """The data of every run and of every evaluation: one file selection, one split, one sequence length."""
    out = [f"data.source={source}", f"data.val_fraction={s.val_fraction}", f"data.seq_len={s.seq_len}"]
    return out + [f"data.max_documents={s.max_documents if s.max_documents else 'null'}"]


def model_args(width: int, layers: int, steps: int, s: Sizes) -> list[str]:
    heads = max(1, width // 32)
    arch = f"{{family: llama, hidden_size: {width}, num_layers: {layers}, num_heads: {heads}, "
    arch += f"max_position_embeddings: {s.seq_len}}}"
    return [
        f"student.arch={arch}",
        f"train.max_steps={steps}",
        f"train.warmup_steps={min(steps, 20)}",
        f"train.micro_batch_size={s.micro_batch}",
        "train.eval_batches=4",
        "logging.progress=false",
    ]


def train_tokenizer(s: Sizes, out: Path) -> Path:
    """The shared tokenizer: a BPE of s.vocab tokens with the ChatML markers, trained on the mixed corpus's
    training documents (the held-out files excluded)."""
    if not out.is_dir():
        dcfg = DataConfig(source=BUILTIN_MIXED, max_documents=s.max_documents, val_fraction=s.val_fraction)
        train_bpe_tokenizer(texts_for_tokenizer(documents(dcfg)), s.vocab, out, chat=True)
    return out


def student_recipes(teachers: dict[str, Path], s: Sizes) -> dict[str, list[str]]:
    named = ", ".join(f"{{name: {name}, path: {path}}}" for name, path in teachers.items())
    kd = [f"teachers=[{named}]", f"distill.top_k={s.top_k}", "distill.alpha=0.5", "distill.loss=forward_kl"]
    return {
        CE: ["distill.alpha=0"],
        MIXTURE: [*kd, "distill.teacher_mix=mixture"],
        ROUTE: [*kd, "distill.teacher_mix=route", "data.teacher_column=teacher_id"],
    }


def run(out: Path, s: Sizes) -> dict:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(s, out / "tokenizer")
    common = [f"tokenizer.path={tokenizer}", "teacher=null", *s.overrides]
    config = str(CONFIGS / "demo.yaml")
    seconds: dict[str, float] = {}

    def train(name: str, work: Path, args: list[str]) -> None:
        if (work / "final").is_dir():  # a rerun continues: finished runs are kept
            return
        t0 = time.perf_counter()
        run_distill(["train", "--config", config, f"output_dir={work}", *args, *common])
        seconds[name] = time.perf_counter() - t0

    def parallel(jobs: list[tuple[str, Path, list[str]]]) -> None:
        with concurrent.futures.ThreadPoolExecutor(max(1, s.jobs)) as pool:
            for done in [pool.submit(train, *job) for job in jobs]:
                done.result()  # the first failure stops the experiment with its exit status

    teachers = {name: out / "teachers" / name for name in SLICES}
    teacher_model = model_args(s.teacher_width, s.teacher_layers, s.teacher_steps, s)
    parallel(
        [
            (f"teacher {name}", work, [*teacher_model, *data_args(s, SLICES[name]), "distill.alpha=0"])
            for name, work in teachers.items()
        ]
    )
    finals = {name: work / "final" for name, work in teachers.items()}
    recipes = student_recipes(finals, s)
    student_model = model_args(s.student_width, s.student_layers, s.student_steps, s)
    students = {
        (name, seed): out / "students" / _slug(name) / f"seed{seed}" for seed in range(s.seeds) for name in recipes
    }
    parallel(
        [
            (
                f"{name}/seed{seed}",
                work,
                [*student_model, *data_args(s, BUILTIN_MIXED), *recipes[name], f"train.seed={seed}"],
            )
            for (name, seed), work in students.items()
        ]
    )
    # Each slice: every model on the same held-out tokens.
    losses: dict[str, dict[str, float]] = {}
    for slice_name, source in SLICES.items():
        results = out / f"eval_{slice_name}.json"
        args = ["eval", "--config", config, *common, "distill.alpha=0", "eval.prompts=0", *data_args(s, source)]
        args += ["--json", str(results)]
        for name, final in finals.items():
            args += ["--model", f"teacher {name}={final}"]
        for (name, seed), work in students.items():
            args += ["--model", f"{name}/seed{seed}={work / 'final'}"]
        run_distill(args)
        for row in json.loads(results.read_text()):
            losses.setdefault(row["model"], {})[slice_name] = row["val_loss"]
            losses[row["model"]][f"{slice_name}_tokens"] = row["val_tokens"]
    record = summarise(losses, s, list(recipes))
    record["seconds"] = time.perf_counter() - started
    record["train_seconds"] = seconds
    md = table(record)
    (out / "multi_teacher.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "multi_teacher.md").write_text(md + "\n")
    printed = {k: record[k] for k in ("val_tokens", "teachers", "summary", "seconds")}
    print(f"\n{json.dumps(printed, indent=2)}\n\n{md}\n\n{record['seconds']:.0f} s; wrote {out}/multi_teacher.*")
    return record


def summarise(losses: dict[str, dict[str, float]], s: Sizes, recipes: list[str]) -> dict:
    """Per student recipe and slice: the validation loss (mean and spread over seeds) and its paired difference to
    the CE-only student of the same seed (same initialisation, same data order)."""
    summary = []
    for name in recipes:
        entry: dict = {"student": name}
        for slice_name in SLICES:
            values = [losses[f"{name}/seed{seed}"][slice_name] for seed in range(s.seeds)]
            deltas = [v - losses[f"{CE}/seed{seed}"][slice_name] for seed, v in enumerate(values)]
            entry[slice_name] = _stats(values)
            if name != CE:
                entry[f"{slice_name}_vs_ce"] = _stats(deltas)
        summary.append(entry)
    teachers = {f"teacher {n}": {k: losses[f"teacher {n}"][k] for k in SLICES} for n in SLICES}
    tokens = {k: losses[f"{CE}/seed0"][f"{k}_tokens"] for k in SLICES}
    return {"sizes": asdict(s), "val_tokens": tokens, "teachers": teachers, "summary": summary, "losses": losses}


def _stats(values: list[float]) -> dict:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": spread, "values": values}


def table(record: dict) -> str:
    """Validation loss on each slice, mean ± std over seeds, and the paired difference to CE only; the teachers'
    own losses first, as references."""
    head = ["model"]
    for k in SLICES:
        head += [f"{k} val loss", f"Δ {k} vs CE only, same seed"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, row in record["teachers"].items():
        cells = [c for k in SLICES for c in (f"{row[k]:.4f}", "-")]
        lines.append(f"| {name} (reference) | " + " | ".join(cells) + " |")
    for entry in record["summary"]:
        cells = []
        for k in SLICES:
            loss, delta = entry[k], entry.get(f"{k}_vs_ce")
            cells.append(f"{loss['mean']:.4f} ± {loss['std']:.4f}")
            cells.append(f"{delta['mean']:+.4f} ± {delta['std']:.4f}" if delta else "-")
        lines.append(f"| {entry['student']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/multi_teacher")
    p.add_argument("--tiny", action="store_true", help="seconds-sized models and steps (CI)")
    for key, value in asdict(Sizes()).items():
        if key != "overrides":
            p.add_argument(f"--{key.replace('_', '-')}", type=type(value) if value is not None else int)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every training run")
    a = p.parse_args(argv)
    base = TINY if a.tiny else Sizes()
    given = {k: getattr(a, k) for k in asdict(base) if k != "overrides" and getattr(a, k) is not None}
    sizes = Sizes(**{**asdict(base), **given, "overrides": a.overrides})
    if sizes.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every `distill` process
    run(Path(a.output_dir), sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
