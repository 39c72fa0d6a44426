"""Per-rank memory of a `replicated` vs a `zero3` teacher at 2 ranks (CPU, gloo), printed as JSON and a table.

Run (a ~120M-parameter Llama teacher, ~480 MB in float32; about a minute on 2 cores):
    .venv/bin/python benchmarks/teacher_memory.py
Small smoke run:
    .venv/bin/python benchmarks/teacher_memory.py --hidden 128 --layers 2 --vocab 4000

The teacher is saved once as a checkpoint (save_pretrained, safetensors) and each engine loads it in its own
`torchrun --nproc_per_node 2` job, through `setup_teacher` as a training run does (zero3: straight into the
partitions under deepspeed.zero.Init). Per rank:
- param_bytes: the bytes of teacher parameters the rank holds after setup (ZeRO-3: its partition plus the
  small vectors kept whole), exact, from the tensors; ratio = param_bytes / the whole teacher's bytes.
  Target: zero3 <= 0.55.
- peak_rss: the kernel's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs right
  before setup) minus the resident set at that moment: everything setup and two forwards touched, including
  checkpoint pages mapped from disk while reading (rank 0 reads every tensor of the file under zero3, a page
  at a time, to scatter it into the partitions; those pages are file cache, not held memory).
- rss_anon: anonymous resident memory after setup and the forwards, minus before: what the rank holds.
Workers run with MALLOC_MMAP_THRESHOLD_=131072 (see below in main) so freed buffers leave the resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENGINES = ("replicated", "zero3")
MIB = 2.0**20


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(args) -> None:
    import torch

    from distributed_distill import models
    from distributed_distill.config import load_config
    from distributed_distill.setup import setup_accelerator
    from distributed_distill.teacher import setup_teacher

    overrides = [f"teacher.path={args.teacher}", "teacher.arch=null", f"teacher.engine={args.engine}"]
    cfg = load_config(ROOT / "configs" / "smoke.yaml", overrides)
    accelerator = setup_accelerator(cfg)
    tconfig = models.model_config(cfg.teacher, 0, "teacher")
    base_rss, base_anon = status_kib("VmRSS"), status_kib("RssAnon")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    teacher = setup_teacher(
        cfg.teacher,
        tconfig,
        accelerator.device,
        seed=cfg.train.seed,
        top_k=cfg.distill.top_k,
        temperature=cfg.distill.temperature,
        chunk_size=cfg.distill.chunk_size,
    )
    ids = torch.randint(0, tconfig.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        targets = teacher.targets({"input_ids": ids})
        del targets
    (local, full), count = teacher.parameter_bytes(), teacher.num_parameters()
    row = {
        "engine": args.engine,
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "num_parameters": count,
        "full_bytes": full,
        "param_bytes": local,
        "ratio": local / full,
        "peak_rss_bytes": (status_kib("VmHWM") - base_rss) * 1024,
        "rss_anon_bytes": (status_kib("RssAnon") - base_anon) * 1024,
    }
    Path(args.out, f"{args.engine}-rank{accelerator.process_index}.json").write_text(json.dumps(row))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--port", type=int, default=29650)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp, "teacher")
        config = AutoConfig.for_model(
            "llama",
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=max(1, args.hidden // 64),
            intermediate_size=4 * args.hidden,
            vocab_size=args.vocab,
            max_position_embeddings=512,
        )
        AutoModelForCausalLM.from_config(config).save_pretrained(teacher)
        # glibc raises its mmap threshold each time a large mmap'd block is freed, after which freed all-gather
        # buffers stay in the heap and in the resident set; a fixed threshold returns them, so RSS shows what
        # tensors hold (both engines measured alike).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
        rows = []
        for i, engine in enumerate(ENGINES):
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(args.port + i), __file__, "--worker", "--engine", engine, "--teacher", str(teacher), "--out", tmp,
            ]  # fmt: skip
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, env=env)
            rows += [json.loads(Path(tmp, f"{engine}-rank{r}.json").read_text()) for r in (0, 1)]
    print(json.dumps(rows, indent=2))
    whole = f"{rows[0]['num_parameters']:,} parameters, {rows[0]['full_bytes'] / MIB:.1f} MiB"
    print(f"\nteacher: {whole}; 2 ranks (gloo)\n")
    print("| engine | rank | teacher params held, MiB | vs whole | peak RSS, MiB | anon RSS held, MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['engine']} | {r['rank']} | {r['param_bytes'] / MIB:.1f} | {r['ratio']:.3f}x | "
            f"{r['peak_rss_bytes'] / MIB:.1f} | {r['rss_anon_bytes'] / MIB:.1f} |"
        )
    worst = max(r["ratio"] for r in rows if r["engine"] == "zero3")
    print(f"\nzero3 parameter bytes per rank: {worst:.3f}x of the whole teacher (target <= 0.55): "
          f"{'met' if worst <= 0.55 else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
