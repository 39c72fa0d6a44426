"""Shared fixtures: an isolated cache, a clean Accelerate state, and a tiny pretrained student (helpers.py has the
non-fixture helpers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .helpers import SMOKE


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


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    """The smoke student saved as a checkpoint: a ZeRO-3 student is initialised by transformers on rank 0 when
    built from `arch`, so strategies are compared from the same starting weights."""
    from distributed_distill import data, models
    from distributed_distill.config import load_config

    cfg = load_config(SMOKE)
    out = tmp_path_factory.mktemp("student") / "tiny-llama"
    # A pretrained student brings its tokenizer: the BPE tokenizer the smoke config trains, trained the same way.
    tokenizer = models.train_bpe_tokenizer(data.texts_for_tokenizer(cfg.data), cfg.tokenizer.vocab_size, out)
    models.load_model(cfg.student, models.model_config(cfg.student, len(tokenizer), "student"), seed=0).save_pretrained(
        out
    )
    return out
