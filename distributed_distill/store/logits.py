"""The logit store: the teacher's top-k targets of every packed training and validation sequence, verifiable, and
streamed into an offline run.

    distill precompute --config configs/smoke.yaml distill.store=stores/smoke     # write (precompute.py)
    distill verify-store stores/smoke                                             # check everything
    distill train --config configs/smoke.yaml distill.signal=offline distill.store=stores/smoke

A row (one packed sequence of data.seq_len tokens) holds `index` (its position in the packed split), `row_hash`
(format.row_hash of the token ids), `input_ids`, `labels`, `position_ids` [S] (restarting at every document and at
the padding), and the teacher's targets of its S - 1 next-token positions: top-k (ids, log-softmax at the store's
temperature in top-k order, and the log of the mass outside the top k) or sampled (unique drawn ids with their
counts, and the entropy), each plain or packed, as the manifest's `targets` and `encoding` say (encoding.py). Ids
are uint16 when the vocabulary fits, else uint32. Format version 2 added sampled targets and the packed encoding;
a version 1 store (top-k, plain) reads as before. The layout and the format core are format.py's (docs/store.md).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from accelerate import Accelerator

from ..config import Config
from ..data.batching import IGNORE_INDEX
from ..errors import DistillError
from ..integrity import file_problem
from ..losses import TeacherTargets
from ..tokenizer import tokenizer_hash
from .encoding import (
    ENCODED_COLUMNS,
    check_rows,
    decode_targets,
    encode_targets,
    list_column,
    store_encoding,
    store_targets,
)
from .format import (
    check_against_run,
    check_shard_files,
    check_tokenizer,
    first_bad_row,
    flat,
    id_dtype,
    label_dtype,
    read_manifest,
    read_shard,
    read_verified_table,
    row_hash,
    verify_shards,
)
from .offline import OfflineSource, OfflineTeacher

LOGIT_FORMAT = "distributed_distill.logit_store"
LOGIT_VERSION = 2
LOGIT_READABLE = (1,)  # version 1: top-k targets in the plain encoding, no `targets`/`encoding` keys
ROW_COLUMNS = ("index", "row_hash", "input_ids", "labels")
# A store precomputed for a student of another tokenizer (distill.cross_tokenizer, cross_store.py): rows in the
# teacher's tokenization, each position also keeping the teacher's log-prob of its label (the chain rule over a
# span's later tokens needs them; the manifest says "label_logprobs": true).
LABEL_LOGPROB = "teacher_label_logprob"


def read_logit_manifest(root: str | Path) -> dict:
    return read_manifest(root, LOGIT_FORMAT, LOGIT_VERSION, "precompute", LOGIT_READABLE)


# ----------------------------------------------------------------------------------------------
# Writing (precompute.py computes the targets)


def encode_logit_rows(
    index: list[int],
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    targets: TeacherTargets,
    vocab_size: int,
    position_ids: torch.Tensor | None = None,
    encoding: str = "plain",
    draws: int | None = None,
    label_logprobs: torch.Tensor | None = None,
) -> pa.Table:
    """One Arrow row per sequence from a micro-batch [B, S] and its N = B * (S - 1) target rows (top-k, or sampled
    from `draws` draws), in `encoding` (encoding.py); packed rows keep their per-document `position_ids` (the
    student must see what the teacher saw). `label_logprobs` [N] (a store for students of other tokenizers,
    LABEL_LOGPROB): the teacher's log-prob of every row's label, as float16, 0 where the label is ignored."""
    b, s = input_ids.shape
    ids_np = input_ids.cpu().numpy()

    def lists(values: pa.Array, per_row: int) -> pa.Array:
        return list_column(values, np.full(b, per_row))

    columns = {}
    if position_ids is not None:
        columns["position_ids"] = lists(pa.array(position_ids.cpu().numpy().astype(id_dtype(s)).reshape(-1)), s)
    if label_logprobs is not None:
        columns[LABEL_LOGPROB] = lists(pa.array(label_logprobs.cpu().to(torch.float16).numpy().reshape(-1)), s - 1)
    return pa.table(
        {
            **columns,
            "index": pa.array(np.asarray(index, dtype=np.int64)),
            "row_hash": pa.array([row_hash(r) for r in ids_np], type=pa.string()),
            "input_ids": lists(pa.array(ids_np.astype(id_dtype(vocab_size)).reshape(-1)), s),
            "labels": lists(pa.array(labels.cpu().numpy().astype(label_dtype(vocab_size)).reshape(-1)), s),
            **encode_targets(targets, b, vocab_size, encoding, draws),
        }
    )


def logit_counts(table: pa.Table) -> dict:
    """A shard's token counts for its sidecar: every token, and the target tokens (labels after the shift)."""
    seq_len = len(table["input_ids"][0]) if table.num_rows else 0
    labels = flat(table["labels"]).reshape(table.num_rows, -1)
    return {"tokens": table.num_rows * seq_len, "target_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum())}


# ----------------------------------------------------------------------------------------------
# Reading


def decode_logit_rows(table: pa.Table, manifest: dict, check_hashes: bool = True) -> dict[str, torch.Tensor]:
    """A batch of store rows as tensors: input_ids / labels [B, S] int64, index [B], and the targets of the B x
    (S - 1) positions as `encoding.decode_targets` gives them (top-k: teacher_ids, teacher_logprobs, teacher_tail;
    sampled: teacher_ids, teacher_counts, teacher_entropy)."""
    b = table.num_rows
    input_ids = flat(table["input_ids"]).reshape(b, -1)
    bad = first_bad_row(input_ids, table["row_hash"].to_pylist()) if check_hashes else None
    if bad is not None:
        raise DistillError(f"store row {table['index'][bad].as_py()}: token ids do not match their content hash")
    s = input_ids.shape[1]
    extra = {}
    if "position_ids" in table.column_names:
        extra["position_ids"] = torch.from_numpy(flat(table["position_ids"]).astype(np.int64).reshape(b, s))
    if LABEL_LOGPROB in table.column_names:
        extra[LABEL_LOGPROB] = torch.from_numpy(flat(table[LABEL_LOGPROB]).astype(np.float32).reshape(b, s - 1))
    return {
        **extra,
        "input_ids": torch.from_numpy(input_ids.astype(np.int64)),
        "labels": torch.from_numpy(flat(table["labels"]).astype(np.int64).reshape(b, s)),
        **decode_targets(table, manifest, b, s - 1),
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
        self.manifest, self.seed, self.shuffle_buffer = manifest, seed, shuffle_buffer

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
                    yield decode_logit_rows(pa.concat_tables(batch), self.manifest)
                    batch = []


class ValidationSplit:
    """The store's validation split, memory-mapped by `datasets`; indexable like the packed dataset that
    `data.eval_batches` expects, and searchable by row hash for the offline teacher."""

    def __init__(self, root: Path, manifest: dict, cache_dir: str | None):
        self.manifest = manifest
        for shard in manifest["splits"]["validation"]["shards"]:  # (small: checked before datasets maps it)
            problem = file_problem(root / shard["path"], shard)
            if problem is not None:
                raise DistillError(f"store {root}: shard {shard['path']} {problem}; run `distill verify-store {root}`")
        files = [str(root / s["path"]) for s in manifest["splits"]["validation"]["shards"]]
        self.ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
        self.ds = self.ds.with_format("arrow")
        self.by_hash = {h: i for i, h in enumerate(self.ds["row_hash"].to_pylist())}

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return decode_logit_rows(self.ds[list(indices)], self.manifest)


def open_logit_store(
    cfg: Config, tokenizer, accelerator: Accelerator, fix: str = "precompute a store with this run's tokenizer"
) -> OfflineSource:
    """Open `distill.store` for training after checking it fits the student: manifest, tokenizer, vocabulary,
    sequence length, temperature, k and the presence and sizes of all shards; all before any model loads.
    `tokenizer`: the one the store's rows must be in (the student's; cross_store.py passes the teacher's), `fix`
    what the refusal of another one suggests."""
    root = Path(cfg.distill.store)
    manifest = read_logit_manifest(root)
    where = f"distill.store={root}"
    check_tokenizer(manifest, tokenizer_hash(tokenizer), where, fix)
    checks = [
        ("aligned vocabulary", "vocab_size", len(tokenizer), "the tokenizer's length"),
        ("seq_len", "seq_len", cfg.data.seq_len, "data.seq_len"),
        ("temperature", "temperature", cfg.distill.temperature, "distill.temperature"),
    ]
    check_target_settings(manifest, cfg, where)
    check_against_run(manifest, where, checks)
    check_shard_files(root, manifest)
    cache = str(Path(cfg.data.cache_dir).expanduser() / "store") if cfg.data.cache_dir else None
    with accelerator.main_process_first():
        val = ValidationSplit(root, manifest, cache)
    train = TrainStream(root, manifest, cfg.train.seed, cfg.distill.shuffle_buffer)
    splits = manifest["splits"]
    line = (
        f"data from logit store {root}: train {splits['train']['rows']} rows, validation "
        f"{splits['validation']['rows']} rows of {manifest['seq_len']} tokens, {describe_targets(manifest)}"
    )
    return OfflineSource(train, val, OfflineTeacher(manifest, val), manifest, line)


def describe_targets(manifest: dict) -> str:
    """'top-64 targets, packed (130.2 bytes/token)' and the like: what a store keeps, for summaries."""
    what = (
        f"top-{manifest['top_k']} targets"
        if store_targets(manifest) == "top_k"
        else f"sampled targets ({manifest['samples']} draws)"
    )
    size = f", {manifest['bytes'] / max(manifest['tokens'], 1):.1f} bytes/token" if "bytes" in manifest else ""
    return f"{what}, {store_encoding(manifest)}{size}"


def check_target_settings(manifest: dict, cfg: Config, where: str) -> None:
    """Refuse a store whose targets the run's distill settings contradict: a top_k or samples other than the
    store's, or sampled targets under a divergence they cannot estimate."""
    distill = cfg.distill
    if store_targets(manifest) == "top_k":
        if distill.samples is not None:
            raise DistillError(
                f"{where} holds top-{manifest['top_k']} targets but distill.samples={distill.samples}; unset "
                "distill.samples, or precompute a sampled store (distill.store_samples)"
            )
        if distill.top_k is not None and distill.top_k != manifest["top_k"]:
            raise DistillError(f"{where} has top_k {manifest['top_k']} but distill.top_k is {distill.top_k}")
        return
    if distill.top_k is not None:
        raise DistillError(
            f"{where} holds sampled targets ({manifest['samples']} draws) but distill.top_k={distill.top_k}; unset "
            "distill.top_k"
        )
    if distill.samples is not None and distill.samples != manifest["samples"]:
        raise DistillError(
            f"{where} has {manifest['samples']} draws per token but distill.samples is {distill.samples}"
        )
    if distill.loss != "forward_kl":
        raise DistillError(
            f"{where} holds sampled targets, which estimate forward KL only, but distill.loss={distill.loss} (the "
            "other divergences need the teacher's probability of ids that were not drawn); use distill.loss=forward_kl"
        )


# ----------------------------------------------------------------------------------------------
# Verification


def verify_logit_store(root: str | Path) -> str:
    """Check manifest, every shard's checksum and size, row counts, row hashes and target shapes.

    Returns a one-line verdict; raises DistillError naming the first faulty shard (and row, where one can be
    found) otherwise.
    """
    root = Path(root)
    if not root.is_dir():
        raise DistillError(f"store {root}: no such directory")
    manifest = read_logit_manifest(root)
    vocab, seq_len = manifest["vocab_size"], manifest["seq_len"]
    shards, total_rows = verify_shards(
        root,
        manifest,
        lambda path, where, shard: _check_logit_rows(path, where, shard, manifest),
        lambda path: _locate_damage(path, seq_len),
    )
    total_tokens = total_rows * seq_len
    if total_tokens != manifest["tokens"]:
        raise DistillError(f"store {root}: {total_rows} rows / {total_tokens} tokens, the manifest says otherwise")
    if store_targets(manifest) == "top_k":
        what = f"k={manifest['top_k']}"
    else:
        what = f"sampled, {manifest['samples']} draws"
    size = f", {manifest['bytes'] / max(total_tokens, 1):.1f} bytes/token" if "bytes" in manifest else ""
    return (
        f"ok: store {root} verified: {shards} shards, {total_rows} rows, {total_tokens} tokens, "
        f"{what}, {store_encoding(manifest)}{size}, vocab {vocab}, seq_len {seq_len}, T={manifest['temperature']}"
    )


def _check_logit_rows(path: Path, where: str, shard: dict, manifest: dict) -> None:
    targets, encoding = store_targets(manifest), store_encoding(manifest)
    vocab, seq_len = manifest["vocab_size"], manifest["seq_len"]
    labelled = (LABEL_LOGPROB,) if manifest.get("label_logprobs") else ()
    table = read_verified_table(path, where, shard, ROW_COLUMNS + ENCODED_COLUMNS[targets, encoding] + labelled)
    lengths = {"input_ids": seq_len, "labels": seq_len, **{c: seq_len - 1 for c in labelled}}
    if (targets, encoding) == ("top_k", "plain"):
        k = manifest["top_k"]
        lengths.update({"teacher_ids": (seq_len - 1) * k, "teacher_logprobs": (seq_len - 1) * k})
    if targets == "top_k":
        lengths["teacher_tail"] = seq_len - 1
    for column, n in lengths.items():
        bad = np.flatnonzero(pc.list_value_length(table[column]).to_numpy(zero_copy_only=False) != n)
        if bad.size:
            raise DistillError(f"{where} row {int(bad[0])}: {column} has the wrong length (expected {n})")
    input_ids = flat(table["input_ids"]).reshape(-1, seq_len)
    bad_row = first_bad_row(input_ids, table["row_hash"].to_pylist())
    if bad_row is not None:
        raise DistillError(f"{where} row {bad_row}: token ids do not match their content hash")
    if (targets, encoding) == ("top_k", "plain"):  # vectorised over the shard: the common case
        ids = flat(table["teacher_ids"]).reshape(len(input_ids), -1)
        bad = np.flatnonzero((ids >= vocab).any(-1))
        if bad.size:
            raise DistillError(f"{where} row {int(bad[0])}: a teacher id is outside the vocabulary ({vocab})")
        logprobs = flat(table["teacher_logprobs"]).reshape(len(input_ids), -1)
        bad = np.flatnonzero((np.isnan(logprobs) | (logprobs > 0)).any(-1))
        if bad.size:
            raise DistillError(f"{where} row {int(bad[0])}: teacher log-probs are not valid (NaN or > 0)")
    else:
        check_rows(table, manifest, where, seq_len)
    if labelled:
        values = flat(table[LABEL_LOGPROB]).reshape(len(input_ids), -1)
        bad = np.flatnonzero((np.isnan(values) | (values > 0)).any(-1))
        if bad.size:
            raise DistillError(f"{where} row {int(bad[0])}: teacher label log-probs are not valid (NaN or > 0)")
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
