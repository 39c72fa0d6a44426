"""A real multi-process check of the teacher engines, run under torchrun by tests/test_teacher_engines.py and
benchmarks/gpu_check.sh (not collected by pytest):

    torchrun --nproc_per_node 2 tests/teacher_worker.py equivalence OUT_DIR TEACHER_DIR [key=value ...]
    torchrun --nproc_per_node 2 tests/teacher_worker.py stall OUT_DIR TEACHER_DIR teacher.collective_timeout=8
    torchrun --nproc_per_node 2 tests/teacher_worker.py crash OUT_DIR TEACHER_DIR

equivalence: every engine (replicated, zero3, zero3 + CPU offload) over the same checkpoint and over an `arch`
teacher; each rank writes rank-K.json with the max |logit difference| against the replicated teacher on its own
inputs, top-k agreement, and the parameter bytes it holds (plus teacher tokens/s per engine).
stall: rank 1 stops calling the teacher after two micro-batches (the bug lockstep forbids) and sleeps;
rank 0 must fail with the collective-timeout error instead of hanging. crash: rank 1 raises after two calls.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distributed_distill import models  # noqa: E402
from distributed_distill.cli import end_process_group, leave  # noqa: E402
from distributed_distill.config import load_config  # noqa: E402
from distributed_distill.errors import DistillError  # noqa: E402
from distributed_distill.setup import setup_accelerator  # noqa: E402
from distributed_distill.teacher import setup_teacher  # noqa: E402

SMOKE = ROOT / "configs" / "smoke.yaml"
ENGINES = (
    ("replicated", []),
    ("zero3", ["teacher.engine=zero3"]),
    ("zero3_offload", ["teacher.engine=zero3", "teacher.offload=cpu"]),
)


def build(overrides: list[str], device):
    cfg = load_config(SMOKE, overrides)
    tcfg = models.model_config(cfg.teacher, 512, "teacher")  # 512: the smoke tokenizer (ignored for a path)
    teacher = setup_teacher(
        cfg.teacher,
        tcfg,
        device,
        seed=cfg.train.seed,
        top_k=cfg.distill.top_k,
        temperature=cfg.distill.temperature,
        chunk_size=cfg.distill.chunk_size,
    )
    return cfg, teacher, tcfg


def inputs(rank: int, vocab: int, batch: int, seq: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data, as in training
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def tokens_per_second(teacher, ids: torch.Tensor, repeats: int) -> float:
    teacher.targets({"input_ids": ids})  # warm-up (and lockstep: every rank runs the same count)
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        teacher.targets({"input_ids": ids})
    if ids.is_cuda:
        torch.cuda.synchronize()
    return ids.numel() * repeats / (time.perf_counter() - start)


def equivalence(out: Path, teacher_dir: str, extra: list[str]) -> None:
    base = [*extra, f"teacher.path={teacher_dir}", "teacher.arch=null"]
    accelerator = setup_accelerator(load_config(SMOKE, base))
    rank, device = accelerator.process_index, accelerator.device
    batch, seq, repeats = (8, 512, 10) if device.type == "cuda" else (2, 32, 2)
    result: dict = {"rank": rank, "world_size": accelerator.num_processes, "engines": {}}
    for source, src_overrides in (("path", base), ("arch", extra)):
        reference = None
        for name, eng in ENGINES:
            _, teacher, tcfg = build([*src_overrides, *eng], device)
            ids = inputs(rank, tcfg.vocab_size, batch, min(seq, models.max_positions(tcfg)), device)
            dense = teacher.targets({"input_ids": ids}).dense_logits().float()
            topk = build([*src_overrides, *eng, "distill.top_k=8"], device)[1].targets({"input_ids": ids})
            if reference is None:
                reference = (dense, topk)
            row = {
                "max_abs_diff": (dense - reference[0]).abs().max().item(),
                "topk_ids_equal": bool(torch.equal(topk.ids, reference[1].ids)),
                "topk_logprob_diff": (topk.logprobs - reference[1].logprobs).abs().max().item(),
                "local_bytes": teacher.parameter_bytes()[0],
                "full_bytes": teacher.parameter_bytes()[1],
                "num_parameters": teacher.num_parameters(),
                "engine": teacher.engine,
                "tokens_per_second": tokens_per_second(teacher, ids, repeats),
            }
            result["engines"][f"{source}/{name}"] = row
            del teacher
    (out / f"rank-{rank}.json").write_text(json.dumps(result, indent=2))


def misbehave(mode: str, teacher_dir: str, extra: list[str]) -> None:
    overrides = [f"teacher.path={teacher_dir}", "teacher.arch=null", "teacher.engine=zero3", *extra]
    cfg = load_config(SMOKE, overrides)
    accelerator = setup_accelerator(cfg)
    teacher = build(overrides, accelerator.device)[1]
    ids = inputs(accelerator.process_index, 512, 2, 16, accelerator.device)
    for call in range(6):
        if accelerator.process_index == 1 and call == 2:
            if mode == "crash":
                raise RuntimeError("rank 1 deliberately failed before its third teacher call")
            time.sleep(300)  # stops calling the teacher: rank 0 waits in an all-gather until the timeout
        teacher.targets({"input_ids": ids})
    print(f"rank {accelerator.process_index}: all teacher calls done", flush=True)


def main() -> int:
    mode, out, teacher_dir, *extra = sys.argv[1:]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if mode == "equivalence":
            equivalence(out, teacher_dir, extra)
            end_process_group()  # as the CLI does after a finished command
        else:
            misbehave(mode, teacher_dir, extra)
    except DistillError as e:  # as the CLI does: one line, exit status 2
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    leave(main())
