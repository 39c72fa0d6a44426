"""`teacher.engine: remote`: the teacher source of a student job whose teacher runs in `distill serve` (serve.py).

    RemoteTeacher (connect, at setup: GET /identity of every server, checked; GET /head for the dense form)
      prefetch(batches)  the next step's micro-batches, sent from a background thread while this step computes
      ready(batches)     this step's targets, waited for on every rank; the ranks agree (one all-reduce) whether a
                         server stayed away, so all stop before the same step
      targets(batch)     a fetched micro-batch's targets (evaluation, and anything not prefetched: fetched now)

Every rank sends its own rows; the server computes them with the code an in-process teacher runs, so the targets
equal the in-process engine's bit for bit. Connection errors and 503/504 are retried (0.1 s doubling to 5 s, the
next server of teacher.url each time, an address file re-read) until teacher.collective_timeout seconds have passed
for that request; any other refusal (400, 401, 413, 500) is one line naming the server and its reason.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import httpx
import torch

from ..config import TeacherConfig
from ..errors import DistillError, Preempted
from ..losses import TeacherTargets
from .protocol import Options, decode_head, decode_response, encode_request, read_token

RETRIED = (503, 504)  # busy, or the request passed serve.request_timeout: the server is there, try again
FIRST_DELAY, MAX_DELAY = 0.1, 5.0  # seconds between tries, doubling


class TeacherUnreachable(Preempted):
    """No server of teacher.url answered a request within teacher.collective_timeout: the run ends as a preemption
    does (exit 75; in training after a checkpoint of the last step), so the rerun resumes exactly."""


class TeacherRefused(DistillError):
    """A server answered a request with an error that retrying cannot fix (a bad request, a wrong token)."""


class Endpoint:
    """One entry of teacher.url: an http(s) address, or `file:PATH`, the address file `distill serve` writes (read
    again after a failed request: a restarted server may listen on another port)."""

    def __init__(self, spec: str):
        self.spec, self.url = spec, None if spec.startswith("file:") else spec.rstrip("/")
        self.last: str | None = self.url  # the address last used (named when it fails)

    def address(self) -> str:
        if self.url is None:
            path = self.spec.removeprefix("file:")
            try:
                self.url = open(path).read().strip().rstrip("/")
            except OSError as e:
                raise ConnectionError(f"address file {path}: {(e.strerror or str(e)).lower()}") from None
            if not self.url.startswith(("http://", "https://")):
                self.url = None
                raise ConnectionError(f"address file {path} holds no http:// address")
            self.last = self.url
        return self.url

    def forget(self) -> None:
        if self.spec.startswith("file:"):
            self.url = None

    def name(self) -> str:
        return self.last or self.spec


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return text.replace("[Errno 111] ", "").lower()


@dataclass(eq=False)
class _Pending:
    """A micro-batch sent ahead: its ids (to match the batch the step asks for) and the request in flight."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor | None
    layers: tuple[int, ...]
    future: Future

    def matches(self, batch: dict, layers: tuple[int, ...]) -> bool:
        positions = batch.get("position_ids")
        return (
            self.layers == layers
            and torch.equal(self.input_ids, batch["input_ids"].cpu())
            and (self.position_ids is None) == (positions is None)
            and (positions is None or torch.equal(self.position_ids, positions.cpu()))
        )


class RemoteTeacher:
    """A `TeacherSource` whose targets come from `distill serve` (see the module docstring). No model runs here:
    `num_parameters` is 0 and `parameter_bytes` (0, 0)."""

    engine = "remote"

    def __init__(
        self,
        tcfg: TeacherConfig,
        identity: dict,
        device: torch.device,
        options: Options,
        vocab: int | None,
    ):
        self.identity, self.device, self.options, self.vocab = identity, device, options, vocab
        self.top_k = options.top_k if options.form == "topk" else None  # evaluation asks which form it scores
        self.samples = options.samples if options.form == "sampled" else None
        self.timeout = tcfg.collective_timeout
        self.ahead = tcfg.prefetch  # the trainer sends the next step's micro-batches during this one
        self.servers = [Endpoint(spec) for spec in tcfg.url]
        self._turn = itertools.count()
        self._lock = threading.Lock()
        token = read_token(tcfg.token_file, "teacher.token_file")  # the server's own reading of a token file
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(self.timeout, connect=5.0))
        # Requests in flight at once (micro-batches sent ahead): enough for the server to batch them together.
        self.slots = threading.BoundedSemaphore(4 * len(self.servers))
        self.pending: list[_Pending] = []
        self.head: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def urls(self) -> str:
        return ", ".join(s.name() for s in self.servers)

    # -- requests --------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None = None, to: Endpoint | None = None) -> bytes:
        """One request, to the next server in turn (or `to`); retried on connection errors and 503/504 until
        teacher.collective_timeout has passed (TeacherUnreachable), refused otherwise (TeacherRefused)."""
        started = time.monotonic()
        delay, tries = FIRST_DELAY, 0
        while True:
            with self._lock:
                server = to or self.servers[next(self._turn) % len(self.servers)]
            left = self.timeout - (time.monotonic() - started)
            try:
                url = server.address() + path
                timeout = httpx.Timeout(max(left, 0.1), connect=min(5.0, max(left, 0.1)))
                response = self.client.request(method, url, content=body, timeout=timeout)
            except (httpx.TransportError, ConnectionError) as e:
                server.forget()  # a restarted server writes its new address
                reason = _reason(e)
            else:
                if response.status_code == 200:
                    return response.content
                said = response.text.strip().splitlines()[0][:300] if response.text.strip() else ""
                if response.status_code not in RETRIED:
                    hint = " (set teacher.token_file or DISTILL_SERVE_TOKEN to the server's token)"
                    raise TeacherRefused(
                        f"teacher server {server.name()} refused {method} {path}: {response.status_code} {said}"
                        + (hint if response.status_code == 401 else "")
                    )
                reason = f"{response.status_code} {said}"
            tries += 1
            waited = time.monotonic() - started
            if waited >= self.timeout:
                raise TeacherUnreachable(
                    f"teacher server {server.name()} unreachable for {waited:.0f} s ({reason}; {tries} tries, "
                    f"teacher.collective_timeout={self.timeout})"
                )
            time.sleep(min(delay, self.timeout - waited))  # the last try at the timeout itself
            delay = min(2 * delay, MAX_DELAY)

    def _fetch(self, batch: dict, layers: tuple[int, ...]) -> TeacherTargets:
        options = dataclasses.replace(self.options, layers=tuple(layers))
        found = decode_response(self._request("POST", "/targets", encode_request(batch, options)), self.device)
        if self.options.form == "dense":  # the server sends the final hidden states; the loss projects them
            found.weight, found.bias = self.head
        return found

    # -- the teacher source ----------------------------------------------------------------------

    def check(self) -> None:
        """At setup: every server serves this teacher (its identity and vocabulary); the dense form's output layer."""
        for server in self.servers:
            try:
                served = json.loads(self._request("GET", "/identity", to=server))
            except ValueError:
                raise TeacherRefused(f"teacher server {server.name()}: GET /identity did not answer JSON") from None
            differs = identity_difference(served.get("identity") or {}, self.identity)
            if differs is not None:
                key, theirs, ours = differs
                raise DistillError(
                    f"teacher server {server.name()} serves another teacher: {key}={_short(theirs)} there, "
                    f"{_short(ours)} here (teacher.path/arch/revision and train.seed must be the server's)"
                )
            if self.vocab is not None and served.get("vocab") != self.vocab:
                raise DistillError(
                    f"teacher server {server.name()} compares {served.get('vocab')} vocabulary rows, this run "
                    f"{self.vocab}: it was started with another tokenizer (tokenizer.* must match the server's)"
                )
        if self.options.form == "dense":
            self.head = decode_head(self._request("GET", "/head"), self.device)

    def prefetch(self, batches: Sequence[dict], layers: Sequence[int] = ()) -> None:
        """Send these micro-batches now, from the background (the next step's, while this one computes); what was
        sent ahead and not asked for is dropped."""
        layers = tuple(layers)
        self.pending = [p for p in self.pending if not p.future.done() or p.future.exception() is None]
        for batch in batches:
            if any(p.matches(batch, layers) for p in self.pending):
                continue
            cpu = {k: batch[k].cpu() for k in ("input_ids", "position_ids") if batch.get(k) is not None}
            future = self._submit(self._fetch, cpu, layers)
            self.pending.append(_Pending(cpu["input_ids"], cpu.get("position_ids"), layers, future))

    def _submit(self, fn, *args) -> Future:
        """`fn(*args)` in a daemon thread (one that never holds the process up when the run ends)."""
        future: Future = Future()

        def run() -> None:
            with self.slots:
                if not future.set_running_or_notify_cancel():
                    return
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 (raised where the result is asked for)
                    future.set_exception(e)

        threading.Thread(target=run, name="remote-teacher", daemon=True).start()
        return future

    def ready(self, batches: Sequence[dict], layers: Sequence[int] = ()) -> str | None:
        """This step's targets, on every rank, before its forward: sent now unless they were sent ahead, and waited
        for. Every rank then learns whether any failed (one all-reduce): None when all arrived; the one line of a
        server that stayed away (every rank then stops before this step); a refusal is raised on every rank."""
        self.prefetch(batches, layers)
        unreachable = refused = None
        wanted = [p for p in self.pending if any(p.matches(b, tuple(layers)) for b in batches)]
        for p in self.pending:
            if p not in wanted:  # sent ahead for a step that went otherwise (an on-policy step, other layers)
                p.future.cancel()
        self.pending = wanted
        for p in wanted:
            error = p.future.exception()
            if isinstance(error, TeacherUnreachable):
                unreachable = unreachable or str(error)
            elif error is not None:
                if not isinstance(error, DistillError):
                    raise error
                refused = refused or str(error)
        if refused is not None or unreachable is not None:
            self.pending = []
        return agree(unreachable, refused)

    def targets(self, batch: dict, layers: Sequence[int] = ()) -> TeacherTargets:
        layers = tuple(layers)
        for i, p in enumerate(self.pending):
            if p.matches(batch, layers):
                del self.pending[i]
                return p.future.result()
        try:  # not sent ahead (evaluation): asked now, on this rank alone
            return self._fetch({k: v for k, v in batch.items() if k in ("input_ids", "position_ids")}, layers)
        except TeacherUnreachable as e:
            raise TeacherUnreachable(
                f"{e}: stopped without a new checkpoint; run the same command again (train.resume=auto) to continue "
                "from the newest"
            ) from None

    def num_parameters(self) -> int:
        return 0

    def parameter_bytes(self) -> tuple[int, int]:
        return 0, 0


def identity_difference(theirs: dict, ours: dict, prefix: str = "") -> tuple[str, object, object] | None:
    """The first key (dotted, in our order) whose values differ between two identities, with both values."""
    for key in [*ours, *(k for k in theirs if k not in ours)]:
        a, b = theirs.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = identity_difference(a, b, f"{prefix}{key}.")
            if found is not None:
                return found
        elif a != b:
            return f"{prefix}{key}", a, b
    return None


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def agree(unreachable: str | None, refused: str | None) -> str | None:
    """Every rank's verdict on its requests, made one (an all-reduce of two flags; the lines gathered only when one
    failed): a refusal on any rank is raised on every rank (rank 0 prints it), else the first unreachable server's
    line is returned on every rank, else None."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        if refused is not None:
            raise TeacherRefused(refused)
        return unreachable
    flags = torch.tensor([float(unreachable is not None), float(refused is not None)])
    if dist.get_backend() == "nccl":
        flags = flags.cuda()
    dist.all_reduce(flags)
    if not flags.any():
        return None
    lines: list = [None] * dist.get_world_size()
    dist.all_gather_object(lines, (unreachable, refused))
    first_refused = next((r for _, r in lines if r is not None), None)
    if first_refused is not None:
        raise TeacherRefused(first_refused)
    return next(u for u, _ in lines if u is not None)


def connect(
    tcfg: TeacherConfig,
    identity: dict,
    device: torch.device,
    *,
    top_k: int | None = None,
    temperature: float = 1.0,
    vocab: int | None = None,
    samples: int | None = None,
    sample_seed: int = 0,
    chunk_size: int = 0,
) -> RemoteTeacher:
    """The `remote` engine (teacher.ENGINES): the form asked for is the run's (distill.top_k, distill.samples, else
    dense); `identity` the one the in-process engines record (teacher.identity: from the config, no weights), which
    every server must report. `chunk_size` is the server's business (its own distill.chunk_size)."""
    form = "topk" if top_k else "sampled" if samples else "dense"
    options = Options(form, top_k or None, samples or None, float(temperature), sample_seed if samples else 0)
    teacher = RemoteTeacher(tcfg, identity, device, options, vocab)
    problem: str | None = None
    try:
        teacher.check()
    except TeacherUnreachable as e:
        problem = str(e)
    except DistillError as e:
        agree(None, str(e))
        raise
    lost = agree(problem, None)
    if lost is not None:
        raise TeacherUnreachable(f"{lost}; nothing trained yet: run the same command again once it serves")
    return teacher
