"""benchmarks/peers.py and benchmarks/loss_memory.py with the peers at a tiny size: every system trains on the same
sequences from the same start, and the loss each logs matches a float64 recomputation under its own convention; the
peers' chunked losses compute the same sums and gradients as this project's (docs/peers.md).

The peers are an optional extra, in a venv of their own: `make test-peers` builds .venv-peers and runs these with
its interpreter (DISTILL_PEERS_PYTHON); CI runs it. Marker `peers`, outside the other tiers. Without the peers
installed these tests fail and say how to install them: a skip here would check nothing.
"""

import json
import os
import subprocess
import sys

import pytest

from .helpers import ROOT

PEERS_PYTHON = os.environ.get("DISTILL_PEERS_PYTHON") or sys.executable
pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def peers_python() -> str:
    probe = (
        "import importlib.util as u; print(','.join(p for p in ('trl', 'torchtune', 'torchao', 'liger_kernel') "
        "if not u.find_spec(p)))"
    )
    done = subprocess.run([PEERS_PYTHON, "-c", probe], capture_output=True, text=True, timeout=120)
    missing = done.stdout.strip() if done.returncode == 0 else f"{PEERS_PYTHON} does not run"
    if missing:
        pytest.fail(f"peers not installed for {PEERS_PYTHON} ({missing}): run `make test-peers` (docs/peers.md)")
    return PEERS_PYTHON


def test_peers_benchmark_tiny(tmp_path, peers_python):
    out = tmp_path / "peers.json"
    cmd = [peers_python, str(ROOT / "benchmarks" / "peers.py"), "--tiny", "--repeats", "2", "--work", str(tmp_path)]
    done = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| distributed_distill |" in done.stdout  # the table
    systems = json.loads(out.read_text())["systems"]
    assert set(systems) == {"distributed_distill", "trl_gkd", "trl_distillation", "torchtune"}
    for name, r in systems.items():
        assert "skipped" not in r, f"{name}: {r.get('skipped')}"
        assert r["tokens_per_second"] > 0 and r["peak_rss_bytes"] > 0
        # Two repeats, each a fresh process that trained the same steps: the same losses, its own timings.
        assert len(r["repeats"]) == 2 and len(r["step_seconds"]) == 2 * 2  # steps 2..3 of each repeat
        assert r["repeats"][0]["reported_loss"] == r["repeats"][1]["reported_loss"], name
        assert all(x["cpu_seconds"] > 0 and x["wall_seconds"] > 0 for x in r["repeats"])
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


def test_loss_memory_benchmark_with_the_peers_tiny(peers_python):
    """benchmarks/loss_memory.py with Liger's and torchtune's chunked losses beside this project's and the naive
    loss: every path computes the same KD and CE sums and gradients, and the table prints every path's figures."""
    cmd = [peers_python, str(ROOT / "benchmarks" / "loss_memory.py"), "--tokens", "256", "--hidden", "64",
           "--vocab", "4000", "--repeats", "2", "--paths", "naive,chunked,liger,torchtune"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    for path in ("naive", "chunked", "liger", "torchtune"):
        r = result[path]
        assert len(r["seconds_all"]) == len(r["cpu_seconds_all"]) == 2
        assert r["seconds"] > 0 and r["cpu_seconds"] > 0 and r["peak_bytes"] > 0
        assert f"| {path} |" in done.stdout
    for path in ("liger", "torchtune"):
        agreement = result[path]["agreement_with_naive"]
        assert agreement["ce_sum_rel_diff"] < 1e-5, (path, agreement)
        assert agreement["grad_norm_weight_rel_diff"] < 1e-4 and agreement["grad_norm_hidden_rel_diff"] < 1e-4
    # Liger's soft loss is forward KL itself; torchtune's is -sum p_T log p_S (KL + H(p_T)), the same gradient.
    assert result["liger"]["agreement_with_naive"]["kd_sum_rel_diff"] < 1e-5
    assert result["agreement"]["kd_sum_rel_diff"] < 1e-5 and result["agreement"]["grad_norm_weight_rel_diff"] < 1e-5
