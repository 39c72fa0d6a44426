"""`distill serve`: a teacher behind an HTTP server (aiohttp), run with the existing engines (docs/serving.md).

    serve -> checks (engine, host, token) -> setup_accelerator -> plan_run (the tokenizer, the teacher's config)
          -> [rank 0: the HTTP thread starts: /health, /ready 503] -> setup_teacher -> the head, once
          -> [rank 0: ready, the address file] -> the teacher loop until SIGTERM/SIGINT

Threads on rank 0: the HTTP server runs its own asyncio loop in a thread (it decodes and validates requests, queues
them and answers), and the main thread runs the teacher: it takes batches from the `Batcher` (requests with equal
options and sequence length merged on the batch dimension up to serve.max_batch_tokens), computes them with
`OnlineTeacher.targets` (the code an in-process teacher runs, so remote equals local bit for bit) and hands each
request its rows. The event loop never waits for the teacher. Under `teacher.engine=zero3` the main thread of every
rank runs each batch in lockstep: rank 0 broadcasts it (or an idle beat, or the stop), the others follow; every
collective stays in the main thread, in one order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from aiohttp import web

from .config import Config, ServeConfig
from .errors import DistillError
from .integrity import atomic_write_text
from .losses import TeacherTargets
from .serving.protocol import (
    TOKEN_ENV,
    BadRequest,
    Limits,
    Options,
    decode_request,
    encode_head,
    encode_response,
    is_loopback,
    read_token,
)

UNAUTHENTICATED = ("/health",)  # a load balancer's probe needs no secret (and learns nothing)


# ----------------------------------------------------------------------------------------------
# Checks before anything loads


def check_serve(cfg: Config) -> str | None:
    """The refusals of `distill serve` before any model loads; returns the token (None: no authentication)."""
    if cfg.teacher is None:
        raise DistillError("distill serve needs a teacher: set teacher.path or teacher.arch")
    if cfg.teacher.engine == "remote":
        raise DistillError("teacher.engine=remote cannot be served: set teacher.engine=replicated or zero3")
    token = read_token(cfg.serve.token_file)
    if token is None and not is_loopback(cfg.serve.host):
        raise DistillError(
            f"serve.host={cfg.serve.host} is not loopback and no token is set: give serve.token_file (or "
            f"{TOKEN_ENV}) so only clients holding it are served"
        )
    return token


# ----------------------------------------------------------------------------------------------
# Dynamic batching


@dataclass(eq=False)
class Job:
    """One POST /targets: its validated batch and options, and how its answer gets back to the event loop."""

    batch: dict
    options: Options
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return self.batch["input_ids"].shape[0]

    @property
    def tokens(self) -> int:
        return self.batch["input_ids"].numel()

    @property
    def key(self) -> tuple:
        """Jobs of equal keys concatenate on the batch dimension into one forward."""
        return self.options, self.batch["input_ids"].shape[1], "position_ids" in self.batch

    def settle(self, result: bytes | BaseException) -> None:
        """From the teacher thread: the response body, or the error, to the waiting handler."""

        def done() -> None:
            if self.future.done():  # timed out meanwhile: the answer was 504
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(done)


class Batcher:
    """The bounded queue of waiting jobs and the batch policy: the oldest job waits up to `wait_s` for others of
    its key; a batch goes as soon as it holds `max_tokens` tokens (or the next job of its key would exceed them).
    A job larger than `max_tokens` runs alone."""

    def __init__(self, max_tokens: int, wait_s: float, size: int):
        self.max_tokens, self.wait_s, self.size = max_tokens, wait_s, size
        self.pending: list[Job] = []
        self.cond = threading.Condition()

    def offer(self, job: Job) -> bool:
        with self.cond:
            if len(self.pending) >= self.size:
                return False
            self.pending.append(job)
            self.cond.notify()
            return True

    def withdraw(self, job: Job) -> bool:
        """A timed-out job's work is dropped if it has not started; whether it had not."""
        with self.cond:
            if job in self.pending:
                self.pending.remove(job)
                self.cond.notify()
                return True
            return False

    def drain(self) -> list[Job]:
        with self.cond:
            jobs, self.pending = self.pending, []
            return jobs

    def next_batch(self, stopping: threading.Event, idle_s: float) -> list[Job] | None:
        """The next batch; [] when nothing came for `idle_s` seconds; None once `stopping` is set. Polls the event
        a few times a second (a signal handler sets it, and must not take the lock)."""
        idle_until = time.monotonic() + idle_s
        with self.cond:
            while not stopping.is_set():
                now = time.monotonic()
                if not self.pending:
                    if now >= idle_until:
                        return []
                    self.cond.wait(min(0.2, idle_until - now))
                    continue
                first = self.pending[0]
                group = [j for j in self.pending if j.key == first.key]
                chosen, tokens = [first], first.tokens
                for job in group[1:]:
                    if tokens + job.tokens > self.max_tokens:
                        break
                    chosen.append(job)
                    tokens += job.tokens
                due = first.arrived + self.wait_s
                if tokens >= self.max_tokens or len(chosen) < len(group) or now >= due:
                    for job in chosen:
                        self.pending.remove(job)
                    return chosen
                self.cond.wait(min(0.2, due - now))
            return None


# ----------------------------------------------------------------------------------------------
# The teacher side


def apply_options(teacher, options: Options) -> None:
    """The teacher's form for one batch: its attributes, as setup_teacher would have set them."""
    teacher.top_k = options.top_k if options.form == "topk" else None
    teacher.samples = options.samples if options.form == "sampled" else None
    teacher.temperature, teacher.sample_seed = options.temperature, options.sample_seed


def compute(teacher, batch: dict, options: Options, device: torch.device) -> TeacherTargets:
    apply_options(teacher, options)
    return teacher.targets({k: v.to(device) for k, v in batch.items()}, options.layers)


def rows_of(targets: TeacherTargets, start: int, stop: int) -> TeacherTargets:
    """Rows [start, stop) of every field the wire carries (the dense form's output layer stays behind: GET /head)."""
    cut = {}
    for f in fields(TeacherTargets):
        value = getattr(targets, f.name)
        if f.name in ("weight", "bias") or value is None:
            continue
        cut[f.name] = {i: v[start:stop] for i, v in value.items()} if f.name == "hidden_states" else value[start:stop]
    return TeacherTargets(**cut)


def head_body(teacher) -> bytes:
    """GET /head: the output layer restricted to the tokenizer's rows, as the in-process teacher projects with (under
    zero3 a gather: every rank calls this, once, at startup)."""
    with teacher._head() as (weight, bias):
        return encode_head(weight, bias)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


@dataclass
class Metrics:
    """GET /metrics; written by the teacher thread and the handlers, read by the handlers (plain counters)."""

    max_tokens: int
    requests: int = 0
    errors: Counter = field(default_factory=Counter)
    tokens: int = 0
    batches: int = 0
    fill_sum: float = 0.0
    ready_at: float | None = None

    def batch(self, tokens: int) -> None:
        self.tokens += tokens
        self.batches += 1
        self.fill_sum += tokens / self.max_tokens

    def to_json(self, queue_depth: int) -> dict:
        elapsed = time.monotonic() - self.ready_at if self.ready_at else 0.0
        return {
            "requests": self.requests,
            "errors": {str(k): v for k, v in sorted(self.errors.items())},
            "tokens": self.tokens,
            "tokens_per_second": self.tokens / elapsed if elapsed > 0 else 0.0,  # since ready
            "queue_depth": queue_depth,
            "batch_fill": self.fill_sum / self.batches if self.batches else 0.0,  # mean over batches
            "batches": self.batches,
            "max_batch_tokens": self.max_tokens,
            "peak_rss_bytes": peak_rss_bytes(),
        }


# ----------------------------------------------------------------------------------------------
# The HTTP side (rank 0)


def answer(status: int, reason: str) -> web.Response:
    return web.Response(status=status, text=reason + "\n")


class ServerStopping(RuntimeError):
    """What a request still waiting when the server stops is answered (503)."""


class Server:
    """The aiohttp application of rank 0 and what its handlers share with the teacher thread."""

    def __init__(self, scfg: ServeConfig, token: str | None, log: logging.Logger):
        self.scfg, self.token, self.log = scfg, token, log
        self.batcher = Batcher(scfg.max_batch_tokens, scfg.batch_wait_ms / 1000, scfg.queue_size)
        self.metrics = Metrics(scfg.max_batch_tokens)
        self.limits: Limits | None = None
        self.identity: dict | None = None
        self.head: bytes | None = None
        self.ready = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.scfg.max_request_bytes, middlewares=[self.record, self.guard])
        app.router.add_get("/health", lambda _: answer(200, "ok"))
        app.router.add_get("/ready", self.handle_ready)
        app.router.add_get("/identity", self.handle_identity)
        app.router.add_get("/head", self.handle_head)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_post("/targets", self.handle_targets)
        return app

    @web.middleware
    async def record(self, request: web.Request, handler) -> web.StreamResponse:
        """Every error answer is counted and logged with its status and reason (one line)."""
        try:
            response = await handler(request)
        except web.HTTPException as e:  # aiohttp's own (404, 405, 413 from client_max_size)
            response = answer(e.status, e.text or e.reason)
        if response.status >= 400:
            self.metrics.errors[response.status] += 1
            reason = (response.text or "").strip() if isinstance(response, web.Response) else ""
            self.log.info(f"{response.status} {request.method} {request.path} from {request.remote}: {reason}")
        return response

    @web.middleware
    async def guard(self, request: web.Request, handler) -> web.StreamResponse:
        if self.token is not None and request.path not in UNAUTHENTICATED:
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
                return answer(401, "missing or wrong token (send Authorization: Bearer <serve token>)")
        if not self.ready and request.path not in ("/health", "/ready", "/metrics"):
            return answer(503, "not ready: the teacher is loading")
        return await handler(request)

    async def handle_ready(self, _) -> web.Response:
        return answer(200, "ready") if self.ready else answer(503, "not ready: the teacher is loading")

    async def handle_identity(self, _) -> web.Response:
        return web.json_response(self.identity)

    async def handle_head(self, _) -> web.Response:
        return web.Response(body=self.head, content_type="application/octet-stream")

    async def handle_metrics(self, _) -> web.Response:
        return web.json_response(self.metrics.to_json(len(self.batcher.pending)))

    async def handle_targets(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        self.metrics.requests += 1
        limit = self.scfg.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            return answer(
                413, f"request body of {request.content_length} bytes exceeds serve.max_request_bytes={limit}"
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return answer(413, f"request body exceeds serve.max_request_bytes={limit}")
        loop = asyncio.get_running_loop()
        try:  # validation reads every id: off the event loop
            batch, options = await loop.run_in_executor(None, decode_request, body, self.limits)
        except BadRequest as e:
            return answer(e.status, str(e))
        job = Job(batch, options, loop, loop.create_future(), started)
        if not self.batcher.offer(job):
            return answer(503, f"busy: {self.scfg.queue_size} requests waiting (serve.queue_size); retry later")
        remaining = self.scfg.request_timeout - (time.monotonic() - started)
        try:
            result = await asyncio.wait_for(asyncio.shield(job.future), timeout=max(remaining, 0.0))
        except asyncio.TimeoutError:
            dropped = self.batcher.withdraw(job)
            return answer(
                504,
                f"request passed serve.request_timeout={self.scfg.request_timeout}s "
                + ("waiting (dropped)" if dropped else "while computed"),
            )
        except ServerStopping as e:
            return answer(503, str(e))
        except Exception as e:  # the teacher failed on this batch: the server itself goes on
            return answer(500, f"teacher failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
        return web.Response(body=result, content_type="application/octet-stream")

    def start(self) -> str:
        """Bind (before the teacher loads, so /health answers and /ready says not yet) and serve from a thread of
        its own; returns http://host:port with the port bound."""
        scfg = self.scfg
        try:
            family, kind, proto, _, address = socket.getaddrinfo(scfg.host, scfg.port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as e:
            raise DistillError(
                f"serve.host={scfg.host} serve.port={scfg.port}: cannot bind ({e.strerror or e})"
            ) from None
        host, port = sock.getsockname()[:2]
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.SockSite(self.runner, sock).start())
        self.thread = threading.Thread(target=self.loop.run_forever, name="distill-serve-http", daemon=True)
        self.thread.start()
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stop(self) -> None:
        """Answer what still waits (503), close the listener and the loop."""
        for job in self.batcher.drain():
            job.settle(ServerStopping("server stopping (SIGTERM/SIGINT): retry another server"))
        if self.loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


# ----------------------------------------------------------------------------------------------
# The command


def server_log(path: str | None) -> logging.Logger:
    """The server's own log: one line per event, to stderr and to serve.log."""
    log = logging.getLogger("distributed_distill.serve")
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s serve %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        handlers.append(logging.FileHandler(path))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    return log


def identity_document(teacher, plan, world_size: int) -> dict:
    from . import models  # (transformers: not imported by a refusal before the plan)

    text_config = plan.teacher_config.get_text_config()
    return {
        "identity": teacher.identity,
        "vocab": plan.vocab,
        "max_positions": models.max_positions(text_config),
        "num_states": text_config.num_hidden_layers + 1,
        "engine": teacher.engine,
        "world_size": world_size,
    }


def serve(cfg: Config) -> int:
    """`distill serve`: until SIGTERM/SIGINT (then 0, after answering or refusing what was waiting)."""
    token = check_serve(cfg)
    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:  # every rank: the followers leave on rank 0's stop message
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    from .setup import plan_run, setup_accelerator
    from .teacher import setup_teacher

    accelerator = setup_accelerator(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1 and cfg.teacher.engine != "zero3":
        raise DistillError(
            f"distill serve under a launcher of {world} processes needs teacher.engine=zero3 (one teacher sharded "
            "across them); a replicated teacher is served by one process (start one server per GPU)"
        )
    plan = plan_run(cfg, accelerator)
    log = server_log(cfg.serve.log) if rank == 0 else None
    server = Server(cfg.serve, token, log) if rank == 0 else None
    if server is not None:
        url = server.start()
        log.info(f"start {url} (pid {os.getpid()}, {world} rank(s), teacher.engine={cfg.teacher.engine}): loading")
    try:
        teacher = setup_teacher(
            cfg.teacher,
            plan.teacher_config,
            accelerator.device,
            seed=cfg.train.seed,
            vocab=plan.vocab,
            chunk_size=plan.cfg.distill.chunk_size,
        )
        head = head_body(teacher)  # a collective under zero3: every rank, once
        if server is None:
            follow(teacher, accelerator.device, world)
            return 0
        document = identity_document(teacher, plan, world)
        server.identity, server.head = document, head
        server.limits = Limits(document["vocab"], document["max_positions"], document["num_states"])
        server.metrics.ready_at = time.monotonic()
        server.ready = True
        if cfg.serve.address_file:
            atomic_write_text(cfg.serve.address_file, url + "\n")
        log.info(f"ready {url}: {json.dumps(document['identity'], sort_keys=True)}")
        lead(server, teacher, accelerator.device, world, stopping, cfg.teacher.collective_timeout)
        log.info(f"stop: {server.metrics.requests} requests, {server.metrics.tokens} tokens")
        return 0
    finally:
        if server is not None:
            server.stop()


def lead(server: Server, teacher, device: torch.device, world: int, stopping: threading.Event, timeout: int) -> None:
    """Rank 0's teacher loop: batches from the queue, each broadcast to the other ranks first under zero3; an idle
    beat well within the collective timeout keeps the followers' broadcast from timing out; the stop at the end."""
    idle_s = max(1.0, min(60.0, timeout / 4))
    while True:
        jobs = server.batcher.next_batch(stopping, idle_s)
        if jobs is None:
            broadcast(world, ("stop",))
            return
        if not jobs:
            broadcast(world, ("idle",))
            continue
        options = jobs[0].options
        batch = {k: torch.cat([j.batch[k] for j in jobs]) for k in jobs[0].batch}
        broadcast(world, ("run", batch, options))
        try:
            targets = compute(teacher, batch, options, device)
        except Exception as e:  # noqa: BLE001 (answered as a 500 to each request of the batch)
            server.log.info(f"teacher failed on a batch of {batch['input_ids'].shape}: {type(e).__name__}: {e}")
            for job in jobs:
                job.settle(e)
            continue
        server.metrics.batch(batch["input_ids"].numel())
        per_row, start = batch["input_ids"].shape[1] - 1, 0
        for job in jobs:
            job.settle(encode_response(rows_of(targets, start * per_row, (start + job.rows) * per_row)))
            start += job.rows


def follow(teacher, device: torch.device, world: int) -> None:
    """A zero3 rank but 0: run every batch rank 0 broadcasts, until its stop."""
    while True:
        message = broadcast(world, None)
        if message[0] == "stop":
            return
        if message[0] == "run":
            compute(teacher, message[1], message[2], device)


def broadcast(world: int, message: tuple | None) -> tuple:
    """Rank 0's message to every rank (`message` None on the others); a no-op with one rank."""
    if world == 1:
        return message
    box = [message]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------
# A server process (tests, benchmarks/serve_load.py)


@contextlib.contextmanager
def running(
    cmd: list[str],
    address_file: str | os.PathLike,
    *,
    timeout: float = 180.0,
    env: dict | None = None,
    cwd: str | os.PathLike | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start `cmd` (a `distill serve` with serve.address_file=`address_file`, maybe under torchrun), wait until the
    address file appears (failing with the server's stderr if it exits or `timeout` passes first), yield (its URL,
    the process); at exit SIGTERM to it and its children (torchrun's workers run in sessions of their own), then
    SIGKILL whatever is left after 30 s. Its stderr goes to address_file + '.stderr'."""
    import psutil

    address = Path(address_file)
    address.unlink(missing_ok=True)
    errors = open(f"{address}.stderr", "w")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=errors, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not address.is_file():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{cmd} {'exited ' + str(proc.returncode) if proc.poll() is not None else 'not ready'} before "
                    f"writing {address}:\n{Path(errors.name).read_text()[-4000:]}"
                )
            time.sleep(0.05)
        yield address.read_text().strip(), proc
    finally:
        if proc.poll() is None:
            family = [proc.pid]
            with contextlib.suppress(psutil.NoSuchProcess):
                family += [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
            for pid in family:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                for pid in family:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait()
        errors.close()
