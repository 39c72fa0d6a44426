"""Offline logit store figures: size, reader speed, precompute overhead, offline KD step time. CPU, 1 thread.

Run (about 3 minutes on one core):
    .venv/bin/python benchmarks/store.py
Smaller and faster:
    .venv/bin/python benchmarks/store.py --tokens 2048 --seq-len 256 --repeats 2
On a GPU node the precompute and step figures use the GPU:  python benchmarks/store.py --device cuda

Prints one JSON object, then a table. What is measured:
- bytes/token: real shards (`store.logits.encode_logit_rows` + `store.format.write_shard`, the precompute writer) of
  every store of `--stores` (top-64 and sampled targets, plain and packed; STORES below) for V=32k and V=128k,
  file bytes / tokens, everything included (ids, labels, hashes, Parquet metadata).
  There are no pretrained teachers on this machine, so the teacher's distribution is synthetic: logits with a
  Zipf-like prior over the ids (frequent tokens have small BPE ids) plus noise, from `teacher.topk_targets`
  as precompute calls it. "flat" is the worst case: near-uniform logits, so the top-k ids are random.
- reader: per store, tokens/s of `store.logits.TrainStream.micro_batches` (datasets streaming, split, hash check,
  decode to tensors) on one core (torch and Arrow limited to one thread); and how fast a resumed run fast-forwards its
  stream to the checkpoint's position (`skip=`: rows read and shuffled, not decoded).
- precompute vs teacher forward: the precompute loop (`OnlineTeacher.targets` with top-k + `encode_logit_rows` +
  the background shard writer) against `model(input_ids).logits` alone, on the same batches, same teacher.
- offline KD step vs CE step: `objective.forward_losses` + backward + AdamW step of the same student: the
  offline step includes reading its batch from the store (each of `--step-stores`); the CE step gets ready tensors.
- shard check: the sha256 an offline run computes over every shard it reads (`store.format.read_shard`), per token
  (best of repeats over one shard's bytes, in memory), times the tokens of that offline KD step, as a share of
  the step's time (target < 2 %).
Each timing is the minimum over repeats, alternating the two sides.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from distributed_distill.config import DistillConfig  # noqa: E402
from distributed_distill.models import AlignedHead  # noqa: E402
from distributed_distill.objective import forward_losses  # noqa: E402
from distributed_distill.store.format import shard_name, write_shard  # noqa: E402
from distributed_distill.store.logits import (  # noqa: E402
    LOGIT_FORMAT,
    LOGIT_VERSION,
    TrainStream,
    encode_logit_rows,
    logit_counts,
)
from distributed_distill.store.offline import OfflineTeacher  # noqa: E402
from distributed_distill.store.writer import write_manifest  # noqa: E402
from distributed_distill.teacher import OnlineTeacher, sampled_targets, topk_targets  # noqa: E402

# The stores measured: name -> (target kind, k or draws N, encoding). `--stores` picks among them.
STORES = {
    "top64-plain": ("top_k", 64, "plain"),
    "top64-packed": ("top_k", 64, "packed"),
    "sampled16-plain": ("sampled", 16, "plain"),
    "sampled16-packed": ("sampled", 16, "packed"),
    "sampled32-packed": ("sampled", 32, "packed"),
}


def synthetic_targets(n: int, vocab: int, store: str, flat: bool, seed: int = 0, seq_len: int | None = None):
    """Targets of n positions of a synthetic teacher, as precompute makes them for `store` (a STORES name)."""
    kind, size, _ = STORES[store]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 64, generator=g)
    weight = torch.randn(vocab, 64, generator=g) * (0.01 if flat else 0.25)
    bias = None if flat else -1.2 * torch.log(torch.arange(vocab, dtype=torch.float32) + 1)
    if kind == "sampled":
        per_row = seq_len - 1 if seq_len else n
        seeds = [seed * 1000 + i for i in range(n // per_row)]
        return sampled_targets(hidden, weight, bias, size, 1.0, seeds, chunk_size=256)
    return topk_targets(hidden, weight, bias, size, 1.0, chunk_size=256, store_dtype=torch.float16)


def write_logit_shard(root: Path, name: str, table: pa.Table) -> dict:
    """A shard and its sidecar, as the precompute writer writes them (its counts computed with the rows)."""
    return write_shard(root, name, table, "bench", logit_counts(table))


def write_store(root: Path, vocab: int, store: str, seq_len: int, rows: int, flat: bool, shard_rows: int = 16) -> dict:
    """A complete store (manifest included) of synthetic targets in `store`'s kind and encoding; returns the
    manifest."""
    kind, size, encoding = STORES[store]
    draws = size if kind == "sampled" else None
    g = torch.Generator().manual_seed(1)
    layout = []

    def shard(name: str, idx: list[int], number: int) -> None:
        ids = torch.randint(0, vocab, (len(idx), seq_len), generator=g)
        targets = synthetic_targets(len(idx) * (seq_len - 1), vocab, store, flat, seed=number, seq_len=seq_len)
        table = encode_logit_rows(idx, ids, ids.clone(), targets, vocab, encoding=encoding, draws=draws)
        write_logit_shard(root, name, table)
        layout.append((name, idx))

    for number, start in enumerate(range(0, rows, shard_rows)):
        shard(shard_name("train", number), list(range(start, min(start + shard_rows, rows))), number)
    shard(shard_name("validation", 0), [0], 0)
    plan = {"format": LOGIT_FORMAT, "version": LOGIT_VERSION, "vocab_size": vocab, "seq_len": seq_len, "teacher": {}}
    plan.update(targets=kind, encoding=encoding, top_k=None if draws else size, samples=draws)
    return write_manifest(root, plan, "bench", layout)


def bytes_per_token(tmp: Path, vocab: int, store: str, seq_len: int, tokens: int, flat: bool) -> float:
    root = tmp / f"size-{vocab}-{store}-{flat}"
    manifest = write_store(root, vocab, store, seq_len, max(1, tokens // seq_len), flat)
    train = manifest["splits"]["train"]
    shutil.rmtree(root)
    return sum(s["bytes"] for s in train["shards"]) / train["tokens"]


def reader_tokens_per_second(
    tmp: Path, vocab: int, store: str, seq_len: int, tokens: int, repeats: int
) -> tuple[float, float]:
    """Decode throughput, and the fast-forward throughput of a resume (the same rows read, not decoded)."""
    root = tmp / f"reader-{store}"
    manifest = write_store(root, vocab, store, seq_len, max(8, tokens // seq_len), flat=False)
    rows, mb = manifest["splits"]["train"]["rows"], 4
    batches = 2 * rows // mb  # two epochs
    best = skip_best = 0.0
    for _ in range(repeats):
        stream = TrainStream(root, manifest, seed=0, shuffle_buffer=64).micro_batches(mb, 1, 0)
        next(stream)  # opening the dataset is a one-off cost, not decode throughput
        started, n = time.perf_counter(), 0
        for _ in range(batches):
            n += next(stream)["input_ids"].numel()
        best = max(best, n / (time.perf_counter() - started))
        started = time.perf_counter()
        skipping = TrainStream(root, manifest, seed=0, shuffle_buffer=64).micro_batches(mb, 1, 0, skip=batches)
        next(skipping)  # the first batch after the skipped ones (includes opening the dataset)
        skip_best = max(skip_best, batches * mb * seq_len / (time.perf_counter() - started))
    shutil.rmtree(root)
    return best, skip_best


def teacher_model(vocab: int, hidden: int, layers: int, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(device).eval().requires_grad_(False)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def precompute_ratio(tmp: Path, args, device: str) -> tuple[float, float, float]:
    """(precompute tokens/s, bare forward tokens/s, ratio) on the same batches."""
    model = teacher_model(args.vocab_small, args.teacher_hidden, args.teacher_layers, device)
    teacher = OnlineTeacher(model, {}, top_k=64, temperature=1.0, chunk_size=1024)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, args.vocab_small, (4, args.seq_len), generator=g).to(device) for _ in range(4)]
    tokens = sum(b.numel() for b in batches)
    root = tmp / "precompute"

    def bare() -> float:
        _sync(device)
        started = time.perf_counter()
        for ids in batches:
            _ = model(input_ids=ids, use_cache=False).logits
        _sync(device)
        return time.perf_counter() - started

    def precompute() -> float:
        writer, in_flight = ThreadPoolExecutor(max_workers=1), None
        _sync(device)
        started = time.perf_counter()
        for number, ids in enumerate(batches):
            targets = teacher.targets({"input_ids": ids})
            table = pa.concat_tables([encode_logit_rows(list(range(4)), ids, ids, targets, args.vocab_small)])
            counts = logit_counts(table)  # (with the rows, as precompute's TargetsWork.shard counts them)
            if in_flight is not None:
                in_flight.result()
            name = shard_name("train", number)
            in_flight = writer.submit(write_shard, root, name, table, "bench", counts)
        in_flight.result()
        writer.shutdown()
        return time.perf_counter() - started

    bare()  # warm-up
    precompute()
    t_bare = t_pre = float("inf")
    for _ in range(args.repeats):
        t_bare, t_pre = min(t_bare, bare()), min(t_pre, precompute())
    shutil.rmtree(root)
    return tokens / t_pre, tokens / t_bare, t_bare / t_pre


STEP_MICRO_BATCH = 2


def step_ratio(tmp: Path, args, device: str, store: str) -> tuple[float, float, float]:
    """(offline KD step s, CE step s, ratio) for the same student and batches, the KD step reading `store`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = args.vocab_small
    root = tmp / f"steps-{store}"
    manifest = write_store(root, vocab, store, args.seq_len, 32, flat=False, shard_rows=8)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=vocab,
        hidden_size=args.student_hidden,
        num_hidden_layers=args.student_layers,
        num_attention_heads=max(1, args.student_hidden // 64),
        intermediate_size=4 * args.student_hidden,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(config).to(device)
    head = AlignedHead(student.get_output_embeddings(), vocab)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    kd_cfg = DistillConfig(alpha=0.5, chunk_size=1024)
    ce_cfg = DistillConfig(alpha=0.0, chunk_size=1024)
    stream = TrainStream(root, manifest, seed=0, shuffle_buffer=0).micro_batches(STEP_MICRO_BATCH, 1, 0)
    ce_batch = {key: v.to(device) for key, v in next(stream).items() if key in ("input_ids", "labels")}
    offline = OfflineTeacher.__new__(OfflineTeacher)  # training batches carry their targets: nothing else needed

    def step(batch, teacher, dcfg) -> None:
        out = forward_losses(student, teacher, batch, dcfg, head)
        (dcfg.alpha * out.kd_sum + (1 - dcfg.alpha) * out.ce_sum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn, n: int = 4) -> float:
        _sync(device)
        started = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        return (time.perf_counter() - started) / n

    def kd_step() -> None:
        batch = next(stream)
        batch.pop("index")
        step({key: v.to(device) for key, v in batch.items()}, offline, kd_cfg)

    def ce_step() -> None:
        step(ce_batch, None, ce_cfg)

    kd_step(), ce_step()  # warm-up
    t_kd = t_ce = float("inf")
    for _ in range(args.repeats):
        t_kd, t_ce = min(t_kd, timed(kd_step)), min(t_ce, timed(ce_step))
    shutil.rmtree(root)
    return t_kd, t_ce, t_kd / t_ce


def shard_check_share(tmp: Path, vocab: int, seq_len: int, step_s: float, step_tokens: int, repeats: int):
    """(seconds of sha256 per token, share of an offline step) for shards of the top-64 plain store."""
    root = tmp / "sha"
    manifest = write_store(root, vocab, "top64-plain", seq_len, 16, flat=False, shard_rows=16)
    shard = manifest["splits"]["train"]["shards"][0]
    data = (root / shard["path"]).read_bytes()
    best = float("inf")
    for _ in range(5 * repeats):
        started = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        best = min(best, time.perf_counter() - started)
    shutil.rmtree(root)
    per_token = best / shard["tokens"]
    return per_token, per_token * step_tokens / step_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per size / reader measurement")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab-small", type=int, default=32_000)
    p.add_argument("--vocab-large", type=int, default=128_256)
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--teacher-layers", type=int, default=8)
    # The sparse KD term adds a few elementwise passes over [tokens, V] to the CE step's; a student whose
    # lm_head matmul dwarfs them (hidden >= 1024, any real student) shows the real ratio. At hidden 256 it
    # is ~1.2-1.3x on CPU.
    p.add_argument("--student-hidden", type=int, default=1024)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--stores", nargs="+", choices=list(STORES), default=list(STORES), help="sizes and reader")
    p.add_argument(
        "--step-stores", nargs="+", choices=list(STORES), default=["top64-plain", "sampled16-packed"],
        help="offline KD step vs CE step, reading each of these",
    )  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    tmp = Path(tempfile.mkdtemp(prefix="store-bench-"))
    r = {"seq_len": args.seq_len, "device": args.device, "stores": {}}
    try:
        for store in args.stores:
            entry = r["stores"][store] = {}
            for name, vocab in (("32k", args.vocab_small), ("128k", args.vocab_large)):
                entry[f"bytes_per_token_V{name}"] = bytes_per_token(tmp, vocab, store, args.seq_len, args.tokens, False)
                entry[f"bytes_per_token_V{name}_flat"] = bytes_per_token(
                    tmp, vocab, store, args.seq_len, args.tokens, True
                )
            entry["reader_tokens_per_s_per_core"], entry["resume_fast_forward_tokens_per_s"] = reader_tokens_per_second(
                tmp, args.vocab_small, store, args.seq_len, args.tokens, args.repeats
            )
        pre, bare, ratio = precompute_ratio(tmp, args, args.device)
        r.update(precompute_tokens_per_s=pre, teacher_forward_tokens_per_s=bare, precompute_vs_forward=ratio)
        for store in args.step_stores:
            t_kd, t_ce, ratio = step_ratio(tmp, args, args.device, store)
            r["stores"].setdefault(store, {}).update(
                offline_kd_step_s=t_kd, ce_step_s=t_ce, offline_kd_vs_ce_step=ratio
            )
        first = r["stores"][args.step_stores[0]]
        per_token, share = shard_check_share(
            tmp, args.vocab_small, args.seq_len, first["offline_kd_step_s"], STEP_MICRO_BATCH * args.seq_len,
            args.repeats,
        )  # fmt: skip
        r.update(shard_sha256_s_per_token=per_token, shard_sha256_share_of_step=share)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(r, indent=2))
    size = "{:.1f} / {:.1f}".format
    print("\n| store | bytes/token V=32k (zipf / flat) | V=128k (zipf / flat) | reader tokens/s per core "
          "(>= 100k) | offline KD step / CE step (<= 1.10x) |\n|---|---:|---:|---:|---:|")  # fmt: skip
    for store, e in r["stores"].items():
        sizes = [size(e[f"bytes_per_token_V{v}"], e[f"bytes_per_token_V{v}_flat"]) if f"bytes_per_token_V{v}" in e
                 else "-" for v in ("32k", "128k")]  # fmt: skip
        reader = f"{e['reader_tokens_per_s_per_core']:,.0f}" if "reader_tokens_per_s_per_core" in e else "-"
        step = f"{e['offline_kd_vs_ce_step']:.2f}x" if "offline_kd_vs_ce_step" in e else "-"
        print(f"| {store} | {sizes[0]} | {sizes[1]} | {reader} | {step} |")
    rows = [
        ("precompute vs bare teacher forward", ">= 0.85x", f"{r['precompute_vs_forward']:.2f}x"),
        ("shard sha256 check, ns per token", "", f"{1e9 * r['shard_sha256_s_per_token']:.0f}"),
        ("shard sha256 check, share of an offline KD step", "< 2 %", f"{100 * r['shard_sha256_share_of_step']:.2g} %"),
    ]
    print("\n| figure | target | measured |\n|---|---|---:|")
    for name, target, value in rows:
        print(f"| {name} | {target} | {value} |")


if __name__ == "__main__":
    main()
