"""Documents: where a run's text comes from, what kind it is, and which documents are held out.

    data.source -> the built-in corpora (this interpreter's standard library, as text or as "write this function"
                   conversations, or both mixed), files (.txt .md .jsonl .json .parquet, a directory or a glob), a
                   `save_to_disk` directory, or a dataset repository (a hub id, or a local clone), all read through
                   `datasets`
    -> one `id` per document (its content hash where it has none)
    -> the kind of the documents (`DocKind`: text, prompt/completion, conversations, or mixed: the built-in both)
    -> a deterministic split by a hash of each document's id (stable when documents are added)
    -> with data.teacher_column (routing several teachers), each document's teacher as an index into `teachers:`

A command builds its `Documents` once (`documents(dcfg)`) and hands the value to everything that reads them: the
tokenizer trainer, tokenization and packing, the held-out prompts, `distill generate`'s prompts.
"""

from __future__ import annotations

import difflib
import enum
import glob
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..config import DataConfig
from ..errors import DistillError
from .chat import conversation_problem

BUILTIN_CORPUS = "python-stdlib"
BUILTIN_CHAT = "python-stdlib-chat"
BUILTIN_MIXED = "python-stdlib-mixed"  # both: each file's text and its conversations, with a teacher_id column
BUILTIN = (BUILTIN_CORPUS, BUILTIN_CHAT, BUILTIN_MIXED)
# python-stdlib-mixed's routing column and its values: the teacher of the code documents and of the conversations.
MIXED_COLUMN, MIXED_TEACHERS = "teacher_id", {"text": "code", "messages": "chat"}
MIXED_FIELDS = ("text", "messages")  # a mixed row's text, or its conversation (the other is null)
# The column documents() adds with data.teacher_column: each document's teacher, an index into `teachers:` (-1: none).
TEACHER_INDEX = "teacher_index"
# The built-in conversations ask for functions of at most this many source lines (a CPU demo's seq_len).
CHAT_MAX_LINES = 12
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def cache_root(dcfg: DataConfig) -> Path:
    root = Path(dcfg.cache_dir or os.environ.get("DISTILL_CACHE", "~/.cache/distributed_distill")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


class DocKind(str, enum.Enum):
    """What a document holds, recognised from its columns (the Hugging Face conversational formats included)."""

    TEXT = "text"  # plain text (data.text_field): every token learned
    PROMPT = "prompt"  # prompt/completion strings: the completion learned
    CHAT = "chat"  # a conversation (data.messages_field): the assistant turns learned
    CHAT_PROMPT = "chat_prompt"  # prompt/completion as lists of messages
    MIXED = "mixed"  # python-stdlib-mixed: a row holds a text (every token learned) or a conversation, not both

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    @property
    def is_chat(self) -> bool:
        """Rendered through the chat template (and never split across packed rows); mixed: its conversations."""
        return self in (DocKind.CHAT, DocKind.CHAT_PROMPT, DocKind.MIXED)


@dataclass(frozen=True)
class Documents:
    """A data source's documents, read once per command: the training and held-out splits and their kind."""

    train: datasets.Dataset
    val: datasets.Dataset
    kind: DocKind
    fields: tuple[str, ...]  # the columns holding the documents' text (not their id, not a routing column)


def documents(dcfg: DataConfig, teachers: Sequence[str] | None = None) -> Documents:
    """data.source's documents, split into training and validation by document hash, with their kind; routed
    (data.teacher_column and the names of `teachers`), with each document's teacher as an index (TEACHER_INDEX)."""
    docs = _load(dcfg)
    kind = document_kind(docs.column_names, dcfg, docs.features)
    if kind.is_chat and dcfg.source not in BUILTIN:  # (the built-in conversations are made well-formed)
        check_conversations(docs, kind, dcfg)
    if dcfg.teacher_column is not None and teachers is not None:
        docs = docs.add_column(TEACHER_INDEX, teacher_indices(docs, dcfg, list(teachers)))
    is_val = [is_validation(row, dcfg.val_fraction) for row in docs.select_columns(["id"])]
    train = docs.select([i for i, v in enumerate(is_val) if not v])
    val = docs.select([i for i, v in enumerate(is_val) if v])
    if len(train) == 0 or len(val) == 0:
        which = "validation" if len(val) == 0 else "training"
        raise DistillError(
            f"data.source={dcfg.source}: the {which} split is empty ({len(docs)} documents, "
            f"data.val_fraction={dcfg.val_fraction}); add documents or change data.val_fraction"
        )
    return Documents(train, val, kind, tuple(document_fields(kind, dcfg)))


def conversation_of(row: dict, kind: DocKind, dcfg: DataConfig):
    """A conversational document's turns: its messages, or its prompt and completion turns together."""
    if kind is DocKind.CHAT:
        return row[dcfg.messages_field]
    prompt, completion = row[dcfg.prompt_field], row[dcfg.completion_field]
    return prompt + completion if isinstance(prompt, list) and isinstance(completion, list) else prompt


def check_conversations(docs: datasets.Dataset, kind: DocKind, dcfg: DataConfig) -> None:
    """Every conversation well-formed (chat.conversation_problem), or one line naming the first bad one (its file and
    line for files), what is wrong with it, and how many are bad: a corpus with bad rows is refused, never trained
    on with some rows silently broken."""
    fields = document_fields(kind, dcfg)
    bad = [
        (i, problem)
        for i, row in enumerate(docs.select_columns(fields))
        if (problem := conversation_problem(conversation_of(row, kind, dcfg))) is not None
    ]
    if not bad:
        return
    index, problem = bad[0]
    fields = document_fields(kind, dcfg)

    def malformed(row: dict) -> bool:
        return all(k in row for k in fields) and conversation_problem(conversation_of(row, kind, dcfg)) is not None

    where = row_location(dcfg, index, malformed)
    raise DistillError(
        f"data.source={dcfg.source}: {where}: {problem}; {len(bad)} of {len(docs)} conversations are malformed "
        "(fix or remove them)"
    )


def row_location(dcfg: DataConfig, index: int, bad: Callable[[dict], bool]) -> str:
    """Where the first bad row is: `file:line` of the first JSON Lines record `bad` holds for (files), else
    `row INDEX` (its position in data.source)."""
    if source_kind(dcfg) == "files" and dcfg.source not in BUILTIN:
        for f in _source_files(dcfg):
            if f.suffix != ".jsonl":
                continue
            for number, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                try:
                    row = json.loads(line) if line.strip() else None
                except ValueError:
                    continue
                if isinstance(row, dict) and bad(row):
                    return f"{f}:{number}"
    return f"row {index}"


def check_teacher_column(dcfg: DataConfig, columns: list[str]) -> None:
    """data.teacher_column is one of the documents' columns, or one line naming the columns there are."""
    if dcfg.teacher_column is not None and dcfg.teacher_column not in columns:
        close = difflib.get_close_matches(dcfg.teacher_column, columns, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DistillError(
            f"data.source={dcfg.source}: no column {dcfg.teacher_column!r} (data.teacher_column); columns are "
            f"{columns}{hint}"
        )


def teacher_indices(docs: datasets.Dataset, dcfg: DataConfig, teachers: list[str]) -> list[int]:
    """Each document's teacher (data.teacher_column) as an index into `teachers` (-1 where the row has none), or one
    line naming the first row whose teacher is not one of them, and the column."""
    column = dcfg.teacher_column
    check_teacher_column(dcfg, docs.column_names)
    index = {name: i for i, name in enumerate(teachers)}
    values = docs[column]
    for i, value in enumerate(values):
        if value is not None and value not in index:
            where = row_location(dcfg, i, lambda row: row.get(column) is not None and row.get(column) not in index)
            raise DistillError(
                f"data.source={dcfg.source}: {where}: {column}={value!r} (data.teacher_column) is not a teacher; "
                f"teachers are {teachers}"
            )
    return [-1 if value is None else index[value] for value in values]


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


def _read_stdlib_mixed(files: list[str], root: str, stamp: list[str]) -> Iterator[dict]:
    """File by file, its text (teacher `code`) and then its conversations (teacher `chat`), with the ids of the two
    corpora: a file's documents land on the side of the split they take in python-stdlib and python-stdlib-chat."""
    for f in files:
        for doc in _read_stdlib([f], root, stamp):
            yield {**doc, "messages": None, MIXED_COLUMN: MIXED_TEACHERS["text"]}
        for doc in _read_stdlib_chat([f], root, stamp):
            yield {**doc, "text": None, MIXED_COLUMN: MIXED_TEACHERS["messages"]}


# Declared, not inferred: the mixed corpus's first rows have no conversation to infer the messages' type from.
MIXED_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        MIXED_FIELDS[0]: datasets.Value("string"),
        MIXED_FIELDS[1]: datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        MIXED_COLUMN: datasets.Value("string"),
    }
)


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


def _load(dcfg: DataConfig) -> datasets.Dataset:
    """All documents as a `datasets.Dataset` with an `id` column and the text (or prompt/completion) fields."""
    cache = str(cache_root(dcfg) / "datasets")
    if dcfg.source in BUILTIN:
        files = stdlib_files()
        if dcfg.max_documents is not None and dcfg.max_documents < len(files):
            # Evenly spaced, not the first N: sorted paths cluster by package (all of asyncio, then ...).
            step = len(files) / dcfg.max_documents
            files = [files[int(i * step)] for i in range(dcfg.max_documents)]
        root = sysconfig.get_paths()["stdlib"]
        # Sizes and mtimes join the fingerprint so an upgraded interpreter never reuses a stale cache.
        stamp = [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
        read = {BUILTIN_CORPUS: _read_stdlib, BUILTIN_CHAT: _read_stdlib_chat, BUILTIN_MIXED: _read_stdlib_mixed}
        return datasets.Dataset.from_generator(
            read[dcfg.source],
            gen_kwargs={"files": [str(f) for f in files], "root": root, "stamp": stamp},
            cache_dir=cache,
            features=MIXED_FEATURES if dcfg.source == BUILTIN_MIXED else None,
        )
    check_not_a_store(dcfg)
    ds = read_source(dcfg, cache, streaming=False)
    if dcfg.max_documents is not None:
        ds = ds.select(range(min(dcfg.max_documents, len(ds))))
    return _with_ids(ds, dcfg)


def check_not_a_store(dcfg: DataConfig) -> None:
    """data.source naming a store this project wrote (its manifest.json or plan.json says which format) is told which
    keys read it, instead of its Parquet shards being read as documents."""
    root = Path(dcfg.source).expanduser()
    for name in ("manifest.json", "plan.json"):
        try:
            fmt = json.loads((root / name).read_text()).get("format", "")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(fmt, str) and fmt.startswith("distributed_distill."):
            kind = fmt.split(".", 1)[1].replace("_", " ")
            raise DistillError(
                f"data.source={dcfg.source} is a {kind}, not documents: a logit store is read with "
                f"distill.signal=offline distill.store={dcfg.source}; a sample store by distill train, as data "
                f"(data.source={dcfg.source}) or with its top-k (distill.signal=offline distill.store={dcfg.source})"
            )


def _with_ids(ds, dcfg: DataConfig):
    """Keep the document's fields and add `id`, a hash of its content (documents without a natural id are
    identified by their content: duplicates land on the same side of the split)."""
    kind = document_kind(ds.column_names, dcfg, ds.features)
    check_fields(dcfg, kind, ds.column_names)
    needed = document_fields(kind, dcfg)
    check_teacher_column(dcfg, ds.column_names)
    ds = ds.select_columns(needed + ([dcfg.teacher_column] if dcfg.teacher_column else []))
    kwargs = {} if isinstance(ds, datasets.IterableDataset) else {"desc": "hashing documents"}
    return ds.map(content_id, fn_kwargs={"fields": needed}, **kwargs)


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


def read_source(dcfg: DataConfig, cache: str, streaming: bool):
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


def content_id(row: dict, fields: list[str]) -> dict:
    """A document's `id`: the sha256 of its fields."""
    blob = "\x00".join(str(row[f]) for f in fields).encode()
    return {"id": hashlib.sha256(blob).hexdigest()}


def is_validation(row: dict, val_fraction: float) -> bool:
    """Whether a document (by its `id`) is held out: a hash, so the split is stable when documents are added."""
    h = int.from_bytes(hashlib.sha256(row["id"].encode()).digest()[:8], "big")
    return (h % 1_000_000) < val_fraction * 1_000_000


def texts_for_tokenizer(docs: Documents) -> Iterator[str]:
    """The training documents' text, for training a tokenizer (conversations: their turns' content; not the
    routing columns)."""
    for row in docs.train.select_columns(list(docs.fields)):
        for f in docs.fields:
            value = row[f] or ""
            yield "\n".join(m["content"] for m in value) if isinstance(value, list) else value


def document_kind(columns: list[str], dcfg: DataConfig, features=None) -> DocKind:
    """The kind of documents with these columns (and `datasets` features, where known): the Hugging Face
    conversational formats are recognised from the columns."""
    if dcfg.source == BUILTIN_MIXED:
        return DocKind.MIXED
    if dcfg.prompt_field is not None:
        feature = None if features is None else features.get(dcfg.prompt_field)
        chat = isinstance(feature, list | datasets.Sequence | datasets.LargeList)
        return DocKind.CHAT_PROMPT if chat else DocKind.PROMPT
    if dcfg.messages_field in columns and dcfg.text_field not in columns:
        return DocKind.CHAT
    return DocKind.TEXT


def check_fields(dcfg: DataConfig, kind: DocKind, columns: list[str]) -> None:
    """The documents have the fields their kind reads; else one line naming the setting that names the missing field
    (for plain text both: the text field is missing, and no conversation column was found under messages_field),
    the columns there are, and the closest one."""
    missing = [c for c in document_fields(kind, dcfg) if c not in columns]
    if not missing:
        return
    field = missing[0]
    close = difflib.get_close_matches(field, columns, n=1) or difflib.get_close_matches(
        dcfg.messages_field, columns, n=1
    )
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if kind is DocKind.TEXT:
        raise DistillError(
            f"data.source={dcfg.source}: no text field {field!r} (data.text_field) and no conversation field "
            f"{dcfg.messages_field!r} (data.messages_field); columns are {columns}{hint}"
        )
    key = "data.prompt_field" if field == dcfg.prompt_field else "data.completion_field"
    raise DistillError(f"data.source={dcfg.source}: field {field!r} ({key}) not found; columns are {columns}{hint}")


def document_fields(kind: DocKind, dcfg: DataConfig) -> list[str]:
    """The columns that hold a document of `kind`."""
    if kind in (DocKind.PROMPT, DocKind.CHAT_PROMPT):
        return [dcfg.prompt_field, dcfg.completion_field]
    if kind is DocKind.MIXED:
        return list(MIXED_FIELDS)
    return [dcfg.messages_field] if kind is DocKind.CHAT else [dcfg.text_field]
