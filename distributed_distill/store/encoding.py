"""How a logit store keeps the teacher's targets of a row: the target kind (top-k or sampled) and the encoding (plain
or packed), both named by the store's manifest (`targets`, `encoding`) and chosen at `distill precompute` with
`distill.store_samples` / `distill.samples` and `distill.store_encoding` (docs/store.md).

Per row of S tokens there are P = S - 1 next-token positions. The columns, by (targets, encoding):

    top_k   plain    teacher_ids [P*k] uint16/32, teacher_logprobs [P*k] float16, teacher_tail [P] float16
    top_k   packed   teacher_ids: P*k ids bit-packed at ceil(log2 V) bits (binary); teacher_codes: P*k bytes, per
                     position the differences of 8-bit codes of the log-probs on the position's own scale (binary);
                     teacher_scale [2P] float16 (per position the largest and smallest log-prob); teacher_tail [P]
    sampled plain    teacher_ids [U] uint16/32 (per position its unique drawn ids, ascending), teacher_counts [U]
                     uint8, teacher_unique [P] uint8 (unique ids per position), teacher_entropy [P] float16
    sampled packed   teacher_ids, teacher_counts, teacher_unique bit-packed (binary) at ceil(log2 V) and
                     ceil(log2 (N + 1)) bits; teacher_entropy [P] float16

Top-k packed codes: the top-k log-probs of a position are sorted (largest first), so with hi, lo the first and the
last, code_j = round(255 (hi - lp_j) / (hi - lo)) never decreases and its differences are small numbers that zstd
packs into a few bits each. Decoding gives lp_j = hi - code_j (hi - lo) / 255: within (hi - lo) / 510 of the value
(plus the float16 rounding of hi and lo), the stated error that tests/test_store_formats.py holds it to.

`encode_targets` turns a micro-batch's `TeacherTargets` into these columns; `decode_targets` turns a batch of rows
back into padded tensors, vectorised over the whole batch (no Python loop over positions), so a reader core keeps
well ahead of a training step (benchmarks/store.py measures tokens/s per encoding).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from ..errors import DistillError
from .format import flat, id_dtype

TARGETS = ("top_k", "sampled")
ENCODINGS = ("plain", "packed")
# Every column a row of each (targets, encoding) holds besides the row's own (index, row_hash, input_ids, labels).
ENCODED_COLUMNS = {
    ("top_k", "plain"): ("teacher_ids", "teacher_logprobs", "teacher_tail"),
    ("top_k", "packed"): ("teacher_ids", "teacher_codes", "teacher_scale", "teacher_tail"),
    ("sampled", "plain"): ("teacher_ids", "teacher_counts", "teacher_unique", "teacher_entropy"),
    ("sampled", "packed"): ("teacher_ids", "teacher_counts", "teacher_unique", "teacher_entropy"),
}


def bits_for(n: int) -> int:
    """Bits that hold every integer in [0, n)."""
    return max(1, int(n - 1).bit_length())


def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Non-negative integers < 2**width, each in `width` bits, least significant bit first, end to end."""
    v = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
    bits = ((v[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes | np.ndarray, width: int, count: int) -> np.ndarray:
    """The first `count` values of `pack_bits(values, width)` as int64: every value read from the 8 bytes at its
    first bit's byte (width <= 57), shifted and masked; numpy all the way."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    padded = np.zeros(buf.size + 8, dtype=np.uint8)
    padded[: buf.size] = buf
    offsets = np.arange(count, dtype=np.int64) * width
    windows = np.lib.stride_tricks.sliding_window_view(padded, 8)[offsets >> 3]
    words = np.ascontiguousarray(windows).view("<u8").reshape(-1)
    mask = np.uint64((1 << width) - 1)
    return ((words >> (offsets & 7).astype(np.uint64)) & mask).astype(np.int64)


def list_column(values: np.ndarray | pa.Array, per_row: np.ndarray) -> pa.Array:
    """A list column of len(per_row) rows from the rows' values end to end (every list column of a logit store)."""
    offsets = np.zeros(len(per_row) + 1, dtype=np.int32)
    np.cumsum(per_row, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values if isinstance(values, pa.Array) else pa.array(values))


def _binary(rows: list[bytes]) -> pa.Array:
    return pa.array(rows, type=pa.binary())


def _split(values: np.ndarray, per_row: np.ndarray) -> list[np.ndarray]:
    return np.split(values, np.cumsum(per_row)[:-1])


# ----------------------------------------------------------------------------------------------
# Writing


def encode_targets(targets, rows: int, vocab_size: int, encoding: str, draws: int | None = None) -> dict[str, pa.Array]:
    """The target columns of `rows` sequences from their TeacherTargets (rows * P positions, in row order): top-k
    (`ids`, `logprobs` rounded through float16 by the producer, `tail_logmass`) or sampled (`ids`, `counts`,
    `entropy`, from `draws` draws per position)."""
    if getattr(targets, "counts", None) is not None:
        return _encode_sampled(targets, rows, vocab_size, encoding, draws)
    ids = targets.ids.cpu().numpy()
    n, k = ids.shape
    p = n // rows
    logprobs = targets.logprobs.cpu().to(torch.float16).numpy()
    tail = list_column(targets.tail_logmass.cpu().to(torch.float16).numpy(), np.full(rows, p))
    if encoding == "plain":
        return {
            "teacher_ids": list_column(ids.astype(id_dtype(vocab_size)).reshape(-1), np.full(rows, p * k)),
            "teacher_logprobs": list_column(logprobs.reshape(-1), np.full(rows, p * k)),
            "teacher_tail": tail,
        }
    lp = logprobs.astype(np.float32)
    hi, lo = lp[:, 0].astype(np.float16), lp[:, -1].astype(np.float16)
    span = np.maximum(hi.astype(np.float32) - lo.astype(np.float32), np.float32(1e-6))
    codes = np.clip(np.rint(255.0 * (hi.astype(np.float32)[:, None] - lp) / span[:, None]), 0, 255).astype(np.int16)
    codes = np.maximum.accumulate(codes, axis=1)  # monotone even where float16 rounding made hi < lp_0
    deltas = np.diff(codes, axis=1, prepend=0).astype(np.uint8)
    width = bits_for(vocab_size)
    return {
        "teacher_ids": _binary([pack_bits(r, width) for r in ids.reshape(rows, -1)]),
        "teacher_codes": _binary([r.tobytes() for r in deltas.reshape(rows, -1)]),
        "teacher_scale": list_column(np.stack([hi, lo], axis=1).reshape(-1), np.full(rows, 2 * p)),
        "teacher_tail": tail,
    }


def _encode_sampled(targets, rows: int, vocab_size: int, encoding: str, draws: int) -> dict[str, pa.Array]:
    counts = np.rint(targets.counts.cpu().numpy() * draws).astype(np.int64)  # exact: counts are c / draws
    ids = targets.ids.cpu().numpy()
    n = ids.shape[0]
    p = n // rows
    keep = counts > 0
    unique = keep.sum(1)  # per position
    flat_ids, flat_counts = ids[keep], counts[keep]  # row-major: position by position, ascending ids
    per_row = unique.reshape(rows, p).sum(1)
    entropy = list_column(targets.entropy.cpu().to(torch.float16).numpy(), np.full(rows, p))
    if encoding == "plain":
        return {
            "teacher_ids": list_column(flat_ids.astype(id_dtype(vocab_size)), per_row),
            "teacher_counts": list_column(flat_counts.astype(np.uint8), per_row),
            "teacher_unique": list_column(unique.astype(np.uint8), np.full(rows, p)),
            "teacher_entropy": entropy,
        }
    id_width, count_width = bits_for(vocab_size), bits_for(draws + 1)
    return {
        "teacher_ids": _binary([pack_bits(r, id_width) for r in _split(flat_ids, per_row)]),
        "teacher_counts": _binary([pack_bits(r, count_width) for r in _split(flat_counts, per_row)]),
        "teacher_unique": _binary([pack_bits(r, count_width) for r in unique.reshape(rows, p)]),
        "teacher_entropy": entropy,
    }


# ----------------------------------------------------------------------------------------------
# Reading


def _binary_values(column) -> tuple[list[bytes], ...]:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.to_pylist()


def decode_targets(table: pa.Table, manifest: dict, b: int, p: int) -> dict[str, torch.Tensor]:
    """The targets of a batch of b rows of p positions: top-k as teacher_ids [b, p, k] int64, teacher_logprobs
    [b, p, k] and teacher_tail [b, p] float32; sampled as teacher_ids [b, p, N] int64 (unique ids, padded with the
    position's first id), teacher_counts [b, p, N] float32 (count / N, 0 for padding), teacher_entropy [b, p]."""
    targets, encoding = store_targets(manifest), store_encoding(manifest)
    if targets == "top_k":
        k = manifest["top_k"]
        tail = torch.from_numpy(flat(table["teacher_tail"]).astype(np.float32).reshape(b, p))
        if encoding == "plain":
            ids = flat(table["teacher_ids"]).astype(np.int64)
            logprobs = flat(table["teacher_logprobs"]).astype(np.float32)
        else:
            width = bits_for(manifest["vocab_size"])
            ids = np.concatenate([unpack_bits(r, width, p * k) for r in _binary_values(table["teacher_ids"])])
            codes = np.frombuffer(b"".join(_binary_values(table["teacher_codes"])), dtype=np.uint8)
            codes = codes.reshape(b * p, k).cumsum(1, dtype=np.int32).astype(np.float32)
            scale = flat(table["teacher_scale"]).astype(np.float32).reshape(b * p, 2)
            hi, lo = scale[:, :1], scale[:, 1:]
            logprobs = hi - codes * ((hi - lo) / 255.0)
        return {
            "teacher_ids": torch.from_numpy(ids.reshape(b, p, k)),
            "teacher_logprobs": torch.from_numpy(np.ascontiguousarray(logprobs, dtype=np.float32).reshape(b, p, k)),
            "teacher_tail": tail,
        }
    draws = manifest["samples"]
    entropy = torch.from_numpy(flat(table["teacher_entropy"]).astype(np.float32).reshape(b, p))
    if encoding == "plain":
        unique = flat(table["teacher_unique"]).astype(np.int64)
        ids, counts = flat(table["teacher_ids"]).astype(np.int64), flat(table["teacher_counts"]).astype(np.int64)
    else:
        id_width, count_width = bits_for(manifest["vocab_size"]), bits_for(draws + 1)
        unique = np.concatenate([unpack_bits(r, count_width, p) for r in _binary_values(table["teacher_unique"])])
        per_row = unique.reshape(b, p).sum(1)
        id_rows, count_rows = _binary_values(table["teacher_ids"]), _binary_values(table["teacher_counts"])
        ids = np.concatenate([unpack_bits(r, id_width, int(u)) for r, u in zip(id_rows, per_row)])
        counts = np.concatenate([unpack_bits(r, count_width, int(u)) for r, u in zip(count_rows, per_row)])
    if int(unique.sum()) != ids.size or ids.size != counts.size:
        raise DistillError(f"store rows {table['index'][0].as_py()}...: sampled targets do not add up (damaged row)")
    # Position of every stored (id, count) and its slot within the position: vectorised scatter into [b*p, N].
    position = np.repeat(np.arange(b * p), unique)
    first = np.zeros(b * p, dtype=np.int64)
    np.cumsum(unique[:-1], out=first[1:])
    slot = np.arange(ids.size) - first[position]
    padded_ids = np.zeros((b * p, draws), dtype=np.int64)
    padded_ids[:] = ids[np.minimum(first, max(ids.size - 1, 0))][:, None] if ids.size else 0
    padded_ids[position, slot] = ids
    weights = np.zeros((b * p, draws), dtype=np.float32)
    weights[position, slot] = counts / np.float32(draws)
    return {
        "teacher_ids": torch.from_numpy(padded_ids.reshape(b, p, draws)),
        "teacher_counts": torch.from_numpy(weights.reshape(b, p, draws)),
        "teacher_entropy": entropy,
    }


def store_targets(manifest: dict) -> str:
    """A manifest's target kind; format version 1 stores (before store 2.0) hold top-k."""
    return manifest.get("targets", "top_k")


def store_encoding(manifest: dict) -> str:
    """A manifest's encoding; format version 1 stores hold plain columns."""
    return manifest.get("encoding", "plain")


def check_rows(table: pa.Table, manifest: dict, where: str, seq_len: int) -> None:
    """verify-store's check of a shard's target columns, for every (targets, encoding): each row's lengths, ids
    inside the vocabulary, valid log-probs (top-k) or counts that add up to the draws (sampled). Raises naming the
    first bad row."""
    targets, encoding = store_targets(manifest), store_encoding(manifest)
    p, vocab, rows = seq_len - 1, manifest["vocab_size"], table.num_rows
    missing = [c for c in ENCODED_COLUMNS[targets, encoding] if c not in table.column_names]
    if missing:
        raise DistillError(f"{where} lacks column {missing[0]!r}")
    for r in range(rows):
        row = table.slice(r, 1)
        try:
            decoded = decode_targets(row, manifest, 1, p)
        except (ValueError, DistillError, IndexError) as e:
            raise DistillError(f"{where} row {r}: its {targets} targets do not decode ({e})") from None
        ids = decoded["teacher_ids"]
        if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            raise DistillError(f"{where} row {r}: a teacher id is outside the vocabulary ({vocab})")
        if targets == "top_k":
            lp = decoded["teacher_logprobs"]
            if lp.shape[-1] != manifest["top_k"] or bool((lp.isnan() | (lp > 0)).any()):
                raise DistillError(f"{where} row {r}: teacher log-probs are not valid (NaN or > 0)")
        else:
            total = decoded["teacher_counts"].sum(-1)
            if not torch.allclose(total, torch.ones_like(total), atol=1e-5):
                raise DistillError(f"{where} row {r}: its counts do not add up to {manifest['samples']} draws")
