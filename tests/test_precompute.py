"""`distill precompute`: 2 processes write the same store as 1; a SIGKILLed run, started again, finishes the
store identical to an uninterrupted one; parts run separately (a job array) write the same store as one run; a
store directory of another config is never overwritten."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distributed_distill.errors import DistillError
from distributed_distill.store.writer import PART_ENV, parse_part, part_of

from .helpers import SAMPLED_STORE, SMOKE, STORE_OVERRIDES, kill_after_shards, precomputed_store, run_cli, store_files


@pytest.fixture(scope="module")
def reference() -> Path:
    return precomputed_store(*STORE_OVERRIDES)


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29711"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    + ["--main_process_port", "29713"],
}


@pytest.mark.multiprocess
# accelerate in the release tier (CI's hour, docs/testing.md); CI's sibling: torchrun, the same writer
@pytest.mark.parametrize(
    "launcher", ["torchrun", pytest.param("accelerate", marks=pytest.mark.release), "torchrun-sampled"]
)
@pytest.mark.slow
def test_two_processes_write_the_store_one_process_writes(reference, tmp_path, launcher):
    # Sampled targets, packed (issue 27): the draws are seeded per row, so 2 processes write the same bytes too.
    settings = SAMPLED_STORE if launcher.endswith("-sampled") else STORE_OVERRIDES
    reference = precomputed_store(*SAMPLED_STORE) if launcher.endswith("-sampled") else reference
    launcher = launcher.removesuffix("-sampled")
    out = tmp_path / "two"
    proc = run_cli(
        [
            "-m",
            "distributed_distill.cli",
            "precompute",
            "--config",
            str(SMOKE),
            f"distill.store={out}",
            *settings,
        ],
        launcher=LAUNCHERS[launcher],
        env={"ACCELERATE_USE_CPU": "true"} if launcher == "accelerate" else {},
        timeout=600,
    )
    assert re.search(r"wrote (\d+) of \1 shards", proc.stdout)  # both ranks' shards, counted across ranks
    assert run_cli(["verify-store", str(out)]).stdout.startswith("ok: ")
    assert store_files(out) == store_files(reference)


@pytest.mark.slow
def test_killed_precompute_resumes_to_the_identical_store(reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "distributed_distill.cli", "precompute", "--config", str(SMOKE)]
    cmd += [f"distill.store={out}", *STORE_OVERRIDES]
    assert kill_after_shards(cmd, out, 3) == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    assert run_cli(["verify-store", str(out)], check=False).returncode == 2  # unfinished is not a store
    done_before = len(list((out / "train").glob("*.json")))
    result = json.loads(run_cli(cmd[3:], timeout=300).stdout.strip().splitlines()[-1])
    assert result["shards_written"] == result["shards"] - done_before  # only the remaining work
    assert store_files(out) == store_files(reference)  # same rows, same bytes, same checksums; no leftover temp files
    again = json.loads(run_cli(cmd[3:], timeout=300).stdout.strip().splitlines()[-1])
    assert again["shards_written"] == 0


@pytest.mark.slow
def test_store_of_another_config_is_not_overwritten(reference, tmp_path):
    before = store_files(reference)
    proc = run_cli(
        ["precompute", "--config", str(SMOKE), f"distill.store={reference}", "distill.store_top_k=8"], check=False
    )
    assert proc.returncode == 2
    assert "holds a finished store of another config" in proc.stderr
    assert store_files(reference) == before
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    proc = run_cli(["precompute", "--config", str(SMOKE), f"distill.store={other}"], check=False)
    assert proc.returncode == 2 and "not a store" in proc.stderr
    proc = run_cli(["precompute", "--config", str(SMOKE), "teacher=null", "distill.alpha=0"], check=False)
    assert proc.returncode == 2 and "needs a teacher" in proc.stderr


@pytest.mark.slow
def test_max_rows_keeps_the_first_rows_of_the_training_order(reference, tmp_path):
    out = tmp_path / "prefix"
    run_cli(
        ["precompute", "--config", str(SMOKE), f"distill.store={out}", *STORE_OVERRIDES]
        + ["distill.store_max_rows=40", "distill.store_shard_rows=16"]
    )
    assert run_cli(["verify-store", str(out)]).stdout.startswith("ok: ")
    small, full = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
    train = small["splits"]["train"]
    assert train["rows"] == 40 and [s["rows"] for s in train["shards"]] == [16, 16, 8]
    assert small["splits"]["validation"]["rows"] == full["splits"]["validation"]["rows"]  # always whole
    first = [pq.read_table(out / s["path"])["index"].to_pylist() for s in train["shards"]]
    ref = pq.read_table(reference / full["splits"]["train"]["shards"][0]["path"])["index"].to_pylist()
    assert sum(first, []) == ref[:40]


def test_parts_cover_the_shard_list_in_contiguous_ranges():
    layout = list(range(26))
    for count in (1, 2, 3, 7, 26, 30):
        parts = [part_of(layout, (i, count)) for i in range(count)]
        assert sum(parts, []) == layout
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert part_of(layout, None) is layout
    assert parse_part("1/4") == (1, 4) and parse_part("") is None and parse_part(None) is None
    for bad in ("4/4", "-1/4", "1", "a/b", "1/0"):
        with pytest.raises(DistillError, match="DISTILL_STORE_PART"):
            parse_part(bad)


@pytest.mark.slow
def test_parts_run_separately_write_the_store_one_run_writes(reference, tmp_path):
    """A job array's tasks (DISTILL_STORE_PART=I/N) fill one store; the last part to finish writes the manifest."""
    out = tmp_path / "parts"
    cmd = ["precompute", "--config", str(SMOKE), f"distill.store={out}", *STORE_OVERRIDES]
    second = json.loads(run_cli(cmd, env={PART_ENV: "1/2"}).stdout.strip().splitlines()[-1])
    assert second["complete"] is False and second["part"] == "1/2"
    assert second["shards_written"] == second["part_shards"] < second["shards"]
    assert not (out / "manifest.json").exists()
    assert run_cli(["verify-store", str(out)], check=False).returncode == 2  # half a store is not a store
    first = run_cli(cmd, env={PART_ENV: "0/2"})
    assert "store complete" in first.stdout
    first = json.loads(first.stdout.strip().splitlines()[-1])
    assert first["complete"] is True and first["shards_written"] + second["shards_written"] == first["shards"]
    assert run_cli(["verify-store", str(out)]).stdout.startswith("ok: ")
    assert store_files(out) == store_files(reference)
    proc = run_cli(cmd, env={PART_ENV: "2/2"}, check=False)
    assert proc.returncode == 2 and "DISTILL_STORE_PART='2/2' must be I/N" in proc.stderr
