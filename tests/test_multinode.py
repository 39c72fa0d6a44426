"""Two nodes on one machine: the job scripts' launcher block (launch/slurm/*.sbatch, `run_per_node`) run as two
node launchers, node ranks 0 and 1, one process each, meeting at a rendezvous on localhost, exactly as `srun`
starts it on each node of a 2-node job (SLURM_JOB_NUM_NODES, SLURM_NODEID and MASTER_ADDR as SLURM and the
script set them). The result equals one node running the same number of processes. A node whose launcher dies
mid-step ends the job within the collective timeout, naming the lost rank; the newest checkpoint verifies.

The same block submitted to a real two-node SLURM (`sbatch --nodes=2`): tests/test_slurm.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from .helpers import (
    ROOT,
    SMOKE,
    STORE_OVERRIDES,
    accelerate_launch,
    last_step,
    precomputed_store,
    read_metrics,
    snapshot,
    torchrun,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

TRAIN_SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
STEPS = ["train.max_steps=4", "train.eval_every=2", "train.micro_batch_size=2", "distill.alpha=0.5"]


def node_command() -> str:
    """The command each node's task runs (`srun ... bash -c '...'` in run_per_node), verbatim from the script."""
    text = TRAIN_SBATCH.read_text()
    block = text[text.index("# ---- launcher:") : text.index("# ---- end of launcher ----")]
    return block[block.index("bash -c '") + len("bash -c '") : block.index('\' launcher "$@" &')]


def start_nodes(port: int, args: list[str], logs: Path, accelerate_config: str = "") -> list[subprocess.Popen]:
    """Two node launchers, as srun starts them on a 2-node job: node ranks 0 and 1, one process each. Their
    output goes to files in `logs` (a pipe nobody reads would fill up and stall a worker)."""
    logs.mkdir(parents=True, exist_ok=True)
    nodes = []
    for node in (0, 1):
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # torchrun, accelerate of this venv
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_NODEID": str(node),
            "NPROC_PER_NODE": "1",  # 2 CPU cores here: one worker per "node"
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "ACCELERATE_CONFIG": accelerate_config,
        }
        out, err = logs / f"node{node}.out", logs / f"node{node}.err"
        with out.open("w") as stdout, err.open("w") as stderr:
            proc = subprocess.Popen(
                ["bash", "-c", node_command(), "launcher", *args],
                cwd=ROOT,
                env=env,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,  # each "node" is its own process tree, killed as a whole on failure
            )
        proc.logs = (out, err)
        nodes.append(proc)
    return nodes


def wait_nodes(nodes: list[subprocess.Popen], timeout: float) -> list[subprocess.CompletedProcess]:
    deadline = time.monotonic() + timeout
    results = []
    for node in nodes:
        try:
            node.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for n in nodes:
                os.killpg(n.pid, signal.SIGKILL)
            pytest.fail(f"node launcher {node.args[-1]} hung for more than {timeout} s")
        out, err = (path.read_text() for path in node.logs)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    return results


def run_two_nodes(port: int, args: list[str], logs: Path, accelerate_config: str = "", timeout: float = 600) -> str:
    results = wait_nodes(start_nodes(port, args, logs, accelerate_config), timeout)
    for node, result in enumerate(results):
        assert result.returncode == 0, f"node {node} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return results[0].stdout


def run_one_node(launcher: list[str], args: list[str], timeout: float = 600) -> str:
    proc = subprocess.run([*launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{launcher}: {proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def assert_same_run(one: Path, two: Path, tol: float) -> None:
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "kd_loss", "ce_loss", "num_tokens", "val_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=tol), (key, ra["step"])
    wa, wb = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=tol, rtol=0, msg=name)


@pytest.mark.release  # CI's hour (docs/testing.md): two-node launches stay in CI in this file and SLURM
def test_two_nodes_zero3_teacher_equal_one_node(tmp_path):
    """torchrun on each node (the block's default), the teacher ZeRO-3-sharded across both nodes."""
    args = ["train", "--config", str(SMOKE), *STEPS, "teacher.engine=zero3"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_one_node(torchrun(29651), ["-m", "distributed_distill.cli", *args, f"output_dir={one}"])
    stdout = run_two_nodes(29652, [*args, f"output_dir={two}"], tmp_path / "logs")
    assert "2 process(es) on cpu" in stdout and "teacher engine zero3" in stdout
    assert "rank 1: student params 0.19 MiB of 0.19, teacher params 0.38 MiB of 0.75 (0.50x)" in stdout
    assert_same_run(one, two, tol=0.0)  # the same reductions in the same order: bit-identical


@pytest.mark.release  # CI's hour (docs/testing.md): two-node launches stay in CI in this file and SLURM
def test_two_nodes_deepspeed_zero2_student_equal_one_node(tmp_path):
    """ACCELERATE_CONFIG=launch/accelerate/zero2.yaml: `accelerate launch` on each node, machine ranks 0 and 1."""
    args = ["train", "--config", str(SMOKE), *STEPS, "teacher.engine=zero3"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_one_node(accelerate_launch("zero2.yaml", 29653), ["-m", "distributed_distill.cli", *args, f"output_dir={one}"])
    stdout = run_two_nodes(
        29654, [*args, f"output_dir={two}"], tmp_path / "logs", accelerate_config="launch/accelerate/zero2.yaml"
    )
    assert "student strategy deepspeed zero2, teacher engine zero3" in stdout and "2 process(es) on cpu" in stdout
    assert_same_run(one, two, tol=1e-5)


def test_two_nodes_precompute_one_store_byte_identical_to_one_node(tmp_path):
    """precompute.sbatch runs the same block: both nodes write shards of one store, equal to a one-node store."""
    reference = precomputed_store(*STORE_OVERRIDES)
    store = tmp_path / "store"
    run_two_nodes(
        29655, ["precompute", "--config", str(SMOKE), f"distill.store={store}", *STORE_OVERRIDES], tmp_path / "logs"
    )
    assert snapshot(store) == snapshot(reference)


def test_a_node_lost_mid_step_ends_the_job_naming_the_rank(tmp_path):
    """Node 1's launcher and worker are killed (SIGKILL: the node is gone) in the middle of training; node 0 stops
    within the collective timeout, saying which rank was lost; the newest complete checkpoint verifies."""
    from distributed_distill.checkpoint import list_checkpoints, verify

    out = tmp_path / "run"
    args = ["train", "--config", str(SMOKE), f"output_dir={out}", "train.max_steps=400", "train.save_every=3"]
    args += ["train.micro_batch_size=2", "teacher.engine=zero3", "teacher.collective_timeout=30"]
    nodes = start_nodes(29656, args, tmp_path / "logs")
    deadline = time.monotonic() + 300
    while last_step(out) < 7:
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), "training did not start"
        time.sleep(0.05)
    lost = psutil.Process(nodes[1].pid)
    for p in [lost, *lost.children(recursive=True)]:
        p.kill()
    killed_at = time.monotonic()
    survivor = wait_nodes(nodes[:1], timeout=120)[0]
    elapsed = time.monotonic() - killed_at
    nodes[1].communicate()
    assert survivor.returncode != 0
    assert "lost rank 1" in survivor.stderr, survivor.stderr[-5000:]
    print(f"node 0 stopped {elapsed:.1f} s after node 1 was killed")
    assert elapsed < 30 + 20, f"node 0 took {elapsed:.0f} s to stop"
    newest = [path for _, path in list_checkpoints(out) if (path / "checkpoint.json").is_file()][0]
    assert verify(newest)["step"] >= 6
