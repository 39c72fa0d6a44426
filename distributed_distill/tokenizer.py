"""The run's tokenizer: which one a run uses, loading it, checking that the models agree with it, and training a BPE
tokenizer on the data when both models are built from `arch`.

    tokenizer.path, else the teacher's or the student's pretrained one (at the model's revision)
    else a sample store's own tokenizer (training on `distill generate`'s samples)
    else a byte-level BPE trained on the training documents, cached by the data and vocabulary

Nothing here loads model weights: a mismatch is refused before any expensive work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .config import Config
from .data.chat import template_problem
from .data.documents import Documents, cache_root, texts_for_tokenizer
from .errors import DistillError
from .integrity import publish_dir
from .models import check_local

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}


# The chat template a tokenizer trained on conversational data gets (ChatML, as Qwen's): each turn is
# <|im_start|>role\ncontent<|im_end|>\n, and the two markers are special tokens of their own.
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tokenizer_source(cfg: Config) -> tuple[str, str | None] | None:
    """(path, revision) of the tokenizer: the explicit one, else the teacher's or student's pretrained one at the
    model's own revision (a pinned model never pairs with an unpinned tokenizer); None = train one on the data.
    With distill.cross_tokenizer the run's tokenizer is the student's (the teacher keeps its own: teacher_tokenizer)."""
    teachers = [] if cfg.distill.cross_tokenizer is not None else cfg.teacher_list()
    for source in (cfg.tokenizer, *teachers, cfg.student):
        if source is not None and source.path is not None:
            return source.path, source.revision
    return None


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    check_local(path, "tokenizer")
    try:
        # trust_remote_code is always explicit: left unset, transformers asks on an interactive terminal.
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistillError(f"tokenizer {path}: cannot load: {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_hash(tok: PreTrainedTokenizerBase) -> str:
    """A fingerprint of the vocabulary and merges, so runs and stores can check they tokenize alike."""
    backend = getattr(tok, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()


SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def tokenizer_difference(
    a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, names: tuple[str, str], *, specials: bool = True
) -> str | None:
    """None when both tokenize alike (same id for every token, same special tokens), else the first difference."""
    ta = {i: t for t, i in a.get_vocab().items()}
    tb = {i: t for t, i in b.get_vocab().items()}
    for i in sorted(ta.keys() | tb.keys()):
        if ta.get(i) != tb.get(i):
            return f"token id {i} is {ta.get(i)!r} in the {names[0]}'s and {tb.get(i)!r} in the {names[1]}"
    if specials:
        for key in SPECIAL_KEYS:
            if getattr(a, key) != getattr(b, key):
                return f"{key} is {getattr(a, key)!r} in the {names[0]}'s and {getattr(b, key)!r} in the {names[1]}"
    return None


def check_tokenizers(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> None:
    """Teacher and student each ship a tokenizer when loaded from a path: both must equal the run's one.

    Distillation compares distributions token id by token id, so a different vocabulary is refused, naming the
    first token that differs, unless distill.cross_tokenizer is set (then the teacher keeps its own tokenizer and
    only the student's is compared with the run's). Special tokens must agree too,
    unless `tokenizer.path` names the tokenizer explicitly (its special tokens are then the run's).
    """
    source = tokenizer_source(cfg)
    teachers = [] if cfg.distill.cross_tokenizer is not None else cfg.teacher_roles()  # the teacher keeps its own
    for role, mcfg in [*teachers, ("student", cfg.student)]:
        if mcfg is None or mcfg.path is None or (mcfg.path, mcfg.revision) == source:
            continue
        try:
            own = load_tokenizer(mcfg.path, mcfg.revision, mcfg.trust_remote_code)
        except DistillError:
            continue  # a weights-only directory: nothing to compare
        diff = tokenizer_difference(own, tokenizer, (role, f"run's ({source[0]})"), specials=cfg.tokenizer.path is None)
        if diff is not None:
            raise DistillError(
                f"{role}.path={mcfg.path}: tokenizers differ: {diff}; teacher and student must share one tokenizer, "
                "or set distill.cross_tokenizer (uld or hybrid: docs/cross_tokenizer.md)"
            )


def teacher_tokenizer(cfg: Config) -> PreTrainedTokenizerBase | None:
    """distill.cross_tokenizer: the teacher's own tokenizer, from teacher.path at its revision; None otherwise."""
    if cfg.distill.cross_tokenizer is None:
        return None
    t = cfg.teacher
    return load_tokenizer(t.path, t.revision, t.trust_remote_code)


def train_bpe_tokenizer(texts, vocab_size: int, out_dir: Path, chat: bool = False) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer on an iterator of texts and save it as a transformers tokenizer; `chat`
    adds the ChatML markers as special tokens and the ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")]
    specials += CHAT_TOKENS if chat else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    if chat:
        fast.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
        fast.chat_template = CHATML_TEMPLATE
    # A temporary name of this process's own: jobs that share the cache (an array's tasks) may train the same
    # tokenizer at the same moment; the first to publish wins and the others drop their identical copy.
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    fast.save_pretrained(tmp)
    try:
        publish_dir(tmp, out_dir)  # a half-written tokenizer is never picked up from the cache
    except OSError:
        if not out_dir.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return fast


def run_tokenizer(cfg: Config, accelerator, documents: Callable[[], Documents], stored: Path | None = None):
    """The run's tokenizer, with `tokenizer.chat_template` applied when given: the configured or pretrained one;
    else `stored` (the tokenizer a sample store's ids belong to, kept in the store); else a BPE tokenizer trained on
    `documents()` (called only when no cached one fits), once, cached by the data and vocabulary it was trained on."""
    source = tokenizer_source(cfg)
    if source is not None:
        path, revision = source
        trust = any(m is not None and m.trust_remote_code for m in (*cfg.teacher_list(), cfg.student))
        tokenizer = load_tokenizer(path, revision=revision, trust_remote_code=trust)
    elif stored is not None:
        tokenizer = load_tokenizer(str(stored))
    else:
        tokenizer = _trained(cfg, accelerator, documents)
    if cfg.tokenizer.chat_template is not None:
        tokenizer.chat_template = Path(cfg.tokenizer.chat_template).expanduser().read_text()
        problem = template_problem(tokenizer)  # a Jinja syntax error is named now, not mid-tokenization
        if problem is not None:
            raise DistillError(f"tokenizer.chat_template={cfg.tokenizer.chat_template} {problem}")
    return tokenizer


def _trained(cfg: Config, accelerator, documents: Callable[[], Documents]) -> PreTrainedTokenizerBase:
    d = cfg.data
    key = json.dumps(
        [
            d.source, d.max_documents, d.val_fraction, d.text_field, d.prompt_field, d.completion_field,
            cfg.tokenizer.vocab_size, d.messages_field, d.subset, d.split, d.revision,
        ]
    )  # fmt: skip
    out = cache_root(d) / "tokenizers" / f"bpe-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    with accelerator.main_process_first():
        if not out.is_dir():
            out.parent.mkdir(parents=True, exist_ok=True)
            accelerator.print(f"training a {cfg.tokenizer.vocab_size}-token BPE tokenizer on {d.source} ...")
            docs = documents()
            train_bpe_tokenizer(texts_for_tokenizer(docs), cfg.tokenizer.vocab_size, out, docs.kind.is_chat)
    return load_tokenizer(str(out))
