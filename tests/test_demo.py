"""The built-in demo: as `make demo` runs it (the release tier: about 15 minutes on 2 idle CPU cores, longer than
CI's budget allows beside everything else), and every phase of it at a tiny size (the slow tier, in CI)."""

import json
import sys

import pytest

from .helpers import run_cli

pytestmark = pytest.mark.slow

TINY = [
    "train.max_steps=3", "train.warmup_steps=1", "data.max_documents=30", "data.val_fraction=0.2",
    "tokenizer.vocab_size=512", "data.seq_len=64",
    "train.micro_batch_size=4", "train.eval_batches=2", "eval.prompts=2", "eval.max_new_tokens=8",
    "generate.max_prompts=8", "generate.sampling.max_new_tokens=16", "generate.batch_size=8",
]  # fmt: skip


def test_the_demo_command_runs_every_phase_at_a_tiny_size(tmp_path):
    """`distill demo` end to end on a shrunken corpus and step budget: every phase (teacher, online, precompute and
    verify-store, offline, generate and verify-store, teacher samples, CE only, eval) runs through the real CLI and the
    table comes out; what the full size shows (the ordering) is the release tier's test below."""
    out = tmp_path / "demo"
    proc = run_cli(["demo", "--output-dir", str(out), "logging.progress=false", *TINY], timeout=1200)
    rows = {r["model"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {
        "teacher", "student (distilled online)", "student (distilled offline, sampled 16, packed)",
        "student (teacher samples, top-64)", "student (CE only)",
    }  # fmt: skip
    assert len({r["val_tokens"] for r in rows.values()}) == 1
    assert rows["teacher"]["val_forward_kl"] == pytest.approx(0, abs=1e-6)
    assert "ok: store" in proc.stdout and "ok: sample store" in proc.stdout
    assert (out / "results.md").read_text().strip() in proc.stdout


def test_a_phase_that_fails_stops_the_demo_with_its_one_error_line(tmp_path):
    """A phase refused by its own command (here the teacher's: more warmup than steps) stops the demo with that
    command's exit status and its `error:` line, with no traceback of the demo's on top and no later phase run."""
    out = tmp_path / "demo"
    proc = run_cli(["demo", "--output-dir", str(out), "train.max_steps=3"], timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: train.warmup_steps=30 exceeds train.max_steps=3"], proc.stderr
    assert "Traceback" not in proc.stderr and "$ distill precompute" not in proc.stdout
    assert not (out / "results.json").exists()


@pytest.mark.release
def test_demo_distilled_students_beat_the_ce_only_student(tmp_path):
    out = tmp_path / "demo"
    # Both cores, as `make demo` runs it (the suite pins OMP_NUM_THREADS=1 for its many small processes).
    proc = run_cli(
        ["demo", "--output-dir", str(out), "logging.progress=false"], timeout=2400, env={"OMP_NUM_THREADS": None}
    )
    print(proc.stdout[-2000:], file=sys.stderr)
    rows = {r["model"]: r for r in json.loads((out / "results.json").read_text())}
    teacher, ce = rows["teacher"], rows["student (CE only)"]
    online, offline = rows["student (distilled online)"], rows["student (distilled offline, sampled 16, packed)"]
    sampled = rows["student (teacher samples, top-64)"]  # distill generate, verify-store, then train on the samples
    assert teacher["val_tokens"] == online["val_tokens"] == offline["val_tokens"] == ce["val_tokens"] > 0
    assert sampled["val_tokens"] == ce["val_tokens"]  # evaluated on the same tokens
    assert online["val_loss"] < ce["val_loss"], rows
    assert offline["val_loss"] < ce["val_loss"], rows
    assert sampled["val_loss"] < ce["val_loss"], rows  # 4.2501 against 4.5041 in the README's run
    assert teacher["val_loss"] < online["val_loss"], rows
    assert "| student (distilled online) |" in proc.stdout
    assert "ok: store" in proc.stdout and "ok: sample store" in proc.stdout  # the demo's stores verified
