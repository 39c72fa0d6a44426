"""The checks that run before anything expensive (tokenizer training, tokenization, model loading), by stage. A
mistake is one line (`error: ...`, exit 2) with nothing written (docs/robustness.md lists every case):

    config   every key, type and combination, at load (config.py; the CLI, before any heavy import)
    launch   the process count the launcher started, the strategies that cannot go together    check_launch
    models   paths, model files against their configs, room for a checkpoint                  check_models
             LoRA targets that match modules of the student (in the run plan, before the tokenizer)  check_lora
    data     enough sequences for one global batch; prompts for on-policy steps                 check_data
    store    an offline run's data.source (check_offline_source), a store writer's settings (check_store_writer);
             a store read for training is checked against the run as it is opened (store/logits.py,
             store/samples.py), and against a resumed checkpoint (checkpoint.py)

Whether a directory can be written at all is settled by taking its lock (`lock.py`), which creates a file there.

Model directories: every safetensors file's header is read (8 bytes of length, then JSON: each tensor's dtype,
shape and byte range) and checked against the file's size (a truncated or overwritten file is named), and the
shapes are compared with those the model's `config.json` implies (the model is built on the `meta` device: no
memory, no weights read). A sharded checkpoint's `model.safetensors.index.json` must name files that exist.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from . import models
from .config import Config, DataConfig, ModelConfig, no_prompts
from .data.documents import DocKind
from .errors import DistillError, on_main
from .lock import launcher_world_size
from .models import transformers_zero3
from .store import offline_sources

# A checkpoint of an AdamW-trained student holds fp32 weights (4 bytes/parameter) and the two fp32 moments (8):
# Accelerate's save_state for one process or DDP writes exactly that; DeepSpeed and FSDP write at least as much.
CHECKPOINT_BYTES_PER_PARAMETER = 12
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
DTYPE_BYTES.update({"I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1})


def safetensors_header(path: Path, where: str) -> dict[str, dict]:
    """The tensors a safetensors file describes, after checking the header against the file's size."""
    fix = "re-download or re-export the model"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DistillError(f"{where}: {path.name} is truncated ({size} bytes, not even a header); {fix}")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise DistillError(
                f"{where}: {path.name} is damaged: its header claims {n:,} bytes but the file has {size:,}; {fix}"
            )
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise DistillError(f"{where}: {path.name} is damaged: its header is not valid JSON ({e}); {fix}") from None
    if not isinstance(header, dict):
        raise DistillError(f"{where}: {path.name} is damaged: its header is not a mapping of tensors; {fix}")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            begin, stop = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= d
            expected = numel * DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise DistillError(f"{where}: {path.name} is damaged: tensor {name!r} is unreadable; {fix}") from None
        if stop - begin != expected:
            raise DistillError(f"{where}: {path.name} is damaged: tensor {name!r} has an inconsistent size; {fix}")
        end = max(end, stop)
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "longer than its header says"
        described = 8 + n + end
        raise DistillError(f"{where}: {path.name} is {what} ({size:,} bytes, its header says {described:,}); {fix}")
    return header


def weight_files(root: Path, where: str) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DistillError(f"{where}: {index.name} is damaged (no weight_map); re-download the model") from None
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise DistillError(f"{where}: weight file {missing[0]} (listed in {index.name}) is missing")
        return [root / n for n in names]
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    if any(root.glob("pytorch_model*.bin")):
        return []  # pickled weights: transformers reads them with weights_only; there is no header to check here
    raise DistillError(
        f"{where}: no weights in this directory (expected model.safetensors, as save_pretrained writes it)"
    )


def check_model_dir(mcfg: ModelConfig, role: str) -> int | None:
    """Check a local model directory (a hub id is left to the loader); returns the number of parameters its
    weights hold, or None when there are no headers to count."""
    root = Path(mcfg.path).expanduser()
    if not root.is_dir():
        return None
    where = f"{role}.path={mcfg.path}"
    config = models.model_config(mcfg, 0, role)  # names config.json problems (missing, invalid, remote code)
    tensors: dict[str, dict] = {}
    for path in weight_files(root, where):
        tensors.update(safetensors_header(path, where))
    if not tensors:
        return None
    expected = _shapes(config)
    for name, info in tensors.items():
        shape = expected.get(name)
        if shape is not None and list(shape) != list(info["shape"]):
            raise DistillError(
                f"{where}: the weights do not match config.json: {name} has shape {list(info['shape'])} but the "
                f"config (vocab_size={getattr(config, 'vocab_size', '?')}, hidden_size="
                f"{getattr(config, 'hidden_size', '?')}) gives {list(shape)}; fix config.json or use matching weights"
            )
    return sum(_numel(info["shape"]) for info in tensors.values())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _shapes(config) -> dict[str, tuple]:
    """The parameter shapes `config` implies, from a model built on the meta device (no memory, no init)."""
    try:
        # Never under a ZeRO-3 student's `zero.Init`: preflight runs on the main process only, and a partitioned
        # build would start collectives that the other ranks never join.
        with transformers_zero3(None), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture that cannot be built from its config alone: nothing to compare
        return {}
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def student_parameters(cfg: Config, counted: int | None) -> tuple[int | None, bool]:
    """The student's parameter count and whether it is exact: from its weight headers, or from its `arch` with the
    vocabulary it will get (a pretrained partner's, else the size of the tokenizer that will be trained); for a
    hub id (no local headers), from its config (an estimate: tied weights, buffers)."""
    if counted is not None:
        return counted, True
    if cfg.student.arch is None:
        shapes = _shapes(models.model_config(cfg.student, 0, "student"))
        return sum(_numel(s) for s in shapes.values()) or None, False
    partner = next(((r, m) for r, m in [*cfg.teacher_roles(), ("student", cfg.student)] if m.path is not None), None)
    if partner is not None:
        vocab, exact = models.model_config(partner[1], 0, partner[0]).vocab_size, True
    else:
        vocab, exact = cfg.tokenizer.vocab_size, cfg.tokenizer.path is None
    shapes = _shapes(models.arch_config(cfg.student.arch, vocab))
    return sum(_numel(s) for s in shapes.values()) or None, exact


def check_space(directory: Path, need: int, what: str, key: str, exact: bool, say) -> None:
    """Refuse when `directory`'s file system has less room than `need` bytes (warn if the estimate is unsure)."""
    free = shutil.disk_usage(directory).free
    if free >= need:
        return
    message = f"{key}={directory} has {_size(free)} free but {what} needs about {_size(need)}"
    message += f"; make room or choose another {key}"
    if exact:
        raise DistillError(message)
    say(f"warning: {message} (an estimate)")


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def check_models(cfg: Config, accelerator) -> None:
    """`distill train`, with the run directory locked: the paths, then (decided on the main process, agreed by all
    ranks) the model files and room for one checkpoint."""
    models.check_paths(cfg)  # a mistyped path is named as such, before a checkpoint is compared against it
    on_main(accelerator, lambda: _check_model_files(cfg, accelerator.print))


def _check_model_files(cfg: Config, say) -> None:
    counted = {}
    for role, mcfg in [("student", cfg.student), *cfg.teacher_roles()]:
        if mcfg.path is not None:
            counted[role] = check_model_dir(mcfg, role)
    params, exact = student_parameters(cfg, counted.get("student"))
    if params:
        check_space(
            Path(cfg.output_dir),
            params * CHECKPOINT_BYTES_PER_PARAMETER,
            f"one checkpoint of the student ({params:,} parameters x {CHECKPOINT_BYTES_PER_PARAMETER} bytes: fp32 "
            "weights and AdamW's two moments)",
            "output_dir",
            exact,
            say,
        )


def check_lora(cfg: Config) -> None:
    """student.lora's target_modules match modules of the student: peft applies the adapters to a copy of the student
    built on the meta device (no memory, no weights; module names do not depend on the vocabulary, so before the
    tokenizer), and a name that matches nothing is refused before any data work or anything written, naming the
    student's linear layers."""
    lora = cfg.student.lora
    if lora is None or lora.target_modules == "all-linear":
        return
    from peft import LoraConfig, get_peft_model

    with transformers_zero3(None), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(models.model_config(cfg.student, 256, "student"))
    try:
        get_peft_model(model, LoraConfig(r=lora.r, target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    except ValueError as e:  # peft's NoMatchingPeftModuleError (a ValueError), or a malformed pattern
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise DistillError(
            f"student.lora.target_modules={lora.target_modules!r} matches no module of the student "
            f"({' '.join(str(e).split())[:160]}); its linear layers are {', '.join(linear)} (or use all-linear)"
        ) from None


def check_launch(cfg: Config, accelerator) -> None:
    """What the launch and the strategies allow, once the accelerator exists: every rank of the launcher joined this
    process group, and the student's sharding goes with LoRA, generation during training and the chunked loss."""
    # A launcher that starts N processes which do not join one process group gives N students trained alone
    # (torchrun without Accelerator(cpu=True) on CPU; `srun -n 2 python train.py` without torchrun). Refuse.
    name, world = launcher_world_size()
    if accelerator.num_processes != world:
        raise DistillError(
            f"Accelerate sees {accelerator.num_processes} process(es) but the launcher started {name}={world}; "
            "on CPU launch with `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N` or torchrun, "
            "under SLURM run one torchrun/accelerate launch per node"
        )
    if not models.student_is_sharded(accelerator):
        return
    strategy = "ZeRO-3" if accelerator.state.deepspeed_plugin is not None else "FSDP"
    if cfg.student.lora is not None:
        # peft wraps the model after it is built; a ZeRO-3 / FSDP student is partitioned as it is built (and its
        # frozen base weights would still be sharded and gathered like trained ones): not supported here.
        raise DistillError(
            f"student.lora with a {strategy} student is not supported; launch LoRA with launch/accelerate/ddp.yaml or "
            "zero2.yaml (the frozen base fits each GPU), or unset student.lora"
        )
    if cfg.eval.train_prompts:
        raise DistillError(
            f"eval.train_prompts={cfg.eval.train_prompts} generates with the student, which a {strategy} student "
            "holds in shards; set eval.train_prompts=0 and run `distill eval` on the exported student"
        )
    if cfg.distill.chunk_size not in (0, "auto"):
        # The chunked loss multiplies by the student's lm_head weight outside its forward, where ZeRO-3 and FSDP
        # hold only a shard of it.
        raise DistillError(
            f"distill.chunk_size={cfg.distill.chunk_size} needs the student's whole output layer, which a {strategy} "
            "student shards; set distill.chunk_size=0 (logits from forward)"
        )


def check_data(cfg: Config, kind: DocKind, sequences: int | None, world: int, unprompted: int = 0) -> None:
    """What a run trains on: prompts for on-policy steps (plain text has none; `unprompted` rows, continuations of
    long documents, start mid-completion), and a training split of at least one global batch (`sequences` None: a
    stream, whose length is unknown until read); before any model loads."""
    if cfg.distill.on_policy > 0 and kind is DocKind.TEXT:
        raise no_prompts(cfg)
    if cfg.distill.on_policy > 0 and unprompted:
        raise DistillError(
            f"distill.on_policy={cfg.distill.on_policy} continues each row's prompt, but {unprompted} of {sequences} "
            f"training rows start mid-completion: their documents are longer than data.seq_len={cfg.data.seq_len} "
            "tokens and go on in further rows; raise data.seq_len, or leave the long documents out"
        )
    train = cfg.train
    batch = train.micro_batch_size * train.grad_accum_steps * world
    if sequences is not None and sequences < batch:
        offline = cfg.distill.signal == "offline"
        source = f"distill.store={cfg.distill.store}" if offline else f"data.source={cfg.data.source}"
        raise DistillError(
            f"{source} gives {sequences} training sequence(s) of {cfg.data.seq_len} tokens, fewer than one global "
            f"batch ({train.micro_batch_size} micro_batch_size x {train.grad_accum_steps} grad_accum_steps x {world} "
            f"process(es) = {batch}); add data, or lower train.micro_batch_size or data.seq_len"
        )


def check_offline_source(cfg: Config) -> None:
    """An offline run trains on its store's rows: a data.source naming other data (another file or store) would be
    ignored without a word, so it is refused. The default data.source says nothing and is let be, and a sample
    store's prompt source (the generating config, reused) names the same data."""
    if cfg.distill.signal != "offline":
        return
    sources = offline_sources(cfg)
    given = cfg.data.source
    if not sources or given == DataConfig.source or any(_same_source(given, s) for s in sources):
        return
    source = sources[0]
    raise DistillError(
        f"distill.signal=offline trains on the rows of distill.store={cfg.distill.store} (made from data.source="
        f"{source}), but data.source={given} names other data; set data.source={source}, or leave it unset"
    )


def _same_source(a: str, b: str) -> bool:
    """Two data.source values naming the same thing: equal, or paths to the same file or directory."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_store_writer(cfg: Config, store: str | None, key: str, command: str) -> None:
    """`distill precompute` and `distill generate`: what writing a store needs, before the accelerator starts."""
    if not cfg.teacher_list():
        raise DistillError(f"distill {command} needs a teacher: set teacher.path or teacher.arch")
    if cfg.teachers and command != "precompute":
        raise DistillError(f"distill {command} samples one teacher: give `teacher:`, not `teachers:`")
    if not store:
        raise DistillError(f"distill {command} needs {key}: the directory to write the store into")
    if cfg.data.streaming:
        raise DistillError(f"distill {command} reads the whole data set: set data.streaming=false")
