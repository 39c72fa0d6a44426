"""The same KD run in this project, TRL and torchtune: tokens/s, peak memory and the loss each reports.

Run (the peers are an optional extra: `pip install -e .[peers]`, or a separate venv, docs/peers.md):
    .venv-peers/bin/python benchmarks/peers.py                  # ~8 minutes on 2 cores
Tiny run (what the slow test does):
    .venv-peers/bin/python benchmarks/peers.py --tiny

One teacher and one student (Llama, saved locally with save_pretrained, vocabulary ~32k from a BPE tokenizer
trained on the built-in corpus), one dataset (the built-in corpus packed by this project's pipeline: the very
sequences of this project's run, in its order, are handed to every peer), one objective (forward KL at T=1, no CE
term: alpha=1 / kd_ratio=1, because TRL's trainers have no CE term), the same optimizer (AdamW, constant lr, betas
(0.9, 0.999), no weight decay, gradient clipping at 1.0), the same steps and global batch, fp32 on CPU. Systems:

  distributed_distill  `distill train` (trainer.train), online replicated teacher, chunk_size auto
  trl_gkd              trl.experimental.gkd.GKDTrainer, lmbda=0 (never samples), beta=0 (forward KL), seq_kd off
  trl_distillation     trl.DistillationTrainer, beta=0; it is on-policy only (it samples every completion), so its
                       sampling step is replaced by the dataset sequence (1-token prompt, the rest the completion)
  torchtune            recipes/knowledge_distillation_single_device.py (KDRecipeSingleDevice), kd_ratio=1; its
                       student is LoRA (the only KD recipes torchtune ships train adapters), rank 8 on every linear

Each runs in a fresh process. Reported per system: tokens/s over steps 2..N (time between the ends of consecutive
steps, so data loading and logging count), peak RSS of the process (VmHWM, before the float64 check), the loss it
logs at the first and last step, and a float64 recomputation (teacher and student in float64, the weights the
system had at that step, on the batch it trained on) of forward KL and of the peer's own convention.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

SYSTEMS = ("distributed_distill", "trl_gkd", "trl_distillation", "torchtune")
PEER_PACKAGES = {"trl_gkd": ("trl",), "trl_distillation": ("trl",), "torchtune": ("torchtune", "torchao")}
# What the loss each system logs is, per counted token (p_T, p_S at T = 1).
CONVENTIONS = {
    "distributed_distill": "KL(p_T||p_S) * T^2, mean over counted tokens of the global step",
    "trl_gkd": "KL(p_T||p_S) (generalized JSD, beta=0; no T^2; its `temperature` only samples), mean over "
    "counted tokens",
    "trl_distillation": "KL(p_T||p_S) (chunked generalized JSD, beta=0, logits / T, no T^2), mean over completion "
    "tokens",
    "torchtune": "-sum p_T log p_S = KL + H(p_T) (cross-entropy to the teacher; no T), mean over counted tokens",
}
SIZES = {
    "full": dict(vocab=32000, teacher_hidden=512, teacher_layers=4, student_hidden=256, student_layers=4, seq_len=256,
                 batch=4, steps=8, documents=1200),
    "tiny": dict(vocab=2000, teacher_hidden=64, teacher_layers=2, student_hidden=32, student_layers=2, seq_len=32,
                 batch=2, steps=3, documents=60),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# shared setup: tokenizer, packed sequences in this project's order, the two models


def data_config(args, cache: Path):
    from distributed_distill.config import DataConfig

    return DataConfig(source="python-stdlib", max_documents=args.documents, seq_len=args.seq_len,
                      val_fraction=0.05, cache_dir=str(cache))  # fmt: skip


def prepare(args, work: Path) -> dict:
    """Tokenizer, models and the step-ordered sequences every system trains on, written under `work`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distributed_distill.data.batching import collate, train_indices
    from distributed_distill.data.documents import documents, texts_for_tokenizer
    from distributed_distill.data.packed import build_datasets
    from distributed_distill.tokenizer import load_tokenizer, train_bpe_tokenizer

    dcfg = data_config(args, work / "cache")
    docs = documents(dcfg)
    tok_dir = work / "tokenizer"
    if not tok_dir.is_dir():
        train_bpe_tokenizer(texts_for_tokenizer(docs), args.vocab, tok_dir)
    tokenizer = load_tokenizer(str(tok_dir))
    train_ds, _, _ = build_datasets(docs, tokenizer, dcfg)
    order = [train_indices(len(train_ds), args.batch, 1, 0, args.seed, s) for s in range(args.steps)]
    sequences = torch.stack([collate(train_ds, idx)["input_ids"] for idx in order])  # [steps, B, S]
    torch.save(sequences, work / "sequences.pt")
    # The sample indices in training order: this project's run records its own (ranks/rank-0.json, the first 256).
    (work / "order.json").write_text(json.dumps([int(i) for idx in order for i in idx][:256]))
    vocab = len(tokenizer)
    for role in ("teacher", "student"):
        hidden, layers = getattr(args, f"{role}_hidden"), getattr(args, f"{role}_layers")
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(4, hidden // 64),
            intermediate_size=hidden * 4, max_position_embeddings=args.seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
            initializer_range=0.1,  # random models with peaked distributions, so the KL is not ~0
        )  # fmt: skip
        torch.manual_seed(1 if role == "teacher" else 0)
        LlamaForCausalLM(config).save_pretrained(work / role)
        tokenizer.save_pretrained(work / role)
    return {"vocab": vocab, "train_sequences": len(train_ds), "tokens_per_step": args.batch * args.seq_len}


# ----------------------------------------------------------------------------------------------
# float64 reference


def objective64(student_logits, teacher_logits, input_ids) -> dict:
    """Per counted token (next-token positions 0..S-2), in float64: KL(p_T||p_S), H(p_T) and their sum."""
    import torch

    ls = torch.log_softmax(student_logits[:, :-1].double(), -1)
    lt = torch.log_softmax(teacher_logits[:, :-1].double(), -1)
    pt = lt.exp()
    kl = (pt * (lt - ls)).sum(-1).mean().item()
    entropy = -(pt * lt).sum(-1).mean().item()
    del input_ids
    return {"kl": kl, "teacher_entropy": entropy, "cross_entropy_to_teacher": kl + entropy}


def hf_check(work: Path, captured: dict) -> dict:
    """float64 forward of the saved teacher and of the student with the captured weights."""
    import torch
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float64).eval()
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float64).eval()
    out = {}
    with torch.no_grad():
        for when, (state, ids) in captured.items():
            student.load_state_dict(state)
            out[when] = objective64(student(input_ids=ids).logits, teacher(input_ids=ids).logits, ids)
    return out


class StepClock:
    """Ends of optimizer steps; tokens/s over steps 2..N from the gaps between them."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def tick(self) -> None:
        self.ends.append(time.perf_counter())

    def tokens_per_second(self, tokens_per_step: int) -> float:
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:])]
        return tokens_per_step * len(gaps) / sum(gaps)


def cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# the systems, one per worker process


def run_distributed_distill(args, work: Path, sequences) -> dict:
    """`distill train` through its documented entry point (cli.main, what the `distill` script calls), watched only
    through what any run writes: metrics.jsonl (per-step time and loss), ranks/rank-0.json (the samples it trained
    on, in order) and the checkpoint of step N-1 (the weights the last step started from)."""
    from safetensors.torch import load_file

    from distributed_distill import cli, rundir

    out = work / "runs" / "distributed_distill"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run every repeat
    overrides = [
        f"output_dir={out}",
        f"student.path={work / 'student'}",
        f"teacher.path={work / 'teacher'}",
        f"tokenizer.path={work / 'teacher'}",
        f"data.max_documents={args.documents}",
        f"data.seq_len={args.seq_len}",
        f"data.cache_dir={work / 'cache'}",
        "data.val_fraction=0.05",
        "distill.alpha=1.0",
        "distill.loss=forward_kl",
        "distill.temperature=1.0",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.batch}",
        f"train.lr={args.lr}",
        "train.warmup_steps=0",
        "train.min_lr_ratio=1.0",
        "train.adam_beta2=0.999",
        "train.max_grad_norm=1.0",
        f"train.seed={args.seed}",
        "train.eval_batches=1",
        "train.log_every=1",
        f"train.save_every={args.steps - 1}",  # the checkpoint the last step starts from (saved between steps)
        "train.keep_last=1",
        "train.device=cpu",
        "train.resume=false",
        "logging.progress=false",
    ]
    code = cli.main(["train", *overrides])
    if code != 0:
        raise RuntimeError(f"distill train exited {code}")
    rows, _ = rundir.read_records(out / rundir.METRICS)
    steps = {r["step"]: r for r in rows if "loss" in r}
    # The step's own time, from fetching its batch to its optimizer update: tokens_per_second = tokens / seconds.
    clock, ends = StepClock(), 0.0
    for step in range(1, args.steps + 1):
        ends += args.batch * args.seq_len / steps[step]["tokens_per_second"]
        clock.ends.append(ends)
    trained = json.loads(rundir.rank_record(out, 0).read_text())["first_sample_indices"]
    order = json.loads((work / "order.json").read_text())
    if trained[: len(order)] != order:
        raise RuntimeError("this project trained on other sequences than the peers")
    last = load_file(out / rundir.step_name(args.steps - 1) / "model.safetensors")
    first = load_file(work / "student" / "model.safetensors")
    saved = (out / rundir.CONFIG).read_text().splitlines()
    chunk = next(line for line in saved if "chunk_size" in line)
    return {
        "clock": clock,
        "reported": {"first": steps[1]["loss"], "last": steps[args.steps]["loss"]},
        "captured": {"first": (first, sequences[0]), "last": (last, sequences[args.steps - 1])},
        "trainable_parameters": sum(t.numel() for t in first.values()),
        "note": chunk.strip(),
    }


def _trl_common(args, work: Path, name: str) -> dict:
    return dict(
        output_dir=str(work / "runs" / name),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
        beta=0.0,  # generalized JSD with beta = 0: forward KL(p_T || p_S)
    )


def _trl_callback(clock: StepClock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.tick()

    return Clock()


def _trl_models(work: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
    return student, teacher, AutoTokenizer.from_pretrained(work / "student")


def _trl_result(trainer, clock, captured, raw) -> dict:
    logged = [e for e in trainer.state.log_history if "loss" in e and "step" in e]
    losses = {e["step"]: e["loss"] for e in logged}
    return {
        "clock": clock,
        "reported": {"first": losses[1], "last": losses[max(losses)]},
        "raw_loss": raw,
        "captured": captured,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


def run_trl_gkd(args, work: Path, sequences) -> dict:
    import datasets
    import torch
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student, teacher, tokenizer = _trl_models(work)
    rows = sequences.reshape(-1, sequences.shape[-1])
    ds = datasets.Dataset.from_dict({"input_ids": rows.tolist()})
    clock, captured, raw = StepClock(), {}, {}

    def collate(batch):
        ids = torch.tensor([b["input_ids"] for b in batch])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    class Trainer(GKDTrainer):
        def _get_train_sampler(self, *_):  # this project's order: the sequences are already laid out in it
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            step = self.state.global_step
            when = "first" if step == 0 else "last" if step == args.steps - 1 else None
            if when:
                assert bool((inputs["input_ids"] == sequences[step]).all())
                captured[when] = (snapshot(self.accelerator.unwrap_model(model)), inputs["input_ids"].clone())
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if when:
                raw[when] = float(loss if not isinstance(loss, tuple) else loss[0])
            return loss

    config = GKDConfig(**_trl_common(args, work, "trl_gkd"), lmbda=0.0, seq_kd=False, temperature=1.0)
    trainer = Trainer(model=student, teacher_model=teacher, args=config, data_collator=collate, train_dataset=ds,
                      processing_class=tokenizer, callbacks=[_trl_callback(clock)])  # fmt: skip
    trainer.train()
    return _trl_result(trainer, clock, captured, raw)


def run_trl_distillation(args, work: Path, sequences) -> dict:
    import datasets
    import torch
    from trl import DistillationConfig, DistillationTrainer

    student, teacher, tokenizer = _trl_models(work)
    rows = sequences.reshape(-1, sequences.shape[-1])
    ds = datasets.Dataset.from_dict({"prompt": ["-"] * len(rows), "input_ids": rows.tolist()})
    clock, captured, raw = StepClock(), {}, {}

    class Trainer(DistillationTrainer):
        def _generate_and_score_completions(self, inputs):
            # Off-policy: the completion is the dataset sequence (TRL samples it from the student here).
            ids = torch.tensor([x["input_ids"] for x in inputs], device=self.accelerator.device)
            prompt, completion = ids[:, :1], ids[:, 1:]
            return {
                "prompt_ids": prompt,
                "prompt_mask": torch.ones_like(prompt),
                "completion_ids": completion,
                "completion_mask": torch.ones_like(completion),
                "num_items_in_batch": torch.tensor(float(completion.numel()), device=ids.device),
            }

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            step = self.state.global_step
            when = "first" if step == 0 else "last" if step == args.steps - 1 else None
            if when:
                ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
                assert sorted(map(tuple, ids.tolist())) == sorted(map(tuple, sequences[step].tolist()))
                captured[when] = (snapshot(self.accelerator.unwrap_model(model)), ids.clone())
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if when:
                raw[when] = float(loss if not isinstance(loss, tuple) else loss[0])
            return loss

    config = DistillationConfig(**_trl_common(args, work, "trl_distillation"), shuffle_dataset=False,
                                temperature=1.0, max_completion_length=args.seq_len)  # fmt: skip
    trainer = Trainer(model=student, teacher_model=teacher, args=config, train_dataset=ds, processing_class=tokenizer,
                      callbacks=[_trl_callback(clock)])  # fmt: skip
    trainer.train()
    return _trl_result(trainer, clock, captured, raw)


# torchtune components, named by dotted path in its config (this file is importable as `peers` in the worker).
class TorchtuneTokenizer:
    """The recipe only reads pad_id (for its collate function); the sequences are already token ids."""

    pad_id = 0
    max_seq_len = None


def torchtune_rows(tokenizer, path: str) -> list[dict]:
    import torch

    del tokenizer
    rows = torch.load(path).reshape(-1, torch.load(path).shape[-1]).tolist()
    return [{"tokens": r, "labels": list(r)} for r in rows]  # the recipe shifts the labels itself


class RecordingLogger:
    """A torchtune metric logger that keeps what the recipe logs (and when) in a JSONL file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def log_config(self, config) -> None:
        pass

    def log_dict(self, payload: dict, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.perf_counter(), **{k: float(v) for k, v in payload.items()}})
                    + "\n")  # fmt: skip

    def log(self, name, data, step) -> None:
        pass

    def close(self) -> None:
        pass


def run_torchtune(args, work: Path, sequences) -> dict:
    import importlib.util

    import torch
    import torchtune
    from omegaconf import OmegaConf

    path = Path(torchtune.__file__).resolve().parent.parent / "recipes" / "knowledge_distillation_single_device.py"
    spec = importlib.util.spec_from_file_location("torchtune_kd_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(sequences, work / "sequences.pt")
    log_path = work / "runs" / "torchtune" / "log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.unlink(missing_ok=True)

    def model(role: str) -> dict:
        hf = json.loads((work / role / "config.json").read_text())
        dims = dict(vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
                    num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
                    embed_dim=hf["hidden_size"], max_seq_len=args.seq_len, intermediate_dim=hf["intermediate_size"],
                    norm_eps=hf["rms_norm_eps"])  # fmt: skip
        if role == "teacher":
            return {"_component_": "torchtune.models.llama2.llama2", **dims}
        return {"_component_": "torchtune.models.llama2.lora_llama2", **dims, "lora_rank": 8, "lora_alpha": 16,
                "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
                "apply_lora_to_output": True}  # fmt: skip

    def checkpointer(role: str) -> dict:
        return {"_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": str(work / role),
                "checkpoint_files": ["model.safetensors"], "model_type": "LLAMA2",
                "output_dir": str(work / "runs" / "torchtune" / role)}  # fmt: skip

    cfg = OmegaConf.create({
        "output_dir": str(work / "runs" / "torchtune"), "device": "cpu", "dtype": "fp32", "seed": args.seed,
        "epochs": 1, "max_steps_per_epoch": args.steps, "gradient_accumulation_steps": 1, "batch_size": args.batch,
        "shuffle": False, "compile": False, "enable_activation_checkpointing": False, "resume_from_checkpoint": False,
        "kd_ratio": 1.0, "clip_grad_norm": 1.0, "log_every_n_steps": 1, "log_peak_memory_stats": False,
        "model": model("student"), "teacher_model": model("teacher"),
        "checkpointer": checkpointer("student"), "teacher_checkpointer": checkpointer("teacher"),
        "tokenizer": {"_component_": "peers.TorchtuneTokenizer"},
        "dataset": {"_component_": "peers.torchtune_rows", "path": str(work / "sequences.pt")},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": args.lr, "weight_decay": 0.0, "betas": [0.9, 0.999]},
        "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                         "num_warmup_steps": 0},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "kd_loss": {"_component_": "torchtune.modules.loss.ForwardKLWithChunkedOutputLoss"},
        "metric_logger": {"_component_": "peers.RecordingLogger", "path": str(log_path)},
    })  # fmt: skip
    captured: dict = {}
    steps_done = [0]

    class Recipe(module.KDRecipeSingleDevice):
        def _setup_lr_scheduler(self, cfg_lr_scheduler, num_training_steps, last_epoch):
            # A constant learning rate like the other systems (the recipe wants a scheduler that takes the step count).
            return torch.optim.lr_scheduler.LambdaLR(self._optimizer, lambda _: 1.0)

        def _loss_step(self, batch):
            step = steps_done[0]
            if step in (0, args.steps - 1):
                assert bool((batch["tokens"] == sequences[step]).all())
                captured["first" if step == 0 else "last"] = (snapshot(self._model), batch["tokens"].clone())
            steps_done[0] += 1
            return super()._loss_step(batch)

    recipe = Recipe(cfg)
    recipe.setup(cfg)
    recipe.train()
    logged = [json.loads(line) for line in log_path.read_text().splitlines()]
    clock = StepClock()
    clock.ends = [r["time"] for r in logged]
    losses = {r["step"]: r["loss"] for r in logged}
    adapters = sum(p.numel() for p in recipe._model.parameters() if p.requires_grad)
    return {
        "clock": clock,
        "reported": {"first": losses[1], "last": losses[args.steps]},
        "captured": captured,
        "trainable_parameters": adapters,
        "models": (recipe._model, recipe._teacher_model),
        "note": "LoRA rank 8 on q/k/v/o, MLP and output; the base weights are frozen",
    }


def torchtune_check(models, captured: dict) -> dict:
    import torch

    student, teacher = (copy.deepcopy(m).double().eval() for m in models)
    for m in (student, teacher):
        m.set_num_output_chunks(0)  # whole logits for the reference
    out = {}
    with torch.no_grad():
        for when, (state, ids) in captured.items():
            student.load_state_dict(state)
            out[when] = objective64(student(ids), teacher(ids), ids)
    return out


def worker(system: str, args, work: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    sequences = torch.load(work / "sequences.pt")
    run = {
        "distributed_distill": run_distributed_distill,
        "trl_gkd": run_trl_gkd,
        "trl_distillation": run_trl_distillation,
        "torchtune": run_torchtune,
    }[system]
    started, cpu_started = time.perf_counter(), cpu_seconds()
    res = run(args, work, sequences)
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    rss = peak_rss()  # before the float64 check allocates its own models
    reference = (
        torchtune_check(res["models"], res["captured"]) if system == "torchtune" else hf_check(work, res["captured"])
    )
    return {
        "system": system,
        "version": version_of(system),
        "tokens_per_second": res["clock"].tokens_per_second(args.batch * args.seq_len),
        "step_seconds": [round(b - a, 3) for a, b in zip(res["clock"].ends, res["clock"].ends[1:])],
        "peak_rss_bytes": rss,
        "wall_seconds": wall,
        "cpu_seconds": cpu,  # user + system time of every thread of the process over the same interval
        "trainable_parameters": res["trainable_parameters"],
        "reported_loss": res["reported"],
        "raw_loss": res.get("raw_loss"),
        "float64": reference,
        "convention": CONVENTIONS[system],
        "note": res.get("note"),
    }


def version_of(system: str) -> str:
    from importlib.metadata import version

    if system == "distributed_distill":
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return f"{version('distributed_distill')} ({head.stdout.strip() or 'no git'})"
    return ", ".join(f"{p} {version(p)}" for p in PEER_PACKAGES[system])


def missing_peers(system: str) -> str | None:
    """Why `system` cannot run in this interpreter, or None."""
    import importlib.util

    for package in PEER_PACKAGES.get(system, ()):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed (pip install -e .[peers])"
    return None


# ----------------------------------------------------------------------------------------------
# the run


def machine() -> str:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), load {os.getloadavg()[0]:.1f}"


def median_tps(r: dict, result: dict) -> float:
    """tokens/s from the median step time (steps 2..N of every repeat): on a shared machine steadier than the mean."""
    import statistics

    return result["data"]["tokens_per_step"] / statistics.median(r["step_seconds"])


def spread(r: dict, result: dict) -> tuple[float, float]:
    """The lowest and highest of the repeats' median-step tokens/s (one value without --repeats)."""
    runs = [median_tps(x, result) for x in r.get("repeats", [r])]
    return min(runs), max(runs)


def table(result: dict) -> str:
    base = result["systems"].get("distributed_distill")
    lines = [
        "| system | version | trainable params | tokens/s (median step; repeats' range) | vs this | CPU s / wall s "
        "| peak RSS (GiB) | vs this | loss step 1: reported / f64 KL / f64 convention "
        "| loss last step: reported / f64 KL / f64 convention |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["systems"].items():
        if "skipped" in r:
            lines.append(f"| {name} | – | – | – | – | – | – | – | skipped: {r['skipped']} | |")
            continue
        conv = "cross_entropy_to_teacher" if name == "torchtune" else "kl"
        losses = [
            f"{r['reported_loss'][w]:.6g} / {r['float64'][w]['kl']:.6g} / {r['float64'][w][conv]:.6g}"
            for w in ("first", "last")
        ]
        ok = base and "skipped" not in base
        tps = median_tps(r, result) / median_tps(base, result) if ok else float("nan")
        rss = r["peak_rss_bytes"] / base["peak_rss_bytes"] if ok else float("nan")
        lo, hi = spread(r, result)
        runs = r.get("repeats", [r])
        cpu = sum(x["cpu_seconds"] for x in runs) / sum(x["wall_seconds"] for x in runs)
        lines.append(
            f"| {name} | {r['version']} | {r['trainable_parameters']:,} | {median_tps(r, result):.0f} "
            f"({lo:.0f}–{hi:.0f}) | {tps:.2f}x | {cpu:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} | {rss:.2f}x "
            f"| {losses[0]} | {losses[1]} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models and 3 steps (the slow test)")
    for key, value in SIZES["full"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every system's process")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every system, alternating systems")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--work", type=Path, default=None, help="where models, data and runs go; default a temp dir")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--table", type=Path, default=None, help="print the table of a result written by --json")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    for key, value in SIZES["tiny" if args.tiny else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.worker:
        print("PEERS-RESULT " + json.dumps(worker(args.worker, args, args.work)), flush=True)
        return

    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="peers-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "json", "work")},
        "machine": machine(),
        "python": sys.executable,
        "torch": _torch_version(),
        "data": prepare(args, work),
        "systems": {},
    }
    systems = args.systems.split(",")
    runs: dict[str, list[dict]] = {system: [] for system in systems}
    for _ in range(args.repeats):  # system after system, then again: a slow spell of the machine hits them all
        for system in systems:
            if "skipped" in result["systems"].get(system, {}):
                continue
            reason = missing_peers(system) or run_worker(system, args, work, runs[system])
            if reason:
                result["systems"][system] = {"skipped": reason}
                continue
            result["systems"][system] = merge(runs[system])
            if args.json:  # what finished is kept if a later system is stopped
                args.json.write_text(json.dumps(result, indent=2))
    result["load_after"] = os.getloadavg()[0]
    result["seconds"] = time.perf_counter() - started
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    print()
    print(table(result))


def run_worker(system: str, args, work: Path, runs: list[dict]) -> str | None:
    """One run of `system` in a fresh process, appended to `runs`; why it failed, or None."""
    cmd = [sys.executable, __file__, "--worker", system, "--work", str(work)] + [
        f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (*SIZES["full"], "lr", "seed", "threads")
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    line = next((x for x in done.stdout.splitlines() if x.startswith("PEERS-RESULT ")), None)
    if done.returncode != 0 or line is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-12:]
        return f"failed (exit {done.returncode}): " + " | ".join(tail)
    runs.append(json.loads(line.split(" ", 1)[1]))
    return None


def merge(runs: list[dict]) -> dict:
    """The first run's record (losses and checks: every repeat trains the same steps), with every repeat's step times
    pooled for the median, the highest peak RSS, and each repeat's own figures kept under `repeats`."""
    keep = ("tokens_per_second", "step_seconds", "peak_rss_bytes", "wall_seconds", "cpu_seconds", "reported_loss")
    return {
        **runs[0],
        "step_seconds": [t for r in runs for t in r["step_seconds"]],
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        "repeats": [{k: r[k] for k in keep} for r in runs],
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
