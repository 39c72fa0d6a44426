"""launch/slurm/*.sbatch on a real SLURM (`.ci/slurm.sh`: slurmctld, two slurmd and munge on this machine).

The smoke config trains as a 2-process job; precompute runs as a 2-task job array into one store; a training job
that is requeued (`scontrol requeue`: SIGTERM) or signalled as at its time limit (SIGUSR1 to the batch script)
resumes from its checkpoint and ends with exactly the student of an uninterrupted run; a two-node job
(`--nodes=2`, a process per node) cancelled and submitted again with `--nodes=1` resumes on one process.

Uses the cluster `.ci/slurm.sh` runs, or starts one (root, SLURM installed) and stops it afterwards; skips
without SLURM. Run alone: `.venv/bin/python -m pytest -m slurm`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .helpers import ROOT, SMOKE, STORE_OVERRIDES, precomputed_store, read_metrics, run_cli, store_files

pytestmark = pytest.mark.slurm

SLURM_SH = ROOT / ".ci" / "slurm.sh"
TRAIN = ROOT / "launch" / "slurm" / "train.sbatch"
PRECOMPUTE = ROOT / "launch" / "slurm" / "precompute.sbatch"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Long enough to interrupt mid-run, short enough for CI: about 10 s of training on 2 CPU cores.
LONG = ["train.max_steps=200", "train.save_every=20"]


@pytest.fixture(scope="session")
def slurm() -> dict[str, str]:
    """The environment for sbatch and scontrol (SLURM_CONF of the test cluster)."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed (no sbatch/slurmctld): `sudo .ci/slurm.sh up` installs and starts one")
    proc = subprocess.run([SLURM_SH, "status"], capture_output=True, text=True)
    started = proc.returncode != 0
    if started:
        if os.geteuid() != 0:
            pytest.skip("no test SLURM running, and starting one needs root: `sudo .ci/slurm.sh up`")
        proc = subprocess.run([SLURM_SH, "up"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f".ci/slurm.sh up failed:\n{proc.stdout}\n{proc.stderr}"
    conf = re.search(r"export SLURM_CONF=(\S+)", proc.stdout).group(1)
    yield {**os.environ, "SLURM_CONF": conf, "VENV": str(Path(sys.executable).parent.parent)}
    if started:
        subprocess.run([SLURM_SH, "down"], capture_output=True, timeout=300)


def _sbatch(env: dict, log_dir: Path, script: Path, *args: str, options: tuple[str, ...] = ()) -> str:
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--output={log_dir}/%x-%j.out", *options, str(script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def _jobs(env: dict, job: str) -> list[dict[str, str]]:
    """`scontrol show job` records of a job (one per task of an array), as dicts of its fields."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True, timeout=60)
    return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in proc.stdout.splitlines()]


def _logs(log_dir: Path) -> str:
    return "\n".join(f"==> {p.name} <==\n{p.read_text(errors='replace')}" for p in sorted(log_dir.glob("*.out")))


def _wait(env: dict, job: str, log_dir: Path, timeout: float = 600, until=None) -> list[dict[str, str]]:
    """Poll until every task of `job` has ended (or `until()` holds); fails with the job's log on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until is not None and until():
            return []
        jobs = _jobs(env, job)
        if jobs and all(j["JobState"] in TERMINAL for j in jobs):
            return jobs
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env, timeout=60)
    pytest.fail(
        f"job {job} did not {'get there' if until else 'end'} in {timeout} s: {_jobs(env, job)}\n{_logs(log_dir)}"
    )


def _completed(jobs: list[dict[str, str]], log_dir: Path) -> str:
    log = _logs(log_dir)
    for j in jobs:
        assert j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0", f"{j['JobId']}: {j['JobState']}\n{log}"
    return log


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def test_train_job(slurm, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    env = {**slurm, "MASTER_PORT": "29810", "WANDB_MODE": "offline"}
    job = _sbatch(env, logs, TRAIN, "--config", str(SMOKE), f"output_dir={out}")
    log = _completed(_wait(env, job, logs), logs)
    assert "1 node(s) x 2 process(es)" in log and "2 process(es) on cpu" in log  # both workers joined one group
    assert (out / "config.yaml").is_file()
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
    for rank in (0, 1):
        assert json.loads((out / "ranks" / f"rank-{rank}.json").read_text())["world_size"] == 2
    assert list((out / "wandb").glob("offline-run-*")), "WANDB_MODE=offline: an offline wandb run on the node"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size


@pytest.mark.slow
@pytest.mark.release  # CI's siblings: the SLURM train job (torchrun); accelerate launch with zero2.yaml elsewhere
def test_train_job_with_an_accelerate_config(slurm, tmp_path):
    """ACCELERATE_CONFIG: `accelerate launch` per node instead of torchrun; here a DeepSpeed ZeRO-2 student on CPU."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    env = {**slurm, "MASTER_PORT": "29816", "ACCELERATE_CONFIG": "launch/accelerate/zero2.yaml"}
    job = _sbatch(env, logs, TRAIN, "--config", str(SMOKE), f"output_dir={out}", "train.max_steps=2")
    log = _completed(_wait(env, job, logs), logs)
    assert "2 process(es) on cpu" in log and "student strategy deepspeed zero2" in log, log
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_precompute_job_array_writes_one_store(slurm, tmp_path):
    store, logs = tmp_path / "store", tmp_path / "logs"
    # No fixed MASTER_PORT: the two array tasks may run at once on the two nodes of this one host, so each takes the
    # script's own default (20000 + its job id), as on a cluster.
    env = {**slurm}
    args = ["--config", str(SMOKE), f"distill.store={store}", *STORE_OVERRIDES]
    job = _sbatch(env, logs, PRECOMPUTE, *args, options=("--array=0-1",))
    jobs = _wait(env, job, logs)
    assert len(jobs) == 2
    log = _completed(jobs, logs)
    assert "part 0/2 of the shards" in log and "part 1/2 of the shards" in log
    assert "store complete" in log  # the task that finished last wrote the manifest
    assert run_cli(["verify-store", str(store)]).stdout.startswith("ok: ")
    assert store_files(store) == store_files(
        precomputed_store(*STORE_OVERRIDES)
    )  # byte-identical to a store made in one run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run the interrupted jobs must reproduce, started directly with torchrun (2 processes)."""
    out = tmp_path_factory.mktemp("slurm") / "uninterrupted"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29812"]
    run_cli(["--config", str(SMOKE), f"output_dir={out}", *LONG], launcher=[*torchrun, "train.py"], timeout=600)
    return out


@pytest.mark.parametrize("interrupt", ["requeue", "usr1"])
@pytest.mark.slow
def test_interrupted_train_job_resumes_to_the_same_student(slurm, uninterrupted, tmp_path, interrupt):
    """`requeue`: `scontrol requeue` kills the job (SIGTERM to every process) and SLURM starts it again.
    `usr1`: what --signal=B:USR1@300 does before the time limit: the script has the workers checkpoint and stop,
    then requeues the job itself."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    # wandb's service process is in the job step too, and gets the signals as well: it must not break the run.
    env = {**slurm, "MASTER_PORT": "29813" if interrupt == "requeue" else "29814", "WANDB_MODE": "offline"}
    job = _sbatch(env, logs, TRAIN, "--config", str(SMOKE), f"output_dir={out}", *LONG)
    _wait(env, job, logs, until=lambda: any(out.glob("step-*/checkpoint.json")))
    cmd = ["scontrol", "requeue", job] if interrupt == "requeue" else ["scancel", "--signal=USR1", "--batch", job]
    subprocess.run(cmd, env=env, check=True, timeout=60)
    [info] = _wait(env, job, logs)
    log = _completed([info], logs)
    assert info["Restarts"] == "1", log
    if interrupt == "usr1":
        assert "SIGUSR1 at" in log and f"requeueing job {job}" in log
    preempted = re.search(r"preempted at step (\d+)", log)
    resumed = re.search(r"resume: continuing from \S+ \(step (\d+)\)", log)
    assert resumed and int(resumed.group(1)) >= 20, log
    if preempted:  # the workers caught the signal in time and checkpointed where they stopped
        assert resumed.group(1) == preempted.group(1)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 201))
    expected, got = _weights(uninterrupted), _weights(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "the resumed student differs"


@pytest.mark.slow
def test_two_node_job_requeued_onto_one_node_resumes_to_the_same_student(slurm, uninterrupted, tmp_path):
    """`sbatch --nodes=2` (two slurmd on this host, one process per node), cancelled mid-run (SIGTERM: the workers
    checkpoint), then the same command submitted with `--nodes=1`: it resumes on 1 process, the accumulation
    doubling so that the global batch stays, and ends with the student of an uninterrupted 2-process run."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    env = {**slurm, "MASTER_PORT": "29817", "NPROC_PER_NODE": "1"}
    args = ["--config", str(SMOKE), f"output_dir={out}", *LONG]
    job = _sbatch(env, logs, TRAIN, *args, options=("--nodes=2",))
    _wait(env, job, logs, until=lambda: any(out.glob("step-*/checkpoint.json")))
    subprocess.run(["scancel", job], env=env, check=True, timeout=60)
    [info] = _wait(env, job, logs)
    log = _logs(logs)
    assert info["JobState"] == "CANCELLED" and "2 node(s) x 1 process(es)" in log, log
    assert "rendezvous 127.0.0.1:" in log  # the first node's NodeAddr (node names do not resolve here)
    requeued = _sbatch(env, logs, TRAIN, *args, options=("--nodes=1",))
    log = _completed(_wait(env, requeued, logs), logs)
    assert "1 node(s) x 1 process(es)" in log
    assert "written by 2 process(es), continuing on 1: 4 x 2 accumulation x 1 = 8 sequences per step" in log, log
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 201))
    expected, got = _weights(uninterrupted), _weights(out)
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    print(f"max |w_requeued - w_uninterrupted| = {worst:.3g}")
    assert worst <= 1e-6


SERVE = ROOT / "launch" / "slurm" / "serve.sbatch"


@pytest.mark.slow
def test_a_serve_job_and_a_student_job_that_finds_it(slurm, tmp_path):
    """launch/slurm/serve.sbatch runs `distill serve` as a job of its own (the first node's address, a token file it
    creates, the address file once ready); a student job submitted right after, with teacher.url=file:ADDRESS_FILE,
    waits for the address, trains against the served teacher, and ends with the student of the same 2-process run
    with the teacher in-process, bit for bit."""
    address, token = tmp_path / "teacher-server.address", tmp_path / "teacher-server.token"
    logs, out, local = tmp_path / "logs", tmp_path / "remote", tmp_path / "local"
    common = ["distill.top_k=8"]
    serve_env = {**slurm, "MASTER_PORT": "29822", "NPROC_PER_NODE": "1"}
    serve_env.update(ADDRESS_FILE=str(address), TOKEN_FILE=str(token))
    server = _sbatch(serve_env, logs, SERVE, "--config", str(SMOKE), *common)
    try:
        remote = ["teacher.engine=remote", f"teacher.url=file:{address}", f"teacher.token_file={token}"]
        student_env = {**slurm, "MASTER_PORT": "29823", "WANDB_MODE": "disabled"}
        args = ["--config", str(SMOKE), f"output_dir={out}", *common, *remote]
        job = _sbatch(student_env, logs, TRAIN, *args)
        log = _completed(_wait(student_env, job, logs), logs)
        assert "teacher served at http://127.0.0.1:" in log and "teacher engine remote" in log, log
        assert "created the token file" in log and (token.stat().st_mode & 0o777) == 0o600
        assert address.read_text().startswith("http://127.0.0.1:")  # the first node's NodeAddr here
    finally:
        subprocess.run(["scancel", server], env=slurm, timeout=60)
    _wait(slurm, server, logs)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29824"]
    run_cli(
        ["--config", str(SMOKE), f"output_dir={local}", *common, "logging.wandb.mode=disabled"],
        launcher=[*torchrun, "train.py"],
        timeout=600,
    )
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(local)]
    expected, got = _weights(local), _weights(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "the served teacher's student differs"
