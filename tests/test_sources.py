"""data.source through `datasets`: a dataset repository directory (the hub's layout, with subsets), a save_to_disk
directory (with splits), and data.streaming, which trains and resumes exactly."""

from __future__ import annotations

import datasets
import pytest
import torch
from safetensors.torch import load_file

from distributed_distill.config import DataConfig
from distributed_distill.data.documents import _load as load_documents
from distributed_distill.data.documents import document_kind, source_kind, stdlib_files
from distributed_distill.data.stream import DocumentStream, streaming_validation
from distributed_distill.errors import DistillError

from .helpers import SMOKE, run_cli, training_records

CARD = """---
configs:
- config_name: plain
  data_files:
  - split: train
    path: plain/train-*.parquet
- config_name: chat
  data_files:
  - split: train
    path: chat/train-*.parquet
---
# a dataset repository as the hub holds it
"""


def texts(n: int, seed: int = 0) -> list[dict]:
    files = stdlib_files()
    return [{"text": files[(seed + 37 * i) % len(files)].read_text(errors="replace")[:3000]} for i in range(n)]


def chats(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} " * (i % 7 + 1)}]}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo") / "org__corpus"
    for name, rows in (("plain", texts(60)), ("chat", chats(40))):
        (root / name).mkdir(parents=True)
        datasets.Dataset.from_list(rows).to_parquet(str(root / name / "train-00000-of-00001.parquet"))
    (root / "README.md").write_text(CARD)
    return root


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved") / "corpus"
    splits = {"train": datasets.Dataset.from_list(texts(50)), "held": datasets.Dataset.from_list(texts(30, seed=5))}
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root


def test_repository_and_save_to_disk_directories(repository, saved, tmp_path):
    cache = str(tmp_path / "cache")
    plain = load_documents(DataConfig(source=str(repository), subset="plain", cache_dir=cache))
    assert source_kind(DataConfig(source=str(repository))) == "repository"
    assert len(plain) == 60 and plain[0]["text"] == texts(1)[0]["text"]
    chat = load_documents(DataConfig(source=str(repository), subset="chat", cache_dir=cache))
    assert document_kind(chat.column_names, DataConfig(), chat.features) == "chat" and len(chat) == 40
    held = load_documents(DataConfig(source=str(saved), split="held", cache_dir=cache))
    assert source_kind(DataConfig(source=str(saved))) == "saved"
    assert len(held) == 30 and held[0]["text"] == texts(1, seed=5)[0]["text"]
    with pytest.raises(DistillError, match=r"no split 'nope' \(data.split\); it has \['held', 'train'\]"):
        load_documents(DataConfig(source=str(saved), split="nope", cache_dir=cache))
    assert source_kind(DataConfig(source="HuggingFaceH4/ultrachat_200k")) == "repository"


def test_a_stream_skips_exactly_and_splits_across_ranks(saved, tmp_path):
    from transformers import AutoTokenizer

    from distributed_distill.tokenizer import train_bpe_tokenizer

    out = tmp_path / "tok"
    tokenizer = train_bpe_tokenizer((r["text"] for r in texts(20)), 300, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    dcfg = DataConfig(source=str(saved), streaming=True, seq_len=32, shuffle_buffer=8, cache_dir=str(tmp_path))
    stream = DocumentStream(dcfg, tokenizer, seed=3)
    first = [b["input_ids"] for _, b in zip(range(6), stream.micro_batches(2, 1, 0))]
    resumed = [b["input_ids"] for _, b in zip(range(2), stream.micro_batches(2, 1, 0, skip=4))]
    assert all(torch.equal(a, b) for a, b in zip(first[4:], resumed))
    r0 = torch.cat([b["input_ids"] for _, b in zip(range(3), stream.micro_batches(2, 2, 0))])
    r1 = torch.cat([b["input_ids"] for _, b in zip(range(3), stream.micro_batches(2, 2, 1))])
    assert not {tuple(r) for r in r0.tolist()} & {tuple(r) for r in r1.tolist()}
    val, _ = streaming_validation(dcfg, tokenizer)
    assert len(val) > 0


@pytest.mark.slow
@pytest.mark.parametrize("source", ["repository", "saved"])
def test_streaming_trains_and_resumes_exactly(repository, saved, tmp_path, source):
    """6 steps in one go, and 3 steps then a resume to 6: the same metrics and bit-identical weights."""
    where = {"repository": [f"data.source={repository}", "data.subset=plain"], "saved": [f"data.source={saved}"]}
    common = [
        "--config",
        str(SMOKE),
        *where[source],
        "data.max_documents=null",
        "data.streaming=true",
        "data.shuffle_buffer=16",
        "data.streaming_val_documents=40",
        "train.save_every=3",
        "train.warmup_steps=0",
        "train.min_lr_ratio=1.0",  # a constant learning rate: the schedule does not depend on max_steps
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_cli(["train", *common, f"output_dir={whole}", "train.max_steps=6"])
    run_cli(["train", *common, f"output_dir={split}", "train.max_steps=3"])
    proc = run_cli(["train", *common, f"output_dir={split}", "train.max_steps=6"])
    assert "resum" in (proc.stdout + proc.stderr).lower()
    assert training_records(whole) == training_records(split)
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
