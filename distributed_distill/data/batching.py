"""Batching, torch only: the ignore label, packing documents into seq_len rows, and the per-rank batch order.

Nothing here reads files or imports `datasets`: the on-policy sampler, the stores and the loop use it without the
data pipeline. The batch order is a pure function of (seed, micro-step, rank), so every rank sees a distinct slice of
the same global batch, and a 1-process run with micro-batch 4 sees exactly the samples of a 2-process run with
micro-batch 2.
"""

from __future__ import annotations

import torch

from ..config import DataConfig

# The label of a token that is not learned (prompt, padding, non-assistant turns): the Hugging Face convention.
IGNORE_INDEX = -100

# Per-document outcome, counted in the startup summary.
KEPT, TRUNCATED, DROPPED = 0, 1, 2


def pack_documents(batch: dict, dcfg: DataConfig, pad: int, whole: bool) -> dict:
    """Rows of seq_len tokens with `position_ids` that restart at every document.

    packing: documents are concatenated; text is cut at block boundaries (each piece restarts its positions), a
    conversation (`whole`) is never split: it starts a new block when it does not fit in the current one.
    No packing: one document per row (text longer than seq_len continues in further rows), padded at the end.
    Padding and rows with nothing to learn are labelled -100 / skipped. The per-token columns `target` (the sample
    store's: which stored top-k row predicts each token, -1 for none) and `teacher_route` (routing: the teacher of
    each token's document) travel with the tokens, -1 on padding."""
    seq = dcfg.seq_len
    carried = [key for key in ("target", "teacher_route") if key in batch]
    out = {"input_ids": [], "labels": [], "position_ids": [], **{key: [] for key in carried}}
    block: dict[str, list[int]] = {key: [] for key in out}
    fill = {"input_ids": pad, "labels": IGNORE_INDEX, "target": -1, "teacher_route": -1}

    def flush() -> None:
        ids, labels = block["input_ids"], block["labels"]
        if ids and any(label != IGNORE_INDEX for label in labels[1:]):  # else nothing to learn from
            short = seq - len(ids)
            for key, values in block.items():
                tail = list(range(short)) if key == "position_ids" else [fill[key]] * short
                out[key].append(values + tail)
        for values in block.values():
            values.clear()

    columns = zip(batch["input_ids"], batch["labels"], batch["status"], *(batch[key] for key in carried))
    for ids, labels, status, *extra in columns:
        if status == DROPPED:
            continue
        if not dcfg.packing or (whole and len(block["input_ids"]) + len(ids) > seq):
            flush()
        # A document's first token is never a target: the token before it belongs to another document.
        doc = {"input_ids": ids, "labels": [IGNORE_INDEX] + labels[1:], **dict(zip(carried, extra))}
        while doc["input_ids"]:
            room = seq - len(block["input_ids"])
            block["position_ids"].extend(range(len(doc["input_ids"][:room])))
            for key in doc:
                block[key].extend(doc[key][:room])
                doc[key] = doc[key][room:]
            if len(block["input_ids"]) == seq:
                flush()
        if not dcfg.packing:
            flush()
    flush()  # the last partial block of this batch
    return out


# ----------------------------------------------------------------------------------------------
# Batching: a pure function of (seed, micro-step, rank)


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def train_indices(n: int, micro_batch: int, world: int, rank: int, seed: int, micro_step: int) -> list[int]:
    """Sample indices of one rank's micro-batch: global position p maps to epoch p // n, shuffled per epoch."""
    start = (micro_step * world + rank) * micro_batch
    out, perm, perm_epoch = [], None, -1
    for pos in range(start, start + micro_batch):
        epoch = pos // n
        if epoch != perm_epoch:
            perm, perm_epoch = _permutation(n, seed, epoch), epoch
        out.append(int(perm[pos % n]))
    return out


def collate(ds, indices: list[int]) -> dict[str, torch.Tensor]:
    """Rows `indices` of a packed split (anything indexable by a list of rows into torch columns) as a batch."""
    rows = ds[indices]
    batch = {"input_ids": rows["input_ids"].long(), "labels": rows["labels"].long()}
    if "position_ids" in rows:  # per-document positions: packed documents do not attend to each other
        batch["position_ids"] = rows["position_ids"].long()
    if "teacher_route" in rows:  # routing: [B, S], the teacher that scores the position after each token (-1: none)
        batch["teacher_route"] = rows["teacher_route"].long()
    # A store read by a student of another tokenizer: the batch's spans and their teacher side (cross_store.py).
    batch.update({key: value for key, value in rows.items() if key.startswith("cross_")})
    return batch


def eval_batches(ds, micro_batch: int, world: int, rank: int, limit: int = 0):
    """Validation micro-batches for one rank. Every rank yields the same number of batches (lockstep for
    sharded teachers); a rank past the end gets a batch whose labels are all ignored."""
    per_round = micro_batch * world
    rounds = -(-len(ds) // per_round)
    if limit:
        rounds = min(rounds, limit)
    for r in range(rounds):
        start = r * per_round + rank * micro_batch
        idx = list(range(start, min(start + micro_batch, len(ds))))
        if idx:
            yield collate(ds, idx)
        else:
            dummy = collate(ds, [0])
            dummy["labels"].fill_(IGNORE_INDEX)
            yield dummy
