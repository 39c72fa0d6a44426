"""What a user can get wrong, and faults of the machine, through the real CLI: one job per run directory (the lock),
a torn metrics line, a full file system, damaged model files, an unwritable output directory, a corpus smaller
than one batch, a damaged store shard. (Ctrl-C is in test_resume.py, beside SIGTERM; each row of the bad-input
table in docs/robustness.md is run by test_bad_input_table.py.)"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distributed_distill import checkpoint
from distributed_distill.eval.report import report

from .helpers import (
    ROOT,
    SMOKE,
    TOP_K,
    error_line,
    precomputed_store,
    read_metrics,
    run_cli,
    tmpfs,
    torchrun,
)

CLI = [sys.executable, "-m", "distributed_distill.cli"]


def _train(out: Path, *overrides: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return run_cli(["train", "--config", str(SMOKE), f"output_dir={out}", *overrides], check=check, **kwargs)


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if max((r["step"] for r in read_metrics(out)), default=0) >= step:
                return
        except (FileNotFoundError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run ended before step {step}:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------
# The lock: one job per run directory


def _refused_while_running(first: list[str], second: list[str], out: Path, steps: int) -> tuple[str, float]:
    """Start `first`, wait for its first metrics record, run `second` on the same directory: it must be refused
    with one line naming the holder, and `first` must finish with exactly one record per step."""
    proc = _start(first)
    try:
        _wait_for_step(proc, out, 1)
        holder = json.loads((out / ".lock").read_text())
        # The first job is paused (SIGSTOP, every process of it) while the second tries: however slowly the second
        # starts on a loaded machine, the first is still running, holding its lock, when the second gets there.
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in tree:
            p.suspend()
        started = time.monotonic()
        try:
            refused = subprocess.run(second, cwd=ROOT, capture_output=True, text=True, timeout=300)
        finally:
            for p in tree:
                p.resume()
        seconds = time.monotonic() - started
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.returncode != 0 and len(lines) == 1, refused.stderr[-3000:]
    assert f"output_dir={out} is in use by another job (host {holder['host']}, pid {holder['pid']}, started" in lines[0]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, steps + 1))  # first run unaffected
    assert not (out / ".lock").exists()  # released when the first run ended
    return lines[0], seconds


def test_a_second_run_on_the_same_output_dir_is_refused_at_once(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--config", str(SMOKE), f"output_dir={out}", "train.max_steps=20"]
    line, seconds = _refused_while_running(CLI + args, CLI + args, out, 20)
    print(f"second run refused in {seconds:.2f} s: {line}")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_second_torchrun_job_on_the_same_output_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    args = ["train.py", "--config", str(SMOKE), f"output_dir={out}", "train.max_steps=20", "train.micro_batch_size=2"]
    line, seconds = _refused_while_running(torchrun(29651, *args), torchrun(29652, *args), out, 20)
    print(f"second torchrun job refused in {seconds:.2f} s: {line}")


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_does_not_block_the_rerun(tmp_path):
    out = tmp_path / "run"
    proc = _start(CLI + ["train", "--config", str(SMOKE), f"output_dir={out}", "train.max_steps=40"])
    _wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert (out / ".lock").is_file()  # the file stays; the kernel dropped the lock with the process
    _train(out, "train.max_steps=4", "train.save_every=2")
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_store_being_written_is_locked(tmp_path):
    store = tmp_path / "store"
    args = ["precompute", "--config", str(SMOKE), f"distill.store={store}", f"distill.store_top_k={TOP_K}"]
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from distributed_distill import lock; lock.acquire({str(store)!r}, 'distill.store');"
         "import time; print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        line = error_line(run_cli(args, check=False))
        assert f"distill.store={store} is in use by another job (host" in line and f"pid {holder.pid}" in line
    finally:
        holder.kill()
        holder.communicate()


# ----------------------------------------------------------------------------------------------
# A torn last line in metrics.jsonl


@pytest.mark.slow
def test_a_torn_metrics_line_is_dropped_on_resume_and_skipped_by_report(tmp_path):
    out = tmp_path / "run"
    _train(out, "train.max_steps=4", "train.save_every=2")
    metrics = out / "metrics.jsonl"
    complete = metrics.read_text()
    metrics.write_text(complete + '{"step": 5, "loss": 4.1')  # a full disk in the middle of an append
    text = report([out])
    assert "skipped its last line" in text and "steps: 4" in text
    proc = run_cli(["report", str(out)])
    assert "skipped its last line" in proc.stdout
    resumed = _train(out, "train.max_steps=6", "train.save_every=2")
    assert "resume: " in resumed.stdout and "skipped its last line" in resumed.stdout
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------------------------
# A full file system (a size-limited tmpfs), at a checkpoint, a store shard and the export


def _full_disk_run(tmp_path: Path, size: str, *overrides: str) -> tuple[Path, str]:
    mount = tmp_path / "small"
    out = mount / "run"
    with tmpfs(mount, size):
        proc = _train(out, *overrides, check=False)
        line = error_line(proc)
        assert not list(out.glob(".tmp-*")), "a temporary directory was left behind"
        newest = checkpoint.newest_complete(out)
        if newest is not None:
            checkpoint.verify(newest)  # nothing complete was damaged
        # Room again (a live resize): the same command continues from the newest complete checkpoint.
        subprocess.run(["mount", "-o", "remount,size=8m", str(mount)], check=True)
        _train(out, *overrides)
        assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
        assert (out / "final" / "model.safetensors").is_file()
    return out, line


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_rerun_resumes(tmp_path):
    # A smoke checkpoint is ~616 KiB: step-0000002 fits, step-0000004 (written before step 2's is pruned) does not.
    out, line = _full_disk_run(tmp_path, "1000k", "train.max_steps=4", "train.save_every=2", "train.keep_last=1")
    assert line == (
        f"error: no space left on device while writing checkpoint {out / 'step-0000004'}; "
        f"the newest complete checkpoint is {out / 'step-0000002'}"
    )


@pytest.mark.slow
def test_a_full_disk_at_the_export_is_one_line_and_the_rerun_exports(tmp_path):
    # step-0000004 (~616 KiB) fits, the export (~236 KiB) does not.
    out, line = _full_disk_run(tmp_path, "800k", "train.max_steps=4", "train.save_every=4")
    assert line == (
        f"error: no space left on device while writing the exported student {out / 'final'}; "
        f"the newest complete checkpoint is {out / 'step-0000004'}"
    )


@pytest.mark.slow
def test_a_full_disk_at_a_store_shard_is_one_line_and_the_rerun_finishes(tmp_path):
    reference = precomputed_store(f"distill.store_top_k={TOP_K}", "distill.store_shard_rows=1000", name="shards-1000")
    shards = sorted((reference / "train").glob("*.parquet"))
    size = sum(p.stat().st_size for p in shards[:2]) + 256 * 1024  # room for about two shards and the metadata
    mount = tmp_path / "small"
    store = mount / "store"
    args = ["precompute", "--config", str(SMOKE), f"distill.store={store}", f"distill.store_top_k={TOP_K}"]
    args.append("distill.store_shard_rows=1000")
    with tmpfs(mount, f"{size // 1024}k"):
        line = error_line(run_cli(args, check=False))
        assert "error: no space left on device while writing store shard" in line
        assert "the shards finished before it are complete" in line
        assert not list(store.rglob("*.tmp")), "a temporary shard was left behind"
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        run_cli(args)
        run_cli(["verify-store", str(store)])
        for p in shards:
            assert (store / "train" / p.name).read_bytes() == p.read_bytes()


@pytest.mark.slow
def test_too_little_room_for_one_checkpoint_is_refused_before_any_work(tmp_path):
    mount = tmp_path / "small"
    with tmpfs(mount, "256k"):
        line = error_line(_train(mount / "run", check=False))
        assert f"output_dir={mount / 'run'} has" in line and "but one checkpoint of the student" in line
        assert "49,248 parameters" in line
        assert not (mount / "run").exists()


# ----------------------------------------------------------------------------------------------
# An output directory that cannot be written


def test_an_output_dir_under_a_regular_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    line = error_line(_train(tmp_path / "file" / "run", check=False))
    out = tmp_path / "file" / "run"
    assert line == f"error: output_dir={out} cannot be written: not a directory; choose a writable directory"


@pytest.mark.slow
def test_a_read_only_output_dir_is_refused_before_any_work(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", "ro"):
        line = error_line(_train(tmp_path / "ro" / "run", check=False))
        assert "cannot be written: read-only file system" in line


# ----------------------------------------------------------------------------------------------
# Damaged model files: found by reading the safetensors headers, before the tokenizer or any data work


def _damage(model: Path, how: str) -> str:
    weights = model / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
        return f"student.path={model}: model.safetensors is truncated ("
    if how == "flipped-header-byte":
        data = bytearray(weights.read_bytes())
        data[10] ^= 0xFF  # inside the JSON header
        weights.write_bytes(bytes(data))
        return f"student.path={model}: model.safetensors is damaged: its header is not valid JSON"
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] += 88
    (model / "config.json").write_text(json.dumps(config))
    return f"student.path={model}: the weights do not match config.json: lm_head.weight has shape [512, 32]"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "flipped-header-byte", "vocab"])
def test_a_damaged_model_is_named_before_any_work(student_dir, tmp_path, how):
    model = tmp_path / "model"
    shutil.copytree(student_dir, model)
    expected = _damage(model, how)
    out = tmp_path / "run"
    proc = _train(out, "student.arch=null", f"student.path={model}", "teacher=null", "distill.alpha=0", check=False)
    assert expected in error_line(proc)
    assert "training a" not in proc.stdout and not out.exists()  # no tokenizer trained, nothing written


# ----------------------------------------------------------------------------------------------
# Data


@pytest.mark.slow
def test_a_corpus_smaller_than_one_global_batch_is_refused_with_the_numbers(tmp_path):
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x): return x + {i}"}) + "\n" for i in range(8)))
    proc = _train(tmp_path / "run", f"data.source={data}", "data.val_fraction=0.5", check=False)
    line = error_line(proc)
    assert f"data.source={data} gives 1 training sequence(s) of 64 tokens, fewer than one global batch" in line
    assert "(4 micro_batch_size x 1 grad_accum_steps x 1 process(es) = 4)" in line


def test_offline_training_checks_each_shard_as_it_reads_it(tmp_path):
    store = tmp_path / "store"
    shutil.copytree(precomputed_store(f"distill.store_top_k={TOP_K}"), store)
    shard = store / "train" / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: same size, same layout, wrong targets
    shard.write_bytes(bytes(data))
    offline = ["distill.signal=offline", f"distill.store={store}", "distill.shuffle_buffer=0"]  # shard 0 first
    proc = _train(tmp_path / "run", *offline, "train.max_steps=2", check=False)
    assert error_line(proc) == (
        f"error: store {store}: shard train/shard-00000.parquet does not match its sha256 (checksum mismatch); "
        f"run `distill verify-store {store}`"
    )


@pytest.mark.parametrize(
    "outcome, code, destroyed",
    [("finished", 0, True), ("preempted", 75, True), ("error", 2, False)],
)
def test_the_cli_destroys_the_process_group_after_a_finished_or_agreed_stop(
    monkeypatch, tmp_path, outcome, code, destroyed
):
    """Left to interpreter shutdown, gloo's worker threads could abort a rank whose work was all saved (SIGABRT,
    "terminate called without an active exception": a failed job). After an error it is left alone: a rank still
    in a collective would hang the destroy. A real gloo group (world size 1) through `cli.main`."""
    import torch.distributed as dist

    from distributed_distill import cli
    from distributed_distill.errors import DistillError, Preempted

    def command(args):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
        dist.barrier()
        if outcome == "preempted":
            raise Preempted("preempted at step 3: checkpoint written")
        if outcome == "error":
            raise DistillError("a bad store")
        return 0

    monkeypatch.setattr(cli, "cmd_verify_store", command)
    try:
        assert cli.main(["verify-store", str(tmp_path)]) == code
        assert dist.is_initialized() is not destroyed
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


LEAVE = """
import atexit, sys
import torch.distributed as dist
from distributed_distill import cli

dist.init_process_group("gloo")
seen = [None] * dist.get_world_size()
dist.all_gather_object(seen, dist.get_rank())  # a collective whose tensors the gloo worker threads drop last
atexit.register(lambda: print(f"rank {dist.get_rank() if dist.is_initialized() else '?'} finalized", flush=True))
print(f"rank {dist.get_rank()} of {dist.get_world_size()} saw {seen}")  # unflushed: leave() must flush it
cli.end_process_group()
cli.leave(0)
"""


@pytest.mark.parametrize("procs", [1, 2])
def test_a_rank_of_several_leaves_without_interpreter_finalization(tmp_path, procs):
    """After a finished multi-process command each rank exits by os._exit, output flushed: interpreter finalization
    could abort it (a gloo worker thread freeing a finished collective's tensors needs the GIL: SIGABRT, a failed
    job). A single process exits normally (its atexit handlers run)."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", "29714"]
    proc = subprocess.run([*cmd, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(procs):
        assert f"rank {rank} of {procs} saw {list(range(procs))}" in proc.stdout
    assert ("finalized" in proc.stdout) == (procs == 1), proc.stdout
