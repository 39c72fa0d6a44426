"""Validation during training, `distill eval` (models compared on a config's validation split), and `distill report`
(a run directory summarised)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import Accelerator

from . import data as data_lib
from . import models
from .config import Config, ModelConfig
from .errors import DistillError
from .objective import forward_losses
from .setup import resolve_loss_chunks, setup_accelerator, setup_tokenizer
from .teacher import TeacherSource
from .tracking import METRICS, read_records


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    head: models.AlignedHead,
    teacher: TeacherSource | None,
    val_ds,
    cfg: Config,
) -> dict:
    """Validation CE (and KD against the teacher, if any) over the split, token-weighted across ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=accelerator.device)
    batches = data_lib.eval_batches(
        val_ds, cfg.train.micro_batch_size, accelerator.num_processes, accelerator.process_index, cfg.train.eval_batches
    )
    for mb in batches:
        mb = {k: v.to(accelerator.device) for k, v in mb.items()}
        with accelerator.autocast():
            out = forward_losses(model, teacher, mb, cfg.distill, head=head)
        sums += torch.stack([out.ce_sum.float(), out.kd_sum.float(), out.num_tokens.float()])
    ce, kd, n = accelerator.reduce(sums, reduction="sum").tolist()
    model.train(was_training)
    n = max(n, 1.0)
    result = {"val_loss": ce / n, "val_ppl": math.exp(min(ce / n, 50.0)), "val_tokens": int(n)}
    if teacher is not None and cfg.distill.alpha > 0:
        result["val_kd_loss"] = kd / n
    return result


def evaluate_models(cfg: Config, named: dict[str, str]) -> list[dict]:
    """Validation CE loss and perplexity of each model, on the same tokens (the config's validation split).

    `named` maps a display name to a model directory or hub id; empty means the config's teacher and student.
    """
    if not named:
        for role in ("teacher", "student"):
            mcfg = getattr(cfg, role)
            if mcfg is not None and mcfg.path is not None:
                named[role] = mcfg.path
    if not named:
        raise DistillError("nothing to evaluate: give --model NAME=PATH or a config whose student/teacher has a path")
    accelerator = setup_accelerator(cfg)
    tokenizer = setup_tokenizer(cfg, accelerator)
    mcfgs = {name: ModelConfig(path=path) for name, path in named.items()}
    configs = {name: models.model_config(m, len(tokenizer), name) for name, m in mcfgs.items()}
    for mc in configs.values():
        models.check_models(cfg, mc, None, len(tokenizer))
    with accelerator.main_process_first():
        _, val_ds = data_lib.build_datasets(cfg.data, tokenizer)
    rows = []
    for name, mcfg in mcfgs.items():
        model = models.load_model(mcfg, configs[name], seed=cfg.train.seed).to(accelerator.device)
        head = models.AlignedHead(model.get_output_embeddings(), len(tokenizer))
        run_cfg = resolve_loss_chunks(cfg, configs[name], accelerator)
        result = evaluate(accelerator, model, head, None, val_ds, run_cfg)
        rows.append({"model": name, "path": mcfg.path, **result})
        del model
    return rows


def read_metrics(run_dir: Path) -> tuple[list[dict], list[str]]:
    """The run's metrics records, and a note for each line skipped (a torn last line)."""
    path = run_dir / METRICS
    if not path.is_file():
        raise DistillError(f"{run_dir} is not a run directory (no {METRICS})")
    return read_records(path)


def report(run_dir: Path) -> str:
    records, notes = read_metrics(run_dir)
    if not records:
        raise DistillError(f"{run_dir}/{METRICS} holds no complete record")
    first, last = records[0], records[-1]
    evals = [r for r in records if "val_loss" in r]
    tps = [r["tokens_per_second"] for r in records]
    lines = [
        *(f"note: {note}" for note in notes),
        f"run: {run_dir}",
        f"steps: {last['step']}  loss: {first['loss']:.4f} -> {last['loss']:.4f}  "
        f"(kd {last['kd_loss']:.4f}, ce {last['ce_loss']:.4f})",
        f"tokens/s: mean {sum(tps) / len(tps):,.0f}",
    ]
    if evals:
        lines.append(
            f"val_loss: {evals[-1]['val_loss']:.4f} (ppl {evals[-1]['val_ppl']:.2f}) at step {evals[-1]['step']}"
        )
    if (run_dir / "final").is_dir():
        lines.append(f"exported student: {run_dir / 'final'}")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """`distill eval` rows as a Markdown table."""
    lines = ["| model | val loss | val perplexity |", "|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} |" for r in rows]
    return "\n".join(lines)
