"""wandb: `offline` writes a local run directory holding the logged metrics; `disabled` writes nothing."""

import json
import struct
import sys
from pathlib import Path

import pytest

from .helpers import SMOKE, read_metrics, run_cli


def _records(run_file) -> list[bytes]:
    """The records of a wandb run file: a LevelDB-style log (7-byte header, 32 KiB blocks, each record
    `crc32 | length | type` then payload, split as FIRST/MIDDLE/LAST across blocks). wandb >= 0.2x no longer
    ships a Python reader, so the test reads the format itself."""
    data, block, pos, out, partial = Path(run_file).read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(payload)
        elif kind == 2:
            partial = payload
        elif kind == 3:
            partial += payload
        elif kind == 4:
            out.append(partial + payload)
    return out


def _history(run_file) -> list[dict]:
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in _records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def test_wandb_offline_writes_the_logged_metrics(tmp_path):
    out = tmp_path / "run"
    run_cli(
        ["train", "--config", str(SMOKE), f"output_dir={out}", "logging.wandb.mode=offline", "train.max_steps=3"],
        env={"WANDB_MODE": None, "WANDB_SILENT": "true"},
    )
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_files = list(runs[0].glob("run-*.wandb"))
    assert len(run_files) == 1
    history = _history(run_files[0])
    logged = read_metrics(out)
    assert [row["_step"] for row in history] == [r["step"] for r in logged]
    for row, rec in zip(history, logged):
        assert row["loss"] == rec["loss"] and row["kd_loss"] == rec["kd_loss"]
    assert "val_loss" in history[-1]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_wandb_offline_with_two_processes(tmp_path):
    """The tracker ends without taking down the process group that the export after it still uses."""
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29815"]
    run_cli(
        ["--config", str(SMOKE), f"output_dir={out}", "logging.wandb.mode=offline", "train.max_steps=2"],
        launcher=[*torchrun, "train.py"],
        env={"WANDB_MODE": None, "WANDB_SILENT": "true"},
        timeout=600,
    )
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_wandb_disabled_writes_nothing(tmp_path):
    out = tmp_path / "run"
    run_cli(
        ["train", "--config", str(SMOKE), f"output_dir={out}", "train.max_steps=1"],
        env={"WANDB_MODE": None, "WANDB_DIR": str(tmp_path / "wandb_env")},
    )
    assert not (out / "wandb").exists()
    assert not (tmp_path / "wandb_env").exists()
    assert not list(tmp_path.rglob("*.wandb"))
