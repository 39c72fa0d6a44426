"""The logit store through the real CLI: `distill precompute` writes it, `distill verify-store` checks it, and
damaged stores (corrupted, truncated, missing shard, a row whose ids no longer match its hash) are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_distill.integrity import sha256_file
from distributed_distill.store.format import PARQUET_OPTIONS, row_hash, shard_name
from distributed_distill.store.logits import LOGIT_FORMAT, LOGIT_VERSION

from .helpers import TOP_K, precomputed_store, run_cli


@pytest.fixture(scope="module")
def smoke_store() -> Path:
    return precomputed_store(f"distill.store_top_k={TOP_K}")


@pytest.fixture
def store_copy(smoke_store, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(smoke_store, dst)
    return dst


def _verify(root: Path):
    return run_cli(["verify-store", str(root)], check=False, timeout=120)


def test_store_verifies_and_manifest_describes_it(smoke_store):
    proc = _verify(smoke_store)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("ok: store") and len(proc.stdout.strip().splitlines()) == 1
    m = json.loads((smoke_store / "manifest.json").read_text())
    assert m["format"] == LOGIT_FORMAT and m["version"] == LOGIT_VERSION
    assert m["top_k"] == TOP_K and m["temperature"] == 2.0 and m["seq_len"] == 64 and m["vocab_size"] == 512
    assert len(m["config_hash"]) == 64 and len(m["tokenizer_sha256"]) == 64 and len(m["dataset_fingerprint"]) == 64
    assert m["teacher"]["arch"]["hidden_size"] == 64 and len(m["teacher"]["config_sha256"]) == 64
    shards = [s for split in ("train", "validation") for s in m["splits"][split]["shards"]]
    assert m["rows"] == sum(s["rows"] for s in shards) and m["tokens"] == m["rows"] * 64
    for s in shards:
        assert sha256_file(smoke_store / s["path"]) == s["sha256"]
    # Narrow types on disk, compression on.
    schema = pq.read_schema(smoke_store / shards[0]["path"])
    assert str(schema.field("teacher_ids").type) == "list<element: uint16>"
    assert str(schema.field("input_ids").type) == "list<element: uint16>"
    assert str(schema.field("teacher_logprobs").type) == "list<element: halffloat>"
    meta = pq.ParquetFile(smoke_store / shards[0]["path"]).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_store_reads_with_plain_datasets(smoke_store):
    m = json.loads((smoke_store / "manifest.json").read_text())
    files = [str(smoke_store / s["path"]) for s in m["splits"]["train"]["shards"]]
    ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    row = next(iter(ds))
    assert len(row["input_ids"]) == 64 and len(row["teacher_ids"]) == 63 * TOP_K and len(row["teacher_tail"]) == 63
    assert row_hash(np.asarray(row["input_ids"])) == row["row_hash"]
    logprobs = np.asarray(row["teacher_logprobs"], dtype=np.float32).reshape(63, TOP_K)
    tail = np.asarray(row["teacher_tail"], dtype=np.float32)
    # Each position: the top-k in descending order, and with the tail they hold all the probability.
    assert (np.diff(logprobs, axis=1) <= 0).all()
    total = np.exp(logprobs).sum(1) + np.exp(tail)
    np.testing.assert_allclose(total, 1.0, atol=2e-2)


def _shard(root: Path, number: int = 3) -> Path:
    return root / shard_name("train", number)


def test_corrupted_shard_is_named(store_copy):
    path = _shard(store_copy)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    proc = _verify(store_copy)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.startswith("error: ") and len(line.splitlines()) == 1
    assert "train/shard-00003.parquet" in line and "checksum mismatch" in line


@pytest.mark.slow
def test_truncated_shard_is_named(store_copy):
    path = _shard(store_copy)
    path.write_bytes(path.read_bytes()[:-1000])
    proc = _verify(store_copy)
    assert proc.returncode == 2
    assert "train/shard-00003.parquet" in proc.stderr and "truncated" in proc.stderr


@pytest.mark.slow
def test_missing_shard_is_named(store_copy):
    _shard(store_copy).unlink()
    proc = _verify(store_copy)
    assert proc.returncode == 2
    assert "train/shard-00003.parquet is missing" in proc.stderr


def test_row_whose_ids_do_not_match_its_hash_is_named(store_copy):
    """Targets paired with other token ids: rewrite a shard (and its checksum, so only the hash can tell)."""
    path = _shard(store_copy)
    table = pq.read_table(path)
    ids = table["input_ids"].to_pylist()
    ids[7][5] = (ids[7][5] + 1) % 512
    column = pa.array(ids, type=pa.list_(pa.uint16()))
    table = table.set_column(table.column_names.index("input_ids"), "input_ids", column)
    pq.write_table(table, path, **PARQUET_OPTIONS)
    manifest = json.loads((store_copy / "manifest.json").read_text())
    entry = next(s for s in manifest["splits"]["train"]["shards"] if s["path"] == "train/shard-00003.parquet")
    entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    proc = _verify(store_copy)
    assert proc.returncode == 2
    assert "train/shard-00003.parquet row 7" in proc.stderr and "content hash" in proc.stderr


@pytest.mark.slow
def test_unfinished_store_is_not_verified(store_copy):
    (store_copy / "manifest.json").unlink()
    proc = _verify(store_copy)
    assert proc.returncode == 2 and "unfinished" in proc.stderr
