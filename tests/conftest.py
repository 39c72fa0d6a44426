"""Shared fixtures: an isolated cache, a clean Accelerate state, and what several test modules need built once per
test session and then only read: the smoke config's tokenizer, a tiny pretrained teacher and student, and the 1- and
2-process smoke runs (helpers.py has the non-fixture helpers).

Session fixtures are built the first time a selected test asks for one, so `pytest -m slow` or a single test file
builds only what it uses. Tests copy what they modify (`shutil.copytree`); the shared directories stay as built."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from .helpers import SMOKE, TWO_PROCESS, run_cli, torchrun


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


@pytest.fixture(scope="session")
def smoke_tokenizer(isolated_env) -> Path:
    """The smoke config's BPE tokenizer, trained once per session into the shared cache, where every run of the smoke
    config (in-process or launched) finds it instead of training its own."""
    from accelerate import Accelerator

    from distributed_distill.config import load_config
    from distributed_distill.data.documents import documents
    from distributed_distill.tokenizer import run_tokenizer

    cfg = load_config(SMOKE)
    return Path(run_tokenizer(cfg, Accelerator(cpu=True), lambda: documents(cfg.data)).name_or_path)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """The smoke config's teacher saved as a checkpoint: the zero3 engine loads it straight into partitions."""
    from distributed_distill import models
    from distributed_distill.config import load_config

    cfg = load_config(SMOKE)
    out = tmp_path_factory.mktemp("teacher") / "tiny-llama"
    models.load_model(cfg.teacher, models.model_config(cfg.teacher, 512, "teacher"), seed=1).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, smoke_tokenizer) -> Path:
    """The smoke student saved as a checkpoint: a ZeRO-3 student is initialised by transformers on rank 0 when
    built from `arch`, so strategies are compared from the same starting weights."""
    from distributed_distill import models
    from distributed_distill.config import load_config
    from distributed_distill.tokenizer import load_tokenizer

    cfg = load_config(SMOKE)
    out = tmp_path_factory.mktemp("student") / "tiny-llama"
    # A pretrained student brings its tokenizer: the BPE tokenizer the smoke config trains (the same files).
    shutil.copytree(smoke_tokenizer, out)
    vocab = len(load_tokenizer(str(out)))
    models.load_model(cfg.student, models.model_config(cfg.student, vocab, "student"), seed=0).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """The smoke config trained by the `distill` console script, as the README runs it (5 steps, one process), run
    once: test_train checks the run directory and the export, test_errors starts failing runs over a copy of it."""
    distill = shutil.which("distill", path=str(Path(sys.executable).parent))
    assert distill, "the `distill` console script is not installed next to this interpreter"
    out = tmp_path_factory.mktemp("smoke") / "distill_cli"
    run_cli(["train", "--config", str(SMOKE), f"output_dir={out}"], launcher=[distill])
    return out


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory) -> tuple[Path, str]:
    """The smoke config trained by 2 processes under torchrun (replicated teacher), run once: test_multiprocess
    compares it with one process, test_teacher_engines with the zero3 teacher and DeepSpeed students. Returns the
    run directory and the launcher's stdout."""
    out = tmp_path_factory.mktemp("two_process") / "run"
    proc = run_cli(
        ["--config", str(SMOKE), f"output_dir={out}", *TWO_PROCESS], launcher=torchrun(29530, "train.py"), timeout=600
    )
    return out, proc.stdout


@pytest.fixture(scope="session")
def prompt_pairs(tmp_path_factory) -> Path:
    """Prompt/completion rows for on-policy steps: a short ASCII line of stdlib code as the prompt, the next line as
    the completion; each row fits the smoke config's data.seq_len=64 whole (on-policy steps refuse rows that start
    mid-completion)."""
    from distributed_distill.data.documents import stdlib_files

    rows = []
    for path in stdlib_files()[::40]:
        text = path.read_text(errors="replace").splitlines()
        lines = [line.strip() for line in text if 8 < len(line.strip()) < 40 and line.isascii()]
        rows += [{"prompt": a, "completion": " " + b} for a, b in zip(lines[:12:2], lines[1:12:2])]
    out = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out
