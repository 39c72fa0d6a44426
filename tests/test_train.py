"""The real entry points on tiny models: `python train.py` and `distill train`, the run directory, the export."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from distributed_distill.config import load_config

from .helpers import ROOT, SMOKE, read_metrics, run_cli

REQUIRED = {"step", "loss", "kd_loss", "ce_loss", "tokens_per_second"}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory, smoke_run):
    """`python train.py` here; `distill train` is the session's smoke run (conftest.py), shared with test_errors."""
    a = tmp_path_factory.mktemp("smoke") / "train_py"
    run_cli(["--config", str(SMOKE), f"output_dir={a}"], launcher=[sys.executable, "train.py"])
    return a, smoke_run


def test_run_directory_contract(smoke_runs):
    run, _ = smoke_runs
    cfg = load_config(run / "config.yaml")
    assert cfg == load_config(SMOKE, [f"output_dir={run}"])
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, cfg.train.max_steps + 1))
    assert all(REQUIRED <= r.keys() for r in records)
    assert "val_loss" in records[-1]
    for r in records:  # the logged loss is exactly the optimised combination
        assert r["loss"] == pytest.approx(cfg.distill.alpha * r["kd_loss"] + (1 - cfg.distill.alpha) * r["ce_loss"])
    final = run / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert (final / "tokenizer.json").is_file()
    teacher = json.loads((run / "teacher.json").read_text())
    assert teacher["arch"]["hidden_size"] == cfg.teacher.arch.hidden_size and len(teacher["config_sha256"]) == 64
    assert not list(final.glob("*teacher*"))


def test_both_entry_points_train_the_same_student(smoke_runs):
    a, b = smoke_runs
    strip = lambda rs: [{k: v for k, v in r.items() if "per_second" not in k} for r in rs]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    from safetensors.torch import load_file

    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_export_loads_with_plain_transformers_and_matches_training(smoke_runs):
    """Recompute the final validation loss with nothing but transformers: it must equal the one the
    training process computed from its live student (same logits)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distributed_distill.data.documents import documents
    from distributed_distill.data.packed import build_datasets
    from distributed_distill.models import model_inputs

    run, _ = smoke_runs
    cfg = load_config(run / "config.yaml")
    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    _, val, _ = build_datasets(documents(cfg.data), tokenizer, cfg.data)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val), 16):
            rows = val[start : start + 16]
            batch = {"input_ids": rows["input_ids"].long(), "position_ids": rows["position_ids"].long()}
            logits = model(**model_inputs(model, batch)).logits[:, :-1]  # documents apart, as in training
            labels = rows["labels"].long()[:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").item()
            count += int((labels != -100).sum())
    assert count == read_metrics(run)[-1]["val_tokens"]
    assert total / count == pytest.approx(read_metrics(run)[-1]["val_loss"], abs=1e-5)


def test_report_and_eval_commands(smoke_runs):
    run, _ = smoke_runs
    out = run_cli(["report", str(run)]).stdout
    assert "steps: 5" in out and "val_loss" in out
    assert (run / "report" / "loss.png").is_file() and (run / "report" / "report.md").is_file()  # the default --out
    rows_path = run / "eval.json"
    run_cli(
        ["eval", "--config", str(run / "config.yaml"), "--model", f"student={run / 'final'}", "--json", str(rows_path)]
    )
    rows = json.loads(rows_path.read_text())
    assert rows[0]["val_loss"] == pytest.approx(read_metrics(run)[-1]["val_loss"], abs=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@pytest.mark.slow
def test_other_families_train_and_export(tmp_path, family):
    out = tmp_path / family
    run_cli(
        [
            "train",
            "--config",
            str(SMOKE),
            f"output_dir={out}",
            "train.max_steps=2",
            f"student.arch.family={family}",
            f"teacher.arch.family={family}",
        ]
    )
    cfg = yaml.safe_load((out / "final" / "config.json").read_text())
    assert cfg["model_type"] == family
    assert "val_loss" in read_metrics(out)[-1]


def test_help_lists_config_keys():
    out = run_cli(["train", "--help-config"]).stdout
    assert "distill.alpha" in out and "train.grad_accum_steps" in out
    assert "--config" in run_cli(["train", "--help"]).stdout


def test_root_train_py_documents_how_to_run():
    text = (ROOT / "train.py").read_text()
    assert "accelerate launch" in text and "torchrun" in text


@pytest.mark.slow
def test_bf16_autocast_run(tmp_path):
    out = tmp_path / "bf16"
    run_cli(["train", "--config", str(SMOKE), f"output_dir={out}", "train.max_steps=3", "train.precision=bf16"])
    records = read_metrics(out)
    assert all(r["loss"] == r["loss"] and r["loss"] < 100 for r in records)  # finite
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "kind",
    # Every kind is checked against a float64 reference in test_losses.py; the end-to-end run of each from the
    # config: the two most used in the default tier, the rest in the slow tier.
    ["forward_kl", "reverse_kl"]
    + [pytest.param(k, marks=pytest.mark.slow) for k in ("jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "mse")],
)
def test_every_loss_kind_trains_from_the_config(tmp_path, kind):
    from distributed_distill.trainer import train

    cfg = load_config(
        SMOKE, [f"output_dir={tmp_path}", "train.max_steps=2", f"distill.loss={kind}", "distill.alpha=1.0"]
    )
    result = train(cfg)
    records = read_metrics(tmp_path)
    assert all(r["loss"] == r["kd_loss"] and 0 <= r["kd_loss"] < 1e3 for r in records)
    assert records[0]["kd_loss"] > 0  # random teacher and student disagree
    assert result["val_kd_loss"] > 0 and (tmp_path / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_online_top_k_trains_with_both_tail_choices(tmp_path):
    from distributed_distill.trainer import train

    losses = {}
    for tail in ("bucket", "renormalize"):
        out = tmp_path / tail
        train(
            load_config(
                SMOKE, [f"output_dir={out}", "train.max_steps=2", "distill.top_k=16", f"distill.top_k_tail={tail}"]
            )
        )
        records = read_metrics(out)
        assert 0 < records[-1]["topk_mass"] < 1
        losses[tail] = records[0]["kd_loss"]
    assert losses["bucket"] != losses["renormalize"]
