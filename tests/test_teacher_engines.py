"""Teacher engines (`replicated`, `zero3`) across 2 real CPU processes (gloo), and student strategies with them.

Every launch is real (torchrun or accelerate launch) and has its own timeout; a timed-out launch is killed
with its whole process group, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .helpers import ROOT, SMOKE, TWO_PROCESS, accelerate_launch, read_metrics, torchrun

WORKER = str(ROOT / "tests" / "teacher_worker.py")
STEPS = TWO_PROCESS  # every training run here is the 2-process smoke run with another engine or strategy


def launch(cmd: list[str], timeout: int, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run a launcher; on timeout kill its process group (the workers too) and fail."""
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} hung for more than {timeout}s:\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.monotonic() - started


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


# ----------------------------------------------------------------------------------------------
# The engine on its own


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero3_teacher_equals_unsharded_and_holds_half(teacher_dir, tmp_path):
    check(launch(torchrun(29610, WORKER, "equivalence", str(tmp_path), str(teacher_dir)), timeout=300)[0])
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world_size"] == 2
        engines = rank["engines"]
        assert set(engines) == {f"{s}/{e}" for s in ("path", "arch") for e in ("replicated", "zero3", "zero3_offload")}
        for name, row in engines.items():
            assert row["max_abs_diff"] <= 1e-5, name  # fp32 logits of the sharded teacher = the unsharded one
            assert row["topk_ids_equal"] and row["topk_logprob_diff"] <= 1e-5, name
            share = row["local_bytes"] / row["full_bytes"]
            if name.endswith("replicated"):
                assert row["engine"] == "replicated" and share == 1.0
            else:  # about half; the norms' few hundred floats stay whole on every rank
                assert row["engine"] == "zero3" and 0.5 <= share <= 0.51, (name, share)
    counts = {row["num_parameters"] for rank in ranks for row in rank["engines"].values()}
    assert len(counts) == 1  # every engine reports the whole teacher's size


@pytest.mark.multiprocess
@pytest.mark.slow
def test_rank_that_stops_calling_the_teacher_fails_the_job_at_the_timeout(teacher_dir, tmp_path):
    cmd = torchrun(29611, WORKER, "stall", str(tmp_path), str(teacher_dir), "teacher.collective_timeout=8")
    result, elapsed = launch(cmd, timeout=180)  # rank 1 sleeps 300 s: only the collective timeout ends this early
    assert result.returncode != 0
    assert "error: zero3 teacher on rank 0: a collective failed or passed teacher.collective_timeout=8s" in (
        result.stderr
    )
    assert "Timed out" in result.stderr
    assert elapsed < 150


@pytest.mark.multiprocess
@pytest.mark.slow
def test_failing_rank_brings_the_whole_job_down_with_its_error(teacher_dir, tmp_path):
    cmd = torchrun(29612, WORKER, "crash", str(tmp_path), str(teacher_dir), "teacher.collective_timeout=60")
    result, elapsed = launch(cmd, timeout=180)
    assert result.returncode != 0
    assert "RuntimeError: rank 1 deliberately failed" in result.stderr
    assert "all teacher calls done" not in result.stdout  # rank 0 did not carry on alone
    assert elapsed < 150


# ----------------------------------------------------------------------------------------------
# Training with each engine and strategy: the same student


def train_cmd(launcher: list[str], out: Path, *overrides: str) -> list[str]:
    return [*launcher, "train.py", "--config", str(SMOKE), f"output_dir={out}", *STEPS, *overrides]


@pytest.fixture(scope="module")
def replicated_run(two_process_run) -> Path:
    """The reference: the session's 2-process smoke run (torchrun, replicated teacher; conftest.py)."""
    out, stdout = two_process_run
    assert "teacher engine replicated" in stdout
    return out


def assert_same_student(reference: Path, run: Path, tol: float = 1e-5) -> None:
    a, b = read_metrics(reference), read_metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "kd_loss", "ce_loss", "num_tokens", "val_loss", "val_kd_loss", "val_tokens"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=tol), (key, ra["step"])
    wa, wb = load_file(reference / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()  # the student only: the teacher never enters the exported weights
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=tol, rtol=0, msg=name)


def assert_uneven_validation(stdout: str) -> None:
    # "validation N" blocks shared by 2 ranks x micro-batch 2: a last round where the ranks hold different counts
    val = int(stdout.split("validation ")[1].split(";")[0])
    assert val % 4, f"validation split {val} divides evenly: the test would not exercise an uneven last batch"


@pytest.mark.multiprocess
def test_zero3_teacher_trains_the_same_student_as_replicated(replicated_run, tmp_path):
    out = tmp_path / "zero3"
    result = check(launch(train_cmd(torchrun(29614), out, "teacher.engine=zero3"), timeout=400)[0])
    assert "student strategy multi_cpu, teacher engine zero3" in result.stdout
    assert "teacher params 0.38 MiB of 0.75 (0.50x)" in result.stdout  # memory report, both ranks
    assert_uneven_validation(result.stdout)  # finished (with its own timeout): lockstep holds on uneven data
    assert_same_student(replicated_run, out)
    identity = json.loads((out / "teacher.json").read_text())
    assert identity == json.loads((replicated_run / "teacher.json").read_text()) and identity["config_sha256"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_deepspeed_zero2_student_with_zero3_teacher(replicated_run, tmp_path):
    out = tmp_path / "zero2"
    result = check(
        launch(train_cmd(accelerate_launch("zero2.yaml", 29615), out, "teacher.engine=zero3"), timeout=400)[0]
    )
    assert "2 process(es) on cpu" in result.stdout
    assert "student strategy deepspeed zero2, teacher engine zero3" in result.stdout
    assert_same_student(replicated_run, out)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_deepspeed_zero3_student_with_zero3_teacher(student_dir, tmp_path):
    """launch/accelerate/zero3.yaml on 2 CPU processes: the student itself sharded (naive loss path, the chunked
    one needs the whole lm_head; `distill.chunk_size: auto` chooses it) trains the same student as plain
    multi-process data parallelism."""
    common = ["student.arch=null", f"student.path={student_dir}"]
    ref = tmp_path / "ddp"
    check(launch(train_cmd(torchrun(29616), ref, *common, "distill.chunk_size=0"), timeout=400)[0])
    out = tmp_path / "zero3"
    launcher = accelerate_launch("zero3.yaml", 29618)
    cmd = train_cmd(launcher, out, "teacher.engine=zero3", *common, "distill.chunk_size=auto")
    result = check(launch(cmd, timeout=400)[0])
    assert "student strategy deepspeed zero3, teacher engine zero3" in result.stdout
    assert "distill.chunk_size=auto: 0 tokens per loss chunk (naive path)" in result.stdout
    assert_same_student(ref, out, tol=1e-4)


@pytest.mark.slow
def test_zero3_teacher_in_a_single_process(tmp_path):
    """One process, no launcher (a teacher offloaded to CPU next to one GPU): the engine makes its own group."""
    out = tmp_path / "single"
    cmd = [sys.executable, "train.py", "--config", str(SMOKE), f"output_dir={out}", "train.max_steps=2",
           "teacher.engine=zero3", "teacher.offload=cpu"]  # fmt: skip
    result = check(launch(cmd, timeout=300)[0])
    assert "rank 0: student params" in result.stdout and "(1.00x)" in result.stdout
    assert read_metrics(out)[-1]["step"] == 2


# ----------------------------------------------------------------------------------------------
# CUDA: NCCL and bf16 (benchmarks/gpu_check.sh runs these and prints the throughput)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (NCCL, bf16); run benchmarks/gpu_check.sh")
def test_gpu_zero3_teacher_nccl_bf16_equals_unsharded(teacher_dir, tmp_path):
    nproc = str(min(2, torch.cuda.device_count()))
    cmd = torchrun(29616, WORKER, "equivalence", str(tmp_path), str(teacher_dir), "teacher.dtype=bfloat16")
    cmd[cmd.index("--nproc_per_node") + 1] = nproc
    check(launch(cmd, timeout=600)[0])
    for r in range(int(nproc)):
        rank = json.loads((tmp_path / f"rank-{r}.json").read_text())
        for name, row in rank["engines"].items():
            # Same bf16 weights, same kernels: the gathered layers compute what the whole ones do.
            assert row["max_abs_diff"] <= 1e-2 and row["topk_ids_equal"], name
            if name.endswith("zero3") and int(nproc) == 2:
                assert row["local_bytes"] / row["full_bytes"] <= 0.55


# ----------------------------------------------------------------------------------------------
# Config and startup errors: one line, naming the key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teacher.offload=cpu"], "teacher.offload=cpu needs teacher.engine=zero3"),
        (["teacher.engine=zero2"], "teacher.engine='zero2' is not one of replicated, zero3"),
        (
            ["teacher.engine=zero3", "teacher.deepspeed_config=/nope.json"],
            "teacher.deepspeed_config=/nope.json: no such",
        ),
        (
            ["teacher.deepspeed_config=launch/deepspeed/teacher_zero3.json"],
            "deepspeed_config needs teacher.engine=zero3",
        ),
        (["teacher.collective_timeout=0"], "teacher.collective_timeout=0 must be >= 1"),
    ],
)
def test_teacher_config_errors_name_the_key(overrides, message):
    from distributed_distill.config import load_config
    from distributed_distill.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(SMOKE, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_teacher_deepspeed_config_must_be_zero_stage_3(tmp_path):
    from distributed_distill import models
    from distributed_distill.config import load_config
    from distributed_distill.errors import DistillError
    from distributed_distill.teacher import setup_teacher

    bad = tmp_path / "stage2.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}))
    cfg = load_config(SMOKE, ["teacher.engine=zero3", f"teacher.deepspeed_config={bad}"])
    with pytest.raises(DistillError, match=r"stage2.json: zero_optimization.stage=2, need 3"):
        setup_teacher(
            cfg.teacher, models.model_config(cfg.teacher, 512, "teacher"), torch.device("cpu"), seed=cfg.train.seed
        )


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero3_student_with_the_chunked_loss_is_refused_at_startup(tmp_path):
    launcher = accelerate_launch("zero3.yaml", 29617)
    result, _ = launch(train_cmd(launcher, tmp_path / "z3", "teacher.engine=zero3"), timeout=300)
    assert result.returncode != 0
    assert "error: distill.chunk_size=64 needs the student's whole output layer, which a ZeRO-3 student shards" in (
        result.stderr
    )
    assert not (tmp_path / "z3" / "metrics.jsonl").exists()
