"""Models: configs, loading or building, and the forward helpers the teacher and the student share.

One code path for every source: a hub id on a cluster and a local directory in tests both go through
`from_pretrained`; small architectures for tests and the demo are built from the config's `arch` block. Nothing
here downloads anything unless a hub id is configured. The tokenizer is `tokenizer.py`'s; the teacher's engines are
`teacher.py`'s.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .config import ArchConfig, Config, ModelConfig
from .errors import DistillError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    for role, mcfg in [*cfg.teacher_roles(), ("student", cfg.student), ("tokenizer", cfg.tokenizer)]:
        if mcfg.path is not None:
            check_local(mcfg.path, role)


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


def resolve_configs(
    cfg: Config, tokenizer_len: int, teacher_tokenizer_len: int | None = None
) -> tuple[PretrainedConfig, list[PretrainedConfig]]:
    """The student's config and every teacher's (cfg.teacher_list() order; [] without one), checked against each
    other and the tokenizer before any weights load.

    A model built from `arch` gets the vocabulary size of a pretrained partner (whose embedding matrix is often
    padded beyond the tokenizer, e.g. to a multiple of 64), else the tokenizer's length. With distill.cross_tokenizer
    (`teacher_tokenizer_len`: the teacher's own tokenizer) the teacher is checked against its own tokenizer and is
    nobody's partner.
    """
    if teacher_tokenizer_len is not None:
        student = model_config(cfg.student, tokenizer_len, "student")
        check_model_configs(cfg, student, None, tokenizer_len)
        teachers = [model_config(m, teacher_tokenizer_len, role) for role, m in cfg.teacher_roles()]
        for teacher in teachers:
            check_model_configs(cfg, teacher, None, teacher_tokenizer_len, student_name="the teacher")
        return student, teachers
    vocab = tokenizer_len
    roles = [*cfg.teacher_roles(), ("student", cfg.student)]
    partner = next(((role, m) for role, m in roles if m.path is not None), None)
    if partner is not None:
        vocab = model_config(partner[1], tokenizer_len, partner[0]).vocab_size
    student = model_config(cfg.student, vocab, "student")
    teachers = [model_config(m, vocab, role) for role, m in cfg.teacher_roles()]
    for teacher in teachers or [None]:
        check_model_configs(cfg, student, teacher, tokenizer_len)
    return student, teachers


def max_positions(config: PretrainedConfig) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_model_configs(
    cfg: Config,
    student: PretrainedConfig,
    teacher: PretrainedConfig | None,
    tokenizer_len: int,
    student_name: str = "the student",
) -> None:
    """Startup checks on configs only, before any weights load: vocabulary rows and sequence length.

    Teacher and student may have different embedding row counts (one family, padded to different multiples, e.g.
    Qwen2.5-7B 152,064 rows and Qwen2.5-0.5B 151,936 with one tokenizer): logits are compared over the first
    `len(tokenizer)` rows (`aligned_vocab`), the padding rows of either model are ignored. A model with fewer
    rows than the tokenizer has tokens it cannot predict and is refused. `student_name` names the student in errors
    (`distill eval`: `--model NAME=DIR`).
    """
    for role, name, mc in (("student", student_name, student), ("teacher", "the teacher", teacher)):
        if mc is None:
            continue
        if tokenizer_len > mc.vocab_size:
            raise DistillError(
                f"the tokenizer has {tokenizer_len} tokens but {name} has only vocab_size={mc.vocab_size} "
                f"embedding rows; a {role} must have a row for every token (use the {role}'s own tokenizer)"
            )
        limit = max_positions(mc)
        if limit is not None and cfg.data.seq_len > limit:
            raise DistillError(f"data.seq_len={cfg.data.seq_len} exceeds {name}'s maximum positions ({limit})")
        new = cfg.distill.sampling.max_new_tokens if cfg.distill.on_policy > 0 else 0
        if limit is not None and cfg.data.seq_len + new > limit:
            raise DistillError(
                f"data.seq_len={cfg.data.seq_len} + distill.sampling.max_new_tokens={new} (an on-policy row: its "
                f"prompt and the sampled completion) exceeds {name}'s maximum positions ({limit})"
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


def student_is_sharded(accelerator) -> bool:
    """ZeRO-3 and FSDP hold only a shard of the student's lm_head weight outside its forward."""
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3)


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
# Forward helpers: the teacher and the student are called alike


# Attention implementations that separate packed documents from position_ids alone (varlen kernels).
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def attention_implementation(model) -> str | None:
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engines wrap the model
    return getattr(getattr(inner, "config", None), "_attn_implementation", None)


def document_mask(position_ids: torch.Tensor, additive_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """[B, 1, S, S] block-diagonal causal mask of packed rows: a token attends to earlier tokens of its own document
    (documents start where position_ids do not continue by one). None when no row holds more than one document.
    Boolean (True = attend) for sdpa; additive (0 / dtype min) for eager attention, which adds the mask."""
    starts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
    segment = starts.cumsum(-1)
    if bool((segment[:, -1] == 1).all()):
        return None
    s = position_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    if additive_dtype is None:
        return mask[:, None]
    zero = torch.zeros((), dtype=additive_dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(additive_dtype).min)[:, None]


def model_inputs(model, batch: dict) -> dict:
    """What a model's forward receives from a batch; the teacher and the student get exactly the same.

    Packed rows carry per-document `position_ids` (each document starts at 0). transformers (5.x) reads them as a
    packed format but its sdpa / eager masks then only remap the causal mask to positions, which lets a document
    see the earlier one; so for those a 4D block-diagonal causal mask is passed as well (S x S per row). The varlen
    flash-attention kernels separate documents from the positions alone."""
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    positions = batch.get("position_ids")
    if positions is not None:
        inputs["position_ids"] = positions
        impl = attention_implementation(model)
        if impl not in VARLEN_ATTENTION:
            dtype = None if impl == "sdpa" else next(getattr(model, "module", model).parameters()).dtype
            mask = document_mask(positions, dtype)
            if mask is not None:
                inputs["attention_mask"] = mask
    return inputs


def forward_states(
    model, batch: dict, layers: Sequence[int] = (), logits: bool = False
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One forward: the final hidden states [B, S, H] after the final norm (without [B, S, V] logits), or with
    `logits` the logits [B, S, V]; and the hidden states [B, S, H] of `layers`, indices as transformers numbers
    them (0 = the embedding output, k = the output of block k, the number of blocks = the final norm's output).

    The model is asked for those indices only (`output_hidden_states` as a list: transformers keeps the selected
    states and drops the others as the forward goes, so a deep teacher never holds every layer's states at once;
    a transformers that predates the selection returns them all, and the same ones are picked)."""
    wanted = sorted({*layers, -1}) if not logits else sorted(set(layers))
    kwargs = {} if logits else {"logits_to_keep": 1}
    if wanted:
        kwargs["output_hidden_states"] = wanted
    out = model(**model_inputs(model, batch), **kwargs)
    states = out.hidden_states or ()
    return (out.logits if logits else states[-1]), {k: states[k] for k in layers}


def parameter_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(bytes this rank holds, bytes of the whole model, number of parameters of the whole model).

    Understands ZeRO-3 partitions (`ds_tensor`: this rank's slice; `ds_numel`: the full size; `data`: empty
    unless gathered, or whole for the small parameters ZeRO-3 keeps on every rank) and FSDP2 DTensors
    (`to_local()`); anything else is held whole.
    """
    local = full = count = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            local += (p.ds_tensor.numel() + p.data.numel()) * p.ds_tensor.element_size()
            full += p.ds_numel * p.ds_tensor.element_size()
            count += p.ds_numel
        else:
            held = p.to_local() if hasattr(p, "to_local") else p
            local += held.numel() * held.element_size()
            full += p.numel() * p.element_size()
            count += p.numel()
    return local, full, count


@contextlib.contextmanager
def transformers_zero3(ds_config: dict | None):
    """Make transformers build/load the next model under `deepspeed.zero.Init(ds_config)`, or (None) not at all.

    transformers decides from one process-wide weak reference; an Accelerate DeepSpeed ZeRO-3 student sets
    it too. Setting ours (or clearing it) for exactly one load keeps the teacher's and student's configs apart.
    """
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    holder = None
    if ds_config is None:
        hf_ds.unset_hf_deepspeed_config()
    else:
        holder = hf_ds.HfDeepSpeedConfig(copy.deepcopy(ds_config))  # registers itself; the weakref needs it alive
    try:
        yield
    finally:
        del holder
        hf_ds._hf_deepspeed_config_weak_ref = saved
