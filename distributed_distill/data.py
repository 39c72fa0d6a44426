"""Datasets: read documents, split train/validation, tokenize, pack into `seq_len` blocks, batch per rank.

    documents (built-in corpora; files, a hub dataset or a save_to_disk directory through `datasets`)
      -> deterministic split by a hash of each document (stable when documents are added)
      -> tokenize, one row per document (cached by `datasets` fingerprints under data.cache_dir); conversations
         through the chat template, only assistant turns learned, long ones cut at a turn boundary or dropped
      -> pack into blocks of seq_len (data.packing) or pad one document per row: `input_ids`, `position_ids`
         restarting at every document, and `labels` with prompt, non-assistant and padding tokens = -100
    data.streaming: the same steps on the fly over a stream (`DocumentStream`), resumed by replaying it.

Labels are aligned with `input_ids` (Hugging Face convention); the loss shifts them by one.
The batch order is a pure function of (seed, step, rank), so every rank sees a distinct slice of
the same global batch, and a 1-process run with micro-batch 4 sees exactly the samples of a
2-process run with micro-batch 2.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import datasets
import torch

from .config import DataConfig
from .errors import DistillError

IGNORE_INDEX = -100
BUILTIN_CORPUS = "python-stdlib"
BUILTIN_CHAT = "python-stdlib-chat"
# The built-in conversations ask for functions of at most this many source lines (a CPU demo's seq_len).
CHAT_MAX_LINES = 12
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


def _function_requests(path: Path, root: str) -> Iterator[dict]:
    """The conversations of one stdlib file: for each documented top-level function of at most CHAT_MAX_LINES
    lines, the user gives its signature and docstring and the assistant answers with the body."""
    import ast

    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few stdlib test files are deliberately invalid
        return
    lines = source.splitlines()
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or ast.get_docstring(node) is None or len(node.body) < 2:
            continue
        if node.end_lineno - node.lineno + 1 > CHAT_MAX_LINES or node.decorator_list:
            continue
        doc_end = node.body[0].end_lineno  # the docstring statement
        head = "\n".join(lines[node.lineno - 1 : doc_end])
        body = "\n".join(lines[doc_end : node.end_lineno])
        module = os.path.relpath(path, root)
        yield {
            "id": module,  # held out by file: every function of a file lands on the same side
            "messages": [
                {
                    "role": "user",
                    "content": f"Write the body of this function from `{module}`:\n\n```python\n{head}\n```",
                },
                {"role": "assistant", "content": f"```python\n{body}\n```"},
            ],
        }


def _read_stdlib_chat(files: list[str], root: str, stamp: list[str]) -> Iterator[dict]:
    del stamp  # only part of the cache fingerprint
    for f in files:
        yield from _function_requests(Path(f), root)


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
    if dcfg.source in (BUILTIN_CORPUS, BUILTIN_CHAT):
        files = stdlib_files()
        if dcfg.max_documents is not None and dcfg.max_documents < len(files):
            # Evenly spaced, not the first N: sorted paths cluster by package (all of asyncio, then ...).
            step = len(files) / dcfg.max_documents
            files = [files[int(i * step)] for i in range(dcfg.max_documents)]
        root = sysconfig.get_paths()["stdlib"]
        # Sizes and mtimes join the fingerprint so an upgraded interpreter never reuses a stale cache.
        stamp = [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
        return datasets.Dataset.from_generator(
            _read_stdlib if dcfg.source == BUILTIN_CORPUS else _read_stdlib_chat,
            gen_kwargs={"files": [str(f) for f in files], "root": root, "stamp": stamp},
            cache_dir=cache,
        )
    ds = _read_source(dcfg, cache, streaming=False)
    if dcfg.max_documents is not None:
        ds = ds.select(range(min(dcfg.max_documents, len(ds))))
    return _with_ids(ds, dcfg)


def _with_ids(ds, dcfg: DataConfig):
    """Keep the document's fields and add `id`, a hash of its content (documents without a natural id are
    identified by their content: duplicates land on the same side of the split)."""
    needed = document_fields(document_kind(ds.column_names, dcfg, ds.features), dcfg)
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DistillError(f"data.source={dcfg.source}: field {missing[0]!r} not found; columns are {ds.column_names}")
    ds = ds.select_columns(needed)
    kwargs = {} if isinstance(ds, datasets.IterableDataset) else {"desc": "hashing documents"}
    return ds.map(_content_id, fn_kwargs={"fields": needed}, **kwargs)


def source_kind(dcfg: DataConfig) -> str:
    """How data.source is read: files (a file, directory or glob of data files), saved (a `save_to_disk`
    directory), or repository (a dataset repository: a hub id, or a local directory with a dataset card)."""
    path = Path(dcfg.source).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "saved"
        card = path / "README.md"
        if card.is_file() and card.read_text(errors="replace").startswith("---"):
            return "repository"
        return "files"
    if path.exists() or glob.has_magic(dcfg.source) or dcfg.source.startswith(("/", ".", "~")):
        return "files"
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dcfg.source):
        return "repository"
    return "files"  # named as missing by _source_files


def _read_source(dcfg: DataConfig, cache: str, streaming: bool):
    """The documents of data.source as a Dataset (or an IterableDataset when streaming), through `datasets`."""
    kind = source_kind(dcfg)
    where = f"data.source={dcfg.source}"
    what = {"saved": "a save_to_disk directory", "repository": "a dataset repository"}.get(kind, "data files")
    try:
        if kind == "saved":
            ds = datasets.load_from_disk(str(Path(dcfg.source).expanduser()))
            if isinstance(ds, datasets.DatasetDict):
                if dcfg.split not in ds:
                    raise DistillError(f"{where}: no split {dcfg.split!r} (data.split); it has {sorted(ds)}")
                ds = ds[dcfg.split]
            return ds.to_iterable_dataset() if streaming else ds
        if kind == "repository":
            return datasets.load_dataset(
                str(Path(dcfg.source).expanduser()) if Path(dcfg.source).expanduser().is_dir() else dcfg.source,
                dcfg.subset,
                split=dcfg.split,
                revision=dcfg.revision,
                cache_dir=cache,
                streaming=streaming,
            )
        files = _source_files(dcfg)
        fmt = _format_of(dcfg, files)
        what = fmt
        kwargs = {"sample_by": "paragraph"} if fmt == "text" else {}
        return datasets.load_dataset(
            fmt, data_files=[str(f) for f in files], split="train", cache_dir=cache, streaming=streaming, **kwargs
        )
    except DistillError:
        raise
    except Exception as e:  # datasets raises many types with multi-line messages; keep one line
        # datasets often says only "An error occurred while generating the dataset": name the file and line.
        located = locate_bad_input(_source_files(dcfg), what) if kind == "files" else None
        msg = located or " ".join(str(e).split())[:300]
        raise DistillError(f"{where}: cannot read as {what}: {msg}") from None


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
    fields = [c for c in train.column_names if c != "id"]
    for row in train:
        for f in fields:
            value = row[f] or ""
            yield "\n".join(m["content"] for m in value) if isinstance(value, list) else value


def is_conversational(dcfg: DataConfig) -> bool:
    docs = load_documents(dcfg)
    return document_kind(docs.column_names, dcfg, docs.features).startswith("chat")


# ----------------------------------------------------------------------------------------------
# Tokenize: one row per document, labels = -100 except on the tokens that are learned


def document_kind(columns: list[str], dcfg: DataConfig, features=None) -> str:
    """text, prompt (prompt/completion strings), chat (a messages column), or chat_prompt (prompt/completion
    as lists of messages): the Hugging Face conversational formats are recognised from the columns."""
    if dcfg.prompt_field is not None:
        feature = None if features is None else features.get(dcfg.prompt_field)
        return "chat_prompt" if isinstance(feature, list | datasets.Sequence | datasets.LargeList) else "prompt"
    if dcfg.messages_field in columns and dcfg.text_field not in columns:
        return "chat"
    return "text"


def document_fields(kind: str, dcfg: DataConfig) -> list[str]:
    if kind in ("prompt", "chat_prompt"):
        return [dcfg.prompt_field, dcfg.completion_field]
    return [dcfg.messages_field] if kind == "chat" else [dcfg.text_field]


def check_chat_template(tokenizer, dcfg: DataConfig) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DistillError(
            f"data.source={dcfg.source} is conversational but the tokenizer has no chat template; "
            "set tokenizer.chat_template: PATH (a Jinja template file)"
        )


def render_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Render a conversation with the tokenizer's chat template: (ids, labels, turn_ends).

    Labels are the assistant turns' tokens (their content and the template's end-of-turn text), -100 elsewhere.
    The assistant spans are found on the text: a turn starts where the template's rendering of the conversation up
    to it, with the generation prompt, ends, and stops where the rendering including it ends; the whole
    conversation is tokenized once and a token is learned when it starts inside a span. `turn_ends` are the token
    counts after each assistant turn: the places a long conversation may be cut.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]

    def render(msgs: list[dict], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = render(messages[:i], prompt=True), render(messages[: i + 1])
        if not (full.startswith(start) and full.startswith(end)):
            raise DistillError(
                "the chat template renders a conversation's beginning differently from the whole conversation "
                f"(turn {i}); assistant tokens cannot be located: use a template without history-dependent output"
            )
        spans.append((len(start), len(end)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels, turn_ends, span = [IGNORE_INDEX] * len(ids), [], 0
    for j, (char, _) in enumerate(offsets):
        while span < len(spans) and char >= spans[span][1]:
            turn_ends.append(j)
            span += 1
        if span < len(spans) and char >= spans[span][0]:
            labels[j] = ids[j]
    turn_ends += [len(ids)] * (len(spans) - span)
    return ids, labels, turn_ends


# Per-document outcome, counted in the startup summary.
KEPT, TRUNCATED, DROPPED = 0, 1, 2


def _tokenize(batch: dict, tokenizer, dcfg: DataConfig, kind: str) -> dict:
    """One row per document. Text and prompt/completion: bos + prompt + body + eos, the body and eos learned.
    Conversations: rendered by the chat template, assistant turns learned, cut to seq_len at the end of the last
    assistant turn that fits (TRUNCATED), or DROPPED when the first assistant turn does not fit; never cut mid-turn."""
    out = {"input_ids": [], "labels": [], "status": []}
    n = len(batch["id"])
    if kind in ("chat", "chat_prompt"):
        for i in range(n):
            if kind == "chat":
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
    prompted = kind == "prompt"
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


def pack_documents(batch: dict, dcfg: DataConfig, pad: int, whole: bool) -> dict:
    """Rows of seq_len tokens with `position_ids` that restart at every document.

    packing: documents are concatenated; text is cut at block boundaries (each piece restarts its positions), a
    conversation (`whole`) is never split: it starts a new block when it does not fit in the current one.
    No packing: one document per row (text longer than seq_len continues in further rows), padded at the end.
    Padding and rows with nothing to learn are labelled -100 / skipped. A per-token `target` column (the sample
    store's: which stored top-k row predicts each token, -1 for none) travels with the tokens, -1 on padding."""
    seq = dcfg.seq_len
    carried = [key for key in ("target",) if key in batch]
    out = {"input_ids": [], "labels": [], "position_ids": [], **{key: [] for key in carried}}
    block: dict[str, list[int]] = {key: [] for key in out}
    fill = {"input_ids": pad, "labels": IGNORE_INDEX, "target": -1}

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


def tokenize(ds: datasets.Dataset, tokenizer, dcfg: DataConfig, desc: str) -> tuple[datasets.Dataset, dict]:
    """Documents -> one tokenized row per document, and the counts of the summary (documents, truncated,
    dropped)."""
    kind = document_kind(ds.column_names, dcfg, ds.features)
    if kind.startswith("chat"):
        check_chat_template(tokenizer, dcfg)
    rows = ds.map(
        _tokenize,
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


def build_datasets(dcfg: DataConfig, tokenizer, summary: dict | None = None):
    """The packed train and validation splits. `summary` (if given) receives the document counts per split."""
    train_docs, val_docs = split_documents(load_documents(dcfg), dcfg)
    out = []
    for name, docs in (("train", train_docs), ("validation", val_docs)):
        rows, counts = tokenize(docs, tokenizer, dcfg, name)
        packed = pack_rows(rows, tokenizer, dcfg, name, whole=counts["kind"].startswith("chat"))
        if len(packed) == 0:
            raise DistillError(f"data.source={dcfg.source}: the {name} split has no tokens to learn from")
        if summary is not None:
            summary[name] = {**counts, "rows": len(packed)}
        out.append(packed)
    return out[0], out[1]


def describe_counts(summary: dict) -> str:
    """The startup summary's data line: what was kept, truncated and dropped."""
    parts = []
    for name, c in summary.items():
        line = f"{name}: {c['documents']} {'conversations' if c['kind'].startswith('chat') else 'documents'}"
        if c["kind"].startswith("chat"):
            line += f" ({c['truncated']} truncated at a turn boundary, {c['dropped']} dropped: first turn > seq_len)"
        parts.append(line + f" -> {c['rows']} rows")
    return "data " + "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# Streaming (data.streaming): documents read as needed, never the whole corpus


def _peek_kind(ds, dcfg: DataConfig) -> tuple[str, list[str]]:
    """The document kind and columns of a stream, from its first row (streamed json has no schema up front)."""
    first = next(iter(ds.take(1)), None)
    if first is None:
        raise DistillError(f"data.source={dcfg.source}: the stream is empty")
    kind = document_kind(list(first), dcfg)
    if kind == "prompt" and isinstance(first.get(dcfg.prompt_field), list):
        kind = "chat_prompt"
    return kind, list(first)


def _document_stream(dcfg: DataConfig):
    """data.source as an IterableDataset of documents with their `id`, and their kind."""
    ds = _read_source(dcfg, str(cache_root(dcfg) / "datasets"), streaming=True)
    kind, columns = _peek_kind(ds, dcfg)
    needed = document_fields(kind, dcfg)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DistillError(f"data.source={dcfg.source}: field {missing[0]!r} not found; columns are {columns}")
    return ds.select_columns(needed).map(_content_id, fn_kwargs={"fields": needed}), kind


def streaming_validation(dcfg: DataConfig, tokenizer, summary: dict | None = None) -> datasets.Dataset:
    """The validation split of a streamed corpus: the held-out documents (by hash, as without streaming) among the
    first data.streaming_val_documents of the stream, tokenized and packed like any split."""
    stream, kind = _document_stream(dcfg)
    held = [row for row in stream.take(dcfg.streaming_val_documents) if _is_val(row, dcfg.val_fraction)]
    if not held:
        raise DistillError(
            f"data.source={dcfg.source}: no validation document among the first data.streaming_val_documents="
            f"{dcfg.streaming_val_documents}; raise it or data.val_fraction"
        )
    rows, counts = tokenize(datasets.Dataset.from_list(held), tokenizer, dcfg, "validation")
    val = pack_rows(rows, tokenizer, dcfg, "validation", whole=kind.startswith("chat"))
    if summary is not None:
        summary["validation"] = {**counts, "rows": len(val)}
    return val


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
        if self.kind.startswith("chat"):
            check_chat_template(tokenizer, dcfg)

    def _rows(self, world: int, rank: int) -> Iterator[tuple[list[int], list[int], list[int]]]:
        from datasets.distributed import split_dataset_by_node

        d = self.dcfg
        for epoch in itertools.count():
            ds, _ = _document_stream(d)
            ds = ds.filter(lambda row: not _is_val(row, d.val_fraction))
            if d.shuffle_buffer:
                ds = ds.shuffle(seed=self.seed, buffer_size=d.shuffle_buffer)
                ds.set_epoch(epoch)
            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
            empty = True
            for docs in ds.iter(batch_size=self.CHUNK):
                rows = _tokenize(docs, self.tokenizer, d, self.kind)
                packed = pack_documents(rows, d, self.tokenizer.pad_token_id, whole=self.kind.startswith("chat"))
                for row in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
                    empty = False
                    yield row
            if empty:
                raise DistillError(f"data.source={d.source}: rank {rank} has no training rows in the stream")

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
    batch = {"input_ids": rows["input_ids"].long(), "labels": rows["labels"].long()}
    if "position_ids" in rows:  # per-document positions: packed documents do not attend to each other
        batch["position_ids"] = rows["position_ids"].long()
    return batch


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
