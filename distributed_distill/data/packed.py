"""Packed splits: documents tokenized (one row per document, cached by `datasets` fingerprints under data.cache_dir)
and packed into seq_len rows.

    Documents -> tokenize: text and prompt/completion as bos + prompt + body + eos (the body learned), conversations
                 through the chat template (assistant turns learned; a long one cut at a turn boundary, or dropped)
              -> pack into blocks of seq_len (data.packing) or pad one document per row: `input_ids`,
                 `position_ids` restarting at every document, `labels` with prompt, non-assistant and padding = -100

Labels are aligned with `input_ids` (Hugging Face convention); the loss shifts them by one.
"""

from __future__ import annotations

import datasets
import pyarrow.compute as pc

from ..config import DataConfig
from ..errors import DistillError
from .batching import DROPPED, IGNORE_INDEX, KEPT, TRUNCATED, pack_documents
from .chat import check_chat_template, render_chat
from .documents import DocKind, Documents


def tokenize_batch(batch: dict, tokenizer, dcfg: DataConfig, kind: DocKind) -> dict:
    """One row per document. Text and prompt/completion: bos + prompt + body + eos, the body and eos learned.
    Conversations: rendered by the chat template, assistant turns learned, cut to seq_len at the end of the last
    assistant turn that fits (TRUNCATED), or DROPPED when the first assistant turn does not fit; never cut mid-turn."""
    out = {"input_ids": [], "labels": [], "status": []}
    n = len(batch["id"])
    if kind.is_chat:
        for i in range(n):
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
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["status"].append(status)
        return out
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompted = kind is DocKind.PROMPT
    prompts = tokenizer(batch[dcfg.prompt_field], add_special_tokens=False)["input_ids"] if prompted else [[]] * n
    bodies = tokenizer(batch[dcfg.completion_field if prompted else dcfg.text_field], add_special_tokens=False)
    for prompt, body in zip(prompts, bodies["input_ids"]):
        head = ([bos] if bos is not None else []) + prompt
        tail = body + ([eos] if eos is not None else [])
        # The bos/prompt tokens are never targets; the body and its eos are.
        out["input_ids"].append(head + tail)
        out["labels"].append([IGNORE_INDEX] * len(head) + tail)
        out["status"].append(KEPT)
    return out


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
    what = "conversations" if counts["kind"].is_chat else "documents"
    return f"its {n} {what} hold no learned token (nothing after a prompt, no assistant turn); check the data's fields"


def describe_counts(summary: dict) -> str:
    """The startup summary's data line: what was kept, truncated and dropped."""
    parts = []
    for name, c in summary.items():
        line = f"{name}: {c['documents']} {'conversations' if c['kind'].is_chat else 'documents'}"
        if c["kind"].is_chat:
            line += f" ({c['truncated']} truncated at a turn boundary, {c['dropped']} dropped: first turn > seq_len)"
        parts.append(line + f" -> {c['rows']} rows")
    return "data " + "; ".join(parts)
