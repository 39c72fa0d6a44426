"""wandb: `offline` writes a local run directory holding the logged metrics; `disabled` writes nothing."""

import json

from .conftest import SMOKE, read_metrics, run_cli


def _history(run_file) -> list[dict]:
    """Decode the history rows of an offline wandb run file with wandb's own reader."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(run_file))
    rows = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_wandb_offline_writes_the_logged_metrics(tmp_path):
    out = tmp_path / "run"
    run_cli(["train", "--config", str(SMOKE), f"output_dir={out}", "logging.wandb.mode=offline", "train.max_steps=3"],
            env={"WANDB_MODE": None, "WANDB_SILENT": "true"})
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


def test_wandb_disabled_writes_nothing(tmp_path):
    out = tmp_path / "run"
    run_cli(["train", "--config", str(SMOKE), f"output_dir={out}", "train.max_steps=1"],
            env={"WANDB_MODE": None, "WANDB_DIR": str(tmp_path / "wandb_env")})
    assert not (out / "wandb").exists()
    assert not (tmp_path / "wandb_env").exists()
    assert not list(tmp_path.rglob("*.wandb"))
