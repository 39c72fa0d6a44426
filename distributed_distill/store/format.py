"""The store format core, shared by the logit store (logits.py) and the sample store (samples.py).

A store directory (docs/store.md):

    manifest.json                  written last: a store without it is unfinished
    plan.json                      what is being written (config hash); a resumed writer must match it
    train/shard-00000.parquet      Parquet shards of rows; each row carries `row_hash`, a content hash of its token ids
    train/shard-00000.json         the shard's sidecar: rows, tokens, bytes, sha256 (written after the shard)
    validation/shard-00000.parquet

What both formats share lives here: the names and id dtypes, the row hash, writing a shard atomically with its
sidecar, reading a manifest and checking it against a run, reading a shard checked against its recorded size and
sha256, and the verification of every shard (`verify_shards`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import lock
from ..errors import DistillError, WriteError, write_failure
from ..integrity import file_problem, fsync_path, read_checked, record, write_json_atomic

MANIFEST, PLAN = "manifest.json", "plan.json"
SPLITS = ("train", "validation")

# Both formats keep teacher log-probs as float16: the online top-k teacher rounds through float16 too
# (teacher.topk_targets), so an offline and an online run with the same k train on identical values.
# BYTE_STREAM_SPLIT groups the high bytes (sign and exponent, few distinct values) so zstd compresses them; ids
# compress best plain (measured, docs/store.md). A column a shard lacks (no top-k kept) is not encoded.
PARQUET_OPTIONS = dict(
    compression="zstd",
    compression_level=3,
    use_dictionary=False,
    write_statistics=False,
    column_encoding={
        "teacher_logprobs.list.element": "BYTE_STREAM_SPLIT",
        "teacher_tail.list.element": "BYTE_STREAM_SPLIT",
        "teacher_label_logprob.list.element": "BYTE_STREAM_SPLIT",
    },
)


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest integer type that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def label_dtype(vocab_size: int) -> np.dtype:
    """Labels hold ids and -100 (ignored)."""
    return np.dtype(np.int16) if vocab_size <= 1 << 15 else np.dtype(np.int32)


def row_hash(input_ids: np.ndarray) -> str:
    """Content hash of one sequence's token ids (any integer dtype): pairs of data and targets are checked by it."""
    return hashlib.blake2b(np.ascontiguousarray(input_ids, dtype="<i4").tobytes(), digest_size=16).hexdigest()


def first_bad_row(input_ids: np.ndarray, hashes: list[str]) -> int | None:
    """The first row [B, S] whose token ids do not match its recorded content hash, or None."""
    for i, (row, expected) in enumerate(zip(input_ids, hashes)):
        if row_hash(row) != expected:
            return i
    return None


def shard_name(split: str, number: int) -> str:
    return f"{split}/shard-{number:05d}.parquet"


def flat(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy(zero_copy_only=False)


def write_shard(root: Path, name: str, table: pa.Table, config_hash: str, counts: dict) -> dict:
    """Write a shard atomically (temp file, fsync, rename), then its sidecar, which records `counts` ({"tokens",
    "target_tokens"}: every token, and those a student learns); returns the sidecar. A failed write (a full disk)
    removes the temporary file and raises WriteError: the shards finished before stay valid."""
    path = root / name
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp, **PARQUET_OPTIONS)
        fsync_path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(
            f"{write_failure(e, root)} while writing store shard {path}; the shards finished before it are complete "
            "(make room and run the same command again: it continues from them)"
        ) from None
    hashes = table["row_hash"].to_pylist()
    sidecar = {
        "path": name,
        "rows": table.num_rows,
        **counts,
        **record(path),
        "rows_sha256": hashlib.sha256("".join(hashes).encode()).hexdigest(),
        "config_hash": config_hash,
    }
    write_json_atomic(path.with_suffix(".json"), sidecar)
    return sidecar


def finished_shard(root: Path, name: str, config_hash: str, rows: int) -> dict | None:
    """The sidecar of a shard that a previous (possibly killed) run completed, or None if it must be redone."""
    path, side = root / name, (root / name).with_suffix(".json")
    try:
        sidecar = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if sidecar.get("config_hash") != config_hash or sidecar.get("rows") != rows or file_problem(path, sidecar):
        return None
    return sidecar


def read_manifest(root: str | Path, fmt: str, version: int, command: str, readable: tuple[int, ...] = ()) -> dict:
    """The manifest of a finished store of format `fmt` (the logit store's, or the sample store's), written by
    `distill {command}`: of this code's `version`, or of an older one it still reads (`readable`)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        writer = next((h for p in sorted(root.glob(f"{lock.NAME}*")) if (h := lock.holder(root, p.name))), None)
        if writer is not None:  # (a rerun would be refused by the writer's lock: say what is going on)
            who = f"host {writer.get('host')}, pid {writer.get('pid')}, started {writer.get('started')}"
            hint = f"`distill {command}` is writing it now ({who}): wait for it to finish"
        elif (root / PLAN).is_file():
            hint = f"{command} is unfinished: rerun it to resume"
        else:
            hint = f"run `distill {command}`"
        raise DistillError(f"store {root}: no {MANIFEST} ({hint})")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise DistillError(f"store {root}: {MANIFEST} is not valid JSON: {e}") from None
    if manifest.get("format") != fmt or manifest.get("version") not in (version, *readable):
        versions = " or ".join(str(v) for v in sorted({version, *readable}))
        raise DistillError(
            f"store {root}: {MANIFEST} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this code reads {fmt!r} version {versions}"
        )
    return manifest


def store_format(root: str | Path) -> str | None:
    """The `format` a directory's manifest (or, unfinished, its plan) names; None when it has neither."""
    for name in (MANIFEST, PLAN):
        try:
            return json.loads((Path(root) / name).read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            continue
    return None


def read_shard(root: Path, shard: dict) -> pa.Table:
    """A shard listed in the manifest, read once and checked against its recorded size and sha256 on the way."""
    data, problem = read_checked(root / shard["path"], shard)
    if problem is not None:
        raise DistillError(f"store {root}: shard {shard['path']} {problem}; run `distill verify-store {root}`")
    return pq.read_table(pa.BufferReader(data))


def read_split(root: Path, manifest: dict, split: str) -> pa.Table:
    """A whole split, each shard checked against its recorded size and sha256 as it is read."""
    return pa.concat_tables([read_shard(root, shard) for shard in manifest["splits"][split]["shards"]])


def check_against_run(manifest: dict, where: str, checks: list[tuple[str, str, object]]) -> None:
    """Refuse a store that does not fit the run: `checks` are (what, manifest key, the run's value, the run's key)."""
    for what, stored_key, ours, key in checks:
        if manifest[stored_key] != ours:
            raise DistillError(f"{where} has {what} {manifest[stored_key]} but {key} is {ours}")


def check_tokenizer(manifest: dict, tokenizer_sha256: str, where: str, fix: str) -> None:
    """Refuse a store made with another tokenizer than the run's (by the sha256 of vocabulary and merges)."""
    if manifest["tokenizer_sha256"] != tokenizer_sha256:
        raise DistillError(
            f"{where} was made with another tokenizer (sha256 {manifest['tokenizer_sha256'][:12]}, this run's is "
            f"{tokenizer_sha256[:12]}); {fix}"
        )


def check_shard_files(root: Path, manifest: dict) -> None:
    """Cheap startup check (no reading): every shard is present with its recorded size."""
    for split in SPLITS:
        for s in manifest["splits"][split]["shards"]:
            problem = file_problem(root / s["path"], s, check_hash=False)
            if problem is not None:
                raise DistillError(f"store {root}: shard {s['path']} {problem}; run `distill verify-store`")


def verify_shards(root: Path, manifest: dict, check_rows, locate_damage) -> tuple[int, int]:
    """What every store format shares: each shard the manifest lists is present with its size and sha256 (after a
    mismatch `locate_damage(path)` names the row where it can), `check_rows(path, where, shard)` accepts its rows,
    the splits' row counts and the dataset fingerprint match, and no unlisted shard lies about. Returns (shards,
    rows)."""
    listed = set()
    fingerprint = hashlib.sha256()
    total_rows = shards = 0
    for split in SPLITS:
        info = manifest["splits"][split]
        rows = 0
        for s in info["shards"]:
            name, path = s["path"], root / s["path"]
            listed.add(name)
            where = f"store {root}: shard {name}"
            problem = file_problem(path, s)
            if problem is not None:
                located = locate_damage(path) if problem.endswith("(checksum mismatch)") else ""
                raise DistillError(f"{where} {problem}{located}")
            check_rows(path, where, s)
            fingerprint.update(s["rows_sha256"].encode())
            rows += s["rows"]
            shards += 1
        if rows != info["rows"]:
            raise DistillError(
                f"store {root}: split {split} has {rows} rows in its shards, the manifest says {info['rows']}"
            )
        total_rows += rows
    extra = sorted(
        str(p.relative_to(root)) for split in SPLITS for p in (root / split).glob("*.parquet") if p.is_file()
    )
    extra = [p for p in extra if p not in listed]
    if extra:
        raise DistillError(f"store {root}: shard {extra[0]} is not in the manifest (left from another run?)")
    if fingerprint.hexdigest() != manifest["dataset_fingerprint"]:
        raise DistillError(f"store {root}: the shards' row hashes do not give the manifest's dataset fingerprint")
    if total_rows != manifest["rows"]:
        raise DistillError(f"store {root}: {total_rows} rows in its shards, the manifest says {manifest['rows']}")
    return shards, total_rows


def read_verified_table(path: Path, where: str, shard: dict, columns: tuple[str, ...]) -> pa.Table:
    """A shard read for verification: readable as Parquet, the manifest's row count, every column present."""
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types; one line for the user
        raise DistillError(f"{where} cannot be read as Parquet: {' '.join(str(e).split())[:200]}") from None
    if table.num_rows != shard["rows"]:
        raise DistillError(f"{where} has {table.num_rows} rows, the manifest says {shard['rows']}")
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DistillError(f"{where} lacks column {missing[0]!r}")
    return table
