"""The built-in demo, as `make demo` runs it (slow: about 10 minutes on 2 CPU cores)."""

import json
import sys

import pytest

from .helpers import run_cli

pytestmark = pytest.mark.slow


def test_demo_distilled_students_beat_the_ce_only_student(tmp_path):
    out = tmp_path / "demo"
    # Both cores, as `make demo` runs it (the suite pins OMP_NUM_THREADS=1 for its many small processes).
    proc = run_cli(
        ["demo", "--output-dir", str(out), "logging.progress=false"], timeout=2400, env={"OMP_NUM_THREADS": None}
    )
    print(proc.stdout[-2000:], file=sys.stderr)
    rows = {r["model"]: r for r in json.loads((out / "results.json").read_text())}
    teacher, ce = rows["teacher"], rows["student (CE only)"]
    online, offline = rows["student (distilled online)"], rows["student (distilled offline, top-64)"]
    sampled = rows["student (teacher samples, top-64)"]  # distill generate, verify-store, then train on the samples
    assert teacher["val_tokens"] == online["val_tokens"] == offline["val_tokens"] == ce["val_tokens"] > 0
    assert sampled["val_tokens"] == ce["val_tokens"]  # evaluated on the same tokens
    assert online["val_loss"] < ce["val_loss"], rows
    assert offline["val_loss"] < ce["val_loss"], rows
    assert sampled["val_loss"] < ce["val_loss"], rows  # 4.2501 against 4.5041 in the README's run
    assert teacher["val_loss"] < online["val_loss"], rows
    assert "| student (distilled online) |" in proc.stdout
    assert "ok: store" in proc.stdout and "ok: sample store" in proc.stdout  # the demo's stores verified
