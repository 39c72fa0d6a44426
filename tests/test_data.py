import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_distill.config import DataConfig
from distributed_distill.data.batching import IGNORE_INDEX, eval_batches, train_indices
from distributed_distill.data.documents import DocKind, documents, stdlib_files
from distributed_distill.data.documents import _load as load_documents
from distributed_distill.data.packed import build_datasets, tokenize_batch
from distributed_distill.errors import DistillError
from distributed_distill.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog\n"] * 50
    return train_bpe_tokenizer(iter(texts), 300, tmp_path_factory.mktemp("tok") / "bpe")


def _cfg(tmp_path, source, **kw) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def _build(dcfg: DataConfig, tokenizer):
    """The packed train and validation splits of data.source."""
    train, val, _ = build_datasets(documents(dcfg), tokenizer, dcfg)
    return train, val


def test_builtin_corpus_is_the_stdlib_split_by_file(tmp_path):
    files = stdlib_files()
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    cfg = _cfg(tmp_path, "python-stdlib", max_documents=60, val_fraction=0.2)
    docs = documents(cfg)
    train, val = docs.train, docs.val
    assert len(train) + len(val) == 60 and len(set(train["id"]) | set(val["id"])) == 60
    again = documents(cfg)
    train2, val2 = again.train, again.val
    assert train["id"] == train2["id"] and val["id"] == val2["id"]  # deterministic
    assert not set(train["id"]) & set(val["id"])  # split by file: no file on both sides
    assert 0 < len(val) < len(train)


def test_text_jsonl_and_parquet_give_the_same_blocks(tmp_path, tokenizer):
    rows = [{"text": f"document {i}: " + "the quick brown fox " * (i % 7 + 1)} for i in range(80)]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("\n\n".join(r["text"] for r in rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    packed = {}
    for name, src in {"text": tmp_path / "t", "json": tmp_path / "a.jsonl", "parquet": tmp_path / "a.parquet"}.items():
        train, val = _build(_cfg(tmp_path, src, seq_len=16, val_fraction=0.25), tokenizer)
        packed[name] = (train[:]["input_ids"].tolist(), val[:]["input_ids"].tolist())
    assert packed["text"] == packed["json"] == packed["parquet"]


def test_packing_labels_and_padding(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": "the quick brown fox " * (i + 1)}) for i in range(30)))
    train, _ = _build(_cfg(tmp_path, path, seq_len=32, val_fraction=0.2), tokenizer)
    ids, labels = train[:]["input_ids"], train[:]["labels"]
    assert ids.shape[1] == 32 and labels.shape == ids.shape
    real = labels != IGNORE_INDEX
    assert (ids[real] == labels[real]).all()
    # every document starts with bos, which is never a target; padding only at the end of a block
    assert (labels[ids == tokenizer.bos_token_id] == IGNORE_INDEX).all()
    pad_rows = (ids[:, -1] == tokenizer.pad_token_id) & (labels[:, -1] == IGNORE_INDEX)
    assert pad_rows.any()


def test_prompt_tokens_never_count(tmp_path, tokenizer):
    path = tmp_path / "pc.jsonl"
    rows = [{"q": "the lazy dog " * 3, "a": "def f(x): return x"} for _ in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _cfg(tmp_path, path, seq_len=64, prompt_field="q", completion_field="a", val_fraction=0.3)
    docs = load_documents(cfg)  # every document is the same: all land on one side of the split
    batch = tokenize_batch(docs[:1], tokenizer, cfg, DocKind.PROMPT)
    n_prompt = len(tokenizer(rows[0]["q"], add_special_tokens=False)["input_ids"])
    n_body = len(tokenizer(rows[0]["a"], add_special_tokens=False)["input_ids"])
    labels = batch["labels"][0]
    assert labels[: 1 + n_prompt] == [IGNORE_INDEX] * (1 + n_prompt)
    assert (
        labels[1 + n_prompt : 1 + n_prompt + n_body + 1] == batch["input_ids"][0][1 + n_prompt : 2 + n_prompt + n_body]
    )
    assert sum(label != IGNORE_INDEX for label in labels) == n_body + 1  # completion + eos


def test_batches_are_disjoint_across_ranks_and_match_one_process():
    n, seed = 50, 3
    one = [train_indices(n, 4, 1, 0, seed, m) for m in range(5)]
    for m in range(5):
        r0 = train_indices(n, 2, 2, 0, seed, m)
        r1 = train_indices(n, 2, 2, 1, seed, m)
        assert r0 + r1 == one[m]
        assert not set(r0) & set(r1)
    # one epoch visits every sample exactly once
    epoch = [i for m in range(10) for i in train_indices(n, 5, 1, 0, seed, m)]
    assert sorted(epoch) == list(range(n))


def test_eval_batches_keep_ranks_in_lockstep(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i} " + "the quick brown fox " * 20}) for i in range(9)))
    _, val = _build(_cfg(tmp_path, path, seq_len=8, val_fraction=0.5), tokenizer)
    counts = [list(eval_batches(val, 3, 2, rank)) for rank in (0, 1)]
    assert len(counts[0]) == len(counts[1])
    counted = sum(int((b["labels"] != IGNORE_INDEX).sum()) for c in counts for b in c)
    assert counted == int((val[:]["labels"] != IGNORE_INDEX).sum())  # nothing counted twice or lost


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.jsonl", "no such file, directory or built-in corpus"),
        (lambda p: (p / "e.jsonl").write_text("") and p / "e.jsonl" or p / "e.jsonl", "is empty"),
        (lambda p: (p / "empty_dir").mkdir() or p / "empty_dir", "no data files found"),
        (lambda p: (p / "bad.jsonl").write_text("{not json\n") and p / "bad.jsonl", "cannot read as json"),
        (lambda p: (p / "f.jsonl").write_text('{"body": "x"}\n') and p / "f.jsonl", "no text field 'text'"),
        (
            lambda p: (p / "g.parquet").write_bytes(b"garbage, not parquet") and p / "g.parquet",
            "cannot read as parquet",
        ),
        (lambda p: (p / "x.csv").write_text("a,b\n") and p / "x.csv", "cannot infer one format"),
    ],
)
def test_bad_data_is_one_clear_line(tmp_path, tokenizer, make, message):
    with pytest.raises(DistillError) as info:
        _build(_cfg(tmp_path, make(tmp_path)), tokenizer)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unreadable_file(tmp_path, tokenizer):
    import os

    path = tmp_path / "locked.jsonl"
    path.write_text('{"text": "x"}\n')
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as a user who can read any file (root); permission errors cannot be provoked")
    with pytest.raises(DistillError, match="permission denied"):
        _build(_cfg(tmp_path, path), tokenizer)


def test_too_few_documents_for_a_validation_split(tmp_path, tokenizer):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": "only one document"}) + "\n")
    with pytest.raises(DistillError, match="split is empty"):
        _build(_cfg(tmp_path, path), tokenizer)


def test_tokenization_is_cached(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i} the quick brown fox"}) for i in range(40)))
    cfg = _cfg(tmp_path, path, seq_len=8, val_fraction=0.2)
    first, _ = _build(cfg, tokenizer)
    second, _ = _build(cfg, tokenizer)
    assert first.cache_files and first.cache_files == second.cache_files
    assert Path(first.cache_files[0]["filename"]).is_relative_to(tmp_path / "cache")
