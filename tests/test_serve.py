"""`distill serve` for real: a server subprocess on 127.0.0.1 (port 0, read back from serve.address_file) with the
smoke config's tiny teacher, talked to with httpx; what it serves is compared bit for bit with the in-process
teacher of the same config, built the way a student job builds it (setup.plan_run, teacher.setup_teacher)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from distributed_distill.serve import running
from distributed_distill.serving.protocol import Options, decode_head, decode_response, encode_request

from .helpers import ROOT, SMOKE, error_line, run_cli, torchrun

TOKEN = "s3cret-token-for-tests"
SERVE = [sys.executable, "-m", "distributed_distill.cli", "serve", "--config", str(SMOKE)]


@contextlib.contextmanager
def server(tmp_path: Path, *overrides: str, launcher: list[str] | None = None):
    """A `distill serve` of the smoke config on a free loopback port: yields (url, its log file)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    address, log = tmp_path / "server.url", tmp_path / "serve.log"
    settings = ["serve.port=0", f"serve.address_file={address}", f"serve.log={log}", *overrides]
    cmd = (launcher + ["-m", "distributed_distill.cli", "serve", "--config", str(SMOKE)]) if launcher else SERVE
    with running([*cmd, *settings], address, cwd=ROOT, timeout=240) as (url, proc):
        yield url, log
    if launcher is None:  # SIGTERM at teardown: a clean stop (torchrun's own status is 1 after a signal)
        assert proc.returncode == 0 and log.read_text().splitlines()[-1].split(" serve ")[1].startswith("stop: ")


@pytest.fixture(scope="module")
def plan(smoke_tokenizer):
    """The smoke config's run plan, as a student job resolves it (the same tokenizer cache the server reads)."""
    from accelerate import Accelerator

    from distributed_distill.config import load_config
    from distributed_distill.setup import plan_run

    return plan_run(load_config(SMOKE), Accelerator(cpu=True))


def local(plan, **form):
    """The in-process teacher of the plan with a given form (top_k / samples / temperature), as trainer builds it."""
    from distributed_distill.teacher import setup_teacher

    cfg = plan.cfg
    return setup_teacher(
        cfg.teacher,
        plan.teacher_config,
        torch.device("cpu"),
        seed=cfg.train.seed,
        vocab=plan.vocab,
        chunk_size=cfg.distill.chunk_size,
        **form,
    )


def rows(plan, n: int, length: int, seed: int) -> dict:
    return {"input_ids": torch.randint(0, plan.vocab, (n, length), generator=torch.Generator().manual_seed(seed))}


def post(client: httpx.Client, batch: dict, options: Options) -> httpx.Response:
    return client.post("/targets", content=encode_request(batch, options))


def served(client: httpx.Client, batch: dict, options: Options):
    response = post(client, batch, options)
    assert response.status_code == 200, response.text
    return decode_response(response.content)


def assert_equal_targets(found, expected, names) -> None:
    for name in names:
        a, b = getattr(found, name), getattr(expected, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name


TOPK = ("ids", "logprobs", "tail_logmass")
SAMPLED = ("ids", "counts", "entropy")


@pytest.fixture(scope="module")
def token_server(tmp_path_factory, smoke_tokenizer):
    """One server with a token file (on loopback too: every endpoint but /health then needs it)."""
    root = tmp_path_factory.mktemp("serve_token")
    (root / "token").write_text(TOKEN + "\n")
    with server(root, f"serve.token_file={root / 'token'}") as (url, log):
        yield url, log


@pytest.fixture
def client(token_server):
    with httpx.Client(base_url=token_server[0], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


# ----------------------------------------------------------------------------------------------
# Default tier


def test_served_targets_equal_the_in_process_teacher_bit_for_bit(plan, client):
    batch = rows(plan, 3, 64, seed=0)
    for k in (8, 100):  # 100: beyond the 20 log-probs other servers cap at
        found = served(client, batch, Options(form="topk", top_k=k, temperature=2.0))
        assert found.ids.shape == (3 * 63, k)
        assert_equal_targets(found, local(plan, top_k=k, temperature=2.0).targets(batch), TOPK)
    # Dense: the final hidden states (+ a hint layer's); the client projects them with GET /head, once.
    found = served(client, batch, Options(form="dense", layers=(1,)))
    expected = local(plan).targets(batch, layers=(1,))
    assert_equal_targets(found, expected, ("hidden",))
    assert torch.equal(found.hidden_states[1], expected.hidden_states[1])
    response = client.get("/head")
    assert response.status_code == 200
    weight, bias = decode_head(response.content)
    assert weight.shape == (plan.vocab, expected.hidden.shape[1]) and torch.equal(weight, expected.weight)
    assert bias is None and expected.bias is None
    logits = torch.nn.functional.linear(found.hidden, weight)
    assert torch.equal(logits, torch.nn.functional.linear(expected.hidden, expected.weight))


def test_identity_is_what_teacher_json_records(plan, client):
    from distributed_distill import teacher

    response = client.get("/identity")
    assert response.status_code == 200
    document = response.json()
    assert document["identity"] == json.loads(json.dumps(teacher.identity(plan.cfg.teacher, plan.teacher_config, 0)))
    assert document["identity"] == json.loads(json.dumps(local(plan).identity))
    text = plan.teacher_config.get_text_config()
    assert document["vocab"] == plan.vocab == 512
    assert document["max_positions"] == text.max_position_embeddings == 128
    assert document["num_states"] == text.num_hidden_layers + 1
    assert (document["engine"], document["world_size"]) == ("replicated", 1)


def test_wrong_or_missing_token_gets_401_and_nothing_served(plan, token_server, client):
    url, log = token_server
    before = client.get("/metrics").json()
    body = encode_request(rows(plan, 1, 16, seed=1), Options(top_k=4))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        with httpx.Client(base_url=url, headers=headers, timeout=60) as other:
            for method, path in (("POST", "/targets"), ("GET", "/head"), ("GET", "/identity"), ("GET", "/metrics")):
                response = other.request(method, path, content=body if method == "POST" else None)
                assert response.status_code == 401, (headers, path)
                assert response.text.startswith("missing or wrong token"), response.text
            assert other.get("/health").text == "ok\n"  # the one open endpoint
    after = client.get("/metrics").json()
    assert (after["batches"], after["tokens"], after["requests"]) == (
        before["batches"],
        before["tokens"],
        before["requests"],
    )
    assert after["errors"]["401"] - before["errors"].get("401", 0) == 12
    assert "401 POST /targets" in log.read_text()


def test_non_loopback_host_without_token_refuses_to_start(tmp_path):
    proc = run_cli(
        ["serve", "--config", str(SMOKE), "serve.host=0.0.0.0"], check=False, env={"DISTILL_SERVE_TOKEN": None}
    )
    line = error_line(proc)
    assert "serve.host=0.0.0.0 is not loopback and no token is set" in line and "serve.token_file" in line
    empty = tmp_path / "token"
    empty.write_text("\n")
    proc = run_cli(["serve", "--config", str(SMOKE), "serve.host=0.0.0.0", f"serve.token_file={empty}"], check=False)
    assert error_line(proc) == f"error: serve.token_file={empty} is empty; put the shared secret in it"
    proc = run_cli(["serve", "--config", str(SMOKE), "teacher.engine=remote", "teacher.url=http://x:1"], check=False)
    assert "teacher.engine=remote cannot be served" in error_line(proc)


# ----------------------------------------------------------------------------------------------
# Slow tier


def garbage(n: int) -> bytes:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n)).numpy().tobytes()


def raw_request(ids: torch.Tensor, options: str) -> bytes:
    """A request body with any input_ids tensor and any options text (what encode_request would never send)."""
    from safetensors.torch import save

    return save({"input_ids": ids}, metadata={"options": options})


def bad_requests(plan) -> list[tuple[str, bytes, int, str]]:
    """(case, body, status, the reason's text) of the issue's table and a few more."""
    good = rows(plan, 2, 32, seed=3)
    body = encode_request(good, Options(top_k=8))
    topk = json.dumps({"form": "topk", "top_k": 8})
    return [
        ("truncated body", body[: len(body) // 2], 400, "request: not a safetensors body"),
        ("wrong dtype", raw_request(good["input_ids"].float(), topk), 400, "input_ids has dtype float32"),
        (
            "ids out of range",
            raw_request(good["input_ids"] + plan.vocab, topk),
            400,
            "outside the teacher's vocabulary",
        ),
        ("negative id", raw_request(good["input_ids"] - plan.vocab, topk), 400, "outside the teacher's vocabulary"),
        ("10 MB of garbage", garbage(10 * 2**20), 413, "exceeds serve.max_request_bytes=8388608"),
        ("5 MB of garbage", garbage(5 * 2**20), 400, "request: not a safetensors body"),
        ("k = 0", encode_request(good, Options(top_k=0)), 400, "options.top_k=0 must be in [1, 512]"),
        ("k > V", encode_request(good, Options(top_k=513)), 400, "options.top_k=513 must be in [1, 512]"),
        (
            "longer than the positions",
            encode_request(rows(plan, 1, 129, 4), Options(top_k=8)),
            400,
            "129 tokens exceed",
        ),
        ("unknown form", raw_request(good["input_ids"], json.dumps({"form": "logits"})), 400, "options.form='logits'"),
        ("options not JSON", raw_request(good["input_ids"], "{top_k: 8"), 400, "options metadata is not JSON"),
        ("hidden state out of range", encode_request(good, Options(form="dense", layers=(3,))), 400, "index 3 outside"),
        ("temperature 0", encode_request(good, Options(top_k=8, temperature=0.0)), 400, "temperature=0.0 must be"),
        ("one token", encode_request(rows(plan, 2, 1, 5), Options(top_k=8)), 400, "need [batch >= 1, length >= 2]"),
    ]


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, smoke_tokenizer):
    """A server without a token, an 8 MB body limit and a wait window long enough for concurrent requests to merge."""
    root = tmp_path_factory.mktemp("serve_open")
    with server(root, f"serve.max_request_bytes={8 * 2**20}", "serve.batch_wait_ms=400") as (url, log):
        with httpx.Client(base_url=url, timeout=60) as c:
            yield c, log


@pytest.mark.slow
def test_bad_requests_get_a_4xx_with_the_reason_and_the_server_goes_on(plan, open_server):
    client, log = open_server
    good = rows(plan, 1, 16, seed=6)
    expected = local(plan, top_k=4).targets(good)
    cases = bad_requests(plan)
    for case, body, status, reason in cases:
        response = client.post("/targets", content=body)
        assert response.status_code == status, (case, response.status_code, response.text)
        assert reason in response.text and response.text.count("\n") == 1, (case, response.text)
        assert_equal_targets(served(client, good, Options(top_k=4)), expected, TOPK)  # still serving, unchanged
    lines = log.read_text()
    assert all(f"{status} POST /targets" in lines for _, _, status, _ in cases)
    errors = client.get("/metrics").json()["errors"]
    assert errors.get("400", 0) >= len(cases) - 1 and errors.get("413", 0) >= 1


@pytest.mark.slow
def test_concurrent_requests_merge_into_one_forward_and_each_equals_in_process(plan, open_server):
    """Requests of equal options and lengths share a forward (the 400 ms window); rows split back bit for bit."""
    client, _ = open_server
    batches = [rows(plan, n, 48, seed=10 + n) for n in (1, 2, 3)]
    before = client.get("/metrics").json()
    for options, form, names in (
        (Options(top_k=24, temperature=2.0), {"top_k": 24, "temperature": 2.0}, TOPK),
        (Options(form="sampled", samples=16, sample_seed=0), {"samples": 16}, SAMPLED),
    ):
        with concurrent.futures.ThreadPoolExecutor(len(batches)) as pool:
            found = list(pool.map(lambda b, o=options: served(client, b, o), batches))
        reference = local(plan, **form)
        for batch, got in zip(batches, found):
            assert_equal_targets(got, reference.targets(batch), names)
    after = client.get("/metrics").json()
    assert after["batches"] - before["batches"] == 2  # three requests, one forward, per form
    assert after["tokens"] - before["tokens"] == 2 * 6 * 48


@pytest.mark.slow
def test_full_queue_is_busy_and_a_timed_out_request_is_dropped(plan, tmp_path):
    """queue_size=1: while one request waits (a 3 s window, 1 s timeout) the next is answered 503 at once; the waiting
    one passes its timeout (504) and its forward never runs."""
    overrides = ("serve.queue_size=1", "serve.batch_wait_ms=3000", "serve.request_timeout=1.0")
    with server(tmp_path, *overrides) as (url, log), httpx.Client(base_url=url, timeout=60) as client:
        body = encode_request(rows(plan, 1, 16, seed=7), Options(top_k=4))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/targets", content=body)
            deadline = time.monotonic() + 30
            while client.get("/metrics").json()["queue_depth"] < 1:
                assert time.monotonic() < deadline and not first.done()
                time.sleep(0.02)
            started = time.monotonic()
            busy = client.post("/targets", content=body)
            assert busy.status_code == 503 and busy.text.startswith("busy: 1 requests waiting"), busy.text
            assert time.monotonic() - started < 0.5  # at once, not after the window
            late = first.result(timeout=30)
        assert late.status_code == 504 and "serve.request_timeout=1.0s waiting (dropped)" in late.text, late.text
        time.sleep(0.5)
        metrics = client.get("/metrics").json()
        assert (metrics["batches"], metrics["queue_depth"], metrics["errors"]) == (0, 0, {"503": 1, "504": 1})
        assert "503 POST /targets" in log.read_text() and "504 POST /targets" in log.read_text()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_server_across_two_ranks_equals_the_replicated_teacher(plan, tmp_path):
    batch = rows(plan, 2, 40, seed=8)
    launcher = torchrun(29741)
    # collective_timeout=20: the followers wait in a broadcast while idle; rank 0's beat (every 5 s) keeps them there.
    with server(tmp_path, "teacher.engine=zero3", "teacher.collective_timeout=20", launcher=launcher) as (url, log):
        with httpx.Client(base_url=url, timeout=120) as client:
            time.sleep(22)  # idle past the collective timeout
            document = client.get("/identity").json()
            assert (document["engine"], document["world_size"]) == ("zero3", 2)
            assert document["identity"] == json.loads(json.dumps(local(plan).identity))
            for k in (8, 64):
                found = served(client, batch, Options(top_k=k, temperature=2.0))
                assert_equal_targets(found, local(plan, top_k=k, temperature=2.0).targets(batch), TOPK)
            found = served(client, batch, Options(form="dense"))
            expected = local(plan).targets(batch)
            assert_equal_targets(found, expected, ("hidden",))
            assert torch.equal(decode_head(client.get("/head").content)[0], expected.weight)
    # The launcher's SIGTERM reached both ranks: rank 0 logged its stop after sending the others theirs.
    assert "stop: 3 requests, 240 tokens" in log.read_text()  # 3 POST /targets of 2 x 40 tokens


@pytest.mark.slow
def test_load_benchmark_prints_latency_throughput_fill_and_flat_memory():
    out = run_cli(
        [str(ROOT / "benchmarks" / "serve_load.py"), "--seconds", "3", "--clients", "8"],
        launcher=[sys.executable],
        timeout=240,
    ).stdout
    start = out.index("{")
    result, _ = json.JSONDecoder().raw_decode(out[start:])
    assert result["errors"] == 0 and result["requests"] >= 8
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    assert result["tokens_per_second"] > 0 and 0 < result["batch_fill"] <= 1
    assert set(result["lengths"]) == {16, 32, 64, 128} and result["clients"] == 8
    growth = result["peak_rss_bytes"]["end"] - result["peak_rss_bytes"]["start"]
    assert growth == result["peak_rss_growth_bytes"] <= result["max_growth_bytes"]
    assert f"| p50 latency | {result['latency_ms']['p50']:.1f} ms |" in out
