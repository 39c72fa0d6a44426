"""Routing several teachers by a data column (data.teacher_column, docs/data.md "Routing"): each document's teacher,
as an index into `teachers:`, follows its tokens through tokenization, packing and padding into batch["teacher_route"];
an unknown teacher name is refused in one line before anything trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distributed_distill.config import DataConfig
from distributed_distill.data.batching import IGNORE_INDEX, collate, eval_batches
from distributed_distill.data.chat import render_chat
from distributed_distill.data.documents import MIXED_FIELDS, TEACHER_INDEX, documents, texts_for_tokenizer
from distributed_distill.data.packed import build_datasets
from distributed_distill.tokenizer import train_bpe_tokenizer

from .helpers import SMOKE, cli_in_process, error_line

TEACHERS = ["code", "chat", "prose"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _text_rows(n: int) -> list[dict]:
    """Documents of different lengths (some longer than a packed row), teachers in a fixed pattern, some without."""
    names = ["code", "prose", None, "chat", "code"]
    return [
        {"text": " ".join(f"word{i}x{j}" for j in range(3 + (7 * i) % 40)), "teacher": names[i % len(names)]}
        for i in range(n)
    ]


def _expected(docs, split, tokenizer) -> tuple[list[int], list[int]]:
    """The split's documents tokenized one by one (bos + text + eos, or the chat template), in document order, and
    each token's teacher: what packing must lay out, padding aside."""
    ids, teachers = [], []
    for row in split:
        messages = row.get(MIXED_FIELDS[1])
        if messages is not None:
            doc = render_chat(messages, tokenizer)[0]
        else:
            doc = [tokenizer.bos_token_id, *tokenizer(row["text"], add_special_tokens=False)["input_ids"]]
            doc.append(tokenizer.eos_token_id)
        ids += doc
        teachers += [row[TEACHER_INDEX]] * len(doc)
    return ids, teachers


def _check_split(packed, docs, split, tokenizer, dcfg: DataConfig) -> None:
    rows = collate(packed, list(range(len(packed))))
    ids, teacher_route, labels = rows["input_ids"], rows["teacher_route"], rows["labels"]
    assert teacher_route.dtype == torch.int64 and teacher_route.shape == ids.shape == (len(packed), dcfg.seq_len)
    real = ids != tokenizer.pad_token_id
    # Padding: no teacher, nothing learned.
    assert (teacher_route[~real] == -1).all() and (labels[~real] == IGNORE_INDEX).all()
    # Every token of every document, in order, with its own document's teacher; the one exception, packing's rule
    # that a row with nothing to learn is left out: a text's last piece when it is its eos alone.
    want = list(zip(*_expected(docs, split, tokenizer)))
    got = list(zip(ids[real].tolist(), teacher_route[real].tolist()))
    left_out, j = [], 0
    for token in want:
        if j < len(got) and got[j] == token:
            j += 1
        else:
            left_out.append(token[0])
    assert j == len(got) and set(left_out) <= {tokenizer.eos_token_id}, (j, len(got), left_out[:5])
    assert len(left_out) < len(want) // 50
    # The label shift: wherever a next token is learned, the token predicting it belongs to the same document, so
    # teacher_route[:, s] (the teacher scoring position s -> s + 1) is the label's document's teacher.
    learned = labels[:, 1:] != IGNORE_INDEX
    assert learned.any()
    assert torch.equal(teacher_route[:, :-1][learned], teacher_route[:, 1:][learned])


@pytest.mark.parametrize("packing", [True, False])
def test_teacher_route_follows_documents_through_packing(tmp_path, packing):
    source = _jsonl(tmp_path / "docs.jsonl", _text_rows(60))
    dcfg = DataConfig(source=str(source), teacher_column="teacher", seq_len=32, val_fraction=0.2, packing=packing)
    docs = documents(dcfg, TEACHERS)
    index = {"code": 0, "chat": 1, "prose": 2, None: -1}
    assert docs.train[TEACHER_INDEX] == [index[t] for t in docs.train["teacher"]]
    assert set(docs.train[TEACHER_INDEX]) == {-1, 0, 1, 2}
    tokenizer = train_bpe_tokenizer(texts_for_tokenizer(docs), 300, tmp_path / "tok")
    # The routing column is not text: the tokenizer trains on the documents alone.
    assert list(texts_for_tokenizer(docs)) == list(docs.train["text"])
    train, val, _ = build_datasets(docs, tokenizer, dcfg)
    for packed, split in ((train, docs.train), (val, docs.val)):
        _check_split(packed, docs, split, tokenizer, dcfg)
    # Validation batches carry them too (a rank past the end: its padding batch as well).
    batches = list(eval_batches(val, 4, 2, 1))
    assert all(b["teacher_route"].shape == b["input_ids"].shape for b in batches)
    # Without data.teacher_column nothing is added: no column, no batch key.
    plain = DataConfig(source=str(source), seq_len=32, val_fraction=0.2, packing=packing)
    train, _, _ = build_datasets(documents(plain, TEACHERS), tokenizer, plain)
    assert "teacher_route" not in collate(train, [0])


def test_mixed_corpus_routes_code_and_conversations(tmp_path):
    """python-stdlib-mixed: every file's text (teacher `code`) and its conversations (teacher `chat`), packed together
    (conversations never split), each token with its document's teacher; the split is the two corpora's own."""
    dcfg = DataConfig(
        source="python-stdlib-mixed", teacher_column="teacher_id", max_documents=24, seq_len=256, val_fraction=0.3
    )
    docs = documents(dcfg, ["chat", "code"])  # any order: the index is the position in `teachers:`
    for split in (docs.train, docs.val):
        chat = [m is not None for m in split[MIXED_FIELDS[1]]]
        assert split["teacher_id"] == ["chat" if c else "code" for c in chat]
        assert split[TEACHER_INDEX] == [0 if c else 1 for c in chat]
    assert 0 in docs.train[TEACHER_INDEX] and 1 in docs.train[TEACHER_INDEX]
    # The held-out files are those python-stdlib and python-stdlib-chat hold out.
    code = documents(DataConfig(source="python-stdlib", max_documents=24, val_fraction=0.3))
    assert sorted(set(docs.val["id"])) == sorted(code.val["id"])
    tokenizer = train_bpe_tokenizer(texts_for_tokenizer(docs), 400, tmp_path / "tok", chat=True)
    train, val, line = build_datasets(docs, tokenizer, dcfg)
    assert "documents and conversations" in line
    # (conversations longer than seq_len are dropped; the reference leaves them out too)
    for packed, split in ((train, docs.train), (val, docs.val)):
        kept = [
            i
            for i, m in enumerate(split[MIXED_FIELDS[1]])
            if m is None or len(render_chat(m, tokenizer)[0]) <= dcfg.seq_len
        ]
        _check_split(packed, docs, split.select(kept), tokenizer, dcfg)
    assert set(collate(train, list(range(len(train))))["teacher_route"].unique().tolist()) == {-1, 0, 1}  # -1: padding


ROUTED = [
    "teacher=null",
    "distill.top_k=8",
    "distill.teacher_mix=route",
    "teachers=[{name: code, arch: {family: llama, hidden_size: 32, num_layers: 1, num_heads: 2, "
    "max_position_embeddings: 128}}, {name: chat, arch: {family: llama, hidden_size: 32, num_layers: 1, "
    "num_heads: 2, max_position_embeddings: 128}}]",
]


def test_unknown_teacher_is_one_line_naming_the_row_and_column(tmp_path):
    rows = [{**row, "teacher": "chat" if row["teacher"] == "prose" else row["teacher"]} for row in _text_rows(12)]
    rows[7]["teacher"] = "kode"  # the one name that is not a teacher's
    source = _jsonl(tmp_path / "docs.jsonl", rows)
    args = ["train", "--config", str(SMOKE), f"output_dir={tmp_path / 'run'}", f"data.source={source}", *ROUTED]
    line = error_line(cli_in_process([*args, "data.teacher_column=teacher"]))
    assert line == (
        f"error: data.source={source}: {source}:8: teacher='kode' (data.teacher_column) is not a teacher; "
        "teachers are ['code', 'chat']"
    )
    line = error_line(cli_in_process([*args, "data.teacher_column=teachr"]))
    assert line == (
        f"error: data.source={source}: no column 'teachr' (data.teacher_column); columns are ['text', 'teacher'] "
        "(did you mean 'teacher'?)"
    )
    assert not (tmp_path / "run" / "final").exists()
