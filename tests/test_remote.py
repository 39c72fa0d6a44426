"""`teacher.engine: remote` for real: `distill train` against `distill serve` subprocesses on 127.0.0.1 (port 0, found
through serve.address_file, which the student reads as teacher.url=file:PATH), compared bit for bit with the same run
with the teacher in-process; the faults (a server killed and restarted, a server gone for good, another teacher, a
wrong token) end as docs/serving.md says. Every server is killed at teardown (serve.running); every run
and wait has its own timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distributed_distill.serve import running

from .helpers import (
    ROOT,
    SMOKE,
    TWO_PROCESS,
    error_line,
    last_step,
    read_metrics,
    run_cli,
    torchrun,
    training_records,
    wait_for_step,
)
from .test_resume import assert_same_student

SERVE = [sys.executable, "-m", "distributed_distill.cli", "serve", "--config", str(SMOKE)]
TRAIN = [sys.executable, "-m", "distributed_distill.cli", "train", "--config", str(SMOKE)]
TOPK = ["distill.top_k=16"]
# Two micro-batches a step: the next step's are sent ahead together (and may share one server batch).
SHORT = ["train.max_steps=4", "train.micro_batch_size=2", "train.grad_accum_steps=2"]
LONG = ["train.max_steps=10", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.save_every=0"]


@contextlib.contextmanager
def serving(directory: Path, *overrides: str, launcher: list[str] | None = None, address: Path | None = None):
    """A `distill serve` of the smoke config (killed at exit): yields (its address file, its URL, the process)."""
    directory.mkdir(parents=True, exist_ok=True)
    address = address or directory / "server.url"
    cmd = [*launcher, "-m", "distributed_distill.cli", *SERVE[3:]] if launcher else SERVE
    settings = ["serve.port=0", f"serve.address_file={address}", f"serve.log={directory / 'serve.log'}"]
    with running([*cmd, *settings, *overrides], address, cwd=ROOT, timeout=240) as (url, proc):
        yield address, url, proc


def remote(address: Path, timeout: int = 60) -> list[str]:
    return ["teacher.engine=remote", f"teacher.url=file:{address}", f"teacher.collective_timeout={timeout}"]


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a server and its children (torchrun's workers), as a lost node ends it: no goodbye."""
    family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical training: every logged loss, gradient norm and validation figure, and the final weights."""
    assert training_records(a) == training_records(b)
    for x, y in zip(read_metrics(a), read_metrics(b)):
        assert (x.get("val_loss"), x.get("val_kd_loss")) == (y.get("val_loss"), y.get("val_kd_loss")), x["step"]
    assert_same_student(a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smoke_tokenizer):
    """The same runs with the teacher in-process, each made once per module: reference(*overrides, procs=1)."""
    made: dict = {}

    def run(*overrides: str, procs: int = 1) -> Path:
        if (overrides, procs) not in made:
            out = tmp_path_factory.mktemp("in_process") / "run"
            args = ["--config", str(SMOKE), f"output_dir={out}", *overrides]
            if procs == 1:
                run_cli(["train", *args], timeout=300)
            else:
                run_cli(args, launcher=torchrun(29660, "train.py"), timeout=600)
            made[overrides, procs] = out
        return made[overrides, procs]

    return run


# ----------------------------------------------------------------------------------------------
# Remote equals local


@pytest.mark.slow  # the default tier's served-teacher test is test_serve.py's (the default tier's 8 minutes)
def test_remote_top_k_run_equals_in_process(reference, tmp_path):
    out = tmp_path / "remote"
    with serving(tmp_path / "server") as (address, url, _):
        ref = reference(*SHORT, *TOPK)  # while the server loads
        proc = run_cli(["train", "--config", str(SMOKE), f"output_dir={out}", *remote(address), *SHORT, *TOPK])
    assert f"teacher engine remote at {url}" in proc.stdout
    assert_same_run(ref, out)


@pytest.mark.slow  # the default tier keeps its 8 minutes (472.75 s of tests at 59b023d with it)
def test_server_of_another_teacher_is_refused_in_one_line(tmp_path, smoke_tokenizer):
    out = tmp_path / "run"
    with serving(tmp_path / "server", "teacher.arch.hidden_size=32") as (address, url, _):
        proc = run_cli(
            ["train", "--config", str(SMOKE), f"output_dir={out}", *remote(address), "train.max_steps=1"], check=False
        )
    line = error_line(proc)
    assert f"teacher server {url} serves another teacher: arch.hidden_size=32 there, 64 here" in line, line
    assert not list(out.glob("step-*")) and not (out / "final").exists()


@pytest.mark.slow
def test_remote_dense_run_equals_in_process(reference, tmp_path):
    out = tmp_path / "remote"
    with serving(tmp_path / "server") as (address, _, _):
        ref = reference(*SHORT)  # the smoke config's dense form: the server sends hidden states, GET /head the head
        run_cli(["train", "--config", str(SMOKE), f"output_dir={out}", *remote(address), *SHORT])
    assert_same_run(ref, out)


@pytest.mark.slow
@pytest.mark.release  # CI's sibling: test_slurm.py's serve job with a 2-process student job (docs/testing.md)
@pytest.mark.multiprocess
def test_two_student_processes_against_one_server_equal_in_process(reference, tmp_path):
    out = tmp_path / "remote"
    with serving(tmp_path / "server") as (address, _, _):
        ref = reference(*TWO_PROCESS, *TOPK, procs=2)
        args = ["--config", str(SMOKE), f"output_dir={out}", *remote(address), *TWO_PROCESS, *TOPK]
        run_cli(args, launcher=torchrun(29661, "train.py"), timeout=600)
    assert_same_run(ref, out)


@pytest.mark.slow
@pytest.mark.release  # CI's sibling: test_serve.py's 2-rank ZeRO-3 server, its targets bit for bit
@pytest.mark.multiprocess
def test_zero3_server_on_two_ranks_equals_in_process(reference, tmp_path):
    """A teacher sharded across the server's own 2 ranks, for a 1-process student; the reference runs the zero3
    engine in-process (on the student's one rank: ZeRO-3 computes the layers from gathered weights alike)."""
    out = tmp_path / "remote"
    launcher = torchrun(29662)
    with serving(tmp_path / "server", "teacher.engine=zero3", launcher=launcher) as (address, _, _):
        ref = reference(*SHORT, *TOPK, "teacher.engine=zero3")
        run_cli(["train", "--config", str(SMOKE), f"output_dir={out}", *remote(address), *SHORT, *TOPK])
    assert_same_run(ref, out)


# ----------------------------------------------------------------------------------------------
# Faults


def start_training(
    out: Path, address: Path, timeout: int, launcher: list[str] | None = None, extra: list[str] = ()
) -> subprocess.Popen:
    args = ["--config", str(SMOKE), f"output_dir={out}", *remote(address, timeout), *LONG, *TOPK, *extra]
    cmd = [*(launcher or TRAIN[:4]), *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """The run's end; one still running after `timeout` (a hang) is killed with its workers, failing the test."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_server_killed_and_restarted_the_run_continues_without_losing_a_step(reference, tmp_path):
    out, address = tmp_path / "remote", tmp_path / "server.url"
    with serving(tmp_path / "first", address=address) as (_, first_url, first):
        ref = reference(*LONG, *TOPK)
        run = start_training(out, address, timeout=120)
        wait_for_step(run, out, 3, timeout=240)
        kill(first)  # its stale address file stays until the next server replaces it
    with serving(tmp_path / "second", address=address) as (_, second_url, _):
        done = finish(run)
    assert done.returncode == 0, done.stderr[-4000:]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 11))
    assert_same_run(ref, out)
    print(f"first server {first_url}, restarted at {second_url}")


@pytest.mark.slow
# 2 processes in the release tier (CI's hour, docs/testing.md); CI runs the 1-process case
@pytest.mark.parametrize("procs", [1, pytest.param(2, marks=[pytest.mark.multiprocess, pytest.mark.release])])
def test_server_gone_for_good_checkpoints_exits_75_and_resumes_exactly(reference, tmp_path, procs):
    out, address = tmp_path / "remote", tmp_path / "server.url"
    launcher = torchrun(29663 + procs, "train.py") if procs == 2 else None
    extra = ["train.micro_batch_size=1"] if procs == 2 else []  # the same global batch on 2 processes
    with serving(tmp_path / "first", address=address) as (_, url, server):
        ref = reference(*LONG, *TOPK, *extra, procs=procs)
        run = start_training(out, address, timeout=3, launcher=launcher, extra=extra)
        wait_for_step(run, out, 3, timeout=240)
        kill(server)
        started = time.monotonic()
        stopped = finish(run, timeout=120)
    waited = time.monotonic() - started
    lines = [line for line in stopped.stderr.splitlines() if "unreachable" in line]
    assert lines and all(line == lines[0] for line in lines), stopped.stderr[-4000:]
    step = last_step(out)
    assert lines[0].startswith(f"teacher server {url} unreachable for 3 s ("), lines[0]
    assert f"preempted at step {step}: checkpoint {out / f'step-{step:07d}'} written" in lines[0], lines[0]
    assert (out / f"step-{step:07d}" / "checkpoint.json").is_file() and step < 10
    if procs == 1:
        assert stopped.returncode == 75 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    else:
        assert stopped.returncode != 0  # torchrun reports its workers' 75 as a failure of its own
    assert waited < 60, waited  # the timeout (3 s) and a checkpoint, not a hang
    with serving(tmp_path / "second", address=address):
        args = ["--config", str(SMOKE), f"output_dir={out}", *remote(address), *LONG, *TOPK, *extra]
        resumed = run_cli(args, launcher=launcher or TRAIN[:4], timeout=600)
    assert f"continuing from {out / f'step-{step:07d}'}" in resumed.stdout
    assert_same_run(ref, out)


@pytest.mark.slow
@pytest.mark.release  # CI's sibling: test_serve.py's wrong and missing token, 401 (default tier)
def test_wrong_or_missing_token_is_refused_and_nothing_trained(tmp_path, smoke_tokenizer):
    token = tmp_path / "token"
    token.write_text("the-right-secret\n")
    out = tmp_path / "run"
    args = ["train", "--config", str(SMOKE), f"output_dir={out}", "train.max_steps=1"]
    with serving(tmp_path / "server", f"serve.token_file={token}") as (address, url, _):
        missing = run_cli([*args, *remote(address)], env={"DISTILL_SERVE_TOKEN": None}, check=False)
        wrong = run_cli([*args, *remote(address)], env={"DISTILL_SERVE_TOKEN": "a-wrong-secret"}, check=False)
        assert not list(out.glob("step-*")) and not (out / "final").exists()
        right = run_cli([*args, *remote(address), f"teacher.token_file={token}"], env={"DISTILL_SERVE_TOKEN": None})
    for proc in (missing, wrong):
        line = error_line(proc)
        assert f"teacher server {url} refused GET /identity: 401 missing or wrong token" in line, line
        assert "teacher.token_file or DISTILL_SERVE_TOKEN" in line
    assert right.returncode == 0 and (out / "final").is_dir()
