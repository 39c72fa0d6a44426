"""`distill precompute`: run the teacher once over the data and keep its top-k targets in a logit store.

    distill precompute --config configs/smoke.yaml distill.store=stores/smoke [distill.store_top_k=64]
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m distributed_distill.cli \\
        precompute --config configs/smoke.yaml distill.store=stores/smoke
    torchrun --nproc_per_node 8 -m distributed_distill.cli precompute --config ... # one per node under SLURM
    DISTILL_STORE_PART=1/4 distill precompute --config ...   # the second quarter of the shards (a job array task)

The work is a fixed list of shards (train rows in the seeded permutation order that training uses, then the
validation rows), dealt round-robin to the ranks. Every rank writes its own shards and sidecars; the ranks
only meet in collectives (the teacher's, and two barriers), never on each other's files. A shard is written
atomically and counts as done once its sidecar's checksum matches the file, so a killed run started again
with the same command redoes only unfinished shards, and the store is byte-identical to one made in one go
(whatever the number of processes: each shard is computed from the same batches).

Parts: with DISTILL_STORE_PART=I/N (set by launch/slurm/precompute.sbatch from its job array), a run does only
the I-th of N contiguous ranges of the shard list, so N jobs, on different nodes and at different times, fill one
store. Parts share nothing but the directory; whichever part finds every shard of the plan finished when it ends
(the last to finish, or any rerun) writes the manifest.

The targets come from the same teacher source an online run uses (`teacher.setup_teacher` with
`distill.top_k`), so an offline run with the store and an online run with that top_k see the same values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import torch

from . import data as data_lib
from . import lock, models
from . import store as store_lib
from .config import Config
from .errors import DistillError
from .integrity import write_json_atomic
from .setup import setup_accelerator, setup_run
from .teacher import TeacherSource, setup_teacher

PART_ENV = "DISTILL_STORE_PART"


def store_plan(cfg: Config, tokenizer, teacher_config, n_train: int, n_val: int) -> dict:
    """Everything that determines the store's content; its hash names the store and guards resumes."""
    distill = cfg.distill
    return {
        "format": store_lib.FORMAT,
        "version": store_lib.VERSION,
        "teacher": teacher_identity(cfg, teacher_config),
        "tokenizer_sha256": models.tokenizer_hash(tokenizer),
        # The aligned vocabulary: the tokenizer's tokens, the rows both models are compared over (the teacher's
        # padding rows beyond them never enter the top-k).
        "vocab_size": len(tokenizer),
        "teacher_vocab_rows": teacher_config.vocab_size,
        "top_k": min(distill.top_k or distill.store_top_k, len(tokenizer)),
        "temperature": distill.temperature,
        "seq_len": cfg.data.seq_len,
        "logprob_dtype": "float16",
        "id_dtype": store_lib.id_dtype(len(tokenizer)).name,
        "data": {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "cache_dir"},
        "order_seed": cfg.train.seed,
        "batch_size": cfg.train.micro_batch_size,
        "shard_rows": distill.store_shard_rows,
        "split_rows": {"train": min(n_train, distill.store_max_rows or n_train), "validation": n_val},
    }


def teacher_identity(cfg: Config, teacher_config) -> dict:
    """The teacher a store was made with, as its plan records it."""
    identity = models.model_identity(cfg.teacher, teacher_config)
    if cfg.teacher.arch is not None:
        identity["init_seed"] = cfg.train.seed + 1  # a teacher built from arch is only defined with its seed
    return identity


def check_store_dir(root: Path, config_hash: str, key: str = "distill.store", fmt: str = store_lib.FORMAT) -> bool:
    """True if `root` already holds this finished store; raises if it holds anything else (never overwritten).
    `key` names the setting that chose the directory, `fmt` the store format (the logit store, or generate's)."""
    if root.exists() and not root.is_dir():
        raise DistillError(f"{key}={root} is a file, not a directory")
    if (root / store_lib.MANIFEST).is_file():
        found = store_lib.store_format(root)
        if found != fmt:
            raise DistillError(f"{key}={root} holds a store of another kind ({found!r}); choose another {key}")
        manifest = json.loads((root / store_lib.MANIFEST).read_text())
        if manifest.get("config_hash") == config_hash:
            return True
        raise DistillError(
            f"{key}={root} holds a finished store of another config (hash {manifest.get('config_hash')!s:.12}, "
            f"this one {config_hash:.12}); choose another {key}"
        )
    if (root / store_lib.PLAN).is_file():
        old = json.loads((root / store_lib.PLAN).read_text()).get("config_hash")
        if old != config_hash:
            raise DistillError(
                f"{key}={root} holds an unfinished store of another config (hash {old!s:.12}, "
                f"this one {config_hash:.12}); rerun that command to finish it, or choose another {key}"
            )
    elif root.is_dir() and any(not p.name.startswith((f"{store_lib.PLAN}.", lock.NAME)) for p in root.iterdir()):
        # (a plan being published by a concurrent part, see publish_json, and the locks are not foreign content)
        raise DistillError(f"{key}={root} is a non-empty directory that is not a store; choose another")
    return False


def shard_layout(
    n_train: int, n_val: int, seed: int, shard_rows: int, max_rows: int | None = None
) -> list[tuple[str, list[int]]]:
    """(shard name, row indices) of every shard. Training rows go in the order training reads them with this
    seed (`data.train_indices`, epoch 0), so an offline run without a shuffle buffer sees the online batches;
    `max_rows` keeps the first rows of that order."""
    train_order = data_lib.train_indices(n_train, n_train, 1, 0, seed, 0)[:max_rows]
    orders = {"train": train_order, "validation": list(range(n_val))}
    layout = []
    for split in store_lib.SPLITS:
        order = orders[split]
        for number, start in enumerate(range(0, len(order), shard_rows)):
            layout.append((store_lib.shard_name(split, number), order[start : start + shard_rows]))
    return layout


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


def precompute(cfg: Config, part: tuple[int, int] | None = None) -> dict:
    """Write (or finish) the store; `part` (default: DISTILL_STORE_PART) restricts this run to part I of N."""
    return write_locked(cfg, part, cfg.distill.store, "distill.store", "precompute", _precompute)


def write_locked(cfg: Config, part: tuple[int, int] | None, store: str | None, key: str, command: str, write) -> dict:
    """What every store writer (`distill precompute`, `distill generate`) starts with: the checks that need no
    work, the accelerator, and the store's lock, held while `write(cfg, part, accelerator)` runs."""
    part = part or parse_part(os.environ.get(PART_ENV))
    if cfg.teacher is None:
        raise DistillError(f"distill {command} needs a teacher: set teacher.path or teacher.arch")
    if not store:
        raise DistillError(f"distill {command} needs {key}: the directory to write the store into")
    if cfg.data.streaming:
        raise DistillError(f"distill {command} reads the whole data set: set data.streaming=false")
    accelerator = setup_accelerator(cfg)
    # One job per store (per part, with parts: the parts of one store run side by side), held until it ends.
    name = lock.NAME if part is None else f"{lock.NAME}-part-{part[0]}-of-{part[1]}"
    lock.hold(store, key, accelerator, name)
    try:
        return write(cfg, part, accelerator)
    finally:
        lock.release(store, name)


def _precompute(cfg: Config, part: tuple[int, int] | None, accelerator) -> dict:
    distill = cfg.distill
    started = time.perf_counter()
    accelerator, tokenizer, _, teacher_config = setup_run(cfg, accelerator)
    with accelerator.main_process_first():
        train_ds, val_ds = data_lib.build_datasets(cfg.data, tokenizer)
    plan = store_plan(cfg, tokenizer, teacher_config, len(train_ds), len(val_ds))
    config_hash = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()
    root = Path(distill.store)
    complete = check_store_dir(root, config_hash)
    accelerator.wait_for_everyone()  # every rank has looked before anything is written
    if complete:
        accelerator.print(f"store {root} is already complete (config hash {config_hash[:12]})")
        return {"store": str(root), "complete": True, "shards_written": 0}
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        publish_json(root / store_lib.PLAN, {"config_hash": config_hash, **plan})
    accelerator.wait_for_everyone()

    layout = shard_layout(len(train_ds), len(val_ds), cfg.train.seed, distill.store_shard_rows, distill.store_max_rows)
    mine = part_of(layout, part)
    world, rank = accelerator.num_processes, accelerator.process_index
    todo = [
        (name, idx)
        for name, idx in mine[rank::world]
        if store_lib.finished_shard(root, name, config_hash, len(idx)) is None
    ]
    bs = cfg.train.micro_batch_size
    my_calls = sum(-(-len(idx) // bs) for _, idx in todo)
    # A sharded (ZeRO-3) teacher needs every rank in every forward: ranks with less (or no) work left run
    # filler batches until all have made the same number of calls.
    all_calls = int(accelerator.gather(torch.tensor([my_calls], device=accelerator.device)).max())
    teacher = None
    if all_calls:  # (a part, or a rerun, with nothing left to compute does not load the teacher)
        teacher = setup_teacher(
            dataclasses.replace(cfg, distill=dataclasses.replace(distill, top_k=plan["top_k"])),
            teacher_config,
            accelerator.device,
            len(tokenizer),
        )
    splits = {"train": train_ds, "validation": val_ds}
    tokens = write_shards(
        teacher, todo, splits, bs, all_calls, root, config_hash, plan["vocab_size"], accelerator.device
    )
    return finish_store(accelerator, root, plan, config_hash, layout, part, mine, tokens, len(todo), started)


def finish_store(
    accelerator, root: Path, plan: dict, config_hash: str, layout: list, part, mine: list, tokens: int, written: int,
    started: float,
) -> dict:  # fmt: skip
    """After every rank wrote its shards (a logit store, or generate's sample store): the manifest, once every
    shard of the plan is there, and the summary line and result of the run (`tokens` and `written` shards of this
    rank, summed over the ranks)."""
    seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    # Without parts every shard is this run's and done now. With parts, the other parts' shards count once their
    # sidecars are there (each was checksummed when written; verify-store checks them all again).
    left = 0
    if part is not None:
        left = sum(not sidecar_done(root, name, config_hash, len(idx)) for name, idx in layout)
    if accelerator.is_main_process and not left:
        write_manifest(root, plan, config_hash, layout)
    accelerator.wait_for_everyone()
    local = torch.tensor([tokens, written], device=accelerator.device)
    tokens_all, written = (int(x) for x in accelerator.reduce(local, reduction="sum").tolist())
    where = "" if part is None else f" (part {part[0]}/{part[1]}: {len(mine)} shards)"
    done = "store complete" if not left else f"{left} shard(s) of other parts still to do, manifest not written"
    accelerator.print(
        f"store {root}: wrote {written} of {len(layout)} shards{where} ({tokens_all:,} tokens) in {seconds:.1f} s; "
        + done
    )
    result = {"store": str(root), "complete": not left, "shards_written": written, "shards": len(layout)}
    if part is not None:
        result.update(part=f"{part[0]}/{part[1]}", part_shards=len(mine))
    return result


def write_shards(
    teacher: TeacherSource | None,
    todo: list[tuple[str, list[int]]],
    splits: dict,
    batch_size: int,
    calls_needed: int,
    root: Path,
    config_hash: str,
    vocab: int,
    device: torch.device,
) -> int:
    """Run the teacher over this rank's unfinished shards and write each one (Parquet encoding overlaps the next
    shard's forwards), then make filler calls until this rank has called the teacher `calls_needed` times, as
    every rank does (lockstep). Returns the tokens computed."""
    calls, tokens = 0, 0
    writer = ThreadPoolExecutor(max_workers=1)
    in_flight: Future | None = None
    for name, idx in todo:
        ds = splits[name.split("/")[0]]
        tables = []
        for start in range(0, len(idx), batch_size):
            rows = idx[start : start + batch_size]
            batch = data_lib.collate(ds, rows)
            targets = teacher.targets({k: v.to(device) for k, v in batch.items()})
            tables.append(
                store_lib.encode_rows(
                    rows, batch["input_ids"], batch["labels"], targets, vocab, batch.get("position_ids")
                )
            )
            calls += 1
            tokens += batch["input_ids"].numel()
        if in_flight is not None:
            in_flight.result()
        in_flight = writer.submit(store_lib.write_shard, root, name, pa.concat_tables(tables), config_hash)
    filler = {k: v.to(device) for k, v in data_lib.collate(splits["train"], [0] * batch_size).items()}
    for _ in range(calls_needed - calls):
        teacher.targets(filler)
    if in_flight is not None:
        in_flight.result()
    writer.shutdown()
    return tokens


def sidecar_done(root: Path, name: str, config_hash: str, rows: int) -> bool:
    try:
        sidecar = json.loads((root / name).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return False
    return sidecar.get("config_hash") == config_hash and sidecar.get("rows") == rows


def write_manifest(root: Path, plan: dict, config_hash: str, layout: list[tuple[str, list[int]]]) -> dict:
    """Assemble the manifest from the shards' sidecars (written by whichever rank made each shard)."""
    splits = {split: {"rows": 0, "tokens": 0, "target_tokens": 0, "shards": []} for split in store_lib.SPLITS}
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
    publish_json(root / store_lib.MANIFEST, manifest)
    return manifest
