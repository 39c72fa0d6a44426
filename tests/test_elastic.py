"""Elastic resume: a checkpoint written by N processes continues on M (a job requeued onto fewer or more nodes).

The global batch (micro x accumulation x processes) stays; the accumulation adjusts. The data position is global,
so the resumed run trains every later sample exactly once, and its student equals (to float32 reduction-order
noise) an uninterrupted run on M processes: online, offline (streamed store with a shuffle buffer), and with a
DeepSpeed ZeRO-2 student (its optimizer state re-partitioned through DeepSpeed's universal checkpoint).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .helpers import SMOKE, TOP_K, accelerate_launch, interrupt, precomputed_store, read_metrics, run_cli, torchrun

STEPS = 12
# save_every=5: the checkpoint resumed is at an odd step, where 2 processes have taken an odd number of micro-steps
# (the 1-process run must still sync its gradients on even ones).
COMMON = [f"train.max_steps={STEPS}", "train.save_every=5", "train.eval_every=6", "train.micro_batch_size=2"]


def _launcher(procs: int | str, port: int) -> list[str]:
    if procs == "zero2-1":
        return [*accelerate_launch("zero2.yaml", port)[:-4], "--num_processes", "1", "train.py"]
    if procs == "zero2":
        return [*accelerate_launch("zero2.yaml", port), "train.py"]
    return [sys.executable, "train.py"] if procs == 1 else torchrun(port, "train.py")


def _args(out: Path, accum: int, source: str) -> list[str]:
    """The run's arguments; accumulation 2 on 1 process and 1 on 2 processes: a global batch of 4 either way."""
    args = ["--config", str(SMOKE), f"output_dir={out}", *COMMON, f"train.grad_accum_steps={accum}"]
    if source == "offline":
        store = precomputed_store(f"distill.store_top_k={TOP_K}")
        args += ["distill.signal=offline", f"distill.store={store}", "distill.shuffle_buffer=16"]
    return args


def assert_close_students(a: Path, b: Path, tol: float) -> float:
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= tol, f"weights differ by {worst:.3g} > {tol}"
    return worst


@pytest.mark.parametrize(
    "before, after, source",
    [
        pytest.param(2, 1, "online", marks=pytest.mark.slow),
        pytest.param(1, 2, "online", marks=pytest.mark.slow),
        pytest.param(2, 1, "offline", marks=pytest.mark.slow),
        # release tier (CI's hour, docs/testing.md); CI's siblings: 1to2-online and 2to1-offline
        pytest.param(1, 2, "offline", marks=[pytest.mark.slow, pytest.mark.release]),
        pytest.param("zero2", "zero2-1", "online", marks=pytest.mark.slow),
    ],
    ids=["2to1-online", "1to2-online", "2to1-offline", "1to2-offline", "zero2-2to1"],
)
@pytest.mark.multiprocess
def test_resume_on_another_process_count_equals_an_uninterrupted_run(tmp_path, before, after, source):
    procs_before, procs_after = (2, 1) if before == "zero2" else (before, after)
    accum = 2 // procs_before  # a global batch of 4 sequences of micro-batch 2
    reference = tmp_path / "reference"
    run_cli(_args(reference, 2 // procs_after, source), launcher=_launcher(after, 29561), timeout=600)
    out = tmp_path / "run"
    # Killed at step 7: the step-5 checkpoint (written by `before` processes) is what the next run continues from.
    killed = interrupt(_launcher(before, 29562) + _args(out, accum, source), out, 7, signal.SIGKILL)
    assert killed.returncode != 0 and not (out / "final").exists()
    done = [int(p.name[5:]) for p in out.glob("step-*") if (p / "checkpoint.json").is_file()]
    # The same command on `after` processes: the accumulation adjusts by itself.
    proc = run_cli(_args(out, accum, source), launcher=_launcher(after, 29563), timeout=600)
    assert f"continuing from {out / f'step-{max(done):07d}'}" in proc.stdout
    assert f"written by {procs_before} process(es), continuing on {procs_after}: 2 x {2 // procs_after} " in (
        proc.stdout
    )
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # every step once
    ref_records = read_metrics(reference)
    for r, ref in zip(records, ref_records):
        assert r["num_tokens"] == ref["num_tokens"], r["step"]  # the same sequences, step by step
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-5), r["step"]
    if before == "zero2":
        # DeepSpeed's universal checkpoint gave the one process the whole optimizer state (2 shards merged).
        assert_close_students(reference, out, tol=1e-5)
        assert not list(out.glob(".universal-*")), "the converted copy is removed after loading"
    else:
        worst = assert_close_students(reference, out, tol=1e-6)
        print(f"max |w_resumed - w_uninterrupted| = {worst:.3g}")


def test_resume_refuses_a_different_global_batch(tmp_path):
    """A checkpoint's global batch cannot change: the key that would change it is named, nothing is trained."""
    from distributed_distill.checkpoint import CheckpointError, global_batch, resume_config
    from distributed_distill.config import load_config, to_dict

    cfg = load_config(SMOKE, ["train.micro_batch_size=2", "train.grad_accum_steps=1"])
    meta = {"config": to_dict(cfg), "world_size": 2}
    assert global_batch(meta) == 4
    assert resume_config(cfg, meta, 1).train.grad_accum_steps == 2  # the same command on half the processes
    assert resume_config(cfg, meta, 2) is cfg
    fine = load_config(SMOKE, ["train.micro_batch_size=4", "train.grad_accum_steps=1"])
    assert resume_config(fine, meta, 1).train.grad_accum_steps == 1  # micro-batch set anew, same global batch
    for overrides, world, key in [
        (["train.micro_batch_size=2", "train.grad_accum_steps=1"], 3, "train.grad_accum_steps=1 on 3"),
        (["train.micro_batch_size=2", "train.grad_accum_steps=4"], 1, "train.grad_accum_steps=4 on 1"),
        (["train.micro_batch_size=3", "train.grad_accum_steps=1"], 1, "train.micro_batch_size=3 on 1"),
    ]:
        with pytest.raises(CheckpointError) as info:
            resume_config(load_config(SMOKE, overrides), meta, world, "runs/x/step-0000004")
        message = str(info.value)
        assert key in message and "global batch of 4 sequences (2 x 1 x 2 process(es))" in message, message
        assert "\n" not in message


def test_data_position_converts_to_another_process_count():
    """The data position a checkpoint records converts to any process count of the same global batch."""
    from distributed_distill.config import load_config, to_dict
    from distributed_distill.trainer import Progress

    cfg = load_config(SMOKE, ["train.micro_batch_size=2", "train.grad_accum_steps=2"])
    meta = {
        "step": 3,
        "tokens_seen": 0,
        "bad_steps": 0,
        "skipped_steps": 0,
        "wandb_run_id": None,
        "world_size": 1,
        "config": to_dict(cfg),
        "data_position": [{"rank": 0, "micro_batches": 6, "first_sample_indices": [1, 2]}],
        "scheduler": torch.optim.lr_scheduler.LambdaLR(
            torch.optim.SGD([torch.zeros(1)], lr=1), lambda s: 1.0
        ).state_dict(),
    }

    class Two:  # the two ranks of a 2-process resume
        num_processes = 2

        def __init__(self, rank: int):
            self.process_index = rank

    half = to_dict(load_config(SMOKE, ["train.micro_batch_size=2", "train.grad_accum_steps=1"]))
    for rank in (0, 1):
        progress = Progress(config=half)
        scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=1), lambda s: 1.0)
        progress.restore(meta, scheduler, Two(rank))
        # 12 sequences consumed (6 micro-batches of 2): each of 2 ranks has taken 3 micro-steps of 2.
        assert progress.micro_batches == 3 and progress.step == 3
        assert progress.first_sample_indices == ([1, 2] if rank == 0 else [])
