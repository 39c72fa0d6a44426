"""Cross-tokenizer alignment (distributed_distill/cross_tokenizer.py): what each token's bytes are, the teacher's batch
for a student batch, the spans both sides share and the rules that leave a span unaligned, the flat prediction rows,
and the vocabulary map with its cache.

Three tokenizers are trained here on a small corpus of hard text (accents, 4-byte emoji, CJK, code with tabs and runs
of spaces, numbers, two chat families): byte-level BPE with 300 ids and ChatML markers ("a"), byte-level BPE with 800
ids and no chat markers ("b"; "b_chat" is it with the ChatML markers added), and a sentencepiece-like BPE
("sp": NFKC, Metaspace with a dummy prefix, byte fallback, Llama-3 chat markers).
"""

from __future__ import annotations

import json

import pytest
import torch

from distributed_distill import cross_tokenizer
from distributed_distill.config import DataConfig
from distributed_distill.cross_tokenizer import (
    ALIGNED,
    BYTES_DIFFER,
    DOCUMENT_START,
    NO_COUNTERPART,
    NO_TEACHER_TOKEN,
    NOT_COUNTED,
    NOT_UTF8,
    Aligner,
    alignment_sample,
    token_bytes,
    vocab_map,
)
from distributed_distill.data.batching import IGNORE_INDEX, pack_documents
from distributed_distill.data.documents import DocKind
from distributed_distill.data.packed import tokenize_batch
from distributed_distill.tokenizer import CHAT_TOKENS, train_bpe_tokenizer

HARD = [
    "Café naïve résumé — déjà vu, Ångström, Straße, señor.",
    "Emoji: 😀🎉👍🏽 and 🇫🇷 flags, 🤖 too.",
    "日本語のテキストと中文字符，한국어도 있어요。",
    "def f(x):\n\tif x  >  1:\n\t\treturn x    *  3.14159\n    return -42  # spaces\t\ttabs",
    "Numbers: 1234567890 3.14159 2,718 0x1F 1e-9 2024-01-31 +44 (0)20 7946 0958",
    "The ﬁne print: ＡＢＣ１２３ ① ligatures and full-width text.",
]
CONVERSATIONS = [
    [
        {"role": "user", "content": "Écris une fonction 😀 qui additionne 12 et 345."},
        {"role": "assistant", "content": "def add(a, b):\n    return a  +  b  # 日本語\n\nadd(12, 345) == 357"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is ﬁve plus ①?"},
        {"role": "assistant", "content": "Six. 🎉"},
        {"role": "user", "content": "And in Straße?"},
        {"role": "assistant", "content": "Sechs, señor\t(6)."},
    ],
]
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def corpus() -> list[str]:
    chats = [
        "".join(f"{marks[0]}{m['role']}{marks[1]}{m['content']}{marks[2]}" for m in conv)
        for conv in CONVERSATIONS
        for marks in (("<|im_start|>", "\n", "<|im_end|>\n"), ("<|start_header_id|>", "<|end_header_id|>\n\n", ""))
    ]
    filler = [f"Line {i}: the quick brown fox jumps over the lazy dog {i * 37}." for i in range(40)]
    return (HARD + chats) * 8 + filler


def train_sp(out, vocab_size: int = 500):
    """A sentencepiece-like BPE: NFKC, Metaspace with a dummy prefix ("first"), byte fallback (the <0xNN> pieces
    added after training, as sentencepiece has them), Llama-3 chat markers as special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", *LLAMA3, "<|pad|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, limit_alphabet=70)
    tok.train_from_iterator(corpus(), trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {  # Llama-2's: "▁" is a space, <0xNN> a byte, the dummy prefix stripped when decoding
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        unk_token="<unk>",
        pad_token="<|pad|>",
        additional_special_tokens=LLAMA3[2:],
    )
    fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(out)
    return fast


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("alignment")
    a = train_bpe_tokenizer(iter(corpus()), 300, tmp / "a", chat=True)
    b = train_bpe_tokenizer(iter(corpus()), 800, tmp / "b")
    b_chat = AutoTokenizer.from_pretrained(tmp / "b")
    b_chat.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    return {"a": a, "b": b, "b_chat": b_chat, "sp": train_sp(tmp / "sp")}


# ----------------------------------------------------------------------------------------------
# Student batches, as the data pipeline makes them


def rows_of(tok, docs: list) -> dict:
    """Tokenized documents (tokenize_batch's rows): a str is text, a (prompt, completion) pair a prompted text, a
    list of turns a conversation through the tokenizer's chat template."""
    out = {"input_ids": [], "labels": [], "status": []}
    for doc in docs:
        if isinstance(doc, str):
            kind, batch, dcfg = DocKind.TEXT, {"id": ["d"], "text": [doc]}, DataConfig(seq_len=4096)
        elif isinstance(doc, tuple):
            kind, batch = DocKind.PROMPT, {"id": ["d"], "prompt": [doc[0]], "completion": [doc[1]]}
            dcfg = DataConfig(seq_len=4096, prompt_field="prompt", completion_field="completion")
        else:
            kind, batch, dcfg = DocKind.CHAT, {"id": ["d"], "messages": [doc]}, DataConfig(seq_len=4096)
        rows = tokenize_batch(batch, tok, dcfg, kind)
        for key in out:
            out[key] += rows[key]
    return out


def student_batch(tok, docs: list, seq_len: int, packing: bool = True) -> dict[str, torch.Tensor]:
    packed = pack_documents(rows_of(tok, docs), DataConfig(seq_len=seq_len, packing=packing), tok.pad_token_id, False)
    return {key: torch.tensor(packed[key], dtype=torch.long) for key in ("input_ids", "labels", "position_ids")}


def documents_for(name: str) -> list:
    docs = [" ".join(HARD), ("Question: ﬁx ① and 😀?", " Answer:\tcafé  😀 12345\n"), HARD[3]]
    return docs if name == "b" else [*docs, *CONVERSATIONS]


PAIRS = [("a", "b"), ("b", "a"), ("a", "sp"), ("sp", "a"), ("sp", "b_chat"), ("a", "b_chat")]


@pytest.fixture(scope="module")
def aligned(toks):
    """(student, teacher) -> (student batch, CrossBatch): every document of documents_for in packed 96-token rows
    (documents cut at row ends, as packing cuts text), the last row with padding."""
    out = {}
    for s, t in PAIRS:
        batch = student_batch(toks[s], documents_for(s), seq_len=96)
        out[s, t] = batch, Aligner(toks[s], toks[t])(batch)
    return out


def joined(table, ids) -> bytes | None:
    parts = [table[i] for i in ids]
    return None if any(p is None for p in parts) else b"".join(parts)


def document_starts(positions: list[int]) -> list[int]:
    return [p for p, q in enumerate(positions) if q == 0]


# ----------------------------------------------------------------------------------------------
# token_bytes


def test_token_bytes_read_each_convention(toks):
    a, sp = toks["a"], toks["sp"]
    a_bytes, sp_bytes = token_bytes(a), token_bytes(sp)
    assert a_bytes[a.convert_tokens_to_ids("Ġ")] == b" " and a_bytes[a.convert_tokens_to_ids("Ċ")] == b"\n"
    assert sp_bytes[sp.convert_tokens_to_ids("▁")] == b" "
    assert (
        sp_bytes[sp.convert_tokens_to_ids("<0xF0>")] == b"\xf0"
        and sp_bytes[sp.convert_tokens_to_ids("<0x0A>")] == b"\n"
    )
    for tok in (a, sp):
        assert all(token_bytes(tok)[i] is None for i in tok.all_special_ids)
    assert all(a_bytes[a.convert_tokens_to_ids(t)] is None for t in CHAT_TOKENS)
    assert all(sp_bytes[sp.convert_tokens_to_ids(t)] is None for t in LLAMA3)
    import unicodedata

    for text in HARD:
        # Byte-level BPE spells the text byte for byte; the sentencepiece-like one its NFKC form, spaces as "▁",
        # characters outside its alphabet as <0xNN> pieces, and a dummy prefix space.
        assert joined(a_bytes, a(text, add_special_tokens=False)["input_ids"]) == text.encode()
        ids = sp(text, add_special_tokens=False)["input_ids"]
        assert joined(sp_bytes, ids) == (" " + unicodedata.normalize("NFKC", text)).encode()
    assert any(_is_byte_piece(sp.convert_ids_to_tokens(i)) for i in sp(HARD[1], add_special_tokens=False)["input_ids"])


def _is_byte_piece(token: str) -> bool:
    return token.startswith("<0x") and token.endswith(">")


# ----------------------------------------------------------------------------------------------
# Spans


@pytest.mark.parametrize("pair", PAIRS, ids="->".join)
def test_aligned_spans_are_the_same_text(toks, aligned, pair):
    """Every aligned span stands for the same bytes on both sides, the source text's slice at its place in the
    row; decoded, each side gives that text (where it is whole characters); spans tile both rows."""
    s, t = pair
    batch, cross = aligned[pair]
    s_bytes, t_bytes = token_bytes(toks[s]), token_bytes(toks[t])
    t_ids = cross.teacher_batch["input_ids"].tolist()
    multi = 0
    for r, ids in enumerate(batch["input_ids"].tolist()):
        spans = [span for span in cross.spans if span.row == r]
        # The spans tile the row: the student's up to its padding tail, the teacher's whole row up to its padding.
        assert [x.student_start for x in spans] == [0] + [x.student_end for x in spans[:-1]]
        assert [x.teacher_start for x in spans] == [0] + [x.teacher_end for x in spans[:-1]]
        text = [s_bytes[i] or b"" for i in ids]  # the row's text: what its tokens spell
        offset = [0, *torch.tensor([len(b) for b in text]).cumsum(0).tolist()]
        row_text = b"".join(text)
        for span in spans:
            if not span.aligned:
                continue
            mine = joined(s_bytes, ids[span.student_start : span.student_end])
            theirs = joined(t_bytes, t_ids[r][span.teacher_start : span.teacher_end])
            if mine is None:  # a special token and its counterpart
                assert span.student_end - span.student_start == 1 and span.teacher_end - span.teacher_start == 1
                continue
            assert mine == theirs == row_text[offset[span.student_start] : offset[span.student_end]]
            assert mine
            multi += (span.student_end - span.student_start) + (span.teacher_end - span.teacher_start) > 2
            try:
                expected = mine.decode()
            except UnicodeDecodeError:
                continue  # part of a character: nothing to decode
            for name, span_ids in (
                (s, ids[span.student_start : span.student_end]),
                (t, t_ids[r][span.teacher_start : span.teacher_end]),
            ):
                got = toks[name].decode(span_ids, clean_up_tokenization_spaces=False)
                # The sentencepiece-like decoder strips a leading space (its dummy prefix) from what it decodes.
                assert got == (expected[1:] if name == "sp" and expected.startswith(" ") else expected)
    assert multi > 0  # the two tokenizations really differ: some spans merge tokens
    assert cross.aligned_tokens > 0.5 * cross.counted_tokens


def verdict(span, s_ids, t_ids, s_labels, s_positions, t_positions, s_bytes, t_bytes, mapped) -> str:
    """The rules, written out independently of the implementation: the reason a span is (not) aligned."""
    s = s_ids[span.student_start : span.student_end]
    t = t_ids[span.teacher_start : span.teacher_end]
    special = len(s) == 1 and s_bytes[s[0]] is None
    counted = {label != IGNORE_INDEX for label in s_labels[span.student_start : span.student_end]}
    assert counted == {span.counted}  # a span is all learned or all not
    if special and not t:
        return NO_COUNTERPART
    if not t:
        return NO_TEACHER_TOKEN
    if special:
        assert t == [mapped[s[0]]]
    elif joined(s_bytes, s) != joined(t_bytes, t):
        return BYTES_DIFFER
    if not span.counted:
        return NOT_COUNTED
    if s_positions[span.student_start] == 0 or t_positions[span.teacher_start] == 0:
        return DOCUMENT_START
    return ALIGNED


@pytest.mark.parametrize("pair", PAIRS, ids="->".join)
def test_unaligned_spans_are_the_ones_the_rules_name(toks, aligned, pair):
    s, t = pair
    batch, cross = aligned[pair]
    aligner = Aligner(toks[s], toks[t])
    s_bytes, t_bytes = token_bytes(toks[s]), token_bytes(toks[t])
    tb = cross.teacher_batch
    for span in cross.spans:
        r = span.row
        if span.reason == NOT_UTF8:  # a row cut mid-character: tokens holding part of one
            assert joined(s_bytes, batch["input_ids"][r, span.student_start : span.student_end].tolist())[0] >= 0x80
            continue
        expected = verdict(
            span,
            batch["input_ids"][r].tolist(),
            tb["input_ids"][r].tolist(),
            batch["labels"][r].tolist(),
            batch["position_ids"][r].tolist(),
            tb["position_ids"][r].tolist(),
            s_bytes,
            t_bytes,
            aligner.special,
        )
        assert span.reason == expected, span
    assert cross.counted_tokens == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # what the loss counts
    assert cross.aligned_tokens == sum(x.student_end - x.student_start for x in cross.spans if x.aligned)


def reasons_of(cross, batch, tok, token: str) -> set[tuple[str, bool]]:
    """(reason, counted) of the spans holding the student's `token`."""
    tid = tok.convert_tokens_to_ids(token)
    ids = batch["input_ids"].tolist()
    return {(x.reason, x.counted) for x in cross.spans if ids[x.row][x.student_start] == tid}


def test_chat_markers_align_only_with_a_counterpart(toks):
    a = toks["a"]
    batch = student_batch(a, [CONVERSATIONS[1]], seq_len=128)
    none = Aligner(a, toks["b"])(batch)
    assert reasons_of(none, batch, a, "<|im_end|>") == {(NO_COUNTERPART, True), (NO_COUNTERPART, False)}
    assert reasons_of(none, batch, a, "<|im_start|>") == {(NO_COUNTERPART, False)}
    markers = {a.convert_tokens_to_ids(t) for t in CHAT_TOKENS}
    dropped = [x for x in none.spans if batch["input_ids"][0, x.student_start].item() in markers]
    assert len(dropped) == 10 and all(
        x.teacher_start == x.teacher_end for x in dropped
    )  # left out of the teacher's row
    same = Aligner(a, toks["b_chat"])(batch)
    assert reasons_of(same, batch, a, "<|im_end|>") == {(ALIGNED, True), (NOT_COUNTED, False)}
    assert reasons_of(same, batch, a, "<|im_start|>") == {(NOT_COUNTED, False)}
    b_chat, t_ids = toks["b_chat"], same.teacher_batch["input_ids"][0].tolist()
    assert t_ids.count(b_chat.convert_tokens_to_ids("<|im_end|>")) == 5
    assert t_ids.count(b_chat.convert_tokens_to_ids("<|im_start|>")) == 5
    # Llama-3 markers have no ChatML counterpart either way; bos and eos are mapped by role.
    sp = toks["sp"]
    batch = student_batch(sp, [CONVERSATIONS[0], "plain text"], seq_len=128)
    cross = Aligner(sp, toks["b_chat"])(batch)
    assert reasons_of(cross, batch, sp, "<|eot_id|>") == {(NO_COUNTERPART, True), (NO_COUNTERPART, False)}
    assert reasons_of(cross, batch, sp, "<|end_of_text|>") == {(ALIGNED, True)}
    assert cross.teacher_batch["input_ids"][0].tolist().count(toks["b_chat"].bos_token_id) == 2


def test_normalised_text_and_dummy_prefix_are_unaligned_but_counted(toks):
    a, sp = toks["a"], toks["sp"]
    text = "Hello ﬁne ①, plain words."
    batch = student_batch(a, [text], seq_len=64)
    cross = Aligner(a, sp)(batch)
    ids, a_bytes = batch["input_ids"][0].tolist(), token_bytes(a)
    by_text = {joined(a_bytes, ids[x.student_start : x.student_end]): x for x in cross.spans if x.student_start}
    # The text begins its document: the teacher puts its dummy prefix before "Hello", a space the text lacks.
    first = next(x for x in cross.spans if x.student_start == 1)
    assert first.reason == BYTES_DIFFER and first.counted
    differ = b"".join(k for k, x in by_text.items() if x.reason == BYTES_DIFFER)
    assert "ﬁ".encode() in differ and "①".encode() in differ  # NFKC turns them into "fi" and "1"
    circled = next(x.student_end for k, x in by_text.items() if "①".encode() in k)
    assert all(x.aligned for x in cross.spans if x.student_start >= circled)  # ", plain words." and the eos
    assert 0 < cross.unaligned_fraction < 0.7
    # A later run of the same document gets no dummy prefix: the body after a prompt aligns from its first token.
    batch = student_batch(a, [("Hello", "world is here")], seq_len=64)
    cross = Aligner(a, sp)(batch)
    body = next(x for x in cross.spans if x.counted)
    assert body.reason == ALIGNED and body.student_start == 1 + len(a("Hello", add_special_tokens=False)["input_ids"])


def test_special_strings_in_text_stay_text(toks):
    a, sp = toks["a"], toks["sp"]
    batch = student_batch(a, ["the text <|eot_id|> and <|begin_of_text|> inside"], seq_len=64)
    cross = Aligner(a, sp)(batch)
    teacher = cross.teacher_batch["input_ids"][0].tolist()
    assert teacher.count(sp.convert_tokens_to_ids("<|eot_id|>")) == 0
    assert teacher.count(sp.bos_token_id) == 1  # the student's own bos, mapped by role
    assert cross.unaligned_fraction < 0.5


def test_a_row_cut_mid_character(toks):
    a, b = toks["a"], toks["b"]
    ids = a(" ".join(HARD), add_special_tokens=False)["input_ids"]
    table = token_bytes(a)
    cut = next(k for k in range(1, len(ids)) if table[ids[k]][0] & 0xC0 == 0x80)  # a token continuing a character
    end = next(k for k in range(cut + 60, len(ids)) if table[ids[k]][0] & 0xC0 == 0x80)
    row = ids[cut:end]  # starts and ends inside a character, as a row of a long document cut by packing does
    batch = {
        "input_ids": torch.tensor([row]),
        "labels": torch.tensor([row]),
        "position_ids": torch.arange(len(row))[None],
    }
    cross = Aligner(a, b)(batch)
    assert cross.spans[0].reason == NOT_UTF8 and cross.spans[-1].reason == NOT_UTF8
    assert sum(x.aligned for x in cross.spans) > 5
    assert all(x.reason in (ALIGNED, NOT_UTF8) for x in cross.spans[1:-1])


def test_same_tokenizer_is_the_identity(toks):
    for name in ("a", "sp"):
        tok = toks[name]
        docs = documents_for(name)
        longest = max(len(ids) for ids in rows_of(tok, docs)["input_ids"])
        batch = student_batch(tok, docs, seq_len=longest, packing=False)  # one row per document, the longest full
        cross = Aligner(tok, tok)(batch)
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(cross.teacher_batch[key], batch[key]), (name, key)
        assert all(x.student_end - x.student_start == 1 == x.teacher_end - x.teacher_start for x in cross.spans)
        assert cross.unaligned_fraction == 0.0 and cross.counted_tokens > 0
        assert torch.equal(cross.student.first, cross.teacher.first) and cross.student.rest.numel() == 0


def test_packed_documents_and_padding(toks):
    a, b = toks["a"], toks["b"]
    docs = [("Prompt: café 😀?", " Answer:\t12345 日本語"), CONVERSATIONS[0], "Short text."]
    total = sum(len(ids) for ids in rows_of(a, docs)["input_ids"])
    batch = student_batch(a, docs, seq_len=total + 8)  # one row: three documents and 8 tokens of padding
    assert batch["input_ids"].shape[0] == 1 and (batch["input_ids"][0, -8:] == a.pad_token_id).all()
    cross = Aligner(a, b)(batch)
    tb = cross.teacher_batch
    s_pos, t_pos = batch["position_ids"][0].tolist(), tb["position_ids"][0].tolist()
    s_starts, t_starts = document_starts(s_pos), document_starts(t_pos)
    assert len(s_starts) == 4  # three documents and the padding tail
    # The teacher's documents: each begins where the spans of a student document begin; positions count up in it.
    firsts = {x.student_start: x.teacher_start for x in cross.spans}
    assert t_starts == [firsts[p] for p in s_starts[:3]]
    assert all(t_pos[q] == t_pos[q - 1] + 1 for q in range(1, len(t_pos)) if q not in t_starts)
    assert tb["input_ids"].shape == tb["labels"].shape == tb["position_ids"].shape
    labels = batch["labels"][0].tolist()
    for x in cross.spans:
        assert x.student_end <= s_starts[3]  # nothing in the padding tail
        assert all(s_pos[p] == s_pos[p - 1] + 1 for p in range(x.student_start + 1, x.student_end))
        assert all(t_pos[q] == t_pos[q - 1] + 1 for q in range(x.teacher_start + 1, x.teacher_end))
        if x.aligned:  # never a prompt token
            assert all(labels[p] != IGNORE_INDEX for p in range(x.student_start, x.student_end))
    # Two rows of different teacher lengths: the shorter padded with the teacher's pad, unlabelled.
    batch = student_batch(a, [" ".join(HARD), "x"], seq_len=1024, packing=False)
    tb = Aligner(a, b)(batch).teacher_batch
    short = tb["input_ids"][1].tolist()
    n = len(b("x", add_special_tokens=False)["input_ids"]) + 2
    assert short[n:] == [b.pad_token_id] * (len(short) - n)
    assert (tb["labels"][1, n:] == IGNORE_INDEX).all()
    assert tb["position_ids"][1, n:].tolist() == list(range(len(short) - n))


@pytest.mark.parametrize("pair", PAIRS, ids="->".join)
def test_flat_rows_predict_the_spans_tokens(aligned, pair):
    batch, cross = aligned[pair]
    aligned_spans = [x for x in cross.spans if x.aligned]
    for side, labels, ids, start in (
        (cross.student, batch["labels"], batch["input_ids"], "student_start"),
        (cross.teacher, cross.teacher_batch["labels"], cross.teacher_batch["input_ids"], "teacher_start"),
    ):
        width = ids.shape[1]
        shifted = labels[:, 1:].reshape(-1)
        assert side.num_spans == len(aligned_spans)
        firsts = torch.tensor([ids[x.row, getattr(x, start)] for x in aligned_spans], dtype=torch.long)
        assert torch.equal(shifted[side.first], firsts)
        assert torch.equal(
            side.first, torch.tensor([x.row * (width - 1) + getattr(x, start) - 1 for x in aligned_spans])
        )
        assert (shifted[side.rest] != IGNORE_INDEX).all()
        rest_flat = (torch.arange(ids.numel()).reshape(ids.shape)[:, 1:]).reshape(-1)
        assert torch.equal(ids.reshape(-1)[rest_flat[side.rest]], shifted[side.rest])
        end = "student_end" if start == "student_start" else "teacher_end"
        lengths = torch.tensor([getattr(x, end) - getattr(x, start) - 1 for x in aligned_spans])
        assert torch.equal(torch.bincount(side.rest_span, minlength=len(aligned_spans)), lengths)
    # Teacher labels: set exactly on the aligned spans' tokens.
    t_labels = cross.teacher_batch["labels"]
    assert int((t_labels != IGNORE_INDEX).sum()) == sum(x.teacher_end - x.teacher_start for x in aligned_spans)


# ----------------------------------------------------------------------------------------------
# The vocabulary map


def constructed_pair():
    """A byte-level vocabulary and a sentencepiece-like one built by hand, so the map is known:

    byte-level (student): <|bos|> Ġthe the a Ġ Ã©(é) ðŁĺĢ(😀) zz A
    sentencepiece (teacher): <unk> <s> ▁the the <0x61> ▁ é <0xC3> q <|im_end|> A <0x41>
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bl_vocab = ["<|bos|>", "Ġthe", "the", "a", "Ġ", "Ã©", "ðŁĺĢ", "zz", "A"]
    bl = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(bl_vocab)}, merges=[]))
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    student = PreTrainedTokenizerFast(tokenizer_object=bl, bos_token="<|bos|>")
    sp_vocab = ["<unk>", "<s>", "▁the", "the", "<0x61>", "▁", "é", "<0xC3>", "q", "<|im_end|>", "A", "<0x41>"]
    sp = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(sp_vocab)}, merges=[], unk_token="<unk>", byte_fallback=True)
    )
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    teacher = PreTrainedTokenizerFast(
        tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", additional_special_tokens=["<|im_end|>"]
    )
    return student, teacher


def test_vocab_map_matches_bytes():
    student, teacher = constructed_pair()
    assert len(token_bytes(student)) == 9 and len(token_bytes(teacher)) == 12
    vmap = vocab_map(student, teacher, None)
    # <unk>: no unk in the student; <s> -> <|bos|> by role; ▁the -> Ġthe; <0x61> -> a; ▁ -> Ġ; é -> Ã©; a lone
    # 0xC3 byte, q and <|im_end|> have no student token; A and <0x41> -> A.
    assert vmap.teacher_to_student.tolist() == [-1, 0, 1, 2, 3, 4, 5, -1, -1, -1, 8, 8]
    assert vmap.teacher_coverage == pytest.approx(8 / 12) and vmap.student_coverage == pytest.approx(7 / 9)
    assert vmap.teacher_to_student.dtype == torch.long and vmap.teacher_size == 12 and vmap.student_size == 9
    # The other way round the piece a tokenizer produces ("A") wins over the byte-fallback piece of the same byte.
    back = vocab_map(teacher, student, None).teacher_to_student.tolist()
    assert back == [1, 2, 3, 4, 5, 6, -1, -1, 10]
    assert "66.7% of the teacher's 12" in vmap.describe()


def test_vocab_map_on_trained_tokenizers(toks):
    a, sp = toks["a"], toks["sp"]
    vmap = vocab_map(a, sp, None)
    a_bytes, sp_bytes = token_bytes(a), token_bytes(sp)
    for t, s in enumerate(vmap.teacher_to_student.tolist()):
        if s >= 0 and sp_bytes[t] is not None:
            assert a_bytes[s] == sp_bytes[t]
        elif sp_bytes[t] is not None:
            assert sp_bytes[t] not in set(a_bytes)
    assert vmap.teacher_to_student[sp.bos_token_id] == a.bos_token_id
    assert vmap.teacher_to_student[sp.convert_tokens_to_ids("<0x20>")] == a.convert_tokens_to_ids("Ġ")
    assert vmap.teacher_to_student[sp.convert_tokens_to_ids("▁")] == a.convert_tokens_to_ids("Ġ")


def test_vocab_map_cache_is_reused_and_a_damaged_one_rebuilt(toks, tmp_path, monkeypatch):
    a, b = toks["a"], toks["b"]
    first = vocab_map(a, b, tmp_path)
    (path,) = tmp_path.glob("vocab-map-*.json")
    builds = []
    real = cross_tokenizer._build_map
    monkeypatch.setattr(cross_tokenizer, "_build_map", lambda *args: builds.append(1) or real(*args))
    assert torch.equal(vocab_map(a, b, tmp_path).teacher_to_student, first.teacher_to_student) and not builds
    record = json.loads(path.read_text())
    record["teacher_to_student"][5] = 7 if record["teacher_to_student"][5] != 7 else 8  # valid JSON, wrong digest
    path.write_text(json.dumps(record))
    assert torch.equal(vocab_map(a, b, tmp_path).teacher_to_student, first.teacher_to_student) and len(builds) == 1
    path.write_text(path.read_text()[:100])  # truncated
    assert torch.equal(vocab_map(a, b, tmp_path).teacher_to_student, first.teacher_to_student) and len(builds) == 2
    assert json.loads(path.read_text())["teacher_to_student"] == first.teacher_to_student.tolist()  # replaced
    vocab_map(b, a, tmp_path)  # another pair, another file
    assert len(list(tmp_path.glob("vocab-map-*.json"))) == 2


def test_the_alignment_sample_adds_up_its_batches(toks, aligned):
    a, b = toks["a"], toks["b"]
    batch, _ = aligned["a", "b"]
    one = Aligner(a, b)(batch)
    assert alignment_sample(Aligner(a, b), [batch, batch]) == (2 * one.counted_tokens, 2 * one.aligned_tokens)
    assert "\n" not in vocab_map(a, b, None).describe()
