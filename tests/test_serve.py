"""`distill serve` for real: a server subprocess on 127.0.0.1 (port 0, read back from serve.address_file) with the
smoke config's tiny teacher, talked to with httpx; what it serves is compared bit for bit with the in-process
teacher of the same config, built the way a student job builds it (setup.plan_run, teacher.setup_teacher)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import httpx
import pytest
import torch

from distributed_distill.serving.protocol import Options, decode_head, decode_targets, encode_request
from distributed_distill.serving.server import running

from .helpers import ROOT, SMOKE, error_line, run_cli

TOKEN = "s3cret-token-for-tests"
SERVE = [sys.executable, "-m", "distributed_distill.cli", "serve", "--config", str(SMOKE)]


@contextlib.contextmanager
def server(tmp_path: Path, *overrides: str, launcher: list[str] | None = None):
    """A `distill serve` of the smoke config on a free loopback port: yields (url, its log file)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    address, log = tmp_path / "server.url", tmp_path / "serve.log"
    settings = ["serve.port=0", f"serve.address_file={address}", f"serve.log={log}", *overrides]
    cmd = (launcher + ["-m", "distributed_distill.cli", "serve", "--config", str(SMOKE)]) if launcher else SERVE
    with running([*cmd, *settings], address, cwd=ROOT, timeout=240) as (url, _):
        yield url, log


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
    return decode_targets(response.content)


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
