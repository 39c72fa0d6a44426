"""The sharded store writer that `distill precompute` (the logit store) and `distill generate` (the sample store)
share: one job skeleton, each command supplying only its plan and its per-shard work.

    lock the store (or this part of it) -> the plan's hash: the store is complete (nothing to do), unfinished with
    this plan (resume), or refused (another plan, foreign files) -> publish plan.json -> the layout's shards: this
    part's (DISTILL_STORE_PART=I/N), dealt round-robin to the ranks, those without a valid sidecar left to do ->
    the teacher loaded only when some rank has work -> each shard computed, then written (atomically, with its
    sidecar) while the next one computes -> filler calls until every rank has called the teacher as often as the
    busiest (ZeRO-3 lockstep) -> the manifest, once every shard of the plan is there -> one summary line.

The ranks only meet in collectives (the teacher's, a few barriers), never on each other's files. A shard is
written atomically and counts as done once its sidecar's checksum matches the file, so a killed run started again
with the same command redoes only unfinished shards, and the store is byte-identical to one made in one go.

Parts: with DISTILL_STORE_PART=I/N (a SLURM job array), a run does only the I-th of N contiguous ranges of the
shard list, so N jobs, on different nodes and at different times, fill one store. Parts share nothing but the
directory; whichever part finds every shard of the plan finished when it ends writes the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import torch

from .. import lock
from ..errors import DistillError
from ..integrity import write_json_atomic
from .format import MANIFEST, PLAN, SPLITS, finished_shard, store_format, write_shard

PART_ENV = "DISTILL_STORE_PART"


class ShardWork(Protocol):
    """What a store-writing command gives the job: the teacher work of its shards."""

    counted: str  # the sidecar count the summary line reports: "tokens" (every token) or "target_tokens"

    def calls(self, name: str, items: list) -> int:
        """How many teacher calls (batches) the shard `name` of `items` takes."""
        ...

    def load(self) -> None:
        """Load the teacher: on every rank, and only when some rank has a shard to compute."""
        ...

    def shard(self, name: str, items: list) -> tuple[pa.Table, dict]:
        """Compute one shard: its rows and its sidecar counts ({"tokens", "target_tokens"})."""
        ...

    def filler(self) -> None:
        """One teacher call that computes nothing: joins the busier ranks' collectives (ZeRO-3 lockstep)."""
        ...


def plan_hash(plan: dict) -> str:
    """The hash of everything that determines a store's content: it names the store and guards its resumes."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def part_setting() -> str | None:
    """DISTILL_STORE_PART, as set by a job array (launch/slurm/precompute.sbatch)."""
    return os.environ.get(PART_ENV)


def parse_part(text: str | None) -> tuple[int, int] | None:
    """`I/N` (0 <= I < N) from DISTILL_STORE_PART; None when unset or empty (the whole store)."""
    if not text:
        return None
    index, sep, count = text.partition("/")
    if sep and index.strip().isdigit() and count.strip().isdigit() and int(index) < int(count):
        return int(index), int(count)
    raise DistillError(f"{PART_ENV}={text!r} must be I/N with 0 <= I < N (part I of N of the store's shards)")


def part_of(layout: list, part: tuple[int, int] | None) -> list:
    """The I-th of N contiguous ranges of the shard list (sizes differ by at most one shard)."""
    if part is None:
        return layout
    index, count = part
    return layout[index * len(layout) // count : (index + 1) * len(layout) // count]


def publish_json(path: Path, obj: dict) -> None:
    """`write_json_atomic` through a temporary name of this process's own: the parts of one store may publish the
    same file (plan, manifest, with the same content) at the same moment from different nodes."""
    write_json_atomic(path, obj, tmp_suffix=f".{socket.gethostname()}.{os.getpid()}")


def check_store_dir(root: Path, config_hash: str, key: str, fmt: str) -> bool:
    """True if `root` already holds this finished store; raises if it holds anything else (never overwritten).
    `key` names the setting that chose the directory, `fmt` the store format (the logit store, or generate's)."""
    if root.exists() and not root.is_dir():
        raise DistillError(f"{key}={root} is a file, not a directory")
    if (root / MANIFEST).is_file():
        found = store_format(root)
        if found != fmt:
            raise DistillError(f"{key}={root} holds a store of another kind ({found!r}); choose another {key}")
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest.get("config_hash") == config_hash:
            return True
        raise DistillError(
            f"{key}={root} holds a finished store of another config (hash {manifest.get('config_hash')!s:.12}, "
            f"this one {config_hash:.12}); choose another {key}"
        )
    if (root / PLAN).is_file():
        old = json.loads((root / PLAN).read_text()).get("config_hash")
        if old != config_hash:
            raise DistillError(
                f"{key}={root} holds an unfinished store of another config (hash {old!s:.12}, "
                f"this one {config_hash:.12}); rerun that command to finish it, or choose another {key}"
            )
    elif root.is_dir() and any(not p.name.startswith((f"{PLAN}.", lock.NAME)) for p in root.iterdir()):
        # (a plan being published by a concurrent part, see publish_json, and the locks are not foreign content)
        raise DistillError(f"{key}={root} is a non-empty directory that is not a store; choose another")
    return False


@contextlib.contextmanager
def locked(store: str, key: str, accelerator, part: tuple[int, int] | None) -> Iterator[None]:
    """One job per store (per part, with parts: the parts of one store run side by side), held until it ends."""
    name = lock.NAME if part is None else f"{lock.NAME}-part-{part[0]}-of-{part[1]}"
    lock.hold(store, key, accelerator, name)
    try:
        yield
    finally:
        lock.release(store, name)


@dataclass
class StoreJob:
    """One run of a store writer (`distill precompute`, `distill generate`): the store `plan` describes, at `root`
    (`key` names the setting that chose it), laid out as `layout` (every shard's name and items), this run's `part`
    of it (None: all), timed from `started`."""

    accelerator: object
    root: Path
    key: str
    plan: dict
    layout: list[tuple[str, list]]
    part: tuple[int, int] | None
    started: float
    config_hash: str = field(init=False)
    what: str = field(init=False)

    def __post_init__(self) -> None:
        self.config_hash = plan_hash(self.plan)
        self.what = "sample store" if self.plan["format"].endswith("sample_store") else "store"

    def run(self, work: ShardWork, publish: Callable[[Path], None] | None = None) -> dict:
        """Write (or finish, or find complete) the store; `publish(root)` writes what the store holds beside its
        shards (the main process, after plan.json: the sample store's tokenizer). Returns the command's result."""
        accelerator, root = self.accelerator, self.root
        complete = check_store_dir(root, self.config_hash, self.key, self.plan["format"])
        accelerator.wait_for_everyone()  # every rank has looked before anything is written
        if complete:
            accelerator.print(f"{self.what} {root} is already complete (config hash {self.config_hash[:12]})")
            return {"store": str(root), "complete": True, "shards_written": 0}
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            # The plan first: a run killed before anything else is written finds a store to resume, not foreign files.
            publish_json(root / PLAN, {"config_hash": self.config_hash, **self.plan})
            if publish is not None:
                publish(root)
        accelerator.wait_for_everyone()
        todo = self.todo()
        my_calls = sum(work.calls(name, items) for name, items in todo)
        # A sharded (ZeRO-3) teacher needs every rank in every forward: ranks with less (or no) work left run filler
        # calls until all have made the same number.
        all_calls = int(accelerator.gather(torch.tensor([my_calls], device=accelerator.device)).max())
        if all_calls:  # (a part, or a rerun, with nothing left to compute does not load the teacher)
            work.load()
        tokens = 0
        writer = ThreadPoolExecutor(max_workers=1)  # a shard's Parquet encoding and write overlap the next one's work
        in_flight: Future | None = None
        for name, items in todo:
            table, counts = work.shard(name, items)
            tokens += counts[work.counted]
            if in_flight is not None:
                in_flight.result()
            in_flight = writer.submit(write_shard, root, name, table, self.config_hash, counts)
        for _ in range(all_calls - my_calls):
            work.filler()
        if in_flight is not None:
            in_flight.result()
        writer.shutdown()
        return self.finish(tokens, len(todo))

    @property
    def mine(self) -> list[tuple[str, list]]:
        """This part's shards (all of them without parts)."""
        return part_of(self.layout, self.part)

    def todo(self) -> list[tuple[str, list]]:
        """This rank's shards of this part (dealt round-robin) that no earlier run finished."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        return [
            (name, items)
            for name, items in self.mine[rank::world]
            if finished_shard(self.root, name, self.config_hash, len(items)) is None
        ]

    def finish(self, tokens: int, written: int) -> dict:
        """After every rank wrote its shards: the manifest, once every shard of the plan is there, and the summary
        line and result of the run (`tokens` and `written` shards of this rank, summed over the ranks)."""
        accelerator, root, part = self.accelerator, self.root, self.part
        seconds = time.perf_counter() - self.started
        accelerator.wait_for_everyone()
        # Without parts every shard is this run's and done now. With parts, the other parts' shards count once their
        # sidecars are there (each was checksummed when written; verify-store checks them all again).
        left = 0
        if part is not None:
            left = sum(not sidecar_done(root, name, self.config_hash, len(idx)) for name, idx in self.layout)
        if accelerator.is_main_process and not left:
            write_manifest(root, self.plan, self.config_hash, self.layout)
        accelerator.wait_for_everyone()
        local = torch.tensor([tokens, written], device=accelerator.device)
        tokens_all, written = (int(x) for x in accelerator.reduce(local, reduction="sum").tolist())
        mine = self.mine
        where = "" if part is None else f" (part {part[0]}/{part[1]}: {len(mine)} shards)"
        done = (
            f"{self.what} complete" if not left else f"{left} shard(s) of other parts still to do, manifest not written"
        )
        accelerator.print(
            f"{self.what} {root}: wrote {written} of {len(self.layout)} shards{where} ({tokens_all:,} tokens) in "
            f"{seconds:.1f} s; " + done
        )
        result = {"store": str(root), "complete": not left, "shards_written": written, "shards": len(self.layout)}
        if part is not None:
            result.update(part=f"{part[0]}/{part[1]}", part_shards=len(mine))
        return result


def sidecar_done(root: Path, name: str, config_hash: str, rows: int) -> bool:
    try:
        sidecar = json.loads((root / name).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return False
    return sidecar.get("config_hash") == config_hash and sidecar.get("rows") == rows


def write_manifest(root: Path, plan: dict, config_hash: str, layout: list[tuple[str, list[int]]]) -> dict:
    """Assemble the manifest from the shards' sidecars (written by whichever rank made each shard)."""
    splits = {split: {"rows": 0, "tokens": 0, "target_tokens": 0, "shards": []} for split in SPLITS}
    fingerprint = hashlib.sha256()
    for name, idx in layout:
        side = (root / name).with_suffix(".json")
        try:
            sidecar = json.loads(side.read_text())
        except (OSError, ValueError):
            raise DistillError(f"store {root}: shard {name} was not written (did a rank fail?); rerun") from None
        if sidecar["config_hash"] != config_hash or sidecar["rows"] != len(idx):
            raise DistillError(f"store {root}: shard {name} belongs to another precompute; rerun to redo it")
        entry = {key: sidecar[key] for key in ("path", "rows", "tokens", "target_tokens", "bytes", "sha256")}
        entry["rows_sha256"] = sidecar["rows_sha256"]
        split = splits[name.split("/")[0]]
        split["shards"].append(entry)
        for key in ("rows", "tokens", "target_tokens"):
            split[key] += sidecar[key]
        fingerprint.update(sidecar["rows_sha256"].encode())
    manifest = {
        **plan,
        "config_hash": config_hash,
        # Content fingerprint of the stored sequences: sha256 over each shard's hash of its rows' hashes.
        "dataset_fingerprint": fingerprint.hexdigest(),
        "rows": sum(s["rows"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "bytes": sum(e["bytes"] for s in splits.values() for e in s["shards"]),
        "splits": splits,
    }
    # Every shard byte over every stored token (ids, labels and targets together): the figure docs/store.md compares.
    manifest["bytes_per_token"] = round(manifest["bytes"] / max(manifest["tokens"], 1), 2)
    publish_json(root / MANIFEST, manifest)
    return manifest
