"""What a 1B+ student needs: gradient checkpointing (same loss and gradients), LoRA (only adapters train, final/
holds the merged model with the same logits as the adapter model, exact resume; refused under ZeRO-3), the teacher's
dtype, and the attention implementation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from distributed_distill import models, objective
from distributed_distill.config import load_config
from distributed_distill.errors import DistillError
from distributed_distill.teacher import OnlineTeacher

from .helpers import SMOKE, accelerate_launch, read_metrics, run_cli, torchrun, training_records

VOCAB = 512


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (3, 24), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("chunk", [0, 16])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(chunk):
    cfg = load_config(SMOKE, [f"distill.chunk_size={chunk}"])
    teacher = OnlineTeacher(models.load_model(cfg.teacher, models.arch_config(cfg.teacher.arch, VOCAB), seed=1), {})
    results = []
    for checkpointing in (False, True):
        student = models.load_model(cfg.student, models.arch_config(cfg.student.arch, VOCAB), seed=0).double()
        scfg = load_config(SMOKE, [f"student.gradient_checkpointing={checkpointing}"]).student
        student = models.prepare_student(student, scfg).train()
        assert student.is_gradient_checkpointing == checkpointing
        out = objective.forward_losses(
            student, teacher, _batch(), cfg.distill, models.AlignedHead(student.get_output_embeddings(), VOCAB)
        )
        (0.5 * out.kd_sum + 0.5 * out.ce_sum).backward()
        results.append((out, {n: p.grad.clone() for n, p in student.named_parameters()}))
    (plain, g_plain), (ckpt, g_ckpt) = results
    assert ckpt.kd_sum.item() == pytest.approx(plain.kd_sum.item(), rel=1e-5, abs=1e-5)
    assert ckpt.ce_sum.item() == pytest.approx(plain.ce_sum.item(), rel=1e-5, abs=1e-5)
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-5, msg=name)


def test_lora_trains_only_adapters_and_final_is_the_merged_model(student_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    overrides = ["student.arch=null", f"student.path={student_dir}", "student.lora={r: 4, alpha: 8}"]
    proc = run_cli(["train", "--config", str(SMOKE), f"output_dir={out}", "train.max_steps=3", *overrides])
    assert "trainable: LoRA" in proc.stdout
    base = load_file(student_dir / "model.safetensors")
    merged = load_file(out / "final" / "model.safetensors")
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    # every linear layer of the blocks moved (adapters merged), nothing else did: embeddings, norms, head
    assert changed and all(k.endswith("proj.weight") for k in changed)
    assert all(torch.equal(base[k], merged[k]) for k in base if "proj" not in k)
    ids = _batch()["input_ids"]
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_dir), out / "final" / "adapter")
    with torch.no_grad():
        want = adapter.eval()(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(out / "final").eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lora_resume_is_exact(student_dir, tmp_path):
    common = [
        "--config",
        str(SMOKE),
        "student.arch=null",
        f"student.path={student_dir}",
        "student.lora={r: 4, alpha: 8}",
        "train.save_every=2",
        "train.warmup_steps=0",
        "train.min_lr_ratio=1.0",  # constant lr: the schedule does not depend on max_steps
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_cli(["train", *common, f"output_dir={whole}", "train.max_steps=4"])
    run_cli(["train", *common, f"output_dir={split}", "train.max_steps=2"])
    run_cli(["train", *common, f"output_dir={split}", "train.max_steps=4"])
    assert training_records(whole) == training_records(split)
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(whole / "final" / name), load_file(split / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
@pytest.mark.multiprocess
def test_lora_under_zero3_is_refused_at_startup(tmp_path):
    launcher = [*accelerate_launch("zero3.yaml", 29641), "train.py"]
    args = ["--config", str(SMOKE), f"output_dir={tmp_path / 'z3'}", "student.lora={r: 4}", "distill.chunk_size=0"]
    proc = run_cli(args, launcher=launcher, check=False, timeout=300)
    assert proc.returncode != 0
    assert "error: student.lora with a ZeRO-3 student is not supported" in proc.stdout + proc.stderr


def test_teacher_dtype_auto_is_bf16_on_cuda_only_and_attention_is_configurable():
    cfg = load_config(SMOKE, ["student.attn_implementation=eager"])
    assert cfg.teacher.dtype == "auto" and cfg.student.dtype == "float32"
    assert models.dtype_name(cfg.teacher, torch.device("cuda")) == "bfloat16"
    assert models.dtype_name(cfg.teacher, torch.device("cpu")) == "float32"
    student = models.load_model(cfg.student, models.arch_config(cfg.student.arch, VOCAB), seed=0)
    assert student.config._attn_implementation == "eager"
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        flash = load_config(SMOKE, ["teacher.attn_implementation=flash_attention_2"])
        with pytest.raises(DistillError, match=r"teacher.attn_implementation=flash_attention_2 needs the flash-attn"):
            models.check_packages(flash)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_lora_and_gradient_checkpointing_under_two_processes(student_dir, tmp_path, strategy):
    """The launch files LoRA is meant for: 2 CPU processes, DDP (torchrun) and a DeepSpeed ZeRO-2 student."""
    out = tmp_path / strategy
    launcher = (
        torchrun(29651, "train.py") if strategy == "ddp" else [*accelerate_launch("zero2.yaml", 29652), "train.py"]
    )
    args = ["--config", str(SMOKE), f"output_dir={out}", "train.max_steps=3", "train.micro_batch_size=2"]
    args += ["student.arch=null", f"student.path={student_dir}", "student.lora={r: 4, alpha: 8}"]
    args += ["student.gradient_checkpointing=true"]
    run_cli(args, launcher=launcher, timeout=600)
    assert read_metrics(out)[-1]["step"] == 3
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    base, merged = load_file(student_dir / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(base[k], merged[k]) for k in base if "proj" not in k)
    assert any(not torch.equal(base[k], merged[k]) for k in base if "proj" in k)
