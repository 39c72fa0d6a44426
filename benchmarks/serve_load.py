"""Load test of `distill serve` on loopback: concurrent clients with mixed sequence lengths for a bounded time.

    python benchmarks/serve_load.py                                  # the smoke teacher, 8 clients, 20 s
    python benchmarks/serve_load.py --url http://127.0.0.1:8470      # an already running server (no token)

Starts `distill serve --config CONFIG serve.port=0 ...` itself (unless --url), warms it up (every client sends each
length once), reads /metrics, then each client sends top-k requests of `--rows` sequences of a length drawn from
`--lengths` until `--seconds` pass, and /metrics again. Prints one JSON document, then a table: p50 / p99 latency,
requests, errors, tokens/s (tokens answered per second of wall time), the batch fill of the measured window
(tokens per forward / serve.max_batch_tokens) and the server's peak RSS at the start and the end of the window.
Exits 1 on any error answer, or when the peak RSS grew by more than --max-growth-mib (memory must stay flat).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(url: str, args: argparse.Namespace) -> dict:
    import httpx
    import torch

    from distributed_distill.serving.protocol import Options, decode_response, encode_request

    lengths = [int(x) for x in args.lengths.split(",")]
    vocab = httpx.get(f"{url}/identity", timeout=60).json()["vocab"]
    options = Options(form="topk", top_k=args.top_k, temperature=1.0)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    tokens = [0]
    lock = threading.Lock()

    def client(index: int, deadline: float | None) -> None:
        """Warm-up (deadline None): each length once, not counted; then random lengths until the deadline."""
        rng, gen = random.Random(index), torch.Generator().manual_seed(index)
        with httpx.Client(base_url=url, timeout=120) as c:
            while deadline is None or time.monotonic() < deadline:
                for length in lengths if deadline is None else [rng.choice(lengths)]:
                    batch = {"input_ids": torch.randint(0, vocab, (args.rows, length), generator=gen)}
                    started = time.perf_counter()
                    response = c.post("/targets", content=encode_request(batch, options))
                    seconds = time.perf_counter() - started
                    ok = response.status_code == 200
                    if ok:  # the answer is read back, as a client would
                        assert decode_response(response.content).ids.shape == (args.rows * (length - 1), args.top_k)
                    if deadline is None:
                        continue
                    with lock:
                        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                        if ok:
                            latencies.append(seconds)
                            tokens[0] += args.rows * length
                if deadline is None:
                    return

    def run_clients(deadline: float | None) -> None:
        threads = [threading.Thread(target=client, args=(i, deadline)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    run_clients(None)
    before = httpx.get(f"{url}/metrics", timeout=60).json()
    started = time.monotonic()
    run_clients(started + args.seconds)
    wall = time.monotonic() - started
    after = httpx.get(f"{url}/metrics", timeout=60).json()
    batches = after["batches"] - before["batches"]
    served = after["tokens"] - before["tokens"]
    errors = sum(v for k, v in statuses.items() if k != 200)
    return {
        "clients": args.clients,
        "seconds": round(wall, 3),
        "lengths": lengths,
        "rows": args.rows,
        "top_k": args.top_k,
        "requests": sum(statuses.values()),
        "errors": errors,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "latency_ms": {
            "p50": 1000 * percentile(latencies, 0.5) if latencies else 0.0,
            "p99": 1000 * percentile(latencies, 0.99) if latencies else 0.0,
            "mean": 1000 * statistics.fmean(latencies) if latencies else 0.0,
        },
        "tokens_per_second": tokens[0] / wall,
        "batches": batches,
        "batch_fill": served / (batches * after["max_batch_tokens"]) if batches else 0.0,
        "max_batch_tokens": after["max_batch_tokens"],
        "peak_rss_bytes": {"start": before["peak_rss_bytes"], "end": after["peak_rss_bytes"]},
        "peak_rss_growth_bytes": after["peak_rss_bytes"] - before["peak_rss_bytes"],
        "max_growth_bytes": int(args.max_growth_mib * 2**20),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"), help="the served config (no --url)")
    p.add_argument("--url", help="load this running server instead of starting one")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--lengths", default="16,32,64,128", help="sequence lengths, drawn uniformly per request")
    p.add_argument("--rows", type=int, default=4, help="sequences per request")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--max-growth-mib", type=float, default=64.0, help="fail if the peak RSS grows more than this")
    p.add_argument(
        "--serve",
        nargs="*",
        default=["serve.max_batch_tokens=2048", "serve.batch_wait_ms=5"],
        metavar="serve.key=value",
        help="overrides of the started server",
    )
    args = p.parse_args()
    if args.url:
        result = load(args.url, args)
    else:
        from distributed_distill.serve import running

        with tempfile.TemporaryDirectory() as tmp:
            address = Path(tmp) / "server.url"
            cmd = [sys.executable, "-m", "distributed_distill.cli", "serve", "--config", args.config]
            cmd += ["serve.port=0", f"serve.address_file={address}", *args.serve]
            with running(cmd, address, cwd=ROOT) as (url, _):
                result = load(url, args)
    print(json.dumps(result, indent=2))
    mib = 2**20
    rss = result["peak_rss_bytes"]
    print(f"\n| {args.clients} clients, {result['seconds']:.0f} s, lengths {args.lengths} x {args.rows} rows | |")
    print("|---|---|")
    print(f"| p50 latency | {result['latency_ms']['p50']:.1f} ms |")
    print(f"| p99 latency | {result['latency_ms']['p99']:.1f} ms |")
    print(f"| requests | {result['requests']} |")
    print(f"| errors | {result['errors']} |")
    print(f"| tokens/s | {result['tokens_per_second']:.0f} |")
    print(f"| batch fill | {result['batch_fill']:.3f} ({result['batches']} forwards of {result['max_batch_tokens']}) |")
    print(f"| peak RSS start -> end | {rss['start'] / mib:.1f} -> {rss['end'] / mib:.1f} MiB |")
    if result["errors"]:
        print(f"FAILED: {result['errors']} error answers {result['statuses']}", file=sys.stderr)
        return 1
    if result["peak_rss_growth_bytes"] > result["max_growth_bytes"]:
        print(f"FAILED: peak RSS grew by more than {args.max_growth_mib} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
