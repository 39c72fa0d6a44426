"""Speed of `distill generate`'s sampling against a plain `model.generate` loop, and the cost of keeping the top-k.

Run (default size, ~2 minutes on 2 cores):
    .venv/bin/python benchmarks/generate.py
Small smoke run:
    .venv/bin/python benchmarks/generate.py --prompts 16 --max-new-tokens 16 --repeats 1
On a GPU (bf16 teacher):
    .venv/bin/python benchmarks/generate.py --device cuda --dtype bfloat16 --teacher-hidden 1024 --teacher-layers 12

Three timings (wall and CPU time, `online_overhead.alternate`) over the same prompts (stdlib source beginnings of
8 to 64 tokens, in batches of --batch), the same teacher and the same sampling settings (temperature 1, no top-k /
top-p filter, exactly --max-new-tokens tokens per sample: no EOS), alternating, --repeats rounds after a warm-up
round, medians reported:
  hf:      `model.generate(do_sample=True)` over each batch (left padding, its own KV cache)
  ours:    what `distill generate` runs per batch (`generate.TeacherSampling.sample`: one generator per sample, the
           KV-cached loop of generation.generate, the row dicts with decoded text), without top-k
  topk:    the same with generate.top_k=--top-k kept at every sampled token (at T=2, from the sampler's logits)
Figures: tokens/s of each, ours / hf (target >= 0.9) and topk / ours time (target <= 1.10), each also in CPU time
(what a part needs moves less than its wall time when other jobs share the machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from online_overhead import alternate  # (benchmarks/ is on the path when a script here runs)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package


def build(args: argparse.Namespace):
    import dataclasses

    import torch

    from distributed_distill import models
    from distributed_distill.config import load_config
    from distributed_distill.data.documents import stdlib_files
    from distributed_distill.generate import TeacherSampling
    from distributed_distill.generation import sampling_setup
    from distributed_distill.setup import RunPlan
    from distributed_distill.teacher import OnlineTeacher
    from distributed_distill.tokenizer import train_bpe_tokenizer

    files = stdlib_files()[:: max(1, len(stdlib_files()) // 200)]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    tokenizer = train_bpe_tokenizer(iter(texts), args.vocab, Path(tempfile.mkdtemp()) / "tok")
    arch = "{{family: llama, hidden_size: {h}, num_layers: {n}, num_heads: {a}, max_position_embeddings: {p}}}"
    cfg = load_config(
        None,
        [
            f"teacher.arch={arch.format(h=args.teacher_hidden, n=args.teacher_layers, a=8, p=512)}",
            "student.arch={family: llama, hidden_size: 32, num_layers: 1, num_heads: 2}",
            f"teacher.dtype={args.dtype}",
            f"generate.sampling.max_new_tokens={args.max_new_tokens}",
            "distill.temperature=2.0",
        ],
    )
    config = models.arch_config(cfg.teacher.arch, len(tokenizer))
    model = models.load_model(cfg.teacher, config, seed=1).to(args.device).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = []
    for text in texts[: args.prompts]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append([tokenizer.bos_token_id] + ids[: int(torch.randint(8, 65, (), generator=gen))])
    # No end token (eos_ids=()): every sample runs to max_new_tokens, as model.generate(min_new_tokens=...) below does.
    sampling = sampling_setup(cfg.generate.sampling, tokenizer, False, "generate.sampling")
    sampling = dataclasses.replace(sampling, eos_ids=())
    # The run plan's parts the sampling work reads: the config and the tokenizer (no accelerator, no data: the
    # teacher is set here instead of loaded).
    plan = RunPlan(
        given=cfg,
        cfg=cfg,
        recorded=cfg,
        accelerator=None,
        tokenizer=tokenizer,
        student_config=None,
        teacher_config=config,
        documents=lambda: None,
    )
    samplers = {}
    for name, k in (("ours", None), ("topk", args.top_k)):
        # The fields of generate.sample_store_plan that the sampling reads: the top-k or none, no sampled targets.
        content = {"top_k": k, "samples": None, "temperature": 2.0, "vocab_size": len(tokenizer)}
        samplers[name] = TeacherSampling(plan, content, sampling, {"train": prompts})
        samplers[name].teacher = OnlineTeacher(model, identity={})
    return model, tokenizer, prompts, samplers


def run_hf(model, tokenizer, prompts, args) -> int:
    import torch

    from distributed_distill.generation import left_pad

    tokens = 0
    for start in range(0, len(prompts), args.batch):
        ids, mask = left_pad(prompts[start : start + args.batch], tokenizer.pad_token_id, torch.device(args.device))
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=None,
            )
        tokens += out[:, ids.shape[1] :].numel()
    return tokens


def run_ours(sampler, prompts, args) -> int:
    tokens = 0
    for start in range(0, len(prompts), args.batch):
        batch = [(p, 0) for p in range(start, min(start + args.batch, len(prompts)))]
        rows = sampler.sample("train", batch, prompts)
        tokens += sum(len(r["completion_ids"]) for r in rows)
    return tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()

    import torch

    torch.manual_seed(0)
    model, tokenizer, prompts, samplers = build(args)
    runs = {
        "hf": lambda: run_hf(model, tokenizer, prompts, args),
        "ours": lambda: run_ours(samplers["ours"], prompts, args),
        "topk": lambda: run_ours(samplers["topk"], prompts, args),
    }
    tokens: dict[str, int] = {}

    def timed(name: str):
        def part() -> None:
            tokens[name] = runs[name]()
            if args.device == "cuda":
                torch.cuda.synchronize()

        return part

    times, cpu = alternate({name: timed(name) for name in runs}, args.repeats)
    assert len(set(tokens.values())) == 1, tokens  # every sample has exactly max_new_tokens tokens
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    rows = [
        {
            "figure": f"{name}_tokens_per_second",
            "value": tokens[name] / med[name],
            "tokens": tokens[name],
            "spread_s": max(t) - min(t),
        }
        for name, t in times.items()
    ]
    rows.append({"figure": "ours_vs_hf_tokens_per_second", "value": med["hf"] / med["ours"], "target": ">= 0.9"})
    rows.append({"figure": "ours_vs_hf_cpu_time", "value": med_cpu["hf"] / med_cpu["ours"]})
    rows.append({"figure": "topk_vs_ours_time", "value": med["topk"] / med["ours"], "target": "<= 1.10"})
    rows.append({"figure": "topk_vs_ours_cpu_time", "value": med_cpu["topk"] / med_cpu["ours"]})
    setup = {k: v for k, v in vars(args).items()}
    for row in rows:
        print(json.dumps({**row, **setup}))
    print("\n| figure | value | target |\n|---|---|---|")
    for row in rows:
        print(f"| {row['figure']} | {row['value']:.3f} | {row.get('target', '')} |")


if __name__ == "__main__":
    main()
