"""Load or build the teacher, the student and their shared tokenizer.

One code path for every source: a hub id on a cluster and a local directory in tests both go
through `from_pretrained`; small architectures for tests and the demo are built from the
config's `arch` block. Nothing here downloads anything unless a hub id is configured.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from .config import ArchConfig, Config, ModelConfig
from .errors import DistillError
from .integrity import publish_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}

# The chat template a tokenizer trained on conversational data gets (ChatML, as Qwen's): each turn is
# <|im_start|>role\ncontent<|im_end|>\n, and the two markers are special tokens of their own.
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _looks_local(path: str) -> bool:
    # A hub id is "name" or "org/name"; anything that starts like a filesystem path is local.
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()


def check_local(path: str, role: str, label: str | None = None) -> None:
    """A local model (or tokenizer) directory exists and holds a saved model; `label` names it in the error
    (default `{role}.path`)."""
    label = label or f"{role}.path"
    if _looks_local(path) and not Path(path).expanduser().is_dir():
        raise DistillError(f"{label}={path}: no such model directory")
    root = Path(path).expanduser()
    if role in ("student", "teacher") and _looks_local(path) and not (root / "config.json").is_file():
        found = sorted(p.name for p in root.iterdir())[:5]
        holds = f"it holds {', '.join(found)}" if found else "it is empty"
        raise DistillError(
            f"{label}={path}: no config.json in this directory ({holds}), so it is not a saved model; give the "
            "directory save_pretrained wrote (config.json, model.safetensors)"
        )


def check_paths(cfg: Config) -> None:
    for role in ("teacher", "student", "tokenizer"):
        path = getattr(getattr(cfg, role), "path", None)  # teacher may be None: no path
        if path is not None:
            check_local(path, role)


def model_config(mcfg: ModelConfig, vocab_size: int, role: str) -> PretrainedConfig:
    """The transformers config of a model, without loading any weights (cheap: runs before data work)."""
    if mcfg.path is not None:
        check_local(mcfg.path, role)
        try:
            return AutoConfig.from_pretrained(
                mcfg.path, revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code
            )
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "custom code" in first and not mcfg.trust_remote_code:
                first = f"it needs the repository's own code, which runs only with {role}.trust_remote_code=true"
            raise DistillError(f"{role}.path={mcfg.path}: cannot load its config: {first}") from None
    return arch_config(mcfg.arch, vocab_size)


def arch_config(arch: ArchConfig, vocab_size: int) -> PretrainedConfig:
    inter = arch.intermediate_size or 4 * arch.hidden_size
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch.family == "gpt2":
        # Dropout off: distillation students match a target distribution; dropout only adds noise
        # and makes training logits differ from the exported model's.
        return AutoConfig.for_model(
            "gpt2",
            n_embd=arch.hidden_size,
            n_layer=arch.num_layers,
            n_head=arch.num_heads,
            n_inner=inter,
            n_positions=arch.max_position_embeddings,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **common,
        )
    return AutoConfig.for_model(
        arch.family,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads or arch.num_heads,
        intermediate_size=inter,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        **common,
    )


def resolve_configs(cfg: Config, tokenizer_len: int) -> tuple[PretrainedConfig, PretrainedConfig | None]:
    """Student and teacher configs, checked against each other and the tokenizer before any weights load.

    A model built from `arch` gets the vocabulary size of a pretrained partner (whose embedding matrix is often
    padded beyond the tokenizer, e.g. to a multiple of 64), else the tokenizer's length.
    """
    vocab = tokenizer_len
    partner = next((m for m in (cfg.teacher, cfg.student) if m is not None and m.path is not None), None)
    if partner is not None:
        vocab = model_config(partner, tokenizer_len, "teacher" if partner is cfg.teacher else "student").vocab_size
    student = model_config(cfg.student, vocab, "student")
    teacher = model_config(cfg.teacher, vocab, "teacher") if cfg.teacher is not None else None
    check_models(cfg, student, teacher, tokenizer_len)
    return student, teacher


def max_positions(config: PretrainedConfig) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_models(cfg: Config, student: PretrainedConfig, teacher: PretrainedConfig | None, tokenizer_len: int) -> None:
    """Startup checks on configs only, before any weights load: vocabulary rows and sequence length.

    Teacher and student may have different embedding row counts (one family, padded to different multiples, e.g.
    Qwen2.5-7B 152,064 rows and Qwen2.5-0.5B 151,936 with one tokenizer): logits are compared over the first
    `len(tokenizer)` rows (`aligned_vocab`), the padding rows of either model are ignored. A model with fewer
    rows than the tokenizer has tokens it cannot predict and is refused.
    """
    for role, mc in (("student", student), ("teacher", teacher)):
        if mc is None:
            continue
        if tokenizer_len > mc.vocab_size:
            raise DistillError(
                f"the tokenizer has {tokenizer_len} tokens but the {role} has only vocab_size={mc.vocab_size} "
                f"embedding rows; a {role} must have a row for every token (use the {role}'s own tokenizer)"
            )
        limit = max_positions(mc)
        if limit is not None and cfg.data.seq_len > limit:
            raise DistillError(f"data.seq_len={cfg.data.seq_len} exceeds the {role}'s maximum positions ({limit})")
        new = cfg.distill.sampling.max_new_tokens if cfg.distill.on_policy > 0 else 0
        if limit is not None and cfg.data.seq_len + new > limit:
            raise DistillError(
                f"data.seq_len={cfg.data.seq_len} + distill.sampling.max_new_tokens={new} (an on-policy row: its "
                f"prompt and the sampled completion) exceeds the {role}'s maximum positions ({limit})"
            )
    check_packages(cfg)


def check_packages(cfg: Config) -> None:
    """Optional packages a config needs, named before anything loads."""
    import importlib.util

    for role in ("student", "teacher"):
        mcfg = getattr(cfg, role)
        if mcfg is not None and mcfg.attn_implementation == "flash_attention_2":
            if importlib.util.find_spec("flash_attn") is None:
                raise DistillError(
                    f"{role}.attn_implementation=flash_attention_2 needs the flash-attn package (CUDA only: "
                    "pip install flash-attn); or use sdpa"
                )
    if getattr(cfg.student, "lora", None) is not None and importlib.util.find_spec("peft") is None:
        raise DistillError("student.lora needs peft: pip install 'distributed_distill[lora]'")


class AlignedHead:
    """A model's output layer restricted to the first `vocab` rows (the tokenizer's tokens).

    The slices are taken afresh on every access, so gradients flow into the real parameter (zero for the padding
    rows) and the optimizer's in-place updates are always seen. Under ZeRO-3 / FSDP the weight is a shard and is
    not used (the loss then slices the logits of the forward instead).
    """

    def __init__(self, module: torch.nn.Module, vocab: int):
        self.module, self.vocab = module, vocab

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight[: self.vocab]

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.module, "bias", None)
        return None if bias is None else bias[: self.vocab]


def dtype_name(mcfg: ModelConfig, device: torch.device | None) -> str:
    """The model's dtype: `auto` is bfloat16 on CUDA and float32 elsewhere (CPU bf16 matmuls are slow)."""
    if mcfg.dtype != "auto":
        return mcfg.dtype
    return "bfloat16" if device is not None and device.type == "cuda" else "float32"


def load_model(
    mcfg: ModelConfig, config: PretrainedConfig, *, seed: int, device: torch.device | None = None
) -> torch.nn.Module:
    dtype = DTYPES[dtype_name(mcfg, device)]
    attention = {"attn_implementation": getattr(mcfg, "attn_implementation", "sdpa")}
    if mcfg.path is not None:
        return AutoModelForCausalLM.from_pretrained(
            mcfg.path, revision=mcfg.revision, dtype=dtype, trust_remote_code=mcfg.trust_remote_code, **attention
        )
    # Seed right before init so the same arch + seed gives the same weights however many processes run.
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, **attention)


def prepare_student(model: torch.nn.Module, scfg) -> torch.nn.Module:
    """Gradient checkpointing and LoRA adapters, as `student` asks (before the optimizer and Accelerate see it)."""
    if scfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) and gives gradients identical to a plain backward.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if scfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = scfg.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return model


def model_identity(mcfg: ModelConfig, config: PretrainedConfig) -> dict:
    """What a run records about a model it did not train (the teacher): enough to tell runs apart."""
    # Fields that change with how the model was loaded, not what it is (a config read from disk has no dtype
    # until the weights load), so precompute and an online run agree on the same teacher.
    volatile = {"dtype", "torch_dtype", "_name_or_path", "transformers_version"}
    stable = {k: v for k, v in config.to_diff_dict().items() if k not in volatile}
    blob = json.dumps(stable, sort_keys=True, default=str).encode()
    return {
        "path": mcfg.path,
        "revision": mcfg.revision,
        "arch": None if mcfg.arch is None else vars(mcfg.arch),
        "config_sha256": hashlib.sha256(blob).hexdigest(),
    }


# ----------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_source(cfg: Config) -> tuple[str, str | None] | None:
    """(path, revision) of the tokenizer: the explicit one, else the teacher's or student's pretrained one at the
    model's own revision (a pinned model never pairs with an unpinned tokenizer); None = train one on the data."""
    for source in (cfg.tokenizer, cfg.teacher, cfg.student):
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
    first token that differs (cross-tokenizer distillation is not supported). Special tokens must agree too,
    unless `tokenizer.path` names the tokenizer explicitly (its special tokens are then the run's).
    """
    source = tokenizer_source(cfg)
    for role in ("teacher", "student"):
        mcfg = getattr(cfg, role)
        if mcfg is None or mcfg.path is None or (mcfg.path, mcfg.revision) == source:
            continue
        try:
            own = load_tokenizer(mcfg.path, mcfg.revision, mcfg.trust_remote_code)
        except DistillError:
            continue  # a weights-only directory: nothing to compare
        diff = tokenizer_difference(own, tokenizer, (role, f"run's ({source[0]})"), specials=cfg.tokenizer.path is None)
        if diff is not None:
            raise DistillError(
                f"{role}.path={mcfg.path}: tokenizers differ: {diff}; teacher and "
                "student must share one tokenizer (cross-tokenizer distillation is not supported)"
            )


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


def tokenizer_hash(tok: PreTrainedTokenizerBase) -> str:
    """A fingerprint of the vocabulary and merges, so runs and stores can check they tokenize alike."""
    backend = getattr(tok, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()
