"""Cross-tokenizer distillation: the teacher's batch for a student batch when the two tokenizers differ, the spans of
text both sides cover, and the map between the two vocabularies.

    student batch (packed rows, student ids) -> per row, per document: runs cut at special tokens and where the
        label mask changes (a prompt and its body apart) -> a text run's bytes (`token_bytes`) decoded and encoded
        by the teacher, a special token mapped by string or role -> the teacher's rows, documents in the same order
    -> spans: the text between two byte boundaries both sides share; a span is aligned when both sides stand for
       exactly that text, every token in it is learned and something in its document comes before it
    -> `CrossBatch`: the teacher's batch, the aligned spans as flat prediction rows of each side (`SpanIndex`, the
       cross-tokenizer loss's input), and how much of the learned text is aligned

`vocab_map` pairs teacher and student ids that stand for the same bytes (cached per pair of tokenizers); `describe`
is the startup summary's line. Nothing here runs a model; the per-batch work is plain Python over token ids and a
batched call of the teacher's tokenizer (about 10 ms for 8 rows of 512 tokens on one CPU core).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import torch

from .data.batching import IGNORE_INDEX
from .errors import DistillError
from .integrity import atomic_write_text
from .losses.cross import SpanIndex
from .tokenizer import SPECIAL_KEYS, tokenizer_hash

# Why a span is or is not aligned (`Span.reason`), in the order they are checked.
ALIGNED = "aligned"
NOT_UTF8 = "not valid UTF-8"  # part of a character: a row cut mid-character
NO_COUNTERPART = "no teacher counterpart"  # a special token the teacher has no token for
NO_TEACHER_TOKEN = "no teacher token"  # text the teacher's tokenizer turned into nothing
BYTES_DIFFER = "bytes differ"  # the teacher's tokens stand for other text (normalised, a dummy prefix, unknown)
NOT_COUNTED = "not counted"  # a prompt, a non-assistant turn, padding
DOCUMENT_START = "document start"  # the span starts its document on one side: nothing predicts it

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a sentencepiece byte-fallback piece
_DECODERS = {"ByteLevel", "Metaspace", "Replace", "ByteFallback", "Fuse", "Strip"}  # the ones token_bytes reads


# ----------------------------------------------------------------------------------------------
# What each token stands for


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes -> unicode table: byte-level BPE writes every byte as a printable character
    (printable Latin-1 stands for itself, the other 68 bytes for chr(256 + n) in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


_UNICODE_TO_BYTE = _gpt2_unicode_to_byte()


def _backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DistillError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')}: cross-tokenizer alignment needs a fast (Rust) "
            "tokenizer; load it with use_fast=True or convert it"
        )
    return backend


def _flat(component: dict | None) -> list[dict]:
    """A pre-tokenizer's or decoder's steps, Sequences flattened."""
    if component is None:
        return []
    if component.get("type") == "Sequence":
        inner = component.get("decoders", component.get("pretokenizers", []))
        return [step for part in inner for step in _flat(part)]
    return [component]


@dataclass(frozen=True)
class _Convention:
    """How a tokenizer's ordinary tokens spell their text, read off its backend's decoder (else pre-tokenizer)."""

    byte_level: bool  # GPT-2 byte-to-unicode characters
    replacements: tuple[tuple[str, str], ...]  # (pattern, text): Metaspace's "▁" -> " ", Replace decoders
    byte_fallback: bool  # <0xNN> pieces are that byte

    @classmethod
    def of(cls, tokenizer) -> _Convention:
        spec = json.loads(_backend(tokenizer).to_str())
        steps = _flat(spec.get("decoder"))
        if not steps:  # no decoder: the pre-tokenizer tells how the text was spelled
            steps = [s for s in _flat(spec.get("pre_tokenizer")) if s.get("type") in ("ByteLevel", "Metaspace")]
        unknown = sorted({s.get("type") for s in steps} - _DECODERS)
        if unknown:
            raise DistillError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')}: its decoder {', '.join(unknown)} is not "
                "supported for cross-tokenizer alignment (byte-level BPE, Metaspace/sentencepiece and byte "
                "fallback are)"
            )
        replacements = []
        for step in steps:
            if step["type"] == "Metaspace":
                replacements.append((step.get("replacement", "▁"), " "))
            elif step["type"] == "Replace":
                if "String" not in step["pattern"]:
                    raise DistillError(
                        f"tokenizer {getattr(tokenizer, 'name_or_path', '?')}: a Replace decoder with a regular "
                        "expression is not supported for cross-tokenizer alignment"
                    )
                replacements.append((step["pattern"]["String"], step["content"]))
        model = spec.get("model") or {}
        return cls(
            byte_level=any(s["type"] == "ByteLevel" for s in steps),
            replacements=tuple(replacements),
            byte_fallback=any(s["type"] == "ByteFallback" for s in steps) or bool(model.get("byte_fallback")),
        )

    def spell(self, token: str) -> bytes | None:
        if self.byte_level:
            try:
                return bytes(_UNICODE_TO_BYTE[c] for c in token)
            except KeyError:  # not a byte-level spelling: no text it stands for
                return None
        if self.byte_fallback:
            piece = _BYTE_PIECE.fullmatch(token)
            if piece is not None:
                return bytes([int(piece.group(1), 16)])
        for pattern, text in self.replacements:
            token = token.replace(pattern, text)
        return token.encode()


_TABLES: dict[str, list[bytes | None]] = {}  # token_bytes per tokenizer_hash


def token_bytes(tokenizer) -> list[bytes | None]:
    """Per id, the bytes of text the token stands for: byte-level BPE through GPT-2's bytes <-> unicode table,
    Metaspace / sentencepiece pieces with "▁" as a space, byte-fallback pieces <0xNN> as that byte, a non-special
    added token as its own content; None for special tokens (and ids with no token). The convention is read from
    the tokenizer's backend (decoder, pre-tokenizer, model), once per tokenizer (cached by `tokenizer_hash`).

    A token's bytes are what it spells, not what the tokenizer inserted: sentencepiece's dummy-prefix "▁Hello" at
    the start of a text is b" Hello". Alignment compares them with the text, so such a token is never paired."""
    key = tokenizer_hash(tokenizer)
    if key not in _TABLES:
        backend = _backend(tokenizer)
        convention = _Convention.of(tokenizer)
        added = backend.get_added_tokens_decoder()
        size = max(backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)
        table: list[bytes | None] = []
        for i in range(size):
            if i in added:
                table.append(None if added[i].special else added[i].content.encode())
                continue
            token = backend.id_to_token(i)
            table.append(None if token is None else convention.spell(token))
        _TABLES[key] = table
    return _TABLES[key]


def _counterparts(src, dst, src_bytes: list[bytes | None], dst_bytes: list[bytes | None]) -> dict[int, int]:
    """src special-token id -> dst id: the dst special token with the same string, else the one of the same role
    (bos, eos, unk, pad, in that order: a pad that is the eos is an eos); ids with neither are absent."""
    src_backend, dst_backend = _backend(src), _backend(dst)
    by_string = {}
    for i, b in enumerate(dst_bytes):
        token = dst_backend.id_to_token(i) if b is None else None
        if token is not None:
            by_string.setdefault(token, i)
    roles = {}
    for key in SPECIAL_KEYS:
        s, d = getattr(src, f"{key}_id", None), getattr(dst, f"{key}_id", None)
        if s is not None and d is not None:
            roles.setdefault(s, d)
    out = {}
    for i, b in enumerate(src_bytes):
        token = src_backend.id_to_token(i) if b is None else None
        if token is None:
            continue
        found = by_string.get(token, roles.get(i))
        if found is not None:
            out[i] = found
    return out


def _pad_id(tokenizer) -> int:
    for key in ("pad_token_id", "eos_token_id"):
        if getattr(tokenizer, key, None) is not None:
            return getattr(tokenizer, key)
    return 0


# ----------------------------------------------------------------------------------------------
# Aligning a batch


@dataclass(frozen=True, slots=True)
class Span:
    """One span of one row: student tokens [student_start, student_end) and teacher tokens [teacher_start,
    teacher_end) (positions in the student's and the teacher's row) that stand for the same text. `counted`: its
    student tokens have labels; `reason`: ALIGNED or why not (the module's constants)."""

    row: int
    student_start: int
    student_end: int
    teacher_start: int
    teacher_end: int
    counted: bool
    reason: str

    @property
    def aligned(self) -> bool:
        return self.reason == ALIGNED


@dataclass
class CrossBatch:
    """A student batch as the teacher sees it, and the spans the two sides share.

    teacher_batch: `input_ids`, `labels`, `position_ids`, each [B, Lt] long: the student's documents in the same
        order, re-tokenized; labels are the teacher's ids inside aligned spans, -100 elsewhere; rows padded to the
        longest with the teacher's pad id (label -100, positions restarting at 0 like a packed row's tail).
    student / teacher: the aligned spans as flat prediction rows, span j being the same text on both sides; a
        prediction row is r * (L - 1) + p - 1 for token p of row r (the row of the shifted logits that predicts it),
        L the side's row length.
    spans: every span of the batch (aligned or not), row by row; the aligned ones in span-index order.
    counted_tokens: student tokens the loss counts (a label, and not a row's first token: labels[:, 1:] != -100, as
    objective.count_tokens); aligned_tokens: those of them inside an aligned span.
    """

    teacher_batch: dict[str, torch.Tensor]
    student: SpanIndex
    teacher: SpanIndex
    spans: list[Span]
    counted_tokens: int
    aligned_tokens: int

    @property
    def unaligned_fraction(self) -> float:
        """The share of learned student tokens outside every aligned span (0 when nothing is learned)."""
        return 1.0 - self.aligned_tokens / self.counted_tokens if self.counted_tokens else 0.0


def _utf8_pieces(parts: list[bytes]) -> list[tuple[int, int, bool]]:
    """A text run's tokens (their bytes) as pieces (first token, end token, valid UTF-8): the whole run when it is
    valid; else the tokens holding bytes that are no part of a whole character (a row cut mid-character at its head
    or tail, a student's sample with a stray byte anywhere) in invalid pieces, apart from the valid stretches between
    them, so that one bad byte masks its own tokens, not the whole run. A cut falls only where a token boundary is a
    character boundary."""
    data = b"".join(parts)
    try:
        data.decode()
        return [(0, len(parts), True)]
    except UnicodeDecodeError:
        pass
    good = bytearray(len(data))  # 1: the byte is part of a whole character
    i = 0
    while i < len(data):
        byte = data[i]
        size = 1 if byte < 0x80 else 2 if 0xC0 <= byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else 4
        try:
            data[i : i + size].decode()
        except UnicodeDecodeError:
            i += 1  # a continuation byte without its lead, a lead without its continuation, a byte no UTF-8 has
            continue
        good[i : i + size] = b"\x01" * size
        i += size
    ends = list(accumulate(len(p) for p in parts))
    starts = [0, *ends[:-1]]
    chars = {0, len(data)} | {k for k in range(1, len(data)) if not good[k] or not 0x80 <= data[k] < 0xC0}
    bad = [not all(good[a:b]) for a, b in zip(starts, ends)]
    changed = True
    while changed:  # a good token next to a bad one across a character's middle cannot stand apart: bad too
        changed = False
        for k in range(len(parts) - 1):
            if bad[k] != bad[k + 1] and ends[k] not in chars:
                bad[k] = bad[k + 1] = changed = True
    pieces, a = [], 0
    for k in range(1, len(parts) + 1):
        if k == len(parts) or bad[k] != bad[a]:
            pieces.append((a, k, not bad[a]))
            a = k
    return pieces


def _char_bytes(text: str) -> list[int]:
    """Byte offset of every character boundary of `text` (len(text) + 1 entries)."""
    return [0, *accumulate(len(c.encode()) for c in text)]


def _local_spans(
    student: list[bytes], teacher_ids: list[int], offsets: list[tuple[int, int]], text: str, table: list
) -> list[tuple[int, int, int, int, str | None]]:
    """Spans of one valid text piece: (student start, end, teacher start, end, BYTES_DIFFER or None when the
    teacher's tokens spell the text), token indices local to the piece.

    The student's boundaries are its tokens' byte ends. The teacher's are found by walking the text: a token whose
    bytes are the text's next bytes ends after them; one that is not (normalised text, a dummy prefix, an unknown
    or special token) ends where its character offsets say, and taints its span. Spans close at the boundaries both
    sides share; a zero-width teacher token belongs to the span it starts."""
    data = text.encode()
    ends: list[int] = []
    spelled: list[bool] = []
    pos, chars = 0, None
    for k, tid in enumerate(teacher_ids):
        b = table[tid] if 0 <= tid < len(table) else None
        if b and data.startswith(b, pos):
            pos += len(b)
            spelled.append(True)
        else:
            chars = chars if chars is not None else _char_bytes(text)
            pos = max(pos, chars[offsets[k][1]])
            spelled.append(False)
        ends.append(pos)
    if ends and ends[-1] < len(data):  # the teacher lost the text's end: its last token takes it, tainted
        ends[-1], spelled[-1] = len(data), False
    closed, s0, t0, k = [], 0, 0, 0
    for i, end in enumerate(accumulate(len(b) for b in student)):
        while k < len(ends) and ends[k] < end:
            k += 1
        if k < len(ends) and ends[k] == end:
            closed.append([s0, i + 1, t0, k + 1])
            s0, t0, k = i + 1, k + 1, k + 1
    if s0 < len(student):
        closed.append([s0, len(student), t0, len(ends)])
    elif t0 < len(ends):  # zero-width teacher tokens after the last boundary
        closed[-1][3] = len(ends)
    spans = []
    for a, b, c, d in closed:
        spans.append((a, b, c, d, None if all(spelled[c:d]) else BYTES_DIFFER))
    return spans


def _first_prefixes(spec: dict) -> list[dict]:
    """The Metaspace steps of a backend's JSON `spec` that put a dummy prefix before a text (prepend_scheme
    "first"), as parts of `spec`."""
    return [
        s
        for s in _flat(spec.get("pre_tokenizer"))
        if s.get("type") == "Metaspace" and s.get("prepend_scheme") == "first"
    ]


def _encoder(spec: dict, prefix: bool = True):
    """A private tokenizer built from a backend's JSON `spec` (the caller's keeps its settings): no truncation or
    padding, and text that spells one of its special tokens ("<|eot_id|>" inside a document) encoded as text.
    prefix=False: without a Metaspace dummy prefix (`_first_prefixes` set to "never")."""
    from tokenizers import Tokenizer

    spec = json.loads(json.dumps(spec))
    for step in [] if prefix else _first_prefixes(spec):
        step["prepend_scheme"] = "never"
    encoder = Tokenizer.from_str(json.dumps(spec))
    encoder.no_truncation()
    encoder.no_padding()
    encoder.encode_special_tokens = True
    return encoder


@dataclass(frozen=True, slots=True)
class _Piece:
    """Student tokens [start, end) of one document that the teacher gets as one unit: a special token (text None)
    or text re-tokenized on its own (`valid`: False for characters cut in two, whose span is unaligned)."""

    start: int
    end: int
    counted: bool
    text: str | None
    valid: bool
    leading: bool = False  # the text that begins its document (after nothing but a bos)


class Aligner:
    """Turns a student batch into the teacher's batch and the spans of text both sides share (`CrossBatch`).

    Per row, per document (a document starts where `position_ids` restart; a padding tail is dropped and the
    teacher's row padded instead): the document is cut into runs at special tokens and where the student's label
    mask changes, so a prompt and its body are re-tokenized apart, as they were tokenized. A text run's bytes
    (`token_bytes`) are decoded and encoded by the teacher (special strings in the text stay text; a Metaspace dummy
    prefix only on the text that begins a document, after nothing or its bos); a special token becomes the teacher's
    token of the same string, else of the same role (bos, eos, unk, pad), else nothing (it is left out of the
    teacher's row and its span is unaligned). A run that is not valid UTF-8 (a row cut mid-character, a sample with a
    stray byte) has the tokens holding the broken bytes in unaligned spans of their own (the teacher sees the same
    bytes as its byte tokens where it has one for each, else U+FFFD), the valid text around them re-tokenized apart.

    A span is aligned when both sides have a token, both sides' bytes are the text's, every token in it is learned
    and neither side's first token starts its document (nothing predicts it); `Span.reason` says which rule failed.
    """

    def __init__(self, student_tokenizer, teacher_tokenizer):
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.student_bytes = token_bytes(student_tokenizer)
        self.teacher_bytes = token_bytes(teacher_tokenizer)
        self.special = _counterparts(student_tokenizer, teacher_tokenizer, self.student_bytes, self.teacher_bytes)
        self.student_pad = student_tokenizer.pad_token_id
        self.teacher_pad = _pad_id(teacher_tokenizer)
        # The teacher's token of each single byte (byte-level BPE, byte fallback): what a broken character becomes
        self.teacher_byte_ids: dict[int, int] = {}
        for tid, spelled in enumerate(self.teacher_bytes):
            if spelled is not None and len(spelled) == 1:
                self.teacher_byte_ids.setdefault(spelled[0], tid)
        self.student_bos = student_tokenizer.bos_token_id
        spec = json.loads(_backend(teacher_tokenizer).to_str())
        self._leading = _encoder(spec)
        # Re-tokenizing a document run by run must not give every run the dummy prefix a Metaspace tokenizer
        # (prepend_scheme "first") puts before a text's first word: only the text that begins a document gets it,
        # as the teacher's own tokenizer would give it; a later run continues the document's text.
        self._continuing = _encoder(spec, prefix=False) if _first_prefixes(spec) else self._leading

    def __call__(self, batch: dict[str, torch.Tensor], label_counted: bool = False) -> CrossBatch:
        """`batch`: the student's `input_ids`, `labels` and (packed rows) `position_ids`, each [B, L] long; without
        `position_ids` every row is one document. `label_counted`: the teacher's batch labels every token of a
        counted span that stands for its text (aligned or not: what a model trained on that batch learns, as a
        store read by another tokenizer needs), not only the aligned spans' tokens."""
        ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
        length = len(ids[0]) if ids else 0
        positions = batch["position_ids"].tolist() if "position_ids" in batch else [list(range(length))] * len(ids)
        layout = [self._pieces(ids[r], labels[r], positions[r]) for r in range(len(ids))]
        # Every text piece of the batch goes to the teacher's tokenizer in one call per kind (leading, continuing).
        pieces = [piece for docs in layout for _, row_pieces in docs for piece in row_pieces if piece.text is not None]
        encodings = {}
        for leading, encoder in ((True, self._leading), (False, self._continuing)):
            mine = [piece for piece in pieces if piece.leading == leading]
            if mine:
                found = encoder.encode_batch([piece.text for piece in mine], add_special_tokens=False)
                encodings.update(zip(map(id, mine), found))
        spans: list[Span] = []
        teacher_rows = [self._teacher_row(r, ids[r], docs, encodings, spans) for r, docs in enumerate(layout)]
        return self._assemble(batch, spans, teacher_rows, length, label_counted)

    def _pieces(self, ids: list[int], labels: list[int], positions: list[int]) -> list[tuple[int, list[_Piece]]]:
        """A row's documents, each (its first position, its pieces): special tokens one by one, text runs cut
        where the label mask changes and apart from any characters cut in two; the padding tail (a last
        document of pad tokens with no label) is left out."""
        table, docs = self.student_bytes, []
        starts = [p for p, q in enumerate(positions) if q == 0 or p == 0]
        for d0, d1 in zip(starts, [*starts[1:], len(ids)]):
            if d1 == len(ids) and all(i == self.student_pad for i in ids[d0:d1]):
                if all(label == IGNORE_INDEX for label in labels[d0:d1]):
                    break
            pieces, p = [], d0
            while p < d1:
                counted = labels[p] != IGNORE_INDEX
                if not 0 <= ids[p] < len(table) or table[ids[p]] is None:
                    pieces.append(_Piece(p, p + 1, counted, None, True))
                    p += 1
                    continue
                q = p + 1
                while q < d1 and 0 <= ids[q] < len(table) and table[ids[q]] is not None:
                    if (labels[q] != IGNORE_INDEX) != counted:
                        break
                    q += 1
                parts = [table[i] for i in ids[p:q]]
                leading = p == d0 or (p == d0 + 1 and ids[d0] == self.student_bos)
                for a, b, valid in _utf8_pieces(parts):
                    text = b"".join(parts[a:b]).decode(errors="replace")
                    pieces.append(_Piece(p + a, p + b, counted, text, valid, leading and a == 0))
                p = q
            docs.append((d0, pieces))
        return docs

    def _teacher_row(self, r: int, ids: list[int], docs: list, encodings, spans: list[Span]) -> tuple[list, list]:
        """Row r's teacher ids and positions; its spans are appended to `spans`."""
        t_ids: list[int] = []
        t_positions: list[int] = []
        for d0, pieces in docs:
            t_doc = len(t_ids)
            for piece in pieces:
                q0 = len(t_ids)
                if piece.text is None:  # a special token
                    mapped = self.special.get(ids[piece.start])
                    t_ids += [] if mapped is None else [mapped]
                    local = [(0, 1, 0, len(t_ids) - q0, NO_COUNTERPART if mapped is None else None)]
                else:
                    enc = encodings[id(piece)]
                    parts = [self.student_bytes[i] for i in ids[piece.start : piece.end]]
                    if piece.valid:
                        t_ids += enc.ids
                        local = _local_spans(parts, enc.ids, enc.offsets, piece.text, self.teacher_bytes)
                    else:  # the same bytes in the teacher's byte tokens where it has them, else U+FFFD as encoded
                        raw = [self.teacher_byte_ids.get(x) for x in b"".join(parts)]
                        t_ids += enc.ids if None in raw else raw
                        local = [(0, piece.end - piece.start, 0, len(t_ids) - q0, NOT_UTF8)]
                for a, b, c, d, problem in local:
                    s0, t0 = piece.start + a, q0 + c
                    if problem is None and d == c:
                        problem = NO_TEACHER_TOKEN
                    if problem is None and not piece.counted:
                        problem = NOT_COUNTED
                    if problem is None and (s0 == d0 or t0 == t_doc):
                        problem = DOCUMENT_START
                    spans.append(Span(r, s0, piece.start + b, t0, q0 + d, piece.counted, problem or ALIGNED))
            t_positions += range(len(t_ids) - t_doc)
        return t_ids, t_positions

    def _assemble(
        self, batch: dict, spans: list[Span], teacher_rows: list, length: int, label_counted: bool
    ) -> CrossBatch:
        """The padded teacher batch, its labels in the aligned spans (label_counted: in every counted span whose
        teacher tokens are whole characters), and both sides' flat span indices."""
        as_long = {"dtype": torch.long, "device": batch["input_ids"].device}
        width = max((len(t) for t, _ in teacher_rows), default=0)
        t_ids = [t + [self.teacher_pad] * (width - len(t)) for t, _ in teacher_rows]
        t_positions = [p + list(range(width - len(p))) for _, p in teacher_rows]
        t_labels = [[IGNORE_INDEX] * width for _ in teacher_rows]
        index = {"student": ([], [], [], length - 1), "teacher": ([], [], [], width - 1)}
        counted = aligned = 0
        for span in spans:
            # What the loss counts: a row's first token has a label but nothing predicts it (labels[:, 1:]).
            counted += span.student_end - span.student_start - (span.student_start == 0) if span.counted else 0
            if span.aligned or (label_counted and span.counted and span.reason != NOT_UTF8):
                t_labels[span.row][span.teacher_start : span.teacher_end] = t_ids[span.row][
                    span.teacher_start : span.teacher_end
                ]
            if not span.aligned:
                continue
            aligned += span.student_end - span.student_start
            j = len(index["student"][0])
            for side, start, end in (
                ("student", span.student_start, span.student_end),
                ("teacher", span.teacher_start, span.teacher_end),
            ):
                first, rest, rest_span, stride = index[side]
                row = span.row * stride - 1  # token p is predicted by the shifted logits' row p - 1
                first.append(row + start)
                rest += range(row + start + 1, row + end)
                rest_span += [j] * (end - start - 1)

        def spans_of(side: str) -> SpanIndex:
            first, rest, rest_span, _ = index[side]
            return SpanIndex(
                first=torch.tensor(first, **as_long),
                rest=torch.tensor(rest, **as_long),
                rest_span=torch.tensor(rest_span, **as_long),
            )

        teacher_batch = {
            key: torch.tensor(values, **as_long).reshape(len(values), width)
            for key, values in (("input_ids", t_ids), ("labels", t_labels), ("position_ids", t_positions))
        }
        return CrossBatch(teacher_batch, spans_of("student"), spans_of("teacher"), spans, counted, aligned)


# ----------------------------------------------------------------------------------------------
# The vocabulary map


@dataclass(frozen=True)
class VocabMap:
    """teacher_to_student: [Vt] long, per teacher id the student id that stands for the same bytes (special
    tokens: the same string, else the same role), -1 where there is none. Vt = len(token_bytes(teacher))."""

    teacher_to_student: torch.Tensor
    student_size: int

    @property
    def teacher_size(self) -> int:
        return len(self.teacher_to_student)

    @property
    def teacher_coverage(self) -> float:
        """The share of the teacher's ids with a student counterpart."""
        return float((self.teacher_to_student >= 0).sum()) / max(self.teacher_size, 1)

    @property
    def student_coverage(self) -> float:
        """The share of the student's ids that some teacher id maps to."""
        hit = self.teacher_to_student[self.teacher_to_student >= 0].unique().numel()
        return hit / max(self.student_size, 1)

    def describe(self) -> str:
        """The vocabulary overlap as a phrase of the startup summary."""
        return (
            f"same bytes: {self.teacher_coverage:.1%} of the teacher's {self.teacher_size:,} ids, "
            f"{self.student_coverage:.1%} of the student's {self.student_size:,}"
        )


def _build_map(student_tokenizer, teacher_tokenizer) -> list[int]:
    s_bytes, t_bytes = token_bytes(student_tokenizer), token_bytes(teacher_tokenizer)
    by_bytes: dict[bytes, int] = {}
    # The piece a tokenizer produces wins over a byte-fallback piece of the same byte ("A" over "<0x41>").
    student_backend = _backend(student_tokenizer)
    fallback = [_BYTE_PIECE.fullmatch(student_backend.id_to_token(i) or "") is not None for i in range(len(s_bytes))]
    for i, b in sorted(enumerate(s_bytes), key=lambda item: fallback[item[0]]):
        if b is not None:
            by_bytes.setdefault(b, i)
    special = _counterparts(teacher_tokenizer, student_tokenizer, t_bytes, s_bytes)
    return [special.get(i, -1) if b is None else by_bytes.get(b, -1) for i, b in enumerate(t_bytes)]


def _map_digest(values: list[int]) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def _read_map(path: Path, student_hash: str, teacher_hash: str, student_size: int, teacher_size: int) -> list | None:
    """The cached map, or None when the file is missing or not exactly what was written for this pair."""
    try:
        cached = json.loads(path.read_text())
        values = cached["teacher_to_student"]
        ok = (
            cached["student"] == student_hash
            and cached["teacher"] == teacher_hash
            and cached["student_size"] == student_size
            and len(values) == teacher_size
            and cached["sha256"] == _map_digest(values)
            and all(isinstance(v, int) and -1 <= v < student_size for v in values)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return values if ok else None


def vocab_map(student_tokenizer, teacher_tokenizer, cache_dir: Path | None = None) -> VocabMap:
    """The map from teacher ids to student ids of the same bytes (`VocabMap`). With `cache_dir` it is built once per
    pair of tokenizers (keyed by both `tokenizer_hash`es) and read back after; a cache file that does not check out
    (unreadable, another pair, a wrong digest) is rebuilt and replaced."""
    student_size = len(token_bytes(student_tokenizer))
    teacher_size = len(token_bytes(teacher_tokenizer))
    values = None
    if cache_dir is not None:
        s_hash, t_hash = tokenizer_hash(student_tokenizer), tokenizer_hash(teacher_tokenizer)
        path = Path(cache_dir) / f"vocab-map-{s_hash[:16]}-{t_hash[:16]}.json"
        values = _read_map(path, s_hash, t_hash, student_size, teacher_size)
    if values is None:
        values = _build_map(student_tokenizer, teacher_tokenizer)
        if cache_dir is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            record = {"student": s_hash, "teacher": t_hash, "student_size": student_size}
            record.update(teacher_to_student=values, sha256=_map_digest(values))
            # Ranks that build the same map at once each write a temporary file of their own.
            atomic_write_text(path, json.dumps(record), tmp_suffix=f".tmp-{socket.gethostname()}-{os.getpid()}")
    return VocabMap(torch.tensor(values, dtype=torch.long), student_size)


def alignment_sample(aligner: Aligner, batches: Iterable[dict]) -> tuple[int, int]:
    """(learned tokens, of them inside aligned spans) over `batches` (a few sample student batches): the startup
    check's figures (cross_teacher.startup_check)."""
    counted = aligned = 0
    for batch in batches:
        cross = aligner(batch)
        counted, aligned = counted + cross.counted_tokens, aligned + cross.aligned_tokens
    return counted, aligned
