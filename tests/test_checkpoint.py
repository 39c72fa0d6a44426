"""Checkpoint contents and safety, resume checks, damaged checkpoints, the non-finite guard and wandb continuity.

Exactness after SIGKILL/SIGTERM is in test_resume.py; these tests cover what a resume must refuse or repair."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_distill import checkpoint, trainer
from distributed_distill.config import load_config
from distributed_distill.errors import DistillError

from .helpers import SMOKE, TOP_K, error_line, precomputed_store, read_metrics, run_cli, snapshot

RUN = ["train.max_steps=6", "train.save_every=2", "train.keep_last=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A 6-step smoke run that kept step-0000004 and step-0000006."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    run_cli(["train", "--config", str(SMOKE), f"output_dir={out}", *RUN])
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


def _train(out: Path, *overrides: str, check: bool = True):
    return run_cli(["train", "--config", str(SMOKE), f"output_dir={out}", *RUN, *overrides], check=check)


_error = error_line


def test_checkpoint_layout_and_marker(finished):
    steps = sorted(p.name for p in finished.iterdir() if p.name.startswith(("step-", ".tmp")))
    assert steps == ["step-0000004", "step-0000006"]  # keep_last=2 deleted step-0000002; no temporaries
    ckpt = finished / "step-0000006"
    meta = checkpoint.verify(ckpt)
    assert meta["step"] == 6 and meta["world_size"] == 1
    assert meta["tokens_seen"] == sum(r["num_tokens"] for r in read_metrics(finished))
    assert meta["data_position"] == [
        {"rank": 0, "micro_batches": 6, "first_sample_indices": meta["data_position"][0]["first_sample_indices"]}
    ]
    assert meta["scheduler"]["last_epoch"] == 6
    assert meta["config"]["train"]["save_every"] == 2
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(meta["files"])
    # The checkpoint holds the trained student: at the last step it equals the export.
    saved, final = load_file(ckpt / "model.safetensors"), load_file(finished / "final" / "model.safetensors")
    assert all(torch.equal(saved[k], final[k]) for k in final)
    # Every non-weight file loads with weights_only=True (plain tensors and data, no code).
    for name in ("optimizer.bin", "random_states_0.pkl"):
        from accelerate.utils.other import load

        assert load(ckpt / name, weights_only=True)


@pytest.mark.slow
def test_resume_after_finishing_extends_the_step_budget(run_copy):
    proc = _train(run_copy, "train.max_steps=8", "train.eval_every=4")  # step budget and eval may change
    assert f"continuing from {run_copy / 'step-0000006'} (step 6)" in proc.stdout
    assert [r["step"] for r in read_metrics(run_copy)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert sorted(p.name for p in run_copy.glob("step-*")) == ["step-0000006", "step-0000008"]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "step-0000006 is damaged: model.safetensors has"),
        pytest.param(
            "flip", "step-0000006 is damaged: optimizer.bin does not match its sha256", marks=pytest.mark.slow
        ),
        pytest.param("no_marker", "step-0000006 is incomplete (no checkpoint.json", marks=pytest.mark.slow),
    ],
)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(run_copy, damage, message):
    newest = run_copy / "step-0000006"
    if damage == "truncate":
        path = newest / "model.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "flip":
        path = newest / "optimizer.bin"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        (newest / "checkpoint.json").unlink()
    proc = _train(run_copy, "train.max_steps=8")
    assert message in proc.stdout
    assert f"continuing from {run_copy / 'step-0000004'} (step 4)" in proc.stdout
    assert (run_copy / "step-0000006.damaged").is_dir()  # kept for inspection, never resumed
    assert [r["step"] for r in read_metrics(run_copy)] == list(range(1, 9))


@pytest.mark.slow
def test_explicit_damaged_checkpoint_is_an_error_and_nothing_changes(run_copy):
    path = run_copy / "step-0000006" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    before = snapshot(run_copy)
    line = _error(_train(run_copy, f"train.resume={run_copy / 'step-0000006'}", check=False))
    assert "step-0000006 is damaged: model.safetensors has 1000 bytes" in line
    assert snapshot(run_copy) == before


@pytest.mark.parametrize(
    "override, message",
    [
        ("student.arch.hidden_size=48", "was written with student.arch.hidden_size=32 but this run has "),
        pytest.param(
            "distill.loss=reverse_kl",
            "was written with distill.loss='forward_kl' but this run has ",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "data.max_documents=30", "was written with data.max_documents=40 but this run has ", marks=pytest.mark.slow
        ),
        # The split of the global batch may change (elastic resume), the global batch may not.
        pytest.param(
            "train.micro_batch_size=2",
            "train.micro_batch_size=2 on 1 process(es) gives 2; the global batch cannot",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_resume_refuses_a_different_run_naming_the_field(run_copy, override, message):
    before = snapshot(run_copy)
    line = _error(_train(run_copy, override, check=False))
    assert message in line, line
    assert snapshot(run_copy) == before


@pytest.mark.multiprocess
@pytest.mark.slow
def test_resume_on_a_process_count_that_cannot_keep_the_global_batch_is_refused(run_copy):
    """4 sequences per step on 1 process: 2 processes of micro-batch 4 cannot make 4 (tests/test_elastic.py: the
    process counts that can, resumed)."""
    before = snapshot(run_copy)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29546"]
    proc = run_cli(["train.py", "--config", str(SMOKE), f"output_dir={run_copy}", *RUN], launcher=launcher, check=False)
    assert proc.returncode != 0
    assert (
        f"checkpoint {run_copy / 'step-0000006'} was trained with a global batch of 4 sequences (4 x 1 x 1 "
        "process(es)), but train.grad_accum_steps=1 on 2 process(es) gives 8" in proc.stderr
    )
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_no_usable_checkpoint_is_an_error(run_copy):
    for name in ("step-0000004", "step-0000006"):
        (run_copy / name / "checkpoint.json").unlink()
    before = snapshot(run_copy)
    line = _error(_train(run_copy, check=False))
    assert f"output_dir {run_copy} holds no usable checkpoint" in line and "step-0000004 is incomplete" in line
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_starting_fresh_over_checkpoints_is_refused(run_copy):
    before = snapshot(run_copy)
    line = _error(_train(run_copy, "train.resume=false", check=False))
    assert f"output_dir {run_copy} holds checkpoints of an earlier run" in line
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_offline_resume_refuses_another_store(tmp_path):
    a = precomputed_store(f"distill.store_top_k={TOP_K}")
    # The same teacher and data cut into other shards: another store (content hash), same training config.
    b = precomputed_store(f"distill.store_top_k={TOP_K}", "distill.store_shard_rows=100", name="other-shards")
    out = tmp_path / "run"
    _train(out, "distill.signal=offline", f"distill.store={a}", "train.max_steps=2")
    before = snapshot(out)
    # The store path may change (stores move); what it holds may not.
    line = _error(_train(out, "distill.signal=offline", f"distill.store={b}", "train.max_steps=4", check=False))
    assert "was trained from store" in line and f"distill.store={b} holds store" in line
    assert snapshot(out) == before


def test_a_tampered_checkpoint_file_is_refused_without_running_code(run_copy, tmp_path):
    """optimizer.bin replaced by a pickle that would run code, with the marker's hash updated to match (an
    attacker who can write the directory): weights_only loading refuses it before anything runs."""
    witness = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {witness}",))

    ckpt = run_copy / "step-0000006"
    (ckpt / "optimizer.bin").write_bytes(pickle.dumps(Payload()))
    marker = json.loads((ckpt / "checkpoint.json").read_text())
    data = (ckpt / "optimizer.bin").read_bytes()
    marker["files"]["optimizer.bin"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "checkpoint.json").write_text(json.dumps(marker))
    line = _error(_train(run_copy, "train.max_steps=8", check=False))
    assert f"checkpoint {ckpt} cannot be loaded" in line
    assert not witness.exists(), "unpickling the checkpoint ran code"


# ----------------------------------------------------------------------------------------------
# The non-finite guard (in-process: the fault is injected into the real loss function)


def _poison(monkeypatch, steps: set[int], micro_per_step: int = 1):
    """Make the KD loss NaN at the given (1-based) optimizer steps."""
    real = trainer.forward_losses
    calls = {"n": 0}

    def forward_losses(student, teacher, batch, dcfg, **kwargs):
        out = real(student, teacher, batch, dcfg, **kwargs)
        if student.training:
            calls["n"] += 1
            if (calls["n"] - 1) // micro_per_step + 1 in steps:
                out.kd_sum = out.kd_sum * float("nan")
        return out

    monkeypatch.setattr(trainer, "forward_losses", forward_losses)


def test_non_finite_steps_are_skipped_and_logged(monkeypatch, tmp_path):
    out = tmp_path / "run"
    _poison(monkeypatch, {3, 4})
    cfg = load_config(
        SMOKE,
        [f"output_dir={out}", "train.max_steps=6", "train.save_every=1", "train.keep_last=0", "train.max_bad_steps=3"],
    )
    trainer.train(cfg)
    records = {r["step"]: r for r in read_metrics(out)}
    assert [s for s, r in records.items() if r.get("skipped")] == [3, 4]
    assert records[3]["loss"] is None and records[4]["grad_norm"] is None and records[4]["skipped_steps"] == 2
    assert all(r["loss"] is not None for s, r in records.items() if s not in (3, 4))
    # Skipped steps left the weights and the optimizer untouched: checkpoints of steps 3 and 4 were not written
    # (only good steps are checkpointed), and step 5 trained on from step 2's state.
    assert sorted(p.name for p in out.glob("step-*")) == [f"step-000000{s}" for s in (1, 2, 5, 6)]
    for name in ("step-0000005", "step-0000006"):
        weights = load_file(out / name / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())
    assert checkpoint.verify(out / "step-0000006")["skipped_steps"] == 2


def test_too_many_non_finite_steps_stop_the_run_keeping_the_last_good_checkpoint(monkeypatch, tmp_path):
    out = tmp_path / "run"
    _poison(monkeypatch, set(range(5, 20)), micro_per_step=2)
    cfg = load_config(
        SMOKE,
        [
            f"output_dir={out}",
            "train.max_steps=12",
            "train.save_every=2",
            "train.max_bad_steps=3",
            "train.grad_accum_steps=2",
        ],
    )
    with pytest.raises(DistillError) as e:
        trainer.train(cfg)
    message = str(e.value)
    assert "3 consecutive steps (up to step 7) had a non-finite loss or gradient (train.max_bad_steps=3)" in message
    assert f"last good checkpoint: {out / 'step-0000004'}" in message
    good = checkpoint.verify(out / "step-0000004")
    assert good["step"] == 4 and not (out / "step-0000006").exists() and not (out / "final").exists()
    assert [r["step"] for r in read_metrics(out) if r.get("skipped")] == [5, 6, 7]


# ----------------------------------------------------------------------------------------------
# wandb


@pytest.mark.slow
def test_resumed_run_continues_the_same_wandb_run(tmp_path):
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    common = ["train", "--config", str(SMOKE), f"output_dir={out}", "train.save_every=2", "logging.wandb.mode=offline"]
    run_cli([*common, "train.max_steps=2"], env=env)
    run_id = checkpoint.verify(out / "step-0000002")["wandb_run_id"]
    assert run_id
    run_cli([*common, "train.max_steps=4"], env=env)
    assert checkpoint.verify(out / "step-0000004")["wandb_run_id"] == run_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
