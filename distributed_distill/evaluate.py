"""Compare models on a config's validation split, and summarise run directories."""

from __future__ import annotations

import json
from pathlib import Path

from . import data as data_lib
from . import models
from .config import Config, ModelConfig
from .errors import DistillError


def evaluate_models(cfg: Config, named: dict[str, str]) -> list[dict]:
    """Validation CE loss and perplexity of each model, on the same tokens (the config's validation split).

    `named` maps a display name to a model directory or hub id; empty means the config's teacher and student.
    """
    from .trainer import evaluate, setup_accelerator, setup_tokenizer

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
        result = evaluate(accelerator, model, model.get_output_embeddings(), None, val_ds, cfg)
        rows.append({"model": name, "path": mcfg.path, **result})
        del model
    return rows


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DistillError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(run_dir: Path) -> str:
    records = read_metrics(run_dir)
    if not records:
        raise DistillError(f"{run_dir}/metrics.jsonl is empty")
    first, last = records[0], records[-1]
    evals = [r for r in records if "val_loss" in r]
    tps = [r["tokens_per_second"] for r in records]
    lines = [
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
