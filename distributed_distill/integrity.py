"""File integrity in one place: content hashes, atomic writes, and the check of a recorded file.

Checkpoints, the logit store, precompute, the run directory and the tokenizer cache all write files that a
later process must be able to trust. They share three rules:

- a file (or a directory of files) is published by writing a temporary name, flushing it to disk, and renaming
  it into place, so a reader sees the old content or the new, never half of it (`atomic_write_text`,
  `write_json_atomic`, `publish_dir`);
- what was written is recorded as its size and sha256 (`record`);
- a recorded file is trusted only if it is present with that size and sha256 (`file_problem`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str, tmp_suffix: str = ".tmp") -> None:
    """Write `text` to `path` through `path + tmp_suffix`, flushed before the rename.

    Writers that may publish the same file at the same moment (the parts of one store on several nodes) pass a
    suffix of their own, so no two of them write one temporary file.
    """
    path = Path(path)
    tmp = path.with_name(path.name + tmp_suffix)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: dict, tmp_suffix: str = ".tmp") -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", tmp_suffix)


def publish_dir(tmp: str | Path, final: str | Path) -> None:
    """Flush every file under the finished directory `tmp` to disk, then rename it to `final` (which must not
    exist) and flush the parent's entry: a reader finds no `final`, or all of it."""
    tmp, final = Path(tmp), Path(final)
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        fsync_path(f)
    fsync_path(tmp)
    tmp.rename(final)
    fsync_path(final.parent)


def record(path: str | Path) -> dict:
    """What is recorded about a written file: its size and sha256."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def file_problem(path: str | Path, recorded: dict, *, check_hash: bool = True) -> str | None:
    """Why `path` is not the file `recorded` describes (`record`'s keys), as the end of a sentence naming the file,
    or None when it is. With check_hash=False only presence and size are checked (cheap: nothing is read)."""
    path = Path(path)
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != recorded["bytes"]:
        return _size_problem(size, recorded)
    if check_hash and sha256_file(path) != recorded["sha256"]:
        return HASH_PROBLEM
    return None


HASH_PROBLEM = "does not match its sha256 (checksum mismatch)"


def _size_problem(size: int, recorded: dict) -> str:
    return f"has {size} bytes, {recorded['bytes']} were written (truncated or replaced)"


def read_checked(path: str | Path, recorded: dict) -> tuple[bytes, str | None]:
    """A recorded file's bytes, read once, and `file_problem`'s verdict on them: the check costs no second read
    (the offline trainer checks every shard as it streams it)."""
    data = Path(path).read_bytes()
    if len(data) != recorded["bytes"]:
        return data, _size_problem(len(data), recorded)
    if hashlib.sha256(data).hexdigest() != recorded["sha256"]:
        return data, HASH_PROBLEM
    return data, None
