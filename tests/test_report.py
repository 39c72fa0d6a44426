"""`distill report`: PNG plots and report.md for finished and in-progress runs (read back as images), wandb images;
and the headline experiment (benchmarks/headline.py) at a reduced size (one of its hint recipes among them), followed
by the store curve (benchmarks/store_curve.py) over the same runs."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from distributed_distill import lock
from distributed_distill.eval.report import DPI, SIZE_INCHES, report, run_status

from .helpers import ROOT, read_metrics, run_cli

TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]  # matplotlib's first three series colours


def _pixels(png, colour) -> int:
    rgb = np.asarray(Image.open(png).convert("RGB"))
    return int((rgb == np.array(colour, dtype=np.uint8)).all(-1).sum())


def _in_progress(finished, tmp_path):
    """The same run as it looks while training: no final/, metrics up to step 3, a torn line being appended."""
    run = tmp_path / "running"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns("final", "step-*", "report"))
    lines = (run / "metrics.jsonl").read_text().splitlines()[:3]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    return run


def test_report_plots_finished_and_in_progress_runs(smoke_run, tmp_path):
    running = _in_progress(smoke_run, tmp_path)
    out = tmp_path / "report"
    lock.acquire(running, "output_dir")  # a job holds the run directory, as a training run does
    try:
        text = report([smoke_run, running], out, wandb=False)
    finally:
        lock.release(running)
    assert f"run: {smoke_run} (finished)" in text and f"run: {running} (running)" in text
    assert "steps: 5 of 5" in text and "steps: 3 of 5" in text and "skipped its last line" in text
    md = (out / "report.md").read_text()
    assert "| finished | 5 / 5 |" in md and "| running | 3 / 5 |" in md and "![loss](loss.png)" in md
    for name, panels in (("loss", 2), ("components", 2), ("diagnostics", 3), ("throughput", 1), ("lr", 1)):
        image = Image.open(out / f"{name}.png")
        assert image.format == "PNG"
        assert image.size == (int(SIZE_INCHES[0] * DPI * panels), int(SIZE_INCHES[1] * DPI)), name
        rgb = np.asarray(image.convert("RGB"))
        assert (rgb < 250).any(-1).mean() > 0.02, f"{name}.png is blank"
        # One series per run: each run's colour is drawn, and no third series exists.
        if name != "diagnostics":  # (the in-progress copy has the same diagnostics: lines overlap)
            assert _pixels(out / f"{name}.png", TAB10[0]) > 30 and _pixels(out / f"{name}.png", TAB10[1]) > 30, name
        assert _pixels(out / f"{name}.png", TAB10[2]) == 0, name


@pytest.mark.slow
def test_report_logs_the_plots_to_wandb(smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["logging"]["wandb"].update(mode="offline", dir=str(tmp_path / "wandb"))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    run_cli(["report", str(run)], env={"WANDB_MODE": None}, timeout=180)
    images = list((tmp_path / "wandb").rglob("media/images/report/*.png"))
    assert {p.name.split("_")[0] for p in images} == {"loss", "components", "diagnostics", "throughput", "lr"}


@pytest.mark.slow
def test_headline_command_at_reduced_size(tmp_path):
    out = tmp_path / "headline"
    recipes = [
        "CE only (no teacher)",
        "forward KL",
        "offline sampled 16, packed (forward KL)",
        "teacher samples, top-64",
        "hints, then forward KL",
    ]
    args = [
        str(ROOT / "benchmarks" / "headline.py"), "--output-dir", str(out), "--seeds", "2", "--jobs", "2",
        "--teacher-steps", "4", "--student-steps", "3", "--max-documents", "24",
        "--teacher-width", "64", "--student-width", "32", "--eval-prompts", "2",
        "data.seq_len=64", "train.micro_batch_size=4", "train.eval_batches=2", "train.log_every=1",
        "generate.max_prompts=8", "generate.sampling.max_new_tokens=16", "generate.batch_size=8", "--recipes", *recipes,
    ]  # fmt: skip
    proc = run_cli(args, launcher=[sys.executable], timeout=900)
    record = json.loads((out / "headline.json").read_text())
    assert [s["recipe"] for s in record["summary"]] == recipes
    for s in record["summary"]:
        assert s["seeds"] == 2 and len(s["val_loss"]["values"]) == 2
        assert s["val_loss"]["min"] <= s["val_loss"]["mean"] <= s["val_loss"]["max"]
    assert "val_forward_kl" in record["summary"][1] and len(record["rows"]) == 10
    # The paired columns: each recipe's loss minus the CE-only student's, and minus the forward-KL student's, of the
    # same seed (none for the reference itself).
    loss = {(r["recipe"], r["seed"]): r["val_loss"] for r in record["rows"]}
    assert "val_loss_vs_ce" not in record["summary"][0] and "val_loss_vs_kd" not in record["summary"][1]
    for s in record["summary"]:
        for key, reference in (("val_loss_vs_ce", recipes[0]), ("val_loss_vs_kd", recipes[1])):
            if s["recipe"] != reference:
                expected = [loss[(s["recipe"], seed)] - loss[(reference, seed)] for seed in (0, 1)]
                assert s[key]["values"] == pytest.approx(expected, abs=1e-12)
    # FitNets' stages in 3 steps: hints alone for the first (a quarter, at least one), then forward KL alone.
    stages = read_metrics(out / "students" / "hints__then_forward_kl" / "seed0")
    assert [r["hint_weight"] for r in stages] == [1.0, 0.0, 0.0] and "hint_loss/1-2" in stages[0]
    table = (out / "headline.md").read_text()
    assert all(f"| {name} | " in table for name in recipes) and "±" in table and table in proc.stdout
    # The teacher evaluated beside its students, through the same path: its KL to itself is zero, agreement one.
    teacher = record["teacher"]
    assert teacher["val_forward_kl"] == pytest.approx(0, abs=1e-6) and teacher["val_top1_agreement"] == 1.0
    assert f"| teacher (reference) | {teacher['val_loss']:.4f} | " in table
    image = Image.open(out / "headline.png")
    assert image.format == "PNG" and (np.asarray(image.convert("RGB")) < 250).any(-1).mean() > 0.02
    store_curve_at_reduced_size(out, args[args.index("--teacher-steps") : args.index("--eval-prompts")])


def store_curve_at_reduced_size(out: Path, sizes: list[str]) -> None:
    """benchmarks/store_curve.py over the reduced headline's directory: its teacher and seed-0 CE-only and forward-KL
    students are reused (finished runs are kept), so only the stores' students train: top-8 plain and packed, and
    4 sampled draws."""
    args = [
        str(ROOT / "benchmarks" / "store_curve.py"), "--output-dir", str(out), "--seeds", "1", "--ks", "8",
        "--jobs", "2", "--draws", "4", *sizes, "data.seq_len=64", "train.micro_batch_size=4", "train.eval_batches=2",
        "train.log_every=1",
    ]  # fmt: skip
    proc = run_cli(args, launcher=[sys.executable], timeout=900)
    record = json.loads((out / "store_curve.json").read_text())
    stores = {r["store"]: r for r in record["stores"]}
    assert list(stores) == ["top-8, plain", "top-8, packed", "sampled 4, packed"]
    rows = json.loads((out / "headline.json").read_text())["rows"]
    loss = {r["recipe"]: r["val_loss"] for r in rows}
    gain = loss["forward KL"] - loss["CE only (no teacher)"]
    assert record["online_gain"] == [pytest.approx(gain)]
    slugs = {"top-8, plain": "top_8__plain", "top-8, packed": "top_8__packed", "sampled 4, packed": "sampled_4__packed"}
    for name, r in stores.items():
        # The share of the gain is the paired ratio, and the bytes are the store's own manifest figure.
        assert r["share"] == pytest.approx((loss[name] - loss["CE only (no teacher)"]) / gain)
        manifest = json.loads((out / "students" / slugs[name] / "seed0" / "store" / "manifest.json").read_text())
        assert r["bytes_per_token"] == manifest["bytes_per_token"] > 0 and manifest["encoding"] == name.split(", ")[1]
    assert stores["sampled 4, packed"]["bytes_per_token"] < stores["top-8, plain"]["bytes_per_token"]
    table = (out / "store_curve.md").read_text()
    assert all(f"| {name} | " in table for name in stores) and table in proc.stdout
    image = Image.open(out / "store_curve.png")
    assert image.format == "PNG" and (np.asarray(image.convert("RGB")) < 250).any(-1).mean() > 0.02


def test_a_resumed_run_is_not_finished_by_an_earlier_export(smoke_run, tmp_path):
    """A finished run resumed with a larger train.max_steps keeps its earlier final/ while it trains on: running while
    its job holds the directory, stopped (resumable) once it does not; finished only at its max_steps (issue 23)."""
    resumed = tmp_path / "resumed"
    shutil.copytree(smoke_run, resumed, ignore=shutil.ignore_patterns("report"))
    config = resumed / "config.yaml"
    config.write_text(config.read_text().replace("max_steps: 5", "max_steps: 8"))
    assert (resumed / "final").is_dir() and run_status(resumed) == "stopped"
    lock.acquire(resumed, "output_dir")
    try:
        assert run_status(resumed) == "running"
        text = report([resumed], tmp_path / "report", wandb=False)
    finally:
        lock.release(resumed)
    assert f"run: {resumed} (running)" in text and "steps: 5 of 8" in text
    assert run_status(resumed) == "stopped" and run_status(smoke_run) == "finished"


def test_output_paths_are_checked_before_the_work(smoke_run, tmp_path, capsys):
    """`distill eval --json` and `distill report --out` that cannot be written are refused before any evaluation or
    plot: nothing printed or made but the error line (issue 23)."""
    from distributed_distill import cli

    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = f"s={smoke_run / 'final'}"
    assert cli.main(["eval", "--model", model, "--json", str(blocker / "eval.json")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: --json {blocker / 'eval.json'} cannot be written: {blocker} is a file")
    assert cli.main(["report", str(smoke_run), "--out", str(blocker / "report")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "cannot be written" in err and blocker.read_text() == "x"


@pytest.mark.slow
def test_eval_json_in_a_missing_directory_is_written_there(smoke_run, tmp_path):
    from distributed_distill import cli

    model = f"s={smoke_run / 'final'}"
    target = tmp_path / "new" / "dir" / "eval.json"
    overrides = ["eval.prompts=0", "train.eval_batches=1", "data.max_documents=40", "data.seq_len=64"]
    assert cli.main(["eval", "--model", model, "--json", str(target), *overrides]) == 0
    assert json.loads(target.read_text())[0]["model"] == "s"
