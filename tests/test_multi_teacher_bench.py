"""benchmarks/multi_teacher.py at its --tiny size (docs/serving.md "Several teachers: measured" quotes it at full
size): two teachers and three students trained by real `distill train` runs, each slice evaluated by `distill eval`;
what it prints (the JSON summary and the table) agrees with what it wrote, every loss is finite, every paired
difference is the difference of the losses it pairs. Whether mixture and routing beat CE only is judged at the full
size, in the docs, not at this one."""

from __future__ import annotations

import json
import math

import pytest

from .test_benchmarks import bench, leading_json, table

STUDENTS = ["CE only (no teacher)", "mixture of both teachers", "routed by teacher_id"]
SLICES = ["code", "chat"]


@pytest.mark.slow
def test_multi_teacher_benchmark_trains_both_teachers_and_scores_every_student_on_each_slice(tmp_path):
    out = bench("multi_teacher.py", "--tiny", "--output-dir", str(tmp_path), timeout=600)
    printed = leading_json(out)
    written = json.loads((tmp_path / "multi_teacher.json").read_text())
    assert printed["summary"] == written["summary"] and printed["teachers"] == written["teachers"]
    assert [s["student"] for s in printed["summary"]] == STUDENTS
    assert all(printed["val_tokens"][k] > 0 for k in SLICES)
    losses = written["losses"]
    ce = {k: losses[f"{STUDENTS[0]}/seed0"][k] for k in SLICES}
    for entry in printed["summary"]:
        for k in SLICES:
            (value,) = entry[k]["values"]  # --tiny: one seed
            assert math.isfinite(value) and value > 0
            assert value == losses[f"{entry['student']}/seed0"][k]
            if entry["student"] == STUDENTS[0]:
                assert f"{k}_vs_ce" not in entry
            else:
                assert entry[f"{k}_vs_ce"]["values"] == [value - ce[k]]
    for name in ("teacher code", "teacher chat"):
        assert all(math.isfinite(printed["teachers"][name][k]) for k in SLICES)
    rows = table(out)
    assert rows["model"] == [c for k in SLICES for c in (f"{k} val loss", f"Δ {k} vs CE only, same seed")]
    for entry in printed["summary"]:
        cells = rows[entry["student"]]
        assert [cells[0], cells[2]] == [f"{entry[k]['mean']:.4f} ± 0.0000" for k in SLICES]
    assert rows["teacher chat (reference)"][2] == f"{printed['teachers']['teacher chat']['chat']:.4f}"
    # The routed student's run routed: its metrics name both teachers' KD terms.
    route = tmp_path / "students" / "routed_by_teacher_id" / "seed0"
    records = [json.loads(line) for line in (route / "metrics.jsonl").read_text().splitlines()]
    assert any("kd_loss/code" in r and "kd_loss/chat" in r for r in records)
