"""The sample store: the teacher's own completions of a prompt set, verifiable, and read by `distill train`.

    distill generate --config configs/generate.yaml generate.store=stores/samples      # write (generate.py)
    distill verify-store stores/samples                                                 # check everything
    distill train --config configs/generate.yaml data.source=stores/samples teacher=null distill.alpha=0  # seq-KD
    distill train --config ... distill.signal=offline distill.store=stores/samples      # + the stored targets

Same layout and guarantees as the logit store (format.py, docs/store.md): manifest.json written last (teacher
identity, sampling settings, prompt-set fingerprint, per-shard sha256 and row hashes), plan.json, train/ and
validation/ Parquet shards with sidecars, plus `tokenizer/` (the tokenizer the ids belong to). One row per sample:

    index, sample          prompt index in its split, sample index (the sample's generator is a function of both)
    row_hash               blake2b-128 of prompt_ids, -1, completion_ids (int32, little-endian)
    prompt_ids, prompt     the prompt's token ids and their text
    completion_ids, completion   the sampled ids (EOS / stop token included) and their text (special tokens skipped)
    finish_reason          eos | stop | length
    logprob, token_logprobs  the sample's log-probability under the teacher (temperature 1) and per token (float32)
    teacher_ids, teacher_logprobs, teacher_tail   (generate.top_k) per completion token: the teacher's top-k ids,
                           their log-probs at distill.temperature (float16) and the log-mass outside them (float16)
    teacher_ids, teacher_counts, teacher_unique, teacher_entropy   (generate.samples, version 2) per completion token:
                           the unique ids of N draws from the teacher at distill.temperature (ascending, end to end:
                           sum(teacher_unique) entries), their counts (uint8, N per token), how many (uint8) and the
                           entropy (float16, nats): the sampled plain columns of a logit store (store/encoding.py)

Plain `datasets.load_dataset("parquet", data_files="stores/samples/train/*.parquet")` reads it.

Training (`sample_data`, `open_sample_targets`): each sample becomes one document, prompt_ids + completion_ids, with
only the completion learned; documents are packed into data.seq_len blocks (never split; a longer one is cut at
seq_len) exactly as prompt/completion data is, and a per-token `target` column says which stored target row
predicts each token, so offline KD reads the targets of exactly the tokens it learns.

Format versions: 2 records `samples` (null, or the draws of sampled targets) beside `top_k`; version 1 stores (top-k
or none) still read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..config import Config
from ..data import batching
from ..data.documents import DocKind
from ..errors import DistillError
from ..tokenizer import load_tokenizer, tokenizer_hash
from .format import (
    SPLITS,
    check_against_run,
    check_tokenizer,
    flat,
    id_dtype,
    read_manifest,
    read_split,
    read_verified_table,
    row_hash,
    store_format,
    verify_shards,
)
from .logits import LABEL_LOGPROB
from .offline import OfflineSource, OfflineTeacher

SAMPLE_FORMAT = "distributed_distill.sample_store"
SAMPLE_VERSION = 2
SAMPLE_READABLE = (1,)  # before generate.samples: top-k or no targets, no `samples` key
TOKENIZER = "tokenizer"
SAMPLE_COLUMNS = (
    "index", "sample", "row_hash", "prompt_ids", "prompt", "completion_ids", "completion", "finish_reason",
    "logprob", "token_logprobs",
)  # fmt: skip


SAMPLE_TOPK_COLUMNS = ("teacher_ids", "teacher_logprobs", "teacher_tail")
SAMPLE_DRAW_COLUMNS = ("teacher_ids", "teacher_counts", "teacher_unique", "teacher_entropy")


def sample_hash(prompt_ids, completion_ids) -> str:
    return row_hash(np.concatenate([np.asarray(prompt_ids), [-1], np.asarray(completion_ids)]))


def is_sample_store(path: str | Path | None) -> bool:
    return path is not None and store_format(Path(path).expanduser()) == SAMPLE_FORMAT


def read_sample_manifest(root: str | Path) -> dict:
    return read_manifest(root, SAMPLE_FORMAT, SAMPLE_VERSION, "generate", SAMPLE_READABLE)


def sample_store_targets(manifest: dict) -> tuple[int | None, int | None]:
    """(top_k, samples) of a sample store: at most one is set (version 1 stores have no samples)."""
    return manifest["top_k"], manifest.get("samples")


def training_store(cfg: Config) -> Path | None:
    """The sample store a training run reads: distill.store when offline, else data.source; None when that is not
    a sample store."""
    path = cfg.distill.store if cfg.distill.signal == "offline" else cfg.data.source
    return Path(path).expanduser() if is_sample_store(path) else None


# ----------------------------------------------------------------------------------------------
# Writing (generate.py produces the rows)


def encode_sample_rows(rows: list[dict], vocab_size: int, k: int | None, samples: int | None = None) -> pa.Table:
    """One Arrow row per sample: dicts with index, sample, prompt_ids, prompt, completion_ids, completion,
    finish_reason, token_logprobs and, with k, teacher_ids [n, k], teacher_logprobs [n, k], teacher_tail [n]; with
    samples, teacher_ids [U], teacher_counts [U], teacher_unique [n] (U = its sum), teacher_entropy [n]."""
    ids_type = pa.from_numpy_dtype(id_dtype(vocab_size))
    columns = {
        "index": pa.array([r["index"] for r in rows], pa.int64()),
        "sample": pa.array([r["sample"] for r in rows], pa.int32()),
        "row_hash": pa.array([sample_hash(r["prompt_ids"], r["completion_ids"]) for r in rows], pa.string()),
        "prompt_ids": pa.array([r["prompt_ids"] for r in rows], pa.list_(ids_type)),
        "prompt": pa.array([r["prompt"] for r in rows], pa.string()),
        "completion_ids": pa.array([r["completion_ids"] for r in rows], pa.list_(ids_type)),
        "completion": pa.array([r["completion"] for r in rows], pa.string()),
        "finish_reason": pa.array([r["finish_reason"] for r in rows], pa.string()),
        "logprob": pa.array([float(np.sum(r["token_logprobs"], dtype=np.float64)) for r in rows], pa.float64()),
        "token_logprobs": pa.array([np.asarray(r["token_logprobs"], np.float32) for r in rows], pa.list_(pa.float32())),
    }
    if k:
        dtypes = {"teacher_ids": id_dtype(vocab_size), "teacher_logprobs": np.float16, "teacher_tail": np.float16}
    elif samples:
        dtypes = {
            "teacher_ids": id_dtype(vocab_size),
            "teacher_counts": np.uint8,
            "teacher_unique": np.uint8,
            "teacher_entropy": np.float16,
        }
    else:
        dtypes = {}
    for name, dtype in dtypes.items():
        values = [np.asarray(r[name]).reshape(-1).astype(dtype) for r in rows]
        columns[name] = pa.array(values, pa.list_(pa.from_numpy_dtype(np.dtype(dtype))))
    return pa.table(columns)


def sample_counts(table: pa.Table) -> dict:
    """The sidecar's token counts: every token of the shard, and the completion tokens (those a student learns)."""
    completion = int(pc.sum(pc.list_value_length(table["completion_ids"])).as_py() or 0)
    prompt = int(pc.sum(pc.list_value_length(table["prompt_ids"])).as_py() or 0)
    return {"tokens": prompt + completion, "target_tokens": completion}


# ----------------------------------------------------------------------------------------------
# Verification


def verify_sample_store(root: str | Path) -> str:
    """`distill verify-store` on a sample store: manifest, every shard's size and sha256, rows, row hashes, list
    lengths, ids inside the vocabulary, valid log-probs (or counts adding up to the draws), the tokenizer the ids
    belong to."""
    root = Path(root)
    if not root.is_dir():
        raise DistillError(f"store {root}: no such directory")
    manifest = read_sample_manifest(root)
    (k, samples), vocab = sample_store_targets(manifest), manifest["vocab_size"]
    if tokenizer_hash(load_tokenizer(str(root / TOKENIZER))) != manifest["tokenizer_sha256"]:
        raise DistillError(f"store {root}: {TOKENIZER}/ is not the tokenizer the samples were made with")
    shards, rows = verify_shards(
        root,
        manifest,
        lambda path, where, shard: _check_sample_rows(path, where, shard, k, samples, vocab),
        lambda path: "",
    )
    tokens = sum(s["tokens"] for split in SPLITS for s in manifest["splits"][split]["shards"])
    if tokens != manifest["tokens"]:
        raise DistillError(f"store {root}: its shards hold {tokens} tokens, the manifest says {manifest['tokens']}")
    targets = f"samples={samples}" if samples else f"top_k={k}"
    return (
        f"ok: sample store {root} verified: {shards} shards, {rows} samples, {tokens} tokens, "
        f"{targets}, vocab {vocab}, sampling T={manifest['sampling']['temperature']}"
    )


def _check_sample_rows(path: Path, where: str, shard: dict, k: int | None, samples: int | None, vocab: int) -> None:
    targets = SAMPLE_TOPK_COLUMNS if k else SAMPLE_DRAW_COLUMNS if samples else ()
    table = read_verified_table(path, where, shard, SAMPLE_COLUMNS + targets)
    lengths = pc.list_value_length(table["completion_ids"]).to_numpy(zero_copy_only=False)
    expected = {"token_logprobs": lengths}
    if k:
        expected.update(teacher_ids=lengths * k, teacher_logprobs=lengths * k, teacher_tail=lengths)
    if samples:
        expected.update(teacher_unique=lengths, teacher_entropy=lengths)
    _check_lengths(table, where, expected)
    if samples:  # (teacher_unique's lengths hold: each row's own sum of it)
        unique = _row_sums(table["teacher_unique"])
        _check_lengths(table, where, {"teacher_ids": unique, "teacher_counts": unique})
    prompts, completions = table["prompt_ids"].to_pylist(), table["completion_ids"].to_pylist()
    for i, (p, c, h) in enumerate(zip(prompts, completions, table["row_hash"].to_pylist())):
        if sample_hash(p, c) != h:
            raise DistillError(f"{where} row {i}: token ids do not match their content hash")
    reasons = set(table["finish_reason"].to_pylist()) - {"eos", "stop", "length"}
    if reasons:
        raise DistillError(f"{where}: unknown finish_reason {sorted(reasons)[0]!r}")
    checks = [("completion_ids", "an id is outside the vocabulary", lambda v: v >= vocab)]
    checks.append(("token_logprobs", "log-probs are not valid (NaN or > 0)", lambda v: np.isnan(v) | (v > 0)))
    if k or samples:
        checks.append(("teacher_ids", "a teacher id is outside the vocabulary", lambda v: v >= vocab))
    if k:
        checks.append(("teacher_logprobs", "teacher log-probs are not valid", lambda v: np.isnan(v) | (v > 0)))
    if samples:
        checks.append(("teacher_counts", "a teacher count is 0", lambda v: v == 0))
        checks.append(("teacher_entropy", "a teacher entropy is not valid", lambda v: ~np.isfinite(v) | (v < 0)))
        checks.append(("teacher_unique", f"unique ids are not 1 to {samples}", lambda v: (v == 0) | (v > samples)))
    for column, what, bad_values in checks:
        bad = np.flatnonzero(bad_values(flat(table[column])))
        if bad.size:
            raise DistillError(f"{where} row {_owner(table[column], int(bad[0]))}: {what}")
    if samples:
        _check_draws(table, where, samples)
    if hashlib.sha256("".join(table["row_hash"].to_pylist()).encode()).hexdigest() != shard["rows_sha256"]:
        raise DistillError(f"{where}: its rows are not the ones the manifest lists (row hashes differ)")


def _check_lengths(table: pa.Table, where: str, expected: dict[str, np.ndarray]) -> None:
    for column, n in expected.items():
        bad = np.flatnonzero(pc.list_value_length(table[column]).to_numpy(zero_copy_only=False) != n)
        if bad.size:
            raise DistillError(f"{where} row {int(bad[0])}: {column} has the wrong length for its completion")


def _offsets(column) -> np.ndarray:
    """Where each row of a list column starts in `flat(column)` [rows + 1] (0 first, however it is chunked)."""
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.concatenate([[0], np.cumsum(lengths)])


def _row_sums(column) -> np.ndarray:
    """Per row the sum of a list column's values [rows] int64."""
    offsets = _offsets(column)
    totals = np.concatenate([[0], np.cumsum(flat(column).astype(np.int64))])
    return totals[offsets[1:]] - totals[offsets[:-1]]


def _owner(column, value: int) -> int:
    """The row of a list column that holds its flat value number `value`."""
    return int(np.searchsorted(_offsets(column)[1:], value, side="right"))


def _check_draws(table: pa.Table, where: str, samples: int) -> None:
    """Sampled targets: every completion token's counts add up to the draws, over ascending (unique) ids."""
    unique = flat(table["teacher_unique"]).astype(np.int64)
    ids, counts = flat(table["teacher_ids"]).astype(np.int64), flat(table["teacher_counts"]).astype(np.int64)
    position = np.repeat(np.arange(unique.size), unique)  # (lengths checked: unique sums to ids.size)
    bad = np.flatnonzero(np.bincount(position, weights=counts, minlength=unique.size) != samples)
    if bad.size:
        raise DistillError(
            f"{where} row {_owner(table['teacher_unique'], int(bad[0]))}: counts do not add up to {samples}"
        )
    same = position[1:] == position[:-1]
    bad = np.flatnonzero(same & (ids[1:] <= ids[:-1]))
    if bad.size:
        raise DistillError(
            f"{where} row {_owner(table['teacher_ids'], int(bad[0]) + 1)}: ids are not unique and ascending"
        )


# ----------------------------------------------------------------------------------------------
# Reading for training


class SampleSplit:
    """One split of a sample store as packed training rows (input_ids, labels, position_ids, target [S]) and, with
    the stored top-k or sampled targets, the targets' flat arrays (`topk_target_rows`, `sampled_target_rows`) and a
    row-hash index (what `store.OfflineTeacher` looks validation rows up in). Indexable like the packed dataset
    `data.collate` and `data.eval_batches` expect; `micro_batches` serves an offline run (the batch order is
    `data.train_indices`'s, a pure function of (seed, micro-step, rank), as for an online run on the same store)."""

    def __init__(
        self,
        table: pa.Table,
        dcfg,
        pad_id: int,
        k: int | None,
        seed: int,
        samples: int | None = None,
        label_logprobs: bool = False,
    ):
        self.k, self.seed = k, seed
        prompts, completions = table["prompt_ids"].to_pylist(), table["completion_ids"].to_pylist()
        docs = {"input_ids": [], "labels": [], "status": [], "target": []}
        offset, self.counts = 0, {"samples": len(prompts), "truncated": 0, "dropped": 0}
        for prompt, completion in zip(prompts, completions):
            ids = (prompt + completion)[: dcfg.seq_len]
            kept = len(ids) - len(prompt)
            status = batching.KEPT if kept == len(completion) else batching.TRUNCATED if kept > 0 else batching.DROPPED
            self.counts["truncated" if status == batching.TRUNCATED else "dropped"] += status != batching.KEPT
            docs["input_ids"].append(ids)
            docs["labels"].append([batching.IGNORE_INDEX] * len(prompt) + completion[: max(kept, 0)])
            docs["status"].append(status)
            docs["target"].append([-1] * len(prompt) + list(range(offset, offset + max(kept, 0))))
            offset += len(completion)  # the flat target rows hold every completion token, kept or not
        packed = batching.pack_documents(docs, dcfg, pad_id, whole=True)
        self.ds = datasets.Dataset.from_dict(packed).with_format("torch")
        self.targets = topk_target_rows(table, k) if k else sampled_target_rows(table, samples) if samples else None
        if self.targets is not None and label_logprobs:  # a student of another tokenizer: the spans' chain rule
            # reads the teacher's log-prob of each sampled token (temperature 1) as the label log-prob of its row
            self.targets[LABEL_LOGPROB] = torch.from_numpy(flat(table["token_logprobs"]).astype(np.float32))
        if self.targets is not None:
            self.by_hash = {row_hash(r.numpy()): i for i, r in enumerate(self.ds["input_ids"])}

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = self.ds[list(indices)]
        out = {key: rows[key].long() for key in ("input_ids", "labels", "position_ids")}
        if self.targets is not None:
            # Row t of [S-1] predicts token t+1: its stored row is that token's `target` (-1: not learned, any
            # valid row stands in, the loss never counts it).
            rows_t = rows["target"][:, 1:].long().clamp(min=0)
            out.update({name: values[rows_t] for name, values in self.targets.items()})
        return out

    def micro_batches(self, micro_batch: int, world: int, rank: int, skip: int = 0):
        for step in range(skip, 1 << 62):
            idx = batching.train_indices(len(self), micro_batch, world, rank, self.seed, step)
            yield {**self[idx], "index": torch.tensor(idx)}


def topk_target_rows(table: pa.Table, k: int) -> dict[str, torch.Tensor]:
    """The stored top-k of every completion token of a split, in row order: teacher_ids [T, k] int64,
    teacher_logprobs [T, k] and teacher_tail [T] float32."""
    column = {name: flat(table[name]) for name in SAMPLE_TOPK_COLUMNS}
    return {
        "teacher_ids": torch.from_numpy(column["teacher_ids"].astype(np.int64)).view(-1, k),
        "teacher_logprobs": torch.from_numpy(column["teacher_logprobs"].astype(np.float32)).view(-1, k),
        "teacher_tail": torch.from_numpy(column["teacher_tail"].astype(np.float32)),
    }


def sampled_target_rows(table: pa.Table, draws: int) -> dict[str, torch.Tensor]:
    """The stored sampled targets of every completion token of a split, in row order, padded as the loss takes them
    (`TeacherTargets.counts`): teacher_ids [T, draws] int64 (the unique ids, then the token's first id again),
    teacher_counts [T, draws] float32 (count / draws, 0 for padding), teacher_entropy [T] float32."""
    unique = flat(table["teacher_unique"]).astype(np.int64)
    ids, counts = flat(table["teacher_ids"]).astype(np.int64), flat(table["teacher_counts"]).astype(np.float32)
    # Each stored (id, count) goes to its token's row, at its place among that token's unique ids: one scatter.
    position = np.repeat(np.arange(unique.size), unique)
    first = np.concatenate([[0], np.cumsum(unique)[:-1]]).astype(np.int64)
    slot = np.arange(ids.size) - first[position]
    padded_ids = np.zeros((unique.size, draws), dtype=np.int64)
    if ids.size:
        padded_ids[:] = ids[np.minimum(first, ids.size - 1)][:, None]  # padding: the token's first id, weight 0
    weights = np.zeros((unique.size, draws), dtype=np.float32)
    padded_ids[position, slot] = ids
    weights[position, slot] = counts / np.float32(draws)
    return {
        "teacher_ids": torch.from_numpy(padded_ids),
        "teacher_counts": torch.from_numpy(weights),
        "teacher_entropy": torch.from_numpy(flat(table["teacher_entropy"]).astype(np.float32)),
    }


def open_sample_splits(
    cfg: Config, tokenizer, root: Path, with_targets: bool, label_logprobs: bool = False
) -> tuple[dict, SampleSplit, SampleSplit]:
    """(manifest, train, validation) of a sample store, after checking it was made with `tokenizer` (the run's, or
    the teacher's for a student of another tokenizer); `label_logprobs`: the targets carry LABEL_LOGPROB too."""
    manifest = read_sample_manifest(root)
    if tokenizer_hash(tokenizer) != manifest["tokenizer_sha256"]:
        kept = tokenizer_hash(load_tokenizer(str(root / TOKENIZER)))
        if kept != manifest["tokenizer_sha256"]:  # the store's own tokenizer/ is not the one its ids belong to
            raise DistillError(
                f"sample store {root}: its {TOKENIZER}/ is not the tokenizer the samples were made with (sha256 "
                f"{kept[:12]}, the manifest records {manifest['tokenizer_sha256'][:12]}): it was changed after "
                "`distill generate`; restore it, or generate the store again"
            )
        fix = f"train with the store's tokenizer ({root / TOKENIZER})"
        check_tokenizer(manifest, tokenizer_hash(tokenizer), f"sample store {root}", fix)
    k, samples = sample_store_targets(manifest) if with_targets else (None, None)
    splits = [
        SampleSplit(
            read_split(root, manifest, split),
            cfg.data,
            tokenizer.pad_token_id,
            k,
            cfg.train.seed,
            samples,
            label_logprobs,
        )
        for split in SPLITS
    ]
    check_learnable(splits, root, cfg.data.seq_len)
    return manifest, splits[0], splits[1]


def check_learnable(splits: list[SampleSplit], root: Path, seq_len: int, tokens: str = "tokens") -> None:
    """Refuse a split (train, validation) in which no completion token fits data.seq_len; `tokens`: whose."""
    for split, name in zip(splits, SPLITS):
        if len(split) == 0:
            raise DistillError(
                f"sample store {root}: the {name} split has no completion tokens to learn from: "
                f"{split.counts['dropped']} of {split.counts['samples']} samples were dropped, their prompts at least "
                f"data.seq_len={seq_len} {tokens} long (no room for a completion token); raise data.seq_len"
            )


def describe_sample_splits(train: SampleSplit, val: SampleSplit, root: Path) -> str:
    parts = [
        f"{name}: {s.counts['samples']} samples ({s.counts['truncated']} cut at data.seq_len, {s.counts['dropped']} "
        f"dropped: prompt >= seq_len) -> {len(s)} rows"
        for name, s in (("train", train), ("validation", val))
    ]
    return f"data from sample store {root}: " + "; ".join(parts)


def sample_data(cfg: Config, tokenizer, root: Path) -> tuple[SampleSplit, SampleSplit, DocKind, str]:
    """Training on the samples as prompt/completion data (seq-KD CE, or KD from an online teacher): the splits, the
    kind of the training data (prompt/completion; its prompts rendered conversations when the store's were, so that
    on-policy samples also end at the chat template's end of turn: generation.sampling_setup), and the startup
    summary's data line."""
    manifest, train, val = open_sample_splits(cfg, tokenizer, root, with_targets=False)
    return train, val, sample_kind(manifest), describe_sample_splits(train, val, root)


def sample_kind(manifest: dict) -> DocKind:
    """The kind of a sample store's training data: prompt/completion, its prompts rendered conversations when the
    store's were."""
    return DocKind.CHAT_PROMPT if DocKind(manifest["prompts"]["kind"]).is_chat else DocKind.PROMPT


def open_sample_targets(cfg: Config, tokenizer, root: Path, label_logprobs: bool = False) -> OfflineSource:
    """An offline run on a sample store's stored top-k or sampled targets, checked against this run before any model
    loads (the teacher source is the `OfflineTeacher`: training batches carry their targets, validation batches are
    found by the content hash of their token ids). `label_logprobs`: the batches also carry each row's label log-prob
    (LABEL_LOGPROB, from token_logprobs), as a student of another tokenizer reads them (cross_samples.py)."""
    manifest = read_sample_manifest(root)
    where = f"distill.store={root}"
    check_sample_targets(manifest, cfg, root)
    checks = [("target temperature", "temperature", cfg.distill.temperature, "distill.temperature")]
    if cfg.distill.top_k is not None:
        checks.append(("top_k", "top_k", cfg.distill.top_k, "distill.top_k"))
    check_against_run(manifest, where, checks)
    manifest, train, val = open_sample_splits(cfg, tokenizer, root, with_targets=True, label_logprobs=label_logprobs)
    return OfflineSource(train, val, OfflineTeacher(manifest, val), manifest, describe_sample_splits(train, val, root))


def check_sample_targets(manifest: dict, cfg: Config, root: Path) -> None:
    """Refuse, in one line, a sample store without per-token targets, and settings its targets contradict: top-k
    targets with distill.samples, sampled ones with other draws, distill.top_k or a divergence they cannot estimate
    (the logit store's refusals, store/logits.py `check_target_settings`, in a sample store's words)."""
    (k, samples), distill, where = sample_store_targets(manifest), cfg.distill, f"distill.store={root}"
    if not k and not samples:
        raise DistillError(
            f"{where} holds no teacher targets (made without generate.top_k or generate.samples): train on it with "
            f"data.source={root} (sequence-level KD), or generate again with generate.top_k or generate.samples"
        )
    if k and distill.samples is not None:
        raise DistillError(
            f"{where} holds top-{k} targets but distill.samples={distill.samples}; unset distill.samples, or generate "
            "again with generate.samples"
        )
    if samples and distill.samples not in (None, samples):
        raise DistillError(f"{where} has {samples} draws per token but distill.samples is {distill.samples}")
    if samples and distill.top_k is not None:
        raise DistillError(
            f"{where} holds sampled targets ({samples} draws) but distill.top_k={distill.top_k}; unset distill.top_k"
        )
    if samples and distill.loss != "forward_kl":
        raise DistillError(
            f"{where} holds sampled targets, which estimate forward KL only, but distill.loss={distill.loss} (the "
            "other divergences need the teacher's probability of ids that were not drawn); use distill.loss=forward_kl"
        )
