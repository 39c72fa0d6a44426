"""Helpers shared by the test modules: running the real CLI, reading what a run wrote, launch commands, and a
logit store made once per test session. (Fixtures live in conftest.py.)"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"


def run_cli(
    args: list[str],
    *,
    launcher: list[str] | None = None,
    env: dict[str, str | None] | None = None,
    timeout: int = 300,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `distill ...` (or `python train.py ...` via launcher) for real, in a fresh interpreter."""
    cmd = (launcher or [sys.executable, "-m", "distributed_distill.cli"]) + args
    full_env = {**os.environ, **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None unsets a variable
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def cli_in_process(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`distill ARGS` in this process (`cli.main`, as the console script runs it), its output captured; `env` set for
    the call only."""
    from distributed_distill import cli

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(args)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def training_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without timings and evaluations: what a resumed run reproduces exactly (a shorter first run
    also evaluates at its last step, where the uninterrupted run does not)."""
    return [
        {k: v for k, v in r.items() if k != "tokens_per_second" and not k.startswith("val_")}
        for r in read_metrics(run_dir)
    ]


def write_config(path: Path, base: Path = SMOKE, **sections) -> Path:
    """A copy of `base` with some sections replaced or updated (one level deep)."""
    cfg = yaml.safe_load(base.read_text())
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


TOP_K = 16
# The 2-process smoke run (conftest's `two_process_run`, run once per session): 4 steps, micro-batch 2 on each rank.
TWO_PROCESS = ["train.max_steps=4", "train.eval_every=2", "train.micro_batch_size=2", "distill.alpha=0.5"]


def precomputed_store(*overrides: str, name: str | None = None) -> Path:
    """A store of the smoke config, made once per test session (keyed by its overrides) and reused."""
    key = hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:12]
    root = Path(os.environ["DISTILL_CACHE"]) / "stores" / (name or key)
    if not (root / "manifest.json").is_file():
        run_cli(["precompute", "--config", str(SMOKE), f"distill.store={root}", *overrides], timeout=300)
    return root


STORE_OVERRIDES = [f"distill.store_top_k={TOP_K}"]
# A sampled, packed store of the smoke config (issue 27): 8 draws per token, the first 24 training rows.
SAMPLED_STORE = ["distill.store_samples=8", "distill.store_encoding=packed", "distill.store_max_rows=24"]


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of a store by relative path (plan.json included: resuming must not change it either)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def torchrun(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *args]


def accelerate_launch(config: str, port: int) -> list[str]:
    """`accelerate launch` with one of launch/accelerate/*.yaml, 2 processes."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "launch" / "accelerate" / config),
        "--num_processes", "2", "--main_process_port", str(port),
    ]  # fmt: skip


def last_step(out: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(out)), default=0)
    except (FileNotFoundError, ValueError):  # not created yet, or a line being written
        return 0


def interrupt(
    cmd: list[str], out: Path, at_step: int, sig: int, timeout: float = 300, to: str = "tree"
) -> subprocess.CompletedProcess:
    """Start `cmd`, wait until metrics.jsonl reaches `at_step`, send `sig` and wait for it to end. `to="tree"`: to
    the process and all its descendants (as SLURM signals every process of a job step; torchrun's workers run in
    sessions of their own, so a process group would miss them); `to="group"`: to its process group, as a
    terminal's Ctrl-C does (torchrun's agent forwards it to its workers)."""
    env = {k: v for k, v in os.environ.items()}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    wait_for_step(proc, out, at_step, timeout)
    if to == "group":
        os.killpg(proc.pid, sig)
    else:
        parent = psutil.Process(proc.pid)
        for p in [parent, *parent.children(recursive=True)]:
            p.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def wait_for_step(proc: subprocess.Popen, out: Path, at_step: int, timeout: float) -> None:
    """Wait until the run `proc` (stdout and stderr piped) has logged `at_step` in out/metrics.jsonl; one that ends
    first, or takes longer than `timeout`, is killed and fails the test with its output."""
    deadline = time.monotonic() + timeout
    while last_step(out) < at_step:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            stdout, stderr = proc.communicate()
            raise AssertionError(f"run ended before step {at_step} ({proc.returncode}):\n{stdout}\n{stderr[-4000:]}")
        time.sleep(0.01)


def kill_after_shards(cmd: list[str], store: Path, shards: int, timeout: float = 240) -> int:
    """Start a store writer (precompute, generate), SIGKILL it once `shards` train shards have their sidecars, and
    return its exit status (a writer that finishes first fails the test: it needs more shards)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while len(list((store / "train").glob("*.json"))) < shards:
            assert proc.poll() is None, "the writer finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return proc.returncode


def error_line(proc: subprocess.CompletedProcess, status: int = 2) -> str:
    """The one `error: ...` line of a refused command (exit status `status`, no traceback). Under torchrun (status
    1) the launcher prints its own report of the failed worker, traceback included; the worker's line is one."""
    assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and (status != 2 or "Traceback" not in proc.stderr), proc.stderr[-3000:]
    return lines[0]


def tmpfs(path: Path, size: str, *options: str):
    """Mount a size-limited tmpfs at `path` (a context manager); skips the test where mounting is not allowed."""
    import contextlib

    import pytest

    @contextlib.contextmanager
    def mounted():
        path.mkdir(parents=True, exist_ok=True)
        opts = ",".join([f"size={size}", *options])
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root and mount rights): {proc.stderr.strip()[:200]}")
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)

    return mounted()
