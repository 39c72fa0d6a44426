"""Packed splits: documents tokenized (one row per document, cached by `datasets` fingerprints under data.cache_dir)
and packed into seq_len rows.

    Documents -> tokenize: text and prompt/completion as bos + prompt + body + eos (the body learned), conversations
                 through the chat template (assistant turns learned; a long one cut at a turn boundary, or dropped)
              -> pack into blocks of seq_len (data.packing) or pad one document per row: `input_ids`,
                 `position_ids` restarting at every document, `labels` with prompt, non-assistant and padding = -100,
                 and when routed (data.teacher_column) `teacher_route`: each token's document's teacher, -1 on padding

Labels are aligned with `input_ids` (Hugging Face convention); the loss shifts them by one.
"""

from __future__ import annotations

import dataclasses

import datasets
import pyarrow.compute as pc

from ..config import DataConfig
from ..errors import DistillError
from .batching import DROPPED, IGNORE_INDEX, KEPT, TRUNCATED, pack_documents
from .chat import check_chat_template, render_chat
from .documents import MIXED_FIELDS, TEACHER_INDEX, DocKind, Documents

ROUTED = {"teacher_route": datasets.Sequence(datasets.Value("int32"))}  # routing's per-token column, when there is one


def tokenize_batch(batch: dict, tokenizer, dcfg: DataConfig, kind: DocKind) -> dict:
    """One row per document. Text and prompt/completion: bos + prompt + body + eos, the body and eos learned.
    Conversations: rendered by the chat template, assistant turns learned, cut to seq_len at the end of the last
    assistant turn that fits (TRUNCATED), or DROPPED when the first assistant turn does not fit; never cut mid-turn.
    Mixed: each row as what it holds. Routed (a TEACHER_INDEX column): `teacher_route`, the row's teacher per token."""
    n = len(batch["id"])
    if kind is DocKind.MIXED:
        chat = [batch[MIXED_FIELDS[1]][i] is not None for i in range(n)]
        fields = {"text_field": MIXED_FIELDS[0], "messages_field": MIXED_FIELDS[1]}
        dcfg, kind_of = dataclasses.replace(dcfg, **fields), {True: DocKind.CHAT, False: DocKind.TEXT}
    else:
        chat, kind_of = [kind.is_chat] * n, {kind.is_chat: kind}
    rows: list[tuple[list[int], list[int], int]] = [([], [], KEPT)] * n
    for is_chat in (True, False):
        mine = [i for i in range(n) if chat[i] == is_chat]
        if mine:
            part = batch if len(mine) == n else {key: [values[i] for i in mine] for key, values in batch.items()}
            make = _chat_rows if is_chat else _text_rows
            for i, row in zip(mine, make(part, tokenizer, dcfg, kind_of[is_chat])):
                rows[i] = row
    out = {"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows], "status": [r[2] for r in rows]}
    if TEACHER_INDEX in batch:
        out["teacher_route"] = [[t] * len(ids) for t, ids in zip(batch[TEACHER_INDEX], out["input_ids"])]
    return out


def _chat_rows(batch: dict, tokenizer, dcfg: DataConfig, kind: DocKind):
    for i in range(len(batch["id"])):
        if kind is DocKind.CHAT:
            messages = batch[dcfg.messages_field][i]
        else:
            messages = list(batch[dcfg.prompt_field][i]) + list(batch[dcfg.completion_field][i])
        ids, labels, ends = render_chat(messages, tokenizer)
        status = KEPT
        if len(ids) > dcfg.seq_len:
            fits = [e for e in ends if e <= dcfg.seq_len]
            cut = fits[-1] if fits else 0
            ids, labels, status = ids[:cut], labels[:cut], TRUNCATED if cut else DROPPED
        yield ids, labels, status


def _text_rows(batch: dict, tokenizer, dcfg: DataConfig, kind: DocKind):
    n = len(batch["id"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompted = kind is DocKind.PROMPT
    prompts = tokenizer(batch[dcfg.prompt_field], add_special_tokens=False)["input_ids"] if prompted else [[]] * n
    bodies = tokenizer(batch[dcfg.completion_field if prompted else dcfg.text_field], add_special_tokens=False)
    for prompt, body in zip(prompts, bodies["input_ids"]):
        head = ([bos] if bos is not None else []) + prompt
        tail = body + ([eos] if eos is not None else [])
        # The bos/prompt tokens are never targets; the body and its eos are.
        yield head + tail, [IGNORE_INDEX] * len(head) + tail, KEPT


def tokenize(
    ds: datasets.Dataset, kind: DocKind, tokenizer, dcfg: DataConfig, desc: str
) -> tuple[datasets.Dataset, dict]:
    """Documents of `kind` -> one tokenized row per document, and the counts of the summary (documents, truncated,
    dropped)."""
    if kind.is_chat:
        check_chat_template(tokenizer, dcfg)
    rows = ds.map(
        tokenize_batch,
        batched=True,
        batch_size=1000,
        remove_columns=ds.column_names,
        fn_kwargs={"tokenizer": tokenizer, "dcfg": dcfg, "kind": kind},
        desc=f"tokenizing {desc}",
        features=datasets.Features(
            {
                "input_ids": datasets.Sequence(datasets.Value("int32")),
                "labels": datasets.Sequence(datasets.Value("int32")),
                "status": datasets.Value("int8"),
                **(ROUTED if TEACHER_INDEX in ds.column_names else {}),
            }
        ),
    )
    status = rows.data.column("status").to_numpy()
    counts = {
        "kind": kind,
        "documents": len(rows),
        "truncated": int((status == TRUNCATED).sum()),
        "dropped": int((status == DROPPED).sum()),
    }
    return rows, counts


def pack_rows(rows: datasets.Dataset, tokenizer, dcfg: DataConfig, desc: str, whole: bool) -> datasets.Dataset:
    packed = rows.map(
        pack_documents,
        batched=True,
        batch_size=1000,
        remove_columns=rows.column_names,
        fn_kwargs={"dcfg": dcfg, "pad": tokenizer.pad_token_id, "whole": whole},
        desc=f"{'packing' if dcfg.packing else 'padding'} {desc}",
        features=datasets.Features(
            {
                "input_ids": datasets.Sequence(datasets.Value("int32")),
                "labels": datasets.Sequence(datasets.Value("int32")),
                "position_ids": datasets.Sequence(datasets.Value("int32")),
                **(ROUTED if "teacher_route" in rows.column_names else {}),
            }
        ),
    )
    return packed.with_format("torch")


def build_datasets(docs: Documents, tokenizer, dcfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """The packed train and validation splits, and the startup summary's data line (what was kept, truncated and
    dropped)."""
    out, summary = [], {}
    for name, split in (("train", docs.train), ("validation", docs.val)):
        rows, counts = tokenize(split, docs.kind, tokenizer, dcfg, name)
        packed = pack_rows(rows, tokenizer, dcfg, name, whole=docs.kind.is_chat)
        if len(packed) == 0:
            raise DistillError(
                f"data.source={dcfg.source}: the {name} split has no tokens to learn from: {why_empty(counts, dcfg)}"
            )
        summary[name] = {**counts, "rows": len(packed)}
        out.append(packed)
    return out[0], out[1], describe_counts(summary)


def rows_without_prompt(ds: datasets.Dataset) -> int:
    """Packed rows whose first token is already learned: the continuation of a document longer than data.seq_len
    (without packing a document goes on in further rows). They have no prompt for an on-policy step to continue."""
    first = pc.list_element(ds.with_format("arrow")["labels"], 0)
    return int(pc.sum(pc.not_equal(first, IGNORE_INDEX)).as_py() or 0)


def why_empty(counts: dict, dcfg: DataConfig) -> str:
    """Why a split of `counts` (tokenize's) packed into no row with anything to learn: the cause and the counts."""
    n, dropped = counts["documents"], counts["dropped"]
    if counts["kind"].is_chat and dropped:
        return (
            f"{dropped} of {n} conversations were dropped because their first assistant turn ends beyond data.seq_len="
            f"{dcfg.seq_len} tokens (a conversation is cut only at the end of a turn); raise data.seq_len"
        )
    what = _what(counts["kind"])
    return f"its {n} {what} hold no learned token (nothing after a prompt, no assistant turn); check the data's fields"


def _what(kind: DocKind) -> str:
    return {DocKind.MIXED: "documents and conversations"}.get(kind, "conversations" if kind.is_chat else "documents")


def describe_counts(summary: dict) -> str:
    """The startup summary's data line: what was kept, truncated and dropped."""
    parts = []
    for name, c in summary.items():
        line = f"{name}: {c['documents']} {_what(c['kind'])}"
        if c["kind"].is_chat:
            line += f" ({c['truncated']} truncated at a turn boundary, {c['dropped']} dropped: first turn > seq_len)"
        parts.append(line + f" -> {c['rows']} rows")
    return "data " + "; ".join(parts)
