"""Typed run configuration: dataclasses mirrored one-to-one by the YAML files in `configs/`.

A run is described by one YAML file plus dotted overrides on the command line:

    distill train --config configs/smoke.yaml train.max_steps=20 distill.alpha=1.0 teacher=null

Each field's `help` is the documentation (`distill train --help-config` prints all of them).
Unknown keys, wrong types and impossible combinations raise `ConfigError` naming the key (and the
closest valid key for a typo) before any model or data is loaded. YAML is read with a safe loader (never
imports or calls code: a config is data) that reads numbers as YAML 1.2 does, so `lr: 1e-3`, `5E-4` and `.5`
are floats (PyYAML follows YAML 1.1, where `1e-3` is a string).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .integrity import atomic_write_text
from .losses import HintKind, LossKind


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field: its default, and the help text that `--help-config` prints (a dataclass default, a class or
    an instance, is built fresh for every instance; an instance also fills the keys a config leaves out)."""
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata={"help": help}, **kwargs)
    if dataclasses.is_dataclass(default):
        made = {"help": help, "defaults": default}
        return field(default_factory=lambda: copy.deepcopy(default), metadata=made, **kwargs)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ArchConfig:
    """A small architecture built from scratch (tests, the demo, students trained from random init)."""

    family: Literal["llama", "gpt2", "qwen2"] = option("llama", "transformers model family")
    hidden_size: int = option(64, "model width")
    num_layers: int = option(2, "number of transformer blocks")
    num_heads: int = option(4, "attention heads")
    num_kv_heads: int | None = option(
        None, "key/value heads for grouped-query attention (llama, qwen2); null = num_heads"
    )
    intermediate_size: int | None = option(None, "MLP width; null = 4 * hidden_size")
    max_position_embeddings: int = option(1024, "longest sequence the model accepts")
    tie_word_embeddings: bool = option(False, "share the input embedding and the output head (always on for gpt2)")

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")


@dataclass
class ModelConfig:
    """A causal LM: loaded with `from_pretrained` (hub id or local directory) or built from `arch`."""

    path: str | None = option(None, "hub id or local directory for from_pretrained; exclusive with arch")
    revision: str | None = option(None, "hub revision (branch, tag or commit) when path is a hub id")
    arch: ArchConfig | None = option(None, "build a fresh model of this architecture instead of loading one")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "float32",
        "parameter dtype when loaded (the student trains in float32 with train.precision for autocast); auto = "
        "bfloat16 on CUDA, float32 on CPU (the teacher's default)",
    )
    trust_remote_code: bool = option(False, "allow code from the model repository to run; off unless you trust it")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = option(
        "sdpa", "attention kernel (transformers attn_implementation); flash_attention_2 needs the flash-attn package"
    )

    def __post_init__(self) -> None:
        if (self.path is None) == (self.arch is None):
            raise ConfigError("a model needs exactly one of `path` (pretrained) or `arch` (built from config)")


@dataclass
class LoraConfig:
    """LoRA adapters (through peft, `pip install 'distributed_distill[lora]'`): only the adapters train."""

    r: int = option(16, "adapter rank")
    alpha: int = option(32, "scaling numerator: the update is (alpha / r) * B A")
    dropout: float = option(0.0, "dropout on the adapter input")
    target_modules: list[str] | str = option(
        "all-linear",
        "module names that get adapters (e.g. [q_proj, v_proj]); all-linear = every linear layer but the head",
    )

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ConfigError(f"student.lora: r={self.r} and alpha={self.alpha} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"student.lora.dropout={self.dropout} must be in [0, 1)")
        if isinstance(self.target_modules, list) and not all(isinstance(m, str) for m in self.target_modules):
            raise ConfigError(f"student.lora.target_modules={self.target_modules!r} must be a list of module names")


@dataclass
class StudentConfig(ModelConfig):
    """The student: a model, and how it trains when it is large."""

    gradient_checkpointing: bool = option(
        False, "recompute each layer's activations in the backward instead of keeping them (less memory, ~30% slower)"
    )
    lora: LoraConfig | None = option(
        None, "train LoRA adapters instead of all weights; final/ holds the merged model and final/adapter the adapter"
    )


@dataclass
class TeacherConfig(ModelConfig):
    """The frozen teacher: a model plus the engine that runs it (see docs/distributed.md)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto",
        "parameter dtype when loaded; auto = bfloat16 on CUDA (a frozen teacher needs no float32), float32 on CPU",
    )
    engine: Literal["replicated", "zero3", "remote"] = option(
        "replicated",
        "replicated = every rank holds the whole teacher; zero3 = DeepSpeed ZeRO-3 inference, parameters "
        "partitioned across all ranks and gathered layer by layer in the forward; remote = served by `distill serve` "
        "at teacher.url (docs/serving.md), path/arch still name the teacher so its identity can be checked",
    )
    url: list[str] | str | None = option(
        None,
        "remote only: the server(s) of this teacher, http://host:port, one or a list (spread round-robin); or "
        "file:PATH, the address file a `distill serve` job writes (serve.address_file)",
    )
    token_file: str | None = option(
        None,
        "remote only: a file holding the server's shared-secret token (or set DISTILL_SERVE_TOKEN); needed when the "
        "server binds beyond loopback",
    )
    prefetch: bool = option(
        True,
        "remote only: send the next step's micro-batches while this step computes, so the server's forward overlaps "
        "the student's step; false = send each step's when it starts (benchmarks/remote_teacher.py measures both)",
    )
    offload: Literal["none", "cpu"] = option(
        "none", "zero3 only: keep the teacher's parameter partitions in CPU memory"
    )
    deepspeed_config: str | None = option(
        None,
        "zero3 only: a DeepSpeed JSON for the teacher engine; null = built in (= launch/deepspeed/teacher_zero3.json)",
    )
    collective_timeout: int = option(
        1800,
        "seconds a rank waits in any collective (teacher all-gathers, loss all-reduces) before the job fails; "
        "a rank that stops calling the teacher then stops the job instead of hanging it",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.engine != "zero3" and self.offload != "none":
            raise ConfigError(f"teacher.offload={self.offload} needs teacher.engine=zero3")
        if self.engine != "zero3" and self.deepspeed_config is not None:
            raise ConfigError("teacher.deepspeed_config needs teacher.engine=zero3")
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise ConfigError(f"teacher.deepspeed_config={self.deepspeed_config}: no such file")
        if self.collective_timeout < 1:
            raise ConfigError(f"teacher.collective_timeout={self.collective_timeout} must be >= 1 (seconds)")
        if isinstance(self.url, str):
            self.url = [self.url]
        if self.engine == "remote" and not self.url:
            raise ConfigError("teacher.engine=remote needs teacher.url (http://host:port of a `distill serve`)")
        if self.engine != "remote" and (self.url or self.token_file or not self.prefetch):
            raise ConfigError("teacher.url / teacher.token_file / teacher.prefetch need teacher.engine=remote")
        for url in self.url or ():
            if not (url.startswith(("http://", "https://")) or url.startswith("file:")):
                raise ConfigError(f"teacher.url={url!r} must start with http://, https:// or file:")


@dataclass
class NamedTeacherConfig(TeacherConfig):
    """One of several teachers (`teachers:`, docs/serving.md "Several teachers"): a teacher config with a name and a
    mixture weight. Every teacher shares the student's tokenizer."""

    name: str | None = option(
        None,
        "required, unique: names the teacher in metrics (kd_loss/NAME, agreement/NAME), teacher.json and the routing "
        "column (data.teacher_column)",
    )
    weight: float = option(1.0, "mixture weight (distill.teacher_mix=mixture), > 0; normalised to sum 1")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"name={self.name!r}: every teacher needs a name of letters, digits, '_', '.' or '-'")
        if not self.weight > 0:
            raise ConfigError(f"weight={self.weight} must be > 0 (weights are normalised to sum 1)")


@dataclass
class ServeConfig:
    """`distill serve`: the teacher behind an HTTP server (docs/serving.md)."""

    host: str = option("127.0.0.1", "address to bind; anything but loopback needs serve.token_file")
    port: int = option(8470, "TCP port; 0 = any free port (written to serve.address_file)")
    token_file: str | None = option(
        None, "a file holding the shared secret clients send (Authorization: Bearer); or set DISTILL_SERVE_TOKEN"
    )
    address_file: str | None = option(
        None, "write http://host:port here once ready (a student job's teacher.url=file:PATH reads it)"
    )
    max_batch_tokens: int = option(16384, "tokens per teacher forward when batching requests together")
    batch_wait_ms: float = option(5.0, "how long the first request of a batch waits for others to join it")
    queue_size: int = option(64, "requests waiting at most; more are answered 503 busy")
    request_timeout: float = option(600.0, "seconds a request may wait and run before it is answered 504")
    max_request_bytes: int = option(64 * 2**20, "largest request body; larger ones are answered 413")
    log: str | None = option(None, "the server's own log file (one line per event); null = stderr only")

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"serve.port={self.port} must be in [0, 65535]")
        for name in ("max_batch_tokens", "queue_size", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name}={getattr(self, name)} must be >= 1")
        if self.batch_wait_ms < 0 or self.request_timeout <= 0:
            raise ConfigError("serve.batch_wait_ms must be >= 0 and serve.request_timeout > 0")


@dataclass
class TokenizerConfig:
    path: str | None = option(
        None,
        "hub id or local directory; null = the teacher's (or student's) pretrained tokenizer, or, when both are "
        "built from arch, a BPE tokenizer trained on the training data and cached",
    )
    revision: str | None = option(None, "hub revision (branch, tag or commit) when path is a hub id")
    vocab_size: int = option(4096, "vocabulary size of a tokenizer trained on the data (ignored when loading one)")
    chat_template: str | None = option(
        None,
        "a Jinja chat template file for conversational data; null = the tokenizer's own (a tokenizer trained on "
        "conversational data gets a ChatML template)",
    )

    def __post_init__(self) -> None:
        if self.vocab_size < 260:
            raise ConfigError(f"tokenizer.vocab_size={self.vocab_size} must be >= 260 (256 bytes + special tokens)")
        if self.chat_template is not None and not Path(self.chat_template).expanduser().is_file():
            raise ConfigError(f"tokenizer.chat_template={self.chat_template}: no such file")


@dataclass
class DataConfig:
    source: str = option(
        "python-stdlib",
        "'python-stdlib' (the built-in corpus: this interpreter's standard-library sources), 'python-stdlib-chat' "
        "(the built-in conversations: write this function, given its signature and docstring), 'python-stdlib-mixed' "
        "(both together, each row with a teacher_id column: code or chat), a file, directory or "
        "glob of .txt / .jsonl / .json / .parquet files, a directory written by `datasets` save_to_disk, or a "
        "dataset repository id on the Hugging Face hub (or a local clone of one)",
    )
    subset: str | None = option(None, "hub dataset: the configuration (subset) name")
    split: str = option("train", "hub / save_to_disk dataset: the split read (train and validation are cut from it)")
    revision: str | None = option(None, "hub dataset: branch, tag or commit")
    streaming: bool = option(
        False,
        "read the training documents as a stream (corpora too big to download first): tokenized and packed on the "
        "fly, shuffled in a seeded buffer, resumed by replaying the stream; validation = the held-out documents "
        "among the first data.streaming_val_documents",
    )
    streaming_val_documents: int = option(2000, "streaming: documents read to pick the validation split from")
    shuffle_buffer: int = option(1000, "streaming: documents in the seeded shuffle buffer; 0 = stream order")
    messages_field: str = option(
        "messages",
        "column holding a conversation (a list of {role, content}); rendered with the chat template, only the "
        "assistant turns are learned. prompt_field / completion_field may hold lists of messages too",
    )
    packing: bool = option(
        True,
        "true = documents concatenated into seq_len blocks, each restarting its position_ids (models whose "
        "attention honours them, e.g. llama, qwen2, gpt2 in transformers, never attend across documents); "
        "false = one document per row, padded",
    )
    format: Literal["auto", "text", "json", "parquet"] = option("auto", "file format; auto = from the file extension")
    text_field: str = option("text", "field holding the text in json/parquet rows")
    prompt_field: str | None = option(None, "field holding a prompt; its tokens are excluded from every loss")
    completion_field: str | None = option(None, "field holding the completion that follows prompt_field")
    seq_len: int = option(256, "tokens per packed training sequence")
    teacher_column: str | None = option(
        None,
        "routing several teachers by row (distill.teacher_mix=route): the column holding each document's teacher, a "
        "name from `teachers:` (null in a row: the teachers' mixture); python-stdlib-mixed has one, teacher_id; "
        "null = none",
    )
    val_fraction: float = option(0.05, "share of documents held out for validation (chosen by a hash of the document)")
    max_documents: int | None = option(None, "use at most this many documents (fast smoke runs); null = all")
    cache_dir: str | None = option(
        None, "where tokenizers and tokenized data are cached; null = ~/.cache/distributed_distill"
    )

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} must be >= 2")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be strictly between 0 and 1")
        if (self.prompt_field is None) != (self.completion_field is None):
            raise ConfigError("data.prompt_field and data.completion_field must be set together")
        if self.max_documents is not None and self.max_documents < 2:
            raise ConfigError(f"data.max_documents={self.max_documents} must be >= 2 (train and validation)")
        if self.streaming_val_documents < 1 or self.shuffle_buffer < 0:
            raise ConfigError("data.streaming_val_documents must be >= 1 and data.shuffle_buffer >= 0")
        if self.streaming and self.source in ("python-stdlib", "python-stdlib-chat", "python-stdlib-mixed"):
            raise ConfigError(f"data.streaming=true needs a file, directory or dataset source, not {self.source!r}")
        if self.streaming and self.max_documents is not None:
            raise ConfigError("data.max_documents is not supported with data.streaming=true (max_steps bounds it)")
        if self.streaming and self.teacher_column is not None:
            raise ConfigError("data.teacher_column is not supported with data.streaming=true (routing packs the data)")


@dataclass
class SamplingConfig:
    """How a model samples completions: the student on on-policy steps (`distill.sampling`, docs/on_policy.md) and
    the teacher in `distill generate` (`generate.sampling`, docs/generate.md); `generation.sampling_setup` turns it
    into the sampler's settings."""

    temperature: float = option(1.0, "sampling temperature; 0 = greedy (argmax)")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens holding this probability; 1 = off")
    top_k: int = option(0, "keep only the k most likely tokens before sampling; 0 = off")
    max_new_tokens: int = option(64, "longest completion sampled, in tokens (finish reason `length`)")
    stop_strings: list[str] = option(
        [], "a completion also ends once its decoded text contains one of these (finish reason `stop`, the text kept)"
    )
    eos_tokens: list[str] | None = option(
        None,
        "tokens that end a completion (finish reason `eos`, the token kept); null = the tokenizer's eos token and, for "
        "chat prompts, the token that ends an assistant turn in the chat template (e.g. <|im_end|>)",
    )

    def __post_init__(self) -> None:
        def strings(value: Any) -> bool:
            return isinstance(value, list) and all(isinstance(t, str) and t for t in value)

        rules = {
            "temperature": (self.temperature >= 0, ">= 0 (0 = greedy)"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "top_k": (self.top_k >= 0, ">= 0 (0 = off)"),
            "max_new_tokens": (self.max_new_tokens >= 1, ">= 1"),
            "stop_strings": (strings(self.stop_strings), "a list of non-empty strings"),
            "eos_tokens": (
                self.eos_tokens is None or strings(self.eos_tokens),
                "a list of non-empty strings (or null)",
            ),
        }
        for name, (ok, rule) in rules.items():
            if not ok:  # (`build` puts the section in front: distill.sampling.top_p=...)
                raise ConfigError(f"{name}={getattr(self, name)!r} must be {rule}")


@dataclass
class HiddenConfig:
    """Hidden-state distillation ("hints", FitNets; docs/hints.md): chosen student layers, each through a learned
    bias-free projection to the teacher's width, regress onto chosen teacher layers at the positions the KD loss
    counts. A layer is an index into the model's hidden states as transformers numbers them: 0 = the embedding
    output, k = the output of block k, and the last (the number of blocks, or `final`) = the final norm's output."""

    layers: list[list[int | str]] | str = option(
        "uniform",
        "uniform = student layer k of S onto teacher layer round(k * T / S) for k = 1..S (the last onto the last: the "
        "final norms' outputs); or a list of [student_layer, teacher_layer] pairs, each an index (0 = embeddings) or "
        "final",
    )
    loss: HintKind = option(
        "mse",
        "per position: mse = mean squared difference over the teacher's width; cosine = 1 - cosine similarity; "
        "normalized_mse = mse between the layer-normalised states",
    )
    weight: float = option(
        1.0, "the hint term's weight: loss = KD/CE terms + weight * mean over pairs of the hint loss"
    )
    balance: Literal["fixed", "kd"] = option(
        "fixed",
        "fixed = the weight as given; kd = rescaled every step so the hint term is weight x the KD loss (the ratio of "
        "the previous step's KD and hint losses; the first step uses the weight as given)",
    )
    init: Literal["xavier", "orthogonal", "identity"] = option(
        "xavier", "the projections' initialisation (seeded by train.seed); identity needs equal widths"
    )
    until_step: int | None = option(
        None,
        "FitNets' two stages: hints alone (KD and CE weighted 0) for steps 1..N, then alpha * KD + (1 - alpha) * CE "
        "without hints; null = hints and that objective together for the whole run",
    )

    def __post_init__(self) -> None:
        if self.layers != "uniform":
            if not isinstance(self.layers, list) or not self.layers:
                raise ConfigError(f"layers={self.layers!r} must be uniform or a non-empty list of [student, teacher]")
            seen = set()
            for pair in self.layers:
                if not (isinstance(pair, list) and len(pair) == 2 and all(_is_layer(x) for x in pair)):
                    raise ConfigError(
                        f"layers={self.layers!r}: {pair!r} is not a [student_layer, teacher_layer] pair (each an "
                        "index >= 0 or final)"
                    )
                if tuple(pair) in seen:
                    raise ConfigError(f"layers={self.layers!r}: the pair {pair!r} is given twice")
                seen.add(tuple(pair))
        if self.weight <= 0:
            raise ConfigError(f"weight={self.weight} must be > 0")
        if self.until_step is not None and self.until_step < 1:
            raise ConfigError(f"until_step={self.until_step} must be >= 1 (or null: hints for the whole run)")


def _is_layer(x: Any) -> bool:
    return x == "final" or (isinstance(x, int) and not isinstance(x, bool) and x >= 0)


@dataclass
class CrossTokenizerConfig:
    """A teacher with another tokenizer (docs/cross_tokenizer.md): both tokenizers encode the same text, the tokens
    are aligned into spans where both sides' boundaries meet, each span's probability is merged by the chain rule on
    both sides, and the two span distributions (over different vocabularies) are compared by `loss`."""

    loss: Literal["uld", "hybrid"] = option(
        "hybrid",
        "uld = the L1 distance between the sorted probability vectors (no vocabulary mapping); hybrid = tokens whose "
        "bytes exist in both vocabularies compared directly (forward KL on the mapped part), the rest by ULD",
    )
    matched_weight: float = option(1.0, "hybrid: the weight of the mapped part's forward KL")
    unmatched_weight: float = option(1.0, "hybrid: the weight of the unmapped part's ULD")
    max_unaligned: float = option(
        0.25,
        "refuse the pair at startup when the alignment drops more than this share of the counted tokens on a sample "
        "of the training data (the figure is printed either way)",
    )
    sample_batches: int = option(4, "micro-batches of the training data the startup alignment check reads")

    def __post_init__(self) -> None:
        for name in ("matched_weight", "unmatched_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"distill.cross_tokenizer.{name}={getattr(self, name)} must be >= 0")
        if not 0.0 <= self.max_unaligned <= 1.0:
            raise ConfigError(f"distill.cross_tokenizer.max_unaligned={self.max_unaligned} must be in [0, 1]")
        if self.sample_batches < 1:
            raise ConfigError(f"distill.cross_tokenizer.sample_batches={self.sample_batches} must be >= 1")


@dataclass
class DistillConfig:
    alpha: float = option(0.5, "loss = alpha * KD + (1 - alpha) * CE; 0 = plain CE training (no teacher needed)")
    loss: LossKind = option("forward_kl", "KD objective (docs/losses.md)")
    temperature: float = option(1.0, "softmax temperature T for both models; the KD term is scaled by T^2")
    beta: float = option(0.5, "jsd mixture weight, 0 < beta < 1")
    skew: float = option(0.1, "skew_forward_kl / skew_reverse_kl mixture weight, 0 <= skew < 1")
    chunk_size: int | str = option(
        "auto",
        "tokens per chunk when computing the loss from hidden states (no [tokens, vocab] tensor); 0 = naive "
        "(full logits); auto = from the vocabulary, hidden size and device (losses.auto_chunk_size; the naive path "
        "for a ZeRO-3/FSDP student)",
    )
    top_k: int | None = option(
        None,
        "online teacher emits sparse top-k targets (ids, log-probs, tail mass) as an offline store holds; null = dense",
    )
    samples: int | None = option(
        None,
        "online teacher emits sampled targets: N draws per position from its distribution at distill.temperature, kept "
        "as unique ids with counts (an unbiased estimate of dense forward KL; forward_kl only), as a sampled store "
        "holds; null = dense or top-k (docs/store.md)",
    )
    top_k_tail: Literal["bucket", "renormalize"] = option(
        "bucket", "sparse targets: keep the mass outside the top-k as one bucket, or renormalise within the top-k"
    )
    teacher_mix: Literal["mixture", "route"] = option(
        "mixture",
        "several teachers (`teachers:`): mixture = their weighted mixture in probability space at every position; "
        "route = per position the teacher data.teacher_column names (a row without one: the mixture)",
    )
    signal: Literal["online", "offline"] = option(
        "online", "online = run the teacher every step; offline = stream top-k targets from distill.store"
    )
    store: str | None = option(
        None, "logit store directory: written by `distill precompute`, read when distill.signal=offline"
    )
    store_top_k: int = option(64, "distill precompute: top-k kept per token when distill.top_k is null")
    store_samples: int | None = option(
        None,
        "distill precompute: keep N sampled draws per token (unique ids with counts) instead of the top-k, when "
        "distill.samples is null; null = top-k (docs/store.md)",
    )
    store_encoding: Literal["plain", "packed"] = option(
        "plain",
        "distill precompute: how targets are kept: plain (uint16/32 ids, float16 log-probs) or packed (ids bit-packed "
        "at ceil(log2 V) bits, log-probs as 8-bit codes on a per-position scale, counts bit-packed; docs/store.md)",
    )
    store_shard_rows: int = option(256, "distill precompute: packed sequences per Parquet shard (the unit of resume)")
    store_max_rows: int | None = option(
        None,
        "distill precompute: keep only the first N training sequences of the seeded order (what N / global batch "
        "steps consume); null = all. The validation split is always whole",
    )
    shuffle_buffer: int = option(
        1024,
        "offline: rows in the seeded streaming shuffle buffer; 0 = store order (the seeded permutation the store "
        "was written in: exactly the batches of an online run with the same seed)",
    )
    on_policy: float = option(
        0.0,
        "share of optimizer steps whose completions the current student samples itself (GKD's lambda), the teacher "
        "scoring every sampled token; the others train on the data's completions. Which steps is a pure function of "
        "(train.seed, step). Needs prompts (prompt/completion or conversational data, data.packing=false) and an "
        "online teacher (docs/on_policy.md)",
    )
    sampling: SamplingConfig = option(
        SamplingConfig, "on-policy steps: how the student samples (distill.on_policy; max_new_tokens defaults to 64)"
    )
    hidden: HiddenConfig | None = option(
        None, "hidden-state distillation (hints) besides or before the KD objective; null = off (docs/hints.md)"
    )
    cross_tokenizer: CrossTokenizerConfig | None = option(
        None,
        "a teacher whose tokenizer differs from the student's: spans aligned by byte offsets, merged by the chain "
        "rule, compared by uld or hybrid (docs/cross_tokenizer.md); null = both must share one tokenizer",
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha={self.alpha} must be in [0, 1]")
        if not 0.0 <= self.on_policy <= 1.0:
            raise ConfigError(f"distill.on_policy={self.on_policy} must be in [0, 1]")
        if self.on_policy > 0 and self.signal == "offline":
            raise ConfigError(
                f"distill.on_policy={self.on_policy} needs distill.signal=online: a store cannot score the student's "
                "own samples"
            )
        if self.on_policy > 0 and self.alpha == 0:
            raise ConfigError(
                f"distill.on_policy={self.on_policy} with distill.alpha=0: on-policy steps train on KD only (CE on "
                "the student's own samples is off), so they would learn nothing; set distill.alpha > 0"
            )
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature={self.temperature} must be > 0")
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(f"distill.beta={self.beta} must be strictly between 0 and 1")
        if not 0.0 <= self.skew < 1.0:
            raise ConfigError(f"distill.skew={self.skew} must be in [0, 1)")
        if self.chunk_size != "auto" and (not isinstance(self.chunk_size, int) or self.chunk_size < 0):
            raise ConfigError(f"distill.chunk_size={self.chunk_size!r} must be 'auto' or an int >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"distill.top_k={self.top_k} must be >= 1 (or null for dense targets)")
        if self.top_k is not None and self.loss == "mse":
            raise ConfigError("distill.loss=mse compares logits and needs dense targets; unset distill.top_k")
        for name in ("samples", "store_samples"):
            n = getattr(self, name)
            if n is not None and not 1 <= n <= 255:
                raise ConfigError(f"distill.{name}={n} must be between 1 and 255 draws per position (or null)")
        if self.samples is not None and self.top_k is not None:
            raise ConfigError(
                f"distill.samples={self.samples} and distill.top_k={self.top_k}: the teacher emits one kind of sparse "
                "target; set one of them to null"
            )
        if self.samples is not None and self.loss != "forward_kl":
            raise ConfigError(
                f"distill.samples with distill.loss={self.loss}: sampled targets estimate forward KL only (the other "
                "divergences need the teacher's probability of ids that were not drawn); use distill.loss=forward_kl "
                "or top-k targets (distill.top_k)"
            )
        if self.signal == "offline" and not self.store:
            raise ConfigError("distill.signal=offline needs distill.store (a directory made by `distill precompute`)")
        if self.signal == "offline" and self.loss == "mse":
            raise ConfigError("distill.loss=mse needs dense targets; an offline store holds top-k (distill.signal)")
        if self.store_max_rows is not None and self.store_max_rows < 1:
            raise ConfigError(f"distill.store_max_rows={self.store_max_rows} must be >= 1 (or null for all)")
        for name in ("store_top_k", "store_shard_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"distill.{name}={getattr(self, name)} must be >= 1")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"distill.shuffle_buffer={self.shuffle_buffer} must be >= 0")
        if self.hidden is not None and self.signal == "offline":
            raise ConfigError(
                "distill.hidden with distill.signal=offline: a store holds the teacher's output distribution only, not "
                "its hidden states; use distill.signal=online or distill.hidden=null"
            )
        if self.hidden is not None and self.hidden.balance == "kd" and self.alpha == 0:
            raise ConfigError(
                "distill.hidden.balance=kd rescales the hint term to the KD term, which distill.alpha=0 turns off; "
                "use distill.hidden.balance=fixed or distill.alpha > 0"
            )
        if self.cross_tokenizer is not None:
            self._check_cross_tokenizer()

    def _check_cross_tokenizer(self) -> None:
        """What distill.cross_tokenizer does not combine with, each named in one line (docs/cross_tokenizer.md)."""
        key = f"distill.cross_tokenizer.loss={self.cross_tokenizer.loss}"
        if self.loss != "forward_kl":
            raise ConfigError(
                f"{key} with distill.loss={self.loss}: spans over two vocabularies are compared by ULD and, on the "
                "mapped part, forward KL only; use distill.loss=forward_kl"
            )
        if self.samples is not None:
            raise ConfigError(f"{key} with distill.samples: sampled targets are not aligned across tokenizers; use "
                              "distill.top_k or dense targets")  # fmt: skip
        if self.store_samples is not None:
            raise ConfigError(
                f"{key} with distill.store_samples: a store for students of another tokenizer keeps top-k targets "
                "(sampled draws are not aligned across tokenizers); unset distill.store_samples"
            )
        unsupported = {
            "distill.hidden": self.hidden is not None,
        }
        for what, given in unsupported.items():
            if given:
                raise ConfigError(
                    f"{key} with {what}: not supported yet (online training, on the data or on-policy samples; "
                    "docs/cross_tokenizer.md, what is built)"
                )


@dataclass
class GenerateConfig:
    """`distill generate`: the teacher samples completions of the data's prompts into a sample store
    (docs/generate.md)."""

    store: str | None = option(None, "the sample store directory `distill generate` writes (and resumes)")
    sampling: SamplingConfig = option(
        SamplingConfig(max_new_tokens=128), "how the teacher samples (here max_new_tokens defaults to 128)"
    )
    samples_per_prompt: int = option(1, "completions sampled for each prompt")
    seed: int | None = option(
        None,
        "sampling seed: a sample is a pure function of (seed, split, prompt index, sample index); null = train.seed",
    )
    top_k: int | None = option(
        None,
        "also keep the teacher's top-k log-probs and tail mass at every completion token, at distill.temperature "
        "(from the logits the sampler used); null = none",
    )
    samples: int | None = option(
        None,
        "also keep N draws per completion token from the teacher's distribution at distill.temperature (unique ids "
        "with counts and the entropy: sampled targets, forward KL only); null = none",
    )
    batch_size: int = option(16, "sequences sampled together per process (one KV-cached batch)")
    shard_prompts: int = option(64, "prompts per Parquet shard (all their samples): the unit of resume")
    max_prompts: int | None = option(None, "use at most the first N prompts of each split; null = all")
    prefix_tokens: int | None = option(
        None,
        "plain-text data (no prompt field, no conversations): prompts are the first N tokens of every window of "
        "N + max_new_tokens tokens of each document, as a text LM continues text; null = text data is refused",
    )

    def __post_init__(self) -> None:
        for name in ("samples_per_prompt", "batch_size", "shard_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"generate.{name}={getattr(self, name)} must be >= 1")
        for name in ("top_k", "max_prompts", "prefix_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"generate.{name}={getattr(self, name)} must be >= 1 (or null)")
        if self.samples is not None and not 1 <= self.samples <= 255:
            # (a count is stored as uint8)
            raise ConfigError(f"generate.samples={self.samples} must be between 1 and 255 draws per token (or null)")
        if self.samples is not None and self.top_k is not None:
            raise ConfigError(
                f"generate.samples={self.samples} and generate.top_k={self.top_k}: a sample store keeps one kind of "
                "per-token target; set one of them to null"
            )


@dataclass
class TrainConfig:
    max_steps: int = option(100, "optimizer steps")
    micro_batch_size: int = option(8, "sequences per process per forward pass")
    grad_accum_steps: int = option(1, "micro-batches per optimizer step; global batch = micro * accum * processes")
    lr: float = option(3e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = option(0.1, "cosine schedule ends at lr * min_lr_ratio")
    warmup_steps: int = option(10, "linear warmup steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.95, "AdamW beta2")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this; 0 = no clipping")
    precision: Literal["fp32", "bf16"] = option("fp32", "fp32, or bf16 autocast (mixed precision) for the student")
    seed: int = option(0, "seed for model init, data order and dropout")
    eval_every: int = option(0, "evaluate every N steps; 0 = only at the end")
    eval_batches: int = option(0, "validation micro-batches per process per evaluation; 0 = the whole split")
    log_every: int = option(1, "write metrics every N steps")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto = cuda when available, else cpu (gloo)")
    save_every: int = option(
        1000, "write a checkpoint output_dir/step-NNNNNNN/ every N steps; 0 = only on SIGTERM/SIGUSR1"
    )
    keep_last: int = option(2, "complete checkpoints to keep (older ones are deleted); 0 = keep all")
    resume: bool | str = option(
        "auto",
        "auto = continue from the newest complete checkpoint in output_dir, if any; false = start fresh (refused "
        "when output_dir holds checkpoints); or the path of a step-NNNNNNN checkpoint directory",
    )
    max_bad_steps: int = option(
        5, "stop with an error after N consecutive steps with a non-finite loss or gradient (each one is skipped)"
    )

    def __post_init__(self) -> None:
        if self.resume is True or self.resume in ("true", ""):
            raise ConfigError(f"train.resume={self.resume!r} must be auto, false or a checkpoint path")
        if self.resume == "false":
            self.resume = False
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        for name in (
            "warmup_steps",
            "eval_every",
            "eval_batches",
            "weight_decay",
            "max_grad_norm",
            "save_every",
            "keep_last",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.warmup_steps > self.max_steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} exceeds train.max_steps={self.max_steps}")


@dataclass
class EvalConfig:
    """What `distill eval` and the evaluations during training measure beyond the validation loss (docs/eval.md)."""

    prompts: int = option(
        16,
        "`distill eval`: held-out prompts whose greedy completions are scored (the teacher's NLL of them, ROUGE-L "
        "against the reference, the task check, repetition); 0 = none",
    )
    train_prompts: int = option(
        0, "the same generation metrics at every train.eval_every evaluation during training; 0 = none (slow)"
    )
    max_new_tokens: int = option(64, "tokens generated per held-out prompt (greedy; stops at end of sequence/turn)")
    prompt_tokens: int = option(
        32,
        "plain-text data: a held-out document's first N tokens are the prompt and the next max_new_tokens its "
        "reference (prompt/completion and chat data bring their own)",
    )
    calibration_bins: int = option(15, "equal-width confidence bins of the expected calibration error")
    repetition_ngram: int = option(4, "repetition rate: the share of a completion's n-grams (this n) seen before in it")

    def __post_init__(self) -> None:
        for name in ("prompts", "train_prompts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name}={getattr(self, name)} must be >= 0")
        for name in ("max_new_tokens", "prompt_tokens", "calibration_bins", "repetition_ngram"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}={getattr(self, name)} must be >= 1")


@dataclass
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = option(
        "disabled", "disabled writes nothing; offline writes a local run directory (sync later); online streams"
    )
    project: str = option("distributed_distill", "wandb project")
    entity: str | None = option(None, "wandb entity (team or user)")
    name: str | None = option(None, "run name; null = the output_dir's name")
    dir: str | None = option(None, "where wandb writes its files; null = output_dir")


@dataclass
class LoggingConfig:
    progress: bool = option(True, "show a progress bar on the main process")
    wandb: WandbConfig = option(WandbConfig, "Weights & Biases tracking (main process only)")


@dataclass
class Config:
    output_dir: str = option("runs/default", "run directory: resolved config, metrics.jsonl, checkpoints, final/")
    student: StudentConfig = option(None, "the model being trained")
    teacher: TeacherConfig | None = option(None, "the frozen teacher; null for plain CE training (distill.alpha=0)")
    teachers: list[NamedTeacherConfig] | None = option(
        None,
        "several frozen teachers instead of `teacher`: a list of teacher configs, each with a name and a weight, mixed "
        "or routed per position (distill.teacher_mix); they need distill.top_k and the student's tokenizer",
    )
    tokenizer: TokenizerConfig = option(TokenizerConfig, "tokenizer shared by teacher and student")
    data: DataConfig = option(DataConfig, "training and validation data")
    distill: DistillConfig = option(DistillConfig, "the distillation objective")
    generate: GenerateConfig = option(GenerateConfig, "distill generate: sampling the teacher into a sample store")
    train: TrainConfig = option(TrainConfig, "optimisation")
    eval: EvalConfig = option(EvalConfig, "metrics beyond the validation loss (distill eval, train.eval_every)")
    logging: LoggingConfig = option(LoggingConfig, "progress, metrics.jsonl and wandb")
    serve: ServeConfig = option(ServeConfig, "distill serve: the teacher behind an HTTP server")

    def __post_init__(self) -> None:
        if self.student is None:
            raise ConfigError("student is required (student.path or student.arch)")
        if self.distill.on_policy > 0 and self.data.packing:
            raise ConfigError(
                f"distill.on_policy={self.distill.on_policy} needs data.packing=false: one prompt per row, which the "
                "student continues"
            )
        plain = ("python-stdlib", "python-stdlib-mixed")
        if self.distill.on_policy > 0 and self.data.prompt_field is None and self.data.source in plain:
            raise no_prompts(self)
        if self.data.streaming and self.distill.signal == "offline":
            raise ConfigError("data.streaming=true with distill.signal=offline: the store holds the data; unset one")
        check_teachers(self)
        if self.distill.cross_tokenizer is not None:
            check_cross_teacher(self)
        if self.teacher is None and self.distill.hidden is not None:
            raise ConfigError("distill.hidden needs a teacher (its hidden states): set teacher.path / teacher.arch")
        if not self.teacher_list() and self.distill.alpha > 0 and self.distill.signal == "online":
            raise ConfigError(
                f"distill.alpha={self.distill.alpha} needs a teacher; "
                "set teacher.path / teacher.arch, or distill.alpha=0"
            )
        for role, model in [("student", self.student), *self.teacher_roles()]:
            if model is not None and model.arch is not None and self.data.seq_len > model.arch.max_position_embeddings:
                raise ConfigError(
                    f"data.seq_len={self.data.seq_len} exceeds {role}.arch.max_position_embeddings="
                    f"{model.arch.max_position_embeddings}"
                )

    def teacher_list(self) -> list[TeacherConfig]:
        """Every teacher of the run: `teachers`, in config order, or `[teacher]`, or [] (CE only)."""
        return list(self.teachers) if self.teachers else [self.teacher] if self.teacher is not None else []

    def teacher_roles(self) -> list[tuple[str, TeacherConfig]]:
        """(the key naming it in messages, its config) of every teacher: `teacher`, or `teachers[NAME]`."""
        if self.teachers:
            return [(f"teachers[{t.name}]", t) for t in self.teachers]
        return [("teacher", self.teacher)] if self.teacher is not None else []


def check_teachers(cfg: Config) -> None:
    """Several teachers (`teachers:`): exclusive with `teacher`, named uniquely, with sparse top-k targets (the mixture
    and the routing combine top-k lists; distill.top_k = the vocabulary size is the exact dense mixture), and
    routing only with a column to route by."""
    mix, column = cfg.distill.teacher_mix, cfg.data.teacher_column
    if cfg.teachers is None:
        if (mix == "route" or column is not None) and cfg.distill.signal == "online":
            raise ConfigError("distill.teacher_mix=route and data.teacher_column need several teachers (`teachers:`)")
        return
    if cfg.teacher is not None:
        raise ConfigError("teacher and teachers are exclusive: give one teacher, or a list of named teachers")
    if not cfg.teachers:
        raise ConfigError("teachers is empty: give at least one named teacher, or teacher=null for CE only")
    names = [t.name for t in cfg.teachers]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise ConfigError(f"teachers: the name {twice!r} is given twice; every teacher needs its own name")
    if cfg.distill.signal == "online" and not cfg.distill.top_k:
        raise ConfigError(
            "teachers: several teachers need sparse targets: set distill.top_k (the vocabulary size gives the exact "
            "dense mixture); dense and sampled (distill.samples) targets are not mixed"
        )
    if cfg.distill.hidden is not None:
        raise ConfigError("distill.hidden needs one teacher (its hidden states), not `teachers:`")
    if mix == "route" and column is None:
        raise ConfigError("distill.teacher_mix=route needs data.teacher_column (the column naming each row's teacher)")
    if mix == "mixture" and column is not None:
        raise ConfigError(f"data.teacher_column={column} routes teachers: it needs distill.teacher_mix=route")


def check_cross_teacher(cfg: Config) -> None:
    """distill.cross_tokenizer: one teacher, in-process, loaded from a path (its own tokenizer is read from there)."""
    if cfg.teachers:
        raise ConfigError("distill.cross_tokenizer with `teachers:`: not supported yet; give one `teacher`")
    if cfg.teacher is None:
        raise ConfigError("distill.cross_tokenizer needs a teacher with a tokenizer of its own: set teacher.path")
    if cfg.teacher.path is None:
        raise ConfigError(
            "distill.cross_tokenizer needs teacher.path (a pretrained teacher and its own tokenizer); a teacher built "
            "from teacher.arch shares the run's tokenizer"
        )
    if cfg.teacher.engine not in ("replicated", "zero3"):
        raise ConfigError(
            f"distill.cross_tokenizer with teacher.engine={cfg.teacher.engine}: not supported yet; use replicated "
            "or zero3"
        )


def no_prompts(cfg: Config) -> ConfigError:
    """On-policy steps continue prompts, which plain text has none of: at config load for the built-in corpus, when
    the data is read for files (on_policy.check_prompts)."""
    return ConfigError(
        f"distill.on_policy={cfg.distill.on_policy} needs prompts, but data.source={cfg.data.source} is plain text; "
        "give data.prompt_field / data.completion_field, or conversational data (e.g. python-stdlib-chat)"
    )


# ----------------------------------------------------------------------------------------------
# Reading YAML: safe, with YAML 1.2 floats.


class Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` with the YAML 1.2 core schema's floats: `1e-3`, `5E-4`, `.5`, `1.` (YAML 1.1, which
    PyYAML implements, needs a dot and a signed exponent, so `1e-3` would be the string '1e-3')."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=Loader)


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that name the key.


# Keys that moved: the old key gets a one-line error naming the new one.
SAMPLING_KEYS = ("temperature", "top_p", "max_new_tokens", "stop_strings", "eos_tokens")
MOVED = {f"generate.{key}": f"generate.sampling.{key}" for key in SAMPLING_KEYS} | {
    "generate.sample_top_k": "generate.sampling.top_k"
}


def _hint(name: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key}={value!r} is not one of {', '.join(map(str, choices))}{_hint(str(value), map(str, choices))}"
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)] if item is not Any else value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            raise ConfigError(f"{key} is required: give a mapping of {tp.__name__} fields")
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, prefix=f"{key}.")
    if tp is float and isinstance(value, str):
        value = _number(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value}: NaN and infinity are not allowed here; give a finite number (e.g. 1e-3)")
    if tp is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # `max_steps: 1e4` (YAML 1.2 reads it as a float)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key}={value!r} must be of type {_type_name(tp)}")
    return value


def _number(text: str) -> Any:
    """A quoted number (`lr: "1e-3"`) is still meant as one; anything else stays text for the type error."""
    try:
        return float(text.strip())
    except ValueError:
        return text


def build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a dict, checking every key and type; errors name the dotted key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in raw.items():
        if prefix + key in MOVED:
            raise ConfigError(f"config key {prefix + key} moved to {MOVED[prefix + key]}")
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + key!r}{_hint(key, names)}")
        defaults = fields[key].metadata.get("defaults")
        if defaults is not None and isinstance(value, dict):  # generate.sampling: its own defaults for unset keys
            value = {f.name: copy.deepcopy(getattr(defaults, f.name)) for f in dataclasses.fields(defaults)} | value
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # Section checks name their own keys ("data.seq_len=..."); nested ones get their location prepended, as
        # part of the key when the message starts with one of their fields ("distill.sampling.top_p=...").
        if prefix and not str(e).startswith(prefix):
            own = any(str(e).startswith(f"{name}=") for name in names)
            raise ConfigError(f"{prefix}{e}" if own else f"{prefix[:-1]}: {e}") from None
        raise


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """`a.b.c=value` into nested dicts; a segment `name[I]` is entry I of the list `name` (teachers[1].engine=remote),
    which must exist (a list grows only by giving it whole: teachers=[...])."""
    node: Any = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        indexed = re.fullmatch(r"(\w+)\[(\d+)\]", part)
        if indexed:
            name, index = indexed.group(1), int(indexed.group(2))
            items = node.get(name)
            if not isinstance(items, list) or index >= len(items):
                have = len(items) if isinstance(items, list) else "no"
                raise ConfigError(f"override {dotted}: {name} has {have} entries, so no {name}[{index}]")
            if last:
                items[index] = value
                return
            if not isinstance(items[index], dict):
                items[index] = {}
            node = items[index]
        elif last:
            node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child


def _not_an_override(item: str) -> str:
    path = Path(item).expanduser()
    if (path / "config.yaml").is_file():  # a run directory
        return (
            f"{item} is a run directory, not a section.key=value override; its config is "
            f"--config {path / 'config.yaml'} and its student --model student={path / 'final'}"
        )
    if path.exists():
        return f"{item} is a path, not a section.key=value override; give a config as --config FILE"
    return f"override {item!r} must look like section.key=value"


def parse_overrides(overrides: typing.Sequence[str]) -> list[tuple[str, Any]]:
    pairs = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(_not_an_override(item))
        try:
            value = load_yaml(text) if text else ""
        except yaml.YAMLError:
            value = text
        pairs.append((key.strip(), value))
    return pairs


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config, apply dotted `key=value` overrides, and validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            run = path / "config.yaml"
            hint = f"this looks like a run directory: --config {run}" if run.is_file() else "e.g. configs/smoke.yaml"
            raise ConfigError(f"--config {path} is a directory; give a YAML file ({hint})")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"config file {where} is not valid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    if path is None and raw.get("student") is None:
        raise ConfigError(
            "no --config given and no student set: give --config FILE (e.g. configs/smoke.yaml), or the whole run as "
            "overrides (student.arch... or student.path=...)"
        )
    return build(Config, raw)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type = Config, prefix: str = "", defaults: Any = None) -> list[str]:
    """One line per config key: dotted name, default and help; for `--help-config`. `defaults`: the section's
    default instance, where its field defaults differ from the class's (generate.sampling)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp)
        items = [x for a in args if typing.get_origin(a) is list for x in typing.get_args(a)]  # a list of sections
        sub = next((a for a in (tp, *args, *items) if dataclasses.is_dataclass(a)), None)
        if sub is not None:
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
            each = "[]" if sub in items else ""
            lines.extend(describe(sub, f"{prefix}{f.name}{each}.", f.metadata.get("defaults")))
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if defaults is not None:
            default = getattr(defaults, f.name)
        lines.append(f"  {prefix}{f.name} = {default!r}  # {f.metadata.get('help', '')}")
    return lines
