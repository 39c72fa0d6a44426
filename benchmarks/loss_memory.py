"""Peak memory and time of the chunked KD loss against the naive one, forward + backward, on CPU.

Run (full size: ~18 GiB resident for the naive path, ~15 minutes on 2 cores for 2 repeats):
    .venv/bin/python benchmarks/loss_memory.py
With the peers' chunked losses (Liger-Kernel, torchtune; installed by `pip install .[peers]`, docs/peers.md):
    .venv-peers/bin/python benchmarks/loss_memory.py --paths naive,chunked,liger,torchtune
The floor (the four matmuls alone, at the chunk size: no loss can beat it with float32 arithmetic) beside them:
    .venv-peers/bin/python benchmarks/loss_memory.py --paths chunked,liger,matmuls
On a GPU (peak: torch.cuda.max_memory_allocated above the inputs; benchmarks/gpu_check.sh runs it):
    .venv-peers/bin/python benchmarks/loss_memory.py --device cuda --paths chunked,liger,matmuls
Small smoke run:
    .venv/bin/python benchmarks/loss_memory.py --tokens 256 --hidden 128 --vocab 8000 --chunk-size 64
The chunk size defaults to the project's `distill.chunk_size: auto` (losses.auto_chunk_size).

Both paths compute the same objective from the same inputs: student hidden states [T, H] (requires
grad) and lm_head weight [V, H] (a Parameter), an online teacher given as hidden states [T, H] and
its lm_head weight [V, H], all float32; the objective is kd_sum + ce_sum, backpropagated.
  naive:   logits = hidden @ weight.T, teacher_logits likewise, kd_loss(reduction="sum") + CE
  chunked: chunked_distill_loss(hidden, weight, labels, teacher_hidden=..., teacher_weight=...)

What is measured, per path, in a fresh subprocess (so nothing is shared or cached between paths):
- peak: the kernel's resident-set high-water mark (VmHWM in /proc/self/status), reset through
  /proc/self/clear_refs once the inputs exist, minus the resident set at that moment. So it counts
  every byte the loss computation touches above the inputs and weights both paths share: logits,
  intermediates and the gradients it produces (hidden.grad [T, H] and weight.grad [V, H], which
  both paths must hold; also reported separately as `grad_bytes`). PyTorch's CPU allocator does
  not cache, and buffers this large are mmap'd by glibc, so freed tensors leave the resident set;
  the kernel tracks the peak exactly, with no sampling gaps.
- time: wall time and CPU time (every thread of the process) of one forward + backward. Paths alternate, one fresh
  process per repeat; the median over repeats is reported, with the range beside it.
- gradients: loss values, gradient norms and 4096 sampled gradient entries, compared between paths.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
PATHS = ("naive", "chunked", "liger", "torchtune", "matmuls")
# The peers' losses (pip install .[peers]; docs/peers.md): what each path's returned value means, per token.
PEER_CONVENTIONS = {
    "liger": "LigerFusedLinearJSDLoss(beta=0, compiled=False): w_hard * CE + w_soft * KL, each / valid tokens",
    "torchtune": "ForwardKLWithChunkedOutputLoss(8) + CEWithChunkedOutputLoss(8): -sum p_T log p_S (KL + H(p_T)) "
    "and CE, each / valid tokens, from 8 logits chunks that all stay alive until backward",
}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak() -> None:
    # Writing 5 resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _inputs(t: int, h: int, v: int, seed: int, device: str = "cpu"):
    import torch

    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same values on every device
    hidden = torch.randn(t, h, generator=g).to(device).requires_grad_(True)
    weight = torch.nn.Parameter((torch.randn(v, h, generator=g) * h**-0.5).to(device))
    teacher_hidden = torch.randn(t, h, generator=g).to(device)
    teacher_weight = (torch.randn(v, h, generator=g) * h**-0.5).to(device)
    labels = torch.randint(0, v, (t,), generator=g).to(device)
    return hidden, weight, teacher_hidden, teacher_weight, labels


def _run_path(path, hidden, weight, teacher_hidden, teacher_weight, labels, args):
    """Forward + backward of kd_sum + ce_sum; returns the two (detached) sums."""
    import torch
    import torch.nn.functional as F

    from distributed_distill.losses import chunked_distill_loss, kd_loss

    common = {"kind": args.kind, "temperature": args.temperature}
    if path == "matmuls":
        # The floor: the four float32 matmuls every path must do (student and teacher logits, the gradients of the
        # hidden states and of the weight), at the chunk size, and nothing else. No path can be faster than this
        # with the same arithmetic; its gradients are not the loss's, so it has no agreement figures.
        n, c = hidden.shape[0], args.chunk_size
        z, t = hidden.new_empty(min(c, n), weight.shape[0]), hidden.new_empty(min(c, n), weight.shape[0])
        grad_h, grad_w = torch.empty_like(hidden), torch.zeros_like(weight)
        with torch.no_grad():
            for i in range(0, n, c):
                h = hidden[i : i + c]
                torch.mm(h, weight.T, out=z[: h.shape[0]])
                torch.mm(teacher_hidden[i : i + c], teacher_weight.T, out=t[: h.shape[0]])
                torch.mm(z[: h.shape[0]], weight, out=grad_h[i : i + c])
                grad_w.addmm_(z[: h.shape[0]].T, h)
        hidden.grad, weight.grad = grad_h, grad_w
        return torch.zeros(()), torch.zeros(())
    if path == "naive":
        logits = hidden @ weight.T
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T
        kd = kd_loss(logits, teacher_logits, labels, reduction="sum", **common)
        ce = F.cross_entropy(logits, labels, reduction="sum")
        del logits, teacher_logits  # the autograd graph keeps what backward needs, nothing more
    elif path == "liger":
        # Liger-Kernel's chunked distillation loss, its pure-PyTorch path (compiled=False: torch.compile of it is a
        # GPU-oriented option), at its default chunk size. beta=0 is forward KL. It returns weighted means.
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        n = (labels != -100).sum()
        loss_fn = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.5,
            weight_soft_loss=0.5,
            beta=0.0,
            temperature=args.temperature,
            compiled=False,
            return_soft_hard_loss=True,
        )
        loss, soft, hard = loss_fn(hidden, weight, teacher_hidden, teacher_weight, labels)
        kd, ce = soft * n, hard * n
        (loss * 2 * n).backward()  # the gradient of kd_sum + ce_sum, as for the other paths
        return kd.detach(), ce.detach()
    elif path == "torchtune":
        # torchtune's KD recipe: the model's output layer emits the logits in 8 chunks (TransformerDecoder
        # .chunked_output), all kept for backward, and the chunked-output losses upcast each chunk to float32.
        from torchtune.modules.loss import CEWithChunkedOutputLoss, ForwardKLWithChunkedOutputLoss

        chunks = 8
        n = (labels != -100).sum()
        student_chunks = [h @ weight.T for h in hidden[None].chunk(chunks, dim=1)]
        with torch.no_grad():
            teacher_chunks = [h @ teacher_weight.T for h in teacher_hidden[None].chunk(chunks, dim=1)]
        kd = ForwardKLWithChunkedOutputLoss(chunks)(student_chunks, teacher_chunks, labels[None])
        ce = CEWithChunkedOutputLoss(chunks)(student_chunks, labels[None])
        del student_chunks, teacher_chunks
        ((kd + ce) * n).backward()
        return (kd * n).detach(), (ce * n).detach()
    else:
        out = chunked_distill_loss(
            hidden,
            weight,
            labels,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            chunk_size=args.chunk_size,
            **common,
        )
        kd, ce = out.kd_sum, out.ce_sum
    (kd + ce).backward()
    return kd.detach(), ce.detach()


def worker(args: argparse.Namespace) -> dict:
    """One path, one forward + backward, in this (fresh) process. Prints nothing; returns figures."""
    import torch

    # Warm up on tiny shapes first: loading kernels and thread pools touches memory (code pages,
    # workspaces) that would otherwise count as the first path's peak at small sizes.
    cuda = args.device == "cuda"
    _run_path(args.path, *_inputs(8, 16, 64, seed=0, device=args.device), args)
    inputs = _inputs(args.tokens, args.hidden, args.vocab, seed=0, device=args.device)
    hidden, weight, teacher_hidden, teacher_weight, labels = inputs
    gc.collect()
    if cuda:  # the caching allocator's high-water mark above the inputs, as VmHWM above VmRSS on the CPU
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = _status_bytes("VmRSS")
        _reset_peak()
    start, cpu_start = time.perf_counter(), time.process_time()
    kd, ce = _run_path(args.path, hidden, weight, teacher_hidden, teacher_weight, labels, args)
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = (torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")) - baseline

    t, h, v = args.tokens, args.hidden, args.vocab
    sample = torch.Generator().manual_seed(1)
    w_idx = torch.randint(0, v * h, (4096,), generator=sample)
    h_idx = torch.randint(0, t * h, (4096,), generator=sample)
    return {
        "path": args.path,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # every thread of the process
        "peak_bytes": peak,
        "kd_sum": kd.item(),
        "ce_sum": ce.item(),
        "grad_norm_weight": weight.grad.norm().item(),
        "grad_norm_hidden": hidden.grad.norm().item(),
        "grad_sample_weight": weight.grad.flatten().cpu()[w_idx].tolist(),
        "grad_sample_hidden": hidden.grad.flatten().cpu()[h_idx].tolist(),
    }


def run_path(path: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", path] + [
        f"--{name.replace('_', '-')}={getattr(args, name)}"
        for name in ("tokens", "hidden", "vocab", "chunk_size", "kind", "temperature", "device")
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if done.returncode != 0:
        raise SystemExit(f"{path} worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(naive: dict, chunked: dict) -> dict:
    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(a), abs(b), 1e-30)

    def max_abs(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) for x, y in zip(a, b))

    return {
        "kd_sum_rel_diff": rel(naive["kd_sum"], chunked["kd_sum"]),
        "ce_sum_rel_diff": rel(naive["ce_sum"], chunked["ce_sum"]),
        "grad_norm_weight_rel_diff": rel(naive["grad_norm_weight"], chunked["grad_norm_weight"]),
        "grad_norm_hidden_rel_diff": rel(naive["grad_norm_hidden"], chunked["grad_norm_hidden"]),
        "grad_sample_weight_max_abs_diff": max_abs(naive["grad_sample_weight"], chunked["grad_sample_weight"]),
        "grad_sample_hidden_max_abs_diff": max_abs(naive["grad_sample_hidden"], chunked["grad_sample_hidden"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument(
        "--chunk-size", default="auto", help="rows per chunk, or auto: the project default (losses.auto_chunk_size)"
    )
    parser.add_argument("--kind", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: peak from torch.cuda stats")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per path; medians are reported")
    parser.add_argument("--paths", default="naive,chunked", help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.chunk_size == "auto":
        from distributed_distill.losses import auto_chunk_size

        args.chunk_size = auto_chunk_size(args.vocab, args.hidden, args.device)
    args.chunk_size = int(args.chunk_size)
    if args.worker:
        args.path = args.worker
        print(json.dumps(worker(args)))
        return

    paths = [p for p in args.paths.split(",") if p]
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    for _ in range(args.repeats):
        for path in paths:  # alternate, so slow phases of the machine hit both paths
            runs[path].append(run_path(path, args))
            done = {k: runs[path][-1][k] for k in ("path", "seconds", "peak_bytes", "kd_sum", "ce_sum")}
            print(json.dumps(done), file=sys.stderr, flush=True)  # progress: a long run keeps what finished

    grad_bytes = (args.vocab * args.hidden + args.tokens * args.hidden) * 4
    result = {
        "config": {
            k: getattr(args, k) for k in ("tokens", "hidden", "vocab", "chunk_size", "kind", "temperature", "device")
        },
        "grad_bytes": grad_bytes,
        "torch_threads": _torch_threads(),
    }
    for path, rs in runs.items():
        result[path] = {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "seconds_all": [round(r["seconds"], 3) for r in rs],
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rs),
            "cpu_seconds_all": [round(r["cpu_seconds"], 3) for r in rs],
            "peak_bytes": max(r["peak_bytes"] for r in rs),
            "peak_bytes_without_grads": max(r["peak_bytes"] for r in rs) - grad_bytes,
        }
    if {"naive", "chunked"} <= set(runs):
        n, c = result["naive"], result["chunked"]
        result["ratio"] = {
            "peak": c["peak_bytes"] / n["peak_bytes"],
            "peak_without_grads": c["peak_bytes_without_grads"] / n["peak_bytes_without_grads"],
            "time": c["seconds"] / n["seconds"],
            "cpu_time": c["cpu_seconds"] / n["cpu_seconds"],
        }
        result["agreement"] = compare(runs["naive"][0], runs["chunked"][0])
    reference = "naive" if "naive" in runs else "chunked"
    if {"matmuls", "chunked"} <= set(runs):  # how close the chunked loss comes to its arithmetic's floor
        result["chunked"]["vs_matmuls"] = result["chunked"]["seconds"] / result["matmuls"]["seconds"]
    for path in runs:
        if path in PEER_CONVENTIONS:
            result[path]["convention"] = PEER_CONVENTIONS[path]
            result[path]["version"] = _version(path.replace("liger", "liger-kernel"))
            if "chunked" in runs:
                result[path]["vs_chunked"] = {
                    "peak": result[path]["peak_bytes"] / result["chunked"]["peak_bytes"],
                    "time": result[path]["seconds"] / result["chunked"]["seconds"],
                    "cpu_time": result[path]["cpu_seconds"] / result["chunked"]["cpu_seconds"],
                }
            if "matmuls" in runs:  # the most this project's loss could lead the peer by, at the same arithmetic
                result[path]["vs_matmuls"] = result[path]["seconds"] / result["matmuls"]["seconds"]
            if reference in runs:
                result[path]["agreement_with_" + reference] = compare(runs[reference][0], runs[path][0])

    print(json.dumps(result, indent=2))
    print()
    print(
        "| path | peak above inputs (GiB) | of which grads (GiB) | fwd+bwd wall s: median (range) "
        "| CPU s: median (range) | vs chunked: peak, wall, CPU |"
    )
    print("|---|---|---|---|---|---|")
    for path in runs:
        r = result[path]
        vs = result["chunked"] if "chunked" in runs else r
        print(
            f"| {path} | {r['peak_bytes'] / 2**30:.2f} | {grad_bytes / 2**30:.2f} | {r['seconds']:.2f} "
            f"({_range(r['seconds_all'])}) | {r['cpu_seconds']:.2f} ({_range(r['cpu_seconds_all'])}) | "
            f"{r['peak_bytes'] / vs['peak_bytes']:.2f}x, {r['seconds'] / vs['seconds']:.2f}x, "
            f"{r['cpu_seconds'] / vs['cpu_seconds']:.2f}x |"
        )
    if "ratio" in result:
        ratio = result["ratio"]
        print(
            f"| chunked / naive | {ratio['peak']:.1%} (without grads {ratio['peak_without_grads']:.1%}) | "
            f"| {ratio['time']:.2f}x | {ratio['cpu_time']:.2f}x | |"
        )


def _range(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}"


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
