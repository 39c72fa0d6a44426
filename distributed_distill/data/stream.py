"""data.streaming: the training documents read as a stream (corpora too big to read first), tokenized and packed on
the fly, resumed by replaying the stream; the validation split is the held-out documents among the stream's first
data.streaming_val_documents."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import datasets
import torch

from ..config import DataConfig
from ..errors import DistillError, RankError
from .batching import pack_documents
from .chat import check_chat_template
from .documents import (
    DocKind,
    cache_root,
    check_fields,
    check_not_a_store,
    content_id,
    document_fields,
    document_kind,
    is_validation,
    read_source,
)
from .packed import describe_counts, pack_rows, tokenize, tokenize_batch


def _peek_kind(ds, dcfg: DataConfig) -> tuple[DocKind, list[str]]:
    """The document kind and columns of a stream, from its first row (streamed json has no schema up front)."""
    first = next(iter(ds.take(1)), None)
    if first is None:
        raise DistillError(f"data.source={dcfg.source}: the stream is empty")
    kind = document_kind(list(first), dcfg)
    if kind is DocKind.PROMPT and isinstance(first.get(dcfg.prompt_field), list):
        kind = DocKind.CHAT_PROMPT
    return kind, list(first)


def _document_stream(dcfg: DataConfig):
    """data.source as an IterableDataset of documents with their `id`, and their kind."""
    check_not_a_store(dcfg)
    ds = read_source(dcfg, str(cache_root(dcfg) / "datasets"), streaming=True)
    kind, columns = _peek_kind(ds, dcfg)
    check_fields(dcfg, kind, columns)
    needed = document_fields(kind, dcfg)
    return ds.select_columns(needed).map(content_id, fn_kwargs={"fields": needed}), kind


def streaming_validation(dcfg: DataConfig, tokenizer) -> tuple[datasets.Dataset, str]:
    """The validation split of a streamed corpus: the held-out documents (by hash, as without streaming) among the
    first data.streaming_val_documents of the stream, tokenized and packed like any split; and the summary line."""
    stream, kind = _document_stream(dcfg)
    held = [row for row in stream.take(dcfg.streaming_val_documents) if is_validation(row, dcfg.val_fraction)]
    if not held:
        raise DistillError(
            f"data.source={dcfg.source}: no validation document among the first data.streaming_val_documents="
            f"{dcfg.streaming_val_documents}; raise it or data.val_fraction"
        )
    rows, counts = tokenize(datasets.Dataset.from_list(held), kind, tokenizer, dcfg, "validation")
    val = pack_rows(rows, tokenizer, dcfg, "validation", whole=kind.is_chat)
    return val, describe_counts({"validation": {**counts, "rows": len(val)}}) + "; train: streamed"


class DocumentStream:
    """The training split of a streamed corpus: every document not held out, in a seeded shuffle buffer (the
    order changes per epoch), split across ranks by `datasets` (`split_dataset_by_node`), tokenized and packed
    on the fly, as the offline store's `TrainStream` yields micro-batches. A resumed run replays the stream up to
    its checkpoint's data position (documents are read and packed again, not trained on), so it continues with
    exactly the next batch."""

    CHUNK = 256  # documents tokenized and packed together (the last block of each chunk is padded)

    def __init__(self, dcfg: DataConfig, tokenizer, seed: int):
        self.dcfg, self.tokenizer, self.seed = dcfg, tokenizer, seed
        _, self.kind = _document_stream(dcfg)
        if self.kind.is_chat:
            check_chat_template(tokenizer, dcfg)

    def _rows(self, world: int, rank: int) -> Iterator[tuple[list[int], list[int], list[int]]]:
        from datasets.distributed import split_dataset_by_node

        d = self.dcfg
        for epoch in itertools.count():
            ds, _ = _document_stream(d)
            ds = ds.filter(lambda row: not is_validation(row, d.val_fraction))
            if d.shuffle_buffer:
                ds = ds.shuffle(seed=self.seed, buffer_size=d.shuffle_buffer)
                ds.set_epoch(epoch)
            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
            empty = True
            for docs in ds.iter(batch_size=self.CHUNK):
                rows = tokenize_batch(docs, self.tokenizer, d, self.kind)
                packed = pack_documents(rows, d, self.tokenizer.pad_token_id, whole=self.kind.is_chat)
                for row in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
                    empty = False
                    yield row
            if empty:
                raise RankError(f"data.source={d.source}: rank {rank} has no training rows in the stream")

    def micro_batches(self, micro_batch: int, world: int, rank: int, skip: int = 0) -> Iterator[dict]:
        batch, index = [], 0
        for row in self._rows(world, rank):
            batch.append(row)
            if len(batch) < micro_batch:
                continue
            if skip:
                skip -= 1
            else:
                ids, labels, positions = (torch.tensor(col, dtype=torch.long) for col in zip(*batch))
                yield {
                    "input_ids": ids,
                    "labels": labels,
                    "position_ids": positions,
                    "index": torch.arange(index, index + micro_batch),
                }
            index += micro_batch
            batch = []
