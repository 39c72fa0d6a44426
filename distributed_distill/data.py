"""Datasets: read documents, split train/validation, tokenize, pack into `seq_len` blocks, batch per rank.

    documents (built-in corpus, or .txt/.jsonl/.json/.parquet through `datasets`)
      -> deterministic split by a hash of each document (stable when documents are added)
      -> tokenize (cached by `datasets` fingerprints under data.cache_dir)
      -> pack into blocks of seq_len: `input_ids`, and `labels` with prompt and padding tokens = -100

Labels are aligned with `input_ids` (Hugging Face convention); the loss shifts them by one.
The batch order is a pure function of (seed, step, rank), so every rank sees a distinct slice of
the same global batch, and a 1-process run with micro-batch 4 sees exactly the samples of a
2-process run with micro-batch 2.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import datasets
import torch

from .config import DataConfig
from .errors import DistillError

IGNORE_INDEX = -100
BUILTIN_CORPUS = "python-stdlib"
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def cache_root(dcfg: DataConfig) -> Path:
    root = Path(dcfg.cache_dir or os.environ.get("DISTILL_CACHE", "~/.cache/distributed_distill")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


# ----------------------------------------------------------------------------------------------
# Reading documents


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library sources: real text on every machine with Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def _read_stdlib(files: list[str], root: str, stamp: list[str]) -> Iterator[dict]:
    del stamp  # only part of the cache fingerprint
    for f in files:
        # A handful of stdlib test files are deliberately not UTF-8; replacement keeps them as text.
        yield {"id": os.path.relpath(f, root), "text": Path(f).read_text(encoding="utf-8", errors="replace")}


def _source_files(dcfg: DataConfig) -> list[Path]:
    src = dcfg.source
    path = Path(src).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in EXTENSIONS)
    elif path.is_file():
        files = [path]
    elif glob.has_magic(src):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(src), recursive=True) if Path(p).is_file())
    else:
        raise DistillError(f"data.source={src}: no such file, directory or built-in corpus (try {BUILTIN_CORPUS!r})")
    if not files:
        raise DistillError(f"data.source={src}: no data files found (extensions: {', '.join(sorted(EXTENSIONS))})")
    for f in files:
        if not os.access(f, os.R_OK):
            raise DistillError(f"data.source: cannot read {f} (permission denied)")
        if f.stat().st_size == 0:
            raise DistillError(f"data.source: {f} is empty")
    return files


def _format_of(dcfg: DataConfig, files: list[Path]) -> str:
    if dcfg.format != "auto":
        return dcfg.format
    kinds = {EXTENSIONS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DistillError(
            f"data.source={dcfg.source}: cannot infer one format from extensions "
            f"{sorted({f.suffix for f in files})}; set data.format"
        )
    return kinds.pop()


def load_documents(dcfg: DataConfig) -> datasets.Dataset:
    """All documents as a `datasets.Dataset` with an `id` column and the text (or prompt/completion) fields."""
    cache = str(cache_root(dcfg) / "datasets")
    if dcfg.source == BUILTIN_CORPUS:
        files = stdlib_files()
        if dcfg.max_documents is not None and dcfg.max_documents < len(files):
            # Evenly spaced, not the first N: sorted paths cluster by package (all of asyncio, then ...).
            step = len(files) / dcfg.max_documents
            files = [files[int(i * step)] for i in range(dcfg.max_documents)]
        root = sysconfig.get_paths()["stdlib"]
        # Sizes and mtimes join the fingerprint so an upgraded interpreter never reuses a stale cache.
        stamp = [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
        return datasets.Dataset.from_generator(
            _read_stdlib,
            gen_kwargs={"files": [str(f) for f in files], "root": root, "stamp": stamp},
            cache_dir=cache,
        )
    files = _source_files(dcfg)
    fmt = _format_of(dcfg, files)
    kwargs = {"sample_by": "paragraph"} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train", cache_dir=cache, **kwargs)
    except Exception as e:  # datasets raises many types with multi-line messages; keep one line
        where = locate_bad_input(files, fmt)  # datasets often says only "An error occurred while generating ..."
        msg = where or " ".join(str(e).split())[:300]
        raise DistillError(f"data.source={dcfg.source}: cannot read as {fmt}: {msg}") from None
    needed = [dcfg.prompt_field, dcfg.completion_field] if dcfg.prompt_field else [dcfg.text_field]
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DistillError(f"data.source={dcfg.source}: field {missing[0]!r} not found; columns are {ds.column_names}")
    if dcfg.max_documents is not None:
        ds = ds.select(range(min(dcfg.max_documents, len(ds))))
    ds = ds.select_columns(needed)
    # Documents without a natural id are identified by their content: duplicates land on the same side.
    return ds.map(_content_id, fn_kwargs={"fields": needed}, desc="hashing documents")


def locate_bad_input(files: list[Path], fmt: str) -> str | None:
    """After `datasets` failed to read the files: the first place that is not UTF-8 text (text, json) or not a
    JSON value per line (JSON Lines), as `file:line: what`; None if nothing is found this way."""
    if fmt not in ("text", "json"):
        return None
    for f in files:
        with open(f, "rb") as stream:
            lines = stream.read().split(b"\n")
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                byte = f"byte {e.start + 1} of the line is {raw[e.start]:#04x}"
                return f"{f}:{number}: not UTF-8 text ({byte}); re-encode the file as UTF-8"
            if fmt == "json" and f.suffix == ".jsonl" and line.strip():
                try:
                    json.loads(line)
                except ValueError as e:
                    return f"{f}:{number}: not a JSON value ({e.msg} at column {e.colno}); one JSON object per line"
    return None


def _content_id(row: dict, fields: list[str]) -> dict:
    blob = "\x00".join(str(row[f]) for f in fields).encode()
    return {"id": hashlib.sha256(blob).hexdigest()}


def _is_val(row: dict, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(row["id"].encode()).digest()[:8], "big")
    return (h % 1_000_000) < val_fraction * 1_000_000


def split_documents(ds: datasets.Dataset, dcfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    is_val = [_is_val(row, dcfg.val_fraction) for row in ds.select_columns(["id"])]
    train = ds.select([i for i, v in enumerate(is_val) if not v])
    val = ds.select([i for i, v in enumerate(is_val) if v])
    if len(train) == 0 or len(val) == 0:
        which = "validation" if len(val) == 0 else "training"
        raise DistillError(
            f"data.source={dcfg.source}: the {which} split is empty ({len(ds)} documents, "
            f"data.val_fraction={dcfg.val_fraction}); add documents or change data.val_fraction"
        )
    return train, val


def texts_for_tokenizer(dcfg: DataConfig) -> Iterator[str]:
    train, _ = split_documents(load_documents(dcfg), dcfg)
    fields = [dcfg.prompt_field, dcfg.completion_field] if dcfg.prompt_field else [dcfg.text_field]
    for row in train:
        yield "".join(row[f] or "" for f in fields)


# ----------------------------------------------------------------------------------------------
# Tokenize and pack


def _tokenize_and_pack(batch: dict, tokenizer, dcfg: DataConfig) -> dict:
    """Tokenize a batch of documents and pack them into seq_len blocks; the last partial block is padded."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids: list[int] = []
    labels: list[int] = []
    prompted = dcfg.prompt_field is not None
    n = len(batch["id"])
    prompts = tokenizer(batch[dcfg.prompt_field], add_special_tokens=False)["input_ids"] if prompted else [[]] * n
    bodies = tokenizer(batch[dcfg.completion_field if prompted else dcfg.text_field], add_special_tokens=False)
    for prompt, body in zip(prompts, bodies["input_ids"]):
        head = ([bos] if bos is not None else []) + prompt
        tail = body + ([eos] if eos is not None else [])
        ids += head + tail
        # The bos/prompt tokens are never targets; the body and its eos are.
        labels += [IGNORE_INDEX] * len(head) + tail
    seq = dcfg.seq_len
    out_ids, out_labels = [], []
    for start in range(0, len(ids), seq):
        block_ids, block_labels = ids[start : start + seq], labels[start : start + seq]
        short = seq - len(block_ids)
        if all(label == IGNORE_INDEX for label in block_labels[1:]):
            continue  # nothing to learn from (e.g. a lone prompt fragment)
        out_ids.append(block_ids + [pad] * short)
        out_labels.append(block_labels + [IGNORE_INDEX] * short)
    return {"input_ids": out_ids, "labels": out_labels}


def pack(ds: datasets.Dataset, tokenizer, dcfg: DataConfig, desc: str) -> datasets.Dataset:
    packed = ds.map(
        _tokenize_and_pack,
        batched=True,
        batch_size=1000,
        remove_columns=ds.column_names,
        fn_kwargs={"tokenizer": tokenizer, "dcfg": dcfg},
        desc=desc,
        features=datasets.Features(
            {
                "input_ids": datasets.Sequence(datasets.Value("int32")),
                "labels": datasets.Sequence(datasets.Value("int32")),
            }
        ),
    )
    return packed.with_format("torch")


def build_datasets(dcfg: DataConfig, tokenizer) -> tuple[datasets.Dataset, datasets.Dataset]:
    train_docs, val_docs = split_documents(load_documents(dcfg), dcfg)
    train = pack(train_docs, tokenizer, dcfg, "packing train")
    val = pack(val_docs, tokenizer, dcfg, "packing validation")
    for name, ds in (("training", train), ("validation", val)):
        if len(ds) == 0:
            raise DistillError(f"data.source={dcfg.source}: the {name} split has no tokens to learn from")
    return train, val


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


def collate(ds: datasets.Dataset, indices: list[int]) -> dict[str, torch.Tensor]:
    rows = ds[indices]
    return {"input_ids": rows["input_ids"].long(), "labels": rows["labels"].long()}


def eval_batches(ds: datasets.Dataset, micro_batch: int, world: int, rank: int, limit: int = 0):
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
