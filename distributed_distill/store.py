"""The offline logit store: the teacher's top-k targets on disk, verifiable, streamed into training.

    distill precompute --config configs/smoke.yaml distill.store=stores/smoke     # write (precompute.py)
    distill verify-store stores/smoke                                             # check everything
    distill train --config configs/smoke.yaml distill.signal=offline distill.store=stores/smoke

Layout of a store directory (format in docs/store.md):

    manifest.json                  written last: a store without it is unfinished
    plan.json                      what is being written (config hash); a resumed precompute must match it
    train/shard-00000.parquet      one row per packed sequence, in the seeded permutation order of training
    train/shard-00000.json         the shard's sidecar: rows, tokens, bytes, sha256 (written after the shard)
    validation/shard-00000.parquet

A row holds `index` (position in the packed split), `row_hash` (blake2b-128 of the token ids as little-endian
int32), `input_ids`, `labels`, and for the S - 1 next-token positions `teacher_ids` [(S-1)*k],
`teacher_logprobs` [(S-1)*k] (float16, log-softmax at the store's temperature, in top-k order) and
`teacher_tail` [S-1] (float16, log of the mass outside the top k), and `position_ids` [S]
(restarting at every document and at the padding). Ids are uint16 when the vocabulary fits, else uint32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from accelerate import Accelerator

from .config import Config
from .errors import DistillError, WriteError, write_failure
from .integrity import file_problem, fsync_path, read_checked, record, write_json_atomic
from .losses import TeacherTargets
from .models import tokenizer_hash, tokenizer_source

FORMAT = "distributed_distill.logit_store"
VERSION = 1
MANIFEST, PLAN = "manifest.json", "plan.json"
SPLITS = ("train", "validation")
COLUMNS = ("index", "row_hash", "input_ids", "labels", "teacher_ids", "teacher_logprobs", "teacher_tail")
# float16 log-probs: the online top-k teacher rounds through float16 too (teacher.topk_targets), so an offline
# and an online run with the same k train on identical values. BYTE_STREAM_SPLIT groups the high bytes (sign
# and exponent, few distinct values) so zstd compresses them; ids compress best plain (measured, docs/store.md).
PARQUET_OPTIONS = dict(
    compression="zstd",
    compression_level=3,
    use_dictionary=False,
    write_statistics=False,
    column_encoding={
        "teacher_logprobs.list.element": "BYTE_STREAM_SPLIT",
        "teacher_tail.list.element": "BYTE_STREAM_SPLIT",
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


# ----------------------------------------------------------------------------------------------
# Writing


def encode_rows(
    index: list[int],
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    targets: TeacherTargets,
    vocab_size: int,
    position_ids: torch.Tensor | None = None,
) -> pa.Table:
    """One Arrow row per sequence from a micro-batch [B, S] and its N = B * (S - 1) sparse target rows; packed
    rows keep their per-document `position_ids` (the student must see what the teacher saw)."""
    b, s = input_ids.shape
    k = targets.ids.shape[-1]
    ids_np = input_ids.cpu().numpy()
    flat_ids = targets.ids.cpu().numpy().astype(id_dtype(vocab_size)).reshape(-1)
    # The log-probs were rounded through float16 by the producer: this cast is exact.
    logprobs = targets.logprobs.cpu().to(torch.float16).numpy().reshape(-1)
    tail = targets.tail_logmass.cpu().to(torch.float16).numpy().reshape(-1)

    def lists(values: np.ndarray, per_row: int) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(np.arange(0, b * per_row + 1, per_row, dtype=np.int32)), values)

    columns = {}
    if position_ids is not None:
        columns["position_ids"] = lists(pa.array(position_ids.cpu().numpy().astype(id_dtype(s)).reshape(-1)), s)
    return pa.table(
        {
            **columns,
            "index": pa.array(np.asarray(index, dtype=np.int64)),
            "row_hash": pa.array([row_hash(r) for r in ids_np], type=pa.string()),
            "input_ids": lists(pa.array(ids_np.astype(id_dtype(vocab_size)).reshape(-1)), s),
            "labels": lists(pa.array(labels.cpu().numpy().astype(label_dtype(vocab_size)).reshape(-1)), s),
            "teacher_ids": lists(pa.array(flat_ids), (s - 1) * k),
            "teacher_logprobs": lists(pa.array(logprobs), (s - 1) * k),
            "teacher_tail": lists(pa.array(tail), s - 1),
        }
    )


def write_shard(
    root: Path, name: str, table: pa.Table, config_hash: str, counts: dict | None = None, options: dict | None = None
) -> dict:
    """Write a shard atomically (temp file, fsync, rename), then its sidecar; returns the sidecar. A failed write
    (a full disk) removes the temporary file and raises WriteError: the shards finished before stay valid.
    `counts` ({"tokens", "target_tokens"}) is for tables of other layouts (the sample store); by default they are
    counted from this store's fixed-length `input_ids` and `labels`; `options` are its Parquet writer options."""
    path = root / name
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp, **(options or PARQUET_OPTIONS))
        fsync_path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(
            f"{write_failure(e, root)} while writing store shard {path}; the shards finished before it are complete "
            "(make room and run the same command again: it continues from them)"
        ) from None
    if counts is None:
        seq_len = len(table["input_ids"][0]) if table.num_rows else 0
        labels = flat(table["labels"]).reshape(table.num_rows, -1)
        counts = {"tokens": table.num_rows * seq_len, "target_tokens": int((labels[:, 1:] != -100).sum())}
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


# ----------------------------------------------------------------------------------------------
# Reading


def read_manifest(root: str | Path, fmt: str = FORMAT, version: int = VERSION, command: str = "precompute") -> dict:
    """The manifest of a finished store of format `fmt` (the logit store's, or the sample store's: samples.py),
    written by `distill {command}`."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        unfinished = f"{command} is unfinished: rerun it to resume"
        hint = unfinished if (root / PLAN).is_file() else f"run `distill {command}`"
        raise DistillError(f"store {root}: no {MANIFEST} ({hint})")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise DistillError(f"store {root}: {MANIFEST} is not valid JSON: {e}") from None
    if manifest.get("format") != fmt or manifest.get("version") != version:
        raise DistillError(
            f"store {root}: {MANIFEST} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this code reads {fmt!r} version {version}"
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


def shard_paths(root: Path, manifest: dict, split: str) -> list[str]:
    return [str(root / s["path"]) for s in manifest["splits"][split]["shards"]]


def check_shard_files(root: Path, manifest: dict) -> None:
    """Cheap startup check (no reading): every shard is present with its recorded size."""
    for split in SPLITS:
        for s in manifest["splits"][split]["shards"]:
            problem = file_problem(root / s["path"], s, check_hash=False)
            if problem is not None:
                raise DistillError(f"store {root}: shard {s['path']} {problem}; run `distill verify-store`")


def flat(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy(zero_copy_only=False)


def decode(table: pa.Table, k: int, check_hashes: bool = True) -> dict[str, torch.Tensor]:
    """A batch of store rows as tensors: input_ids / labels [B, S] int64, teacher_ids [B, S-1, k] int64,
    teacher_logprobs [B, S-1, k] and teacher_tail [B, S-1] float32, index [B]."""
    b = table.num_rows
    input_ids = flat(table["input_ids"]).reshape(b, -1)
    bad = first_bad_row(input_ids, table["row_hash"].to_pylist()) if check_hashes else None
    if bad is not None:
        raise DistillError(f"store row {table['index'][bad].as_py()}: token ids do not match their content hash")
    s = input_ids.shape[1]
    extra = {}
    if "position_ids" in table.column_names:
        extra["position_ids"] = torch.from_numpy(flat(table["position_ids"]).astype(np.int64).reshape(b, s))
    return {
        **extra,
        "input_ids": torch.from_numpy(input_ids.astype(np.int64)),
        "labels": torch.from_numpy(flat(table["labels"]).astype(np.int64).reshape(b, s)),
        "teacher_ids": torch.from_numpy(flat(table["teacher_ids"]).astype(np.int64).reshape(b, s - 1, k)),
        "teacher_logprobs": torch.from_numpy(flat(table["teacher_logprobs"]).astype(np.float32).reshape(b, s - 1, k)),
        "teacher_tail": torch.from_numpy(flat(table["teacher_tail"]).astype(np.float32).reshape(b, s - 1)),
        "index": torch.from_numpy(table["index"].to_numpy().astype(np.int64)),
    }


class TrainStream:
    """The training split, streamed shard by shard (one shard in memory at a time, never the whole store).

    One global order, the same on every rank and for any number of ranks: global micro-batch q (rows
    q*micro .. q*micro+micro-1 of the order) belongs to rank q % world, the same assignment as an online run's
    batches (`data.train_indices`). The data position is therefore global: a run resumed on a different number
    of processes continues at the same row of the same order, and no row is trained twice or skipped. The
    price: every rank reads every row (as an Arrow slice, cheap) and decodes only its own. The stream is never
    given to `accelerator.prepare`, whose data-loader wrapper would split it a second time. It repeats over
    epochs, so every rank always has a full micro-batch and the ranks stay in step.

    Shuffling: per epoch the shard order is permuted (seeded), then rows pass through a seeded buffer of
    `shuffle_buffer` rows: each incoming row replaces a random one of the buffer, which is emitted. The buffer
    holds Arrow row slices: `IterableDataset.shuffle` turns every row into Python objects, about 3k tokens/s at
    k=64. With `shuffle_buffer=0` rows come in store order, which precompute wrote in the order an online run
    with the same seed trains on (the first epoch), at any number of processes.

    Every shard is checked against the manifest's size and sha256 as it is read (`read_shard`: the bytes are
    read once, hashed in memory and decoded from there, no second read): a damaged shard stops the run with one
    line naming it.
    """

    def __init__(self, root: Path, manifest: dict, seed: int, shuffle_buffer: int):
        self.root = root
        self.shards = manifest["splits"]["train"]["shards"]
        self.rows = manifest["splits"]["train"]["rows"]
        self.k, self.seed, self.shuffle_buffer = manifest["top_k"], seed, shuffle_buffer

    def __len__(self) -> int:
        return self.rows

    def _rows(self) -> Iterator[pa.Table]:
        """Every row of the global order (before the shuffle buffer), epoch after epoch; each shard checked."""
        n = len(self.shards)
        for epoch in itertools.count():
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle_buffer else range(n)
            for i in order:
                table = read_shard(self.root, self.shards[i])
                for r in range(table.num_rows):
                    yield table.slice(r, 1)

    def micro_batches(
        self, micro_batch: int, world: int, rank: int, skip: int = 0
    ) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches, from its `skip`-th on (global micro-batch `skip * world + rank`): a resumed
        run replays the order up to its checkpoint (rows are read and shuffled as before, but not decoded), so it
        continues with exactly the next batch."""
        rng = np.random.default_rng([self.seed, 1])
        buffer: list[pa.Table] = []
        batch: list[pa.Table] = []
        emitted = 0  # rows of the global order so far
        for row in self._rows():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(row)
                continue
            if self.shuffle_buffer:
                j = int(rng.integers(self.shuffle_buffer))
                row, buffer[j] = buffer[j], row
            q, emitted = emitted // micro_batch, emitted + 1
            if q % world == rank and q // world >= skip:
                batch.append(row)
                if len(batch) == micro_batch:
                    yield decode(pa.concat_tables(batch), self.k)
                    batch = []


class ValidationSplit:
    """The store's validation split, memory-mapped by `datasets`; indexable like the packed dataset that
    `data.eval_batches` expects, and searchable by row hash for the offline teacher."""

    def __init__(self, root: Path, manifest: dict, cache_dir: str | None):
        self.k = manifest["top_k"]
        for shard in manifest["splits"]["validation"]["shards"]:  # (small: checked before datasets maps it)
            problem = file_problem(root / shard["path"], shard)
            if problem is not None:
                raise DistillError(f"store {root}: shard {shard['path']} {problem}; run `distill verify-store {root}`")
        files = shard_paths(root, manifest, "validation")
        self.ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
        self.ds = self.ds.with_format("arrow")
        self.by_hash = {h: i for i, h in enumerate(self.ds["row_hash"].to_pylist())}

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return decode(self.ds[list(indices)], self.k)


class OfflineTeacher:
    """A teacher source that reads the targets instead of computing them: training batches carry their own
    (`teacher_*` keys); validation batches are matched to store rows by the content hash of their token ids."""

    engine = "offline store"

    def __init__(self, manifest: dict, validation: ValidationSplit):
        self.identity = {**manifest["teacher"], "store_config_hash": manifest["config_hash"]}
        self.k, self.validation = manifest["top_k"], validation

    def targets(self, batch: dict) -> TeacherTargets:
        if "teacher_ids" not in batch:
            batch = self._lookup(batch["input_ids"])
        return TeacherTargets(
            ids=batch["teacher_ids"].reshape(-1, self.k),
            logprobs=batch["teacher_logprobs"].reshape(-1, self.k),
            tail_logmass=batch["teacher_tail"].reshape(-1),
        )

    def _lookup(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = []
        for seq in input_ids.cpu().numpy():
            pos = self.validation.by_hash.get(row_hash(seq))
            if pos is None:
                raise DistillError("a validation sequence is not in the store: it was made from other data")
            rows.append(pos)
        found = self.validation[rows]
        return {k: v.to(input_ids.device) for k, v in found.items()}

    def num_parameters(self) -> int:
        return 0  # the teacher ran when the store was made; none runs now

    def parameter_bytes(self) -> tuple[int, int]:
        return 0, 0


class OfflineSource:
    """What an offline run trains from: the streamed train split, the validation split and the teacher source."""

    def __init__(self, train: TrainStream, val: ValidationSplit, teacher: OfflineTeacher, manifest: dict):
        self.train, self.val, self.teacher, self.manifest = train, val, teacher, manifest


def offline_config(cfg: Config) -> Config:
    """The run's config without its teacher (the store replaces it), keeping the tokenizer it resolved to."""
    path, revision = tokenizer_source(cfg) or (None, None)
    tokenizer = dataclasses.replace(cfg.tokenizer, path=path, revision=revision)
    return dataclasses.replace(cfg, teacher=None, tokenizer=tokenizer)


def open_offline(cfg: Config, tokenizer, accelerator: Accelerator) -> OfflineSource:
    """Open `distill.store` for training after checking it fits the student: manifest, tokenizer, vocabulary,
    sequence length, temperature, k and the presence and sizes of all shards; all before any model loads."""
    root = Path(cfg.distill.store)
    manifest = read_manifest(root)
    where = f"distill.store={root}"
    tok_hash = tokenizer_hash(tokenizer)
    if manifest["tokenizer_sha256"] != tok_hash:
        raise DistillError(
            f"{where} was made with another tokenizer (sha256 {manifest['tokenizer_sha256'][:12]}, this run's is "
            f"{tok_hash[:12]}); precompute a store with this run's tokenizer"
        )
    checks = [
        ("aligned vocabulary", manifest["vocab_size"], len(tokenizer), "the tokenizer's length"),
        ("seq_len", manifest["seq_len"], cfg.data.seq_len, "data.seq_len"),
        ("temperature", manifest["temperature"], cfg.distill.temperature, "distill.temperature"),
    ]
    if cfg.distill.top_k is not None:
        checks.append(("top_k", manifest["top_k"], cfg.distill.top_k, "distill.top_k"))
    for what, stored, ours, key in checks:
        if stored != ours:
            raise DistillError(f"{where} has {what} {stored} but {key} is {ours}")
    check_shard_files(root, manifest)
    cache = str(Path(cfg.data.cache_dir).expanduser() / "store") if cfg.data.cache_dir else None
    with accelerator.main_process_first():
        val = ValidationSplit(root, manifest, cache)
    train = TrainStream(root, manifest, cfg.train.seed, cfg.distill.shuffle_buffer)
    return OfflineSource(train, val, OfflineTeacher(manifest, val), manifest)


# ----------------------------------------------------------------------------------------------
# Verification


def verify_store(root: str | Path) -> str:
    """Check manifest, every shard's checksum and size, row counts, row hashes and target shapes.

    Returns a one-line verdict; raises DistillError naming the first faulty shard (and row, where one can be
    found) otherwise.
    """
    root = Path(root)
    if not root.is_dir():
        raise DistillError(f"store {root}: no such directory")
    manifest = read_manifest(root)
    k, vocab, seq_len = manifest["top_k"], manifest["vocab_size"], manifest["seq_len"]
    shards, total_rows = verify_shards(
        root,
        manifest,
        lambda path, where, shard: _check_rows(path, where, shard, k, vocab, seq_len),
        lambda path: _locate_damage(path, seq_len),
    )
    total_tokens = total_rows * seq_len
    if total_tokens != manifest["tokens"]:
        raise DistillError(f"store {root}: {total_rows} rows / {total_tokens} tokens, the manifest says otherwise")
    return (
        f"ok: store {root} verified: {shards} shards, {total_rows} rows, {total_tokens} tokens, "
        f"k={k}, vocab {vocab}, seq_len {seq_len}, T={manifest['temperature']}"
    )


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


def _check_rows(path: Path, where: str, shard: dict, k: int, vocab: int, seq_len: int) -> None:
    table = read_verified_table(path, where, shard, COLUMNS)
    lengths = {
        "input_ids": seq_len,
        "labels": seq_len,
        "teacher_ids": (seq_len - 1) * k,
        "teacher_logprobs": (seq_len - 1) * k,
        "teacher_tail": seq_len - 1,
    }
    for column, n in lengths.items():
        bad = np.flatnonzero(pc.list_value_length(table[column]).to_numpy(zero_copy_only=False) != n)
        if bad.size:
            raise DistillError(f"{where} row {int(bad[0])}: {column} has the wrong length (expected {n})")
    input_ids = flat(table["input_ids"]).reshape(-1, seq_len)
    bad_row = first_bad_row(input_ids, table["row_hash"].to_pylist())
    if bad_row is not None:
        raise DistillError(f"{where} row {bad_row}: token ids do not match their content hash")
    ids = flat(table["teacher_ids"]).reshape(len(input_ids), -1)
    bad = np.flatnonzero((ids >= vocab).any(-1))
    if bad.size:
        raise DistillError(f"{where} row {int(bad[0])}: a teacher id is outside the vocabulary ({vocab})")
    logprobs = flat(table["teacher_logprobs"]).reshape(len(input_ids), -1)
    bad = np.flatnonzero((np.isnan(logprobs) | (logprobs > 0)).any(-1))
    if bad.size:
        raise DistillError(f"{where} row {int(bad[0])}: teacher log-probs are not valid (NaN or > 0)")
    if hashlib.sha256("".join(table["row_hash"].to_pylist()).encode()).hexdigest() != shard["rows_sha256"]:
        raise DistillError(f"{where}: its rows are not the ones the manifest lists (row hashes differ)")


def _locate_damage(path: Path, seq_len: int) -> str:
    """After a checksum mismatch, try to name the damaged row (best effort: damage may make the file unreadable)."""
    try:
        table = pq.read_table(path)
        bad = first_bad_row(flat(table["input_ids"]).reshape(-1, seq_len), table["row_hash"].to_pylist())
        if bad is not None:
            return f" (row {bad}: token ids do not match their content hash)"
        return " (the file still decodes; the damage is in targets or metadata)"
    except Exception as e:  # unreadable: the checksum is the verdict
        return f" (the file no longer decodes: {' '.join(str(e).split())[:120]})"
