"""benchmarks/store.py at a tiny size (bytes, reader speed, precompute and step ratios of every store kind and
encoding), so that the command docs/store.md quotes its figures from keeps running. benchmarks/store_curve.py runs
at a reduced size in tests/test_report.py, on the reduced headline's teacher and students."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_store_benchmark_prints_every_store_at_a_tiny_size():
    args = [
        str(ROOT / "benchmarks" / "store.py"), "--tokens", "256", "--seq-len", "32", "--repeats", "1",
        "--vocab-small", "300", "--vocab-large", "70000", "--teacher-hidden", "32", "--teacher-layers", "1",
        "--student-hidden", "32", "--student-layers", "1", "--step-stores", "top64-plain", "sampled16-packed",
    ]  # fmt: skip
    proc = run_cli(args, launcher=[sys.executable], timeout=300)
    record = json.loads(proc.stdout[: proc.stdout.index("\n}\n") + 3])
    stores = record["stores"]
    assert set(stores) == {"top64-plain", "top64-packed", "sampled16-plain", "sampled16-packed", "sampled32-packed"}
    for name, entry in stores.items():
        assert entry["reader_tokens_per_s_per_core"] > 0 and entry["bytes_per_token_V32k"] > 0, name
    # Packing saves bytes where ids need fewer than 16 bits (V=300: 9 bits) and costs nothing in sampled targets.
    assert stores["top64-packed"]["bytes_per_token_V32k"] < stores["top64-plain"]["bytes_per_token_V32k"]
    assert stores["sampled16-packed"]["bytes_per_token_V32k"] < stores["sampled16-plain"]["bytes_per_token_V32k"]
    assert stores["sampled16-packed"]["bytes_per_token_V32k"] < stores["sampled32-packed"]["bytes_per_token_V32k"]
    assert stores["sampled16-packed"]["offline_kd_vs_ce_step"] > 0 and record["precompute_vs_forward"] > 0
    assert "| sampled16-packed |" in proc.stdout and "| precompute vs bare teacher forward |" in proc.stdout
