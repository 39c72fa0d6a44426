"""`distill report RUN_DIR [RUN_DIR ...]`: plots (PNG) and a Markdown summary from the runs' `metrics.jsonl`.

    distill report runs/demo/student_kd runs/demo/student_ce --out runs/demo/report

Writes into `--out` (default `RUN_DIR/report` for one run, `./report` for several): `loss.png` (train and validation
loss vs tokens, one colour per run), `components.png` (KD and CE terms), `diagnostics.png` (teacher entropy and
top-1 agreement), `hints.png` (distill.hidden runs: the hint loss, per layer pair, and its weight after balancing),
`teachers.png` (several teachers: each teacher's KD term and top-1 agreement, train and validation),
`throughput.png` (tokens/s), `lr.png` (learning rate) and `report.md`. A run not yet finished
(`run_status`: running, or stopped and resumable) reports what it has logged so far. A run whose config has wandb on
gets the plots logged to its wandb run as images. matplotlib comes with the `[eval]` extra.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import lock
from ..checkpoint import MARKER, complete_checkpoints
from ..config import load_config
from ..errors import DistillError
from ..integrity import atomic_write_text
from ..rundir import CONFIG, METRICS, finished_run, read_records
from ..tracking import wandb_kwargs

# The figures: file name -> [(panel title, metric key), ...]; one panel per key, one line per run.
FIGURES = {
    "loss": [("train loss", "loss"), ("validation loss", "val_loss")],
    "components": [("KD loss", "kd_loss"), ("CE loss", "ce_loss")],
    "diagnostics": [
        ("teacher entropy", "teacher_entropy"),
        ("top-1 agreement (train)", "top1_agreement"),
        ("top-1 agreement (validation)", "val_top1_agreement"),
    ],
    # distill.hidden (docs/hints.md): a key ending in "/" is a family, one line per member (here per layer pair).
    "hints": [
        ("hint loss (mean over pairs)", "hint_loss"),
        ("hint loss per layer pair", "hint_loss/"),
        ("hint weight after balancing", "hint_weight"),
    ],
    # Several teachers (`teachers:`): one line per teacher, the student's KD against it alone and its agreement.
    "teachers": [
        ("KD loss per teacher (train)", "kd_loss/"),
        ("KD loss per teacher (validation)", "val_kd_loss/"),
        ("top-1 agreement per teacher (train)", "agreement/"),
        ("top-1 agreement per teacher (validation)", "val_agreement/"),
    ],
    "throughput": [("tokens/s", "tokens_per_second")],
    "lr": [("learning rate", "lr")],
}
LINE_STYLES = ("-", "--", ":", "-.")  # the members of a family, within a run's colour
# Plots against tokens trained on; throughput and the learning rate against the step.
BY_STEP = {"throughput", "lr"}
SIZE_INCHES, DPI = (6.0, 3.6), 100  # a panel's size: a figure of N panels is N panels wide


def read_run(run_dir: Path) -> tuple[list[dict], list[str]]:
    """The run's metrics records, and a note for each line skipped (a torn last line)."""
    path = run_dir / METRICS
    if not path.is_file():
        raise DistillError(f"{run_dir} is not a run directory (no {METRICS})")
    return read_records(path)


def _tokens(records: list[dict]) -> list[float]:
    """Tokens trained on at each record: `tokens_seen`, or for runs logged before it existed, num_tokens x step."""
    return [r.get("tokens_seen", r.get("num_tokens", 0) * r["step"]) for r in records]


def plot(runs: dict[str, list[dict]], out: Path) -> list[Path]:
    """One PNG per figure that some run has data for; each run keeps its colour in every figure."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (a cluster login node, CI)
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10").colors
    written = []
    for name, panels in FIGURES.items():
        panels = [(title, _members(runs, key)) for title, key in panels]
        panels = [
            (title, keys) for title, keys in panels if any(k in r for rs in runs.values() for r in rs for k in keys)
        ]
        if not panels:
            continue
        fig, axes = plt.subplots(
            1, len(panels), figsize=(SIZE_INCHES[0] * len(panels), SIZE_INCHES[1]), dpi=DPI, squeeze=False
        )
        for ax, (title, keys) in zip(axes[0], panels):
            for i, (label, records) in enumerate(runs.items()):
                for j, key in enumerate(keys):
                    have = [r for r in records if r.get(key) is not None]
                    if not have:
                        continue
                    x = [r["step"] for r in have] if name in BY_STEP else _tokens(have)
                    style = "o-" if key.startswith("val_") else LINE_STYLES[j % len(LINE_STYLES)]
                    member = f"{label} {key.rsplit('/', 1)[1]}" if "/" in key else label
                    ax.plot(
                        x, [r[key] for r in have], style, color=colours[i % len(colours)], label=member, markersize=3
                    )
            ax.set_title(title)
            ax.set_xlabel("step" if name in BY_STEP else "tokens")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _members(runs: dict[str, list[dict]], key: str) -> list[str]:
    """The metric keys one panel draws: `key` itself, or for a family ("hint_loss/") every key any run logged in it."""
    if not key.endswith("/"):
        return [key]
    return sorted({k for records in runs.values() for r in records for k in r if k.startswith(key)})


def summary_row(run_dir: Path, records: list[dict]) -> dict:
    """What report.md and the console show of one run."""
    last = records[-1]
    evals = [r for r in records if r.get("val_loss") is not None]
    tps = [r["tokens_per_second"] for r in records if r.get("tokens_per_second")]
    max_steps = None
    if (run_dir / CONFIG).is_file():
        max_steps = load_config(run_dir / CONFIG).train.max_steps
    row = {
        "run": str(run_dir),
        "status": run_status(run_dir),
        "step": last["step"],
        "max_steps": max_steps,
        "first_loss": records[0].get("loss"),
        "loss": last.get("loss"),
        "kd_loss": last.get("kd_loss"),
        "ce_loss": last.get("ce_loss"),
        "tokens_per_second": sum(tps) / len(tps) if tps else None,
    }
    if evals:
        e = evals[-1]
        row.update({k: v for k, v in e.items() if k.startswith(("val_", "gen_"))}, eval_step=e["step"])
    return row


def run_status(run_dir: Path) -> str:
    """finished (exported at its max_steps: an earlier final/ of a run resumed to train longer does not count),
    running (a job holds the run directory's lock), or stopped (resumable by the same command)."""
    if finished_run(run_dir) is not None:
        return "finished"
    return "running" if lock.holder(run_dir) is not None else "stopped"


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict], images: list[Path], notes: list[str]) -> str:
    lines = ["# Run report", ""]
    lines += [f"- note: {n}" for n in notes]
    lines += [
        "| run | status | step | loss (first -> last) | KD | CE | val loss | val ppl | top-1 agree | tokens/s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        step = f"{r['step']}" + (f" / {r['max_steps']}" if r["max_steps"] else "")
        lines.append(
            f"| {r['run']} | {r['status']} | {step} | {_fmt(r['first_loss'])} -> {_fmt(r['loss'])} | "
            f"{_fmt(r['kd_loss'])} | {_fmt(r['ce_loss'])} | {_fmt(r.get('val_loss'))} | "
            f"{_fmt(r.get('val_ppl'), '.2f')} | {_fmt(r.get('val_top1_agreement'), '.3f')} | "
            f"{_fmt(r['tokens_per_second'], ',.0f')} |"
        )
    lines.append("")
    for r in rows:  # several teachers: each one's KD term and agreement at the last evaluation
        if per_teacher_line(r):
            lines += [f"- {r['run']}, per teacher (validation): {per_teacher_line(r)}", ""]
    lines += [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"


def per_teacher_line(row: dict) -> str:
    """Several teachers: `NAME KD x, agreement y` for each teacher of a run's last evaluation ("" without them)."""
    names = [k.split("/", 1)[1] for k in row if k.startswith("val_kd_loss/")]
    return "; ".join(
        f"{n} KD {_fmt(row.get(f'val_kd_loss/{n}'))}, agreement {_fmt(row.get(f'val_agreement/{n}'), '.3f')}"
        for n in names
    )


def text(rows: list[dict], notes: list[str], out: Path, images: list[Path]) -> str:
    """The console summary."""
    lines = [f"note: {n}" for n in notes]
    for r in rows:
        lines.append(f"run: {r['run']} ({r['status']})")
        steps = f"{r['step']}" + (f" of {r['max_steps']}" if r["max_steps"] else "")
        lines.append(
            f"  steps: {steps}  loss: {_fmt(r['first_loss'])} -> {_fmt(r['loss'])} "
            f"(kd {_fmt(r['kd_loss'])}, ce {_fmt(r['ce_loss'])})  tokens/s: mean {_fmt(r['tokens_per_second'], ',.0f')}"
        )
        if r.get("val_loss") is not None:
            lines.append(f"  val_loss: {r['val_loss']:.4f} (ppl {r['val_ppl']:.2f}) at step {r['eval_step']}")
        per_teacher = per_teacher_line(r)
        if per_teacher:
            lines.append(f"  per teacher (validation): {per_teacher}")
        if r["status"] == "finished":
            lines.append(f"  exported student: {Path(r['run']) / 'final'}")
    lines.append(f"wrote {out / 'report.md'} and {len(images)} plot(s) in {out}")
    return "\n".join(lines)


def default_out(run_dirs: list[Path]) -> Path:
    """Where the report goes without --out: RUN_DIR/report for one run, ./report for several."""
    return run_dirs[0] / "report" if len(run_dirs) == 1 else Path("report")


def report(run_dirs: list[Path], out: Path | None = None, wandb: bool = True) -> str:
    """Plots and report.md for the runs; returns the console summary."""
    runs, rows, notes = {}, [], []
    for run_dir in run_dirs:
        records, skipped = read_run(run_dir)
        notes += skipped
        if not records:
            raise DistillError(f"{run_dir}/{METRICS} holds no complete record yet")
        label = run_dir.name if run_dir.name not in runs else str(run_dir)
        runs[label] = records
        rows.append(summary_row(run_dir, records))
    out = out or default_out(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    images = plot(runs, out)
    atomic_write_text(out / "report.md", markdown(rows, images, notes))
    if wandb:
        for run_dir in run_dirs:
            log_images(run_dir, images)
    return text(rows, notes, out, images)


def log_images(run_dir: Path, images: list[Path]) -> None:
    """The plots as images in the run's wandb run (resumed by the id its newest checkpoint records), when the run's
    config has wandb on."""
    if not (run_dir / CONFIG).is_file():
        return
    cfg = load_config(run_dir / CONFIG)
    kwargs = wandb_kwargs(cfg)
    if kwargs is None:
        return
    import wandb

    run_id = None
    for ckpt in complete_checkpoints(run_dir):
        run_id = json.loads((ckpt / MARKER).read_text()).get("wandb_run_id")
        break
    resume = {"id": run_id, "resume": "allow"} if run_id else {}
    run = wandb.init(project=cfg.logging.wandb.project, **kwargs, **resume)
    run.log({f"report/{p.stem}": wandb.Image(str(p)) for p in images})
    run.finish()
