"""The built-in demo, as `make demo` runs it (slow: about 10 minutes on 2 CPU cores)."""

import json
import sys

import pytest

from .conftest import run_cli

pytestmark = pytest.mark.slow


def test_demo_distilled_student_beats_ce_only_student(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli(["demo", "--output-dir", str(out), "logging.progress=false"], timeout=1500)
    print(proc.stdout[-2000:], file=sys.stderr)
    rows = {r["model"]: r for r in json.loads((out / "results.json").read_text())}
    teacher, kd, ce = rows["teacher"], rows["student (distilled)"], rows["student (CE only)"]
    assert teacher["val_tokens"] == kd["val_tokens"] == ce["val_tokens"] > 0
    assert kd["val_loss"] < ce["val_loss"], rows
    assert teacher["val_loss"] < kd["val_loss"], rows
    assert "| student (distilled) |" in proc.stdout
