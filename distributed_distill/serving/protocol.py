"""The wire format of `distill serve`: one safetensors body each way, so the tensors travel as raw little-endian
bytes with a JSON header (the `safetensors` library writes and parses both; nothing here hand-rolls a format).

A request (POST /targets) holds `input_ids` [B, S] (int32 or int64) and, for packed rows, `position_ids` [B, S],
with the options in the header's metadata under "options" (JSON):

    {"form": "topk", "top_k": 64, "temperature": 2.0}              top-k log-probs and tail mass, any k <= V
    {"form": "sampled", "samples": 16, "temperature": 1.0, "sample_seed": 0}   sampled ids with counts, entropy
    {"form": "dense", "temperature": 1.0}                          the final hidden states; the client holds the
                                                                   output layer (GET /head, once) and the loss
                                                                   projects them chunk by chunk, as in-process
    "layers": [1, 2] (optional, any form)                          also these hidden states (the hint loss)

A response holds exactly the `TeacherTargets` fields the in-process engine would return for the same batch
(`ids`, `logprobs`, `tail_logmass`, `counts`, `entropy`, `hidden`, `hidden_states.<i>`), B * (S - 1) rows each.

`decode_request` validates everything before any work: a body that is not safetensors (truncated, garbage), wrong
dtypes or shapes, ids outside the vocabulary, a sequence longer than the model's positions, k outside [1, V]; each
is a `BadRequest` naming the problem, which the server answers with a 4xx and keeps serving everyone else.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import DistillError
from ..losses import TeacherTargets

FORMS = ("topk", "sampled", "dense")
TARGET_FIELDS = ("ids", "logprobs", "tail_logmass", "counts", "entropy", "hidden")
ID_DTYPES = (torch.int32, torch.int64)
TOKEN_ENV = "DISTILL_SERVE_TOKEN"  # the shared secret, when no token file is given


class BadRequest(ValueError):
    """A request the server refuses (a 4xx) with a one-line reason; `status` is the HTTP status."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Options:
    """What a request asks for. Requests with equal options (and sequence length) can share one teacher forward."""

    form: str = "topk"
    top_k: int | None = None
    samples: int | None = None
    temperature: float = 1.0
    sample_seed: int = 0
    layers: tuple[int, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        return json.dumps(
            {
                "form": self.form,
                "top_k": self.top_k,
                "samples": self.samples,
                "temperature": self.temperature,
                "sample_seed": self.sample_seed,
                "layers": list(self.layers),
            }
        )


@dataclass(frozen=True)
class Limits:
    """What the served teacher accepts: its vocabulary (ids and k), its positions, its hidden-state indices."""

    vocab: int
    max_positions: int
    num_states: int  # hidden-state indices 0..num_states-1 (0 = embeddings, the last = the final norm's output)
    max_rows: int = 1 << 16  # sequences per request


def encode_request(batch: dict, options: Options) -> bytes:
    tensors = {"input_ids": batch["input_ids"].detach().to("cpu", torch.int64).contiguous()}
    if batch.get("position_ids") is not None:
        tensors["position_ids"] = batch["position_ids"].detach().to("cpu", torch.int64).contiguous()
    return st_save(tensors, metadata={"options": options.to_json()})


def _header_metadata(body: bytes) -> dict:
    """The safetensors header's metadata (the library's load returns tensors only): 8 bytes of little-endian length,
    then that many bytes of JSON; safetensors' own parse (st_load) has already validated both."""
    n = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + n]).get("__metadata__") or {}


def _parse(body: bytes, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    if len(body) < 8:
        raise BadRequest(f"{what}: body of {len(body)} bytes is not a safetensors body (truncated?)")
    try:
        tensors = st_load(body)
        meta = _header_metadata(body)
    except (SafetensorError, ValueError, UnicodeDecodeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise BadRequest(f"{what}: not a safetensors body ({first})") from None
    return tensors, meta


def _int(options: dict, key: str, low: int, high: int | None, name: str) -> int:
    value = options.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"options.{key}={value!r} must be an integer")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise BadRequest(f"options.{key}={value} must be in {bound} ({name})")
    return value


def decode_request(body: bytes, limits: Limits) -> tuple[dict, Options]:
    """The batch ({"input_ids": [B, S] int64, maybe "position_ids"}) and options of a request body, validated
    against the served teacher's `limits`; a `BadRequest` naming the first problem otherwise."""
    tensors, meta = _parse(body, "request")
    try:
        raw = json.loads(meta.get("options", "{}"))
    except json.JSONDecodeError:
        raise BadRequest("request: options metadata is not JSON") from None
    if not isinstance(raw, dict):
        raise BadRequest("request: options metadata must be a JSON object")
    unknown = sorted(set(tensors) - {"input_ids", "position_ids"})
    if unknown:
        raise BadRequest(f"request: unknown tensor {unknown[0]!r} (send input_ids and optionally position_ids)")
    ids = tensors.get("input_ids")
    if ids is None:
        raise BadRequest("request: no input_ids tensor")
    if ids.dtype not in ID_DTYPES:
        raise BadRequest(f"request: input_ids has dtype {str(ids.dtype).removeprefix('torch.')}, need int32 or int64")
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise BadRequest(f"request: input_ids has shape {list(ids.shape)}, need [batch >= 1, length >= 2]")
    rows, length = ids.shape
    if rows > limits.max_rows:
        raise BadRequest(f"request: {rows} sequences, at most {limits.max_rows} per request", status=413)
    if length > limits.max_positions:
        raise BadRequest(f"request: sequences of {length} tokens exceed the teacher's {limits.max_positions} positions")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= limits.vocab:
        bad = low if low < 0 else high
        raise BadRequest(f"request: token id {bad} is outside the teacher's vocabulary [0, {limits.vocab})")
    batch = {"input_ids": ids.long()}
    positions = tensors.get("position_ids")
    if positions is not None:
        if positions.dtype not in ID_DTYPES or positions.shape != ids.shape:
            raise BadRequest(f"request: position_ids must be int32/int64 of input_ids' shape {list(ids.shape)}")
        if int(positions.min()) < 0 or int(positions.max()) >= limits.max_positions:
            raise BadRequest(f"request: position_ids outside [0, {limits.max_positions})")
        batch["position_ids"] = positions.long()
    form = raw.get("form", "topk")
    if form not in FORMS:
        raise BadRequest(f"options.form={form!r} must be one of {', '.join(FORMS)}")
    temperature = raw.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise BadRequest(f"options.temperature={temperature!r} must be a number > 0")
    layers = raw.get("layers") or []
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise BadRequest(f"options.layers={layers!r} must be a list of hidden-state indices")
    for i in layers:
        if not 0 <= i < limits.num_states:
            raise BadRequest(f"options.layers: index {i} outside the teacher's hidden states [0, {limits.num_states})")
    top_k = _int(raw, "top_k", 1, limits.vocab, "the vocabulary") if form == "topk" else None
    samples = _int(raw, "samples", 1, 1 << 16, "draws per position") if form == "sampled" else None
    seed = _int(raw, "sample_seed", 0, None, "the draw seed") if form == "sampled" else 0
    options = Options(form, top_k, samples, float(temperature), seed, tuple(layers))
    return batch, options


def encode_response(targets: TeacherTargets) -> bytes:
    tensors = {name: getattr(targets, name) for name in TARGET_FIELDS if getattr(targets, name) is not None}
    for index, states in (targets.hidden_states or {}).items():
        tensors[f"hidden_states.{index}"] = states
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def decode_response(body: bytes, device: torch.device | str = "cpu") -> TeacherTargets:
    """The `TeacherTargets` of a response body (without the output layer of the dense form: the client adds it)."""
    tensors, _ = _parse(body, "response")
    found = TeacherTargets(**{name: tensors[name].to(device) for name in TARGET_FIELDS if name in tensors})
    states = {int(k.split(".", 1)[1]): v.to(device) for k, v in tensors.items() if k.startswith("hidden_states.")}
    found.hidden_states = states or None
    return found


def encode_head(weight: torch.Tensor, bias: torch.Tensor | None) -> bytes:
    """GET /head: the output layer (restricted to the tokenizer's rows) a dense-form client projects with."""
    tensors = {"weight": weight.detach().to("cpu").contiguous()}
    if bias is not None:
        tensors["bias"] = bias.detach().to("cpu").contiguous()
    return st_save(tensors)


def decode_head(body: bytes, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    tensors, _ = _parse(body, "head")
    bias = tensors.get("bias")
    return tensors["weight"].to(device), None if bias is None else bias.to(device)


# ----------------------------------------------------------------------------------------------
# The shared secret (both sides) and where a server may listen without one


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def read_token(token_file: str | None, what: str = "serve.token_file") -> str | None:
    """The shared secret: `token_file`'s contents (stripped), else $DISTILL_SERVE_TOKEN, else None."""
    if token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        token = open(os.path.expanduser(token_file)).read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DistillError(f"{what}={token_file} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if not token:
        raise DistillError(f"{what}={token_file} is empty; put the shared secret in it")
    return token
