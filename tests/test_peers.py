"""benchmarks/peers.py at a tiny size: every system trains on the same sequences from the same start, and the loss
each logs matches a float64 recomputation under its own convention (docs/peers.md).

The peers are an optional extra. The test runs them with the interpreter in DISTILL_PEERS_PYTHON (a separate venv,
as docs/peers.md sets up), else this one, and skips with the reason when TRL or torchtune is not importable there.
"""

import json
import os
import subprocess
import sys

import pytest

from .helpers import ROOT

PEERS_PYTHON = os.environ.get("DISTILL_PEERS_PYTHON") or sys.executable


def _missing_peers() -> str | None:
    probe = (
        "import importlib.util as u; print(','.join(p for p in ('trl', 'torchtune', 'torchao') if not u.find_spec(p)))"
    )
    done = subprocess.run([PEERS_PYTHON, "-c", probe], capture_output=True, text=True, timeout=120)
    missing = done.stdout.strip() if done.returncode == 0 else f"{PEERS_PYTHON} does not run"
    return missing or None


@pytest.mark.slow
def test_peers_benchmark_tiny(tmp_path):
    missing = _missing_peers()
    if missing:
        pytest.skip(f"peers not installed for {PEERS_PYTHON} ({missing}): pip install -e .[peers]")
    out = tmp_path / "peers.json"
    cmd = [PEERS_PYTHON, str(ROOT / "benchmarks" / "peers.py"), "--tiny", "--work", str(tmp_path / "w")]
    done = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| distributed_distill |" in done.stdout  # the table
    systems = json.loads(out.read_text())["systems"]
    assert set(systems) == {"distributed_distill", "trl_gkd", "trl_distillation", "torchtune"}
    for name, r in systems.items():
        assert "skipped" not in r, f"{name}: {r.get('skipped')}"
        assert r["tokens_per_second"] > 0 and r["peak_rss_bytes"] > 0
        # Same start, same batch: every system's first step is the same float64 objective (torchtune's own
        # float64 forward is its own model code: 4e-9 apart at the benchmark's size).
        first = systems["distributed_distill"]["float64"]["first"]
        assert r["float64"]["first"]["kl"] == pytest.approx(first["kl"], rel=1e-7)
        convention = "cross_entropy_to_teacher" if name == "torchtune" else "kl"
        for when in ("first", "last"):
            # float32 against float64; log p_T - log p_S cancels, so an absolute term too
            expected = pytest.approx(r["float64"][when][convention], rel=1e-5, abs=5e-6)
            assert r["reported_loss"][when] == expected, (name, when)
    # Full fine-tuning everywhere but torchtune, whose KD recipe trains LoRA adapters only.
    assert systems["torchtune"]["trainable_parameters"] < systems["distributed_distill"]["trainable_parameters"]
    assert systems["trl_gkd"]["trainable_parameters"] == systems["distributed_distill"]["trainable_parameters"]
