"""Shared fixtures: an isolated cache, tiny configs, and a way to run the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """Caches in a per-session temp dir (the tokenizer and tokenized corpus are built once per session), no
    network, wandb off unless a test turns it on."""
    cache = tmp_path_factory.mktemp("cache")
    env = {
        "DISTILL_CACHE": str(cache),
        "HF_DATASETS_CACHE": str(cache / "hf_datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def reset_accelerate():
    """Accelerate keeps process-wide singletons; tests that build an Accelerator in-process start clean."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


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


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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
