"""The gradient of one optimizer step does not depend on how the global batch is split into micro-batches
and accumulation steps (docs/design.md, normalisation): token-level losses are divided by the valid-token count
of the whole step, not of each micro-batch. The hint term of distill.hidden too (its projections included)."""

import copy

import pytest
import torch

from distributed_distill import hidden, models, setup, trainer
from distributed_distill.config import load_config
from distributed_distill.teacher import OnlineTeacher

from .helpers import SMOKE

VOCAB, SEQ = 97, 16


def _global_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, SEQ), generator=g)
    labels = ids.clone()
    # very different numbers of counted tokens per sequence: 15, 9, 3 and 0 (all masked)
    labels[1, :7] = -100
    labels[2, 4:] = -100
    labels[3, :] = -100
    return {"input_ids": ids, "labels": labels}


def _step_delta(micro: int, accum: int, alpha: float, loss: str, chunk: int, hints: tuple[str, ...] = ()) -> dict:
    cfg = load_config(
        SMOKE,
        [
            f"train.micro_batch_size={micro}",
            f"train.grad_accum_steps={accum}",
            f"distill.alpha={alpha}",
            f"distill.loss={loss}",
            f"distill.chunk_size={chunk}",
            "train.max_grad_norm=0",
            *hints,
        ],
    )
    accelerator = setup.setup_accelerator(cfg)
    s_config, t_config = models.arch_config(cfg.student.arch, VOCAB), models.arch_config(cfg.teacher.arch, VOCAB)
    student = models.load_model(cfg.student, s_config, seed=0)
    if hints:  # distill.hidden: the projections join the student (and its update) before it is prepared
        pairs = hidden.resolve_pairs(cfg.distill.hidden, s_config, t_config)
        hidden.attach(student, cfg.distill.hidden, pairs, s_config, t_config, cfg.train.seed)
    teacher = OnlineTeacher(models.load_model(cfg.teacher, t_config, seed=1), {})
    before = copy.deepcopy(student.state_dict())
    # Plain SGD with lr=1: the parameter change is exactly minus the gradient.
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    student, optimizer = accelerator.prepare(student, optimizer)
    head = models.AlignedHead(accelerator.unwrap_model(student).get_output_embeddings(), VOCAB)
    batch = _global_batch()
    micro_batches = [{k: v[i : i + micro] for k, v in batch.items()} for i in range(0, 4, micro)]
    step_hints = hidden.for_step(cfg.distill.hidden, hidden.projections(accelerator.unwrap_model(student)), 1, None)
    result = trainer.train_step(accelerator, student, head, teacher, optimizer, micro_batches, cfg, hints=step_hints)
    after = accelerator.unwrap_model(student).state_dict()
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return {"loss": result.loss, "num_tokens": result.num_tokens, **{k: before[k] - after[k] for k in before}}


# distill.hidden (issue 24): the hint term and its projections, on the chunked and the naive path.
HINTS_MSE = ("distill.hidden.loss=mse", "distill.hidden.weight=3")
HINTS_COSINE = ("distill.hidden.loss=cosine", "distill.hidden.layers=[[0,1],[final,final]]")


@pytest.mark.parametrize(
    ("alpha", "loss", "chunk", "hints"),
    [
        pytest.param(0.5, "forward_kl", 5, (), id="0.5-forward_kl-5"),
        pytest.param(0.5, "forward_kl", 0, (), id="0.5-forward_kl-0"),
        pytest.param(0.0, "forward_kl", 7, (), id="0.0-forward_kl-7"),
        pytest.param(0.5, "forward_kl", 5, HINTS_MSE, marks=pytest.mark.slow, id="hints-mse-chunked"),
        pytest.param(0.5, "reverse_kl", 0, HINTS_COSINE, marks=pytest.mark.slow, id="hints-cosine-naive"),
    ],
)
def test_gradient_is_invariant_to_micro_batching(alpha, loss, chunk, hints):
    reference = _step_delta(4, 1, alpha, loss, chunk, hints)
    assert reference["num_tokens"] == 15 + 9 + 3
    assert any(v.abs().max() > 1e-4 for k, v in reference.items() if isinstance(v, torch.Tensor))
    if hints:  # the projections are part of the step: trained, and split-invariant like the rest
        assert any(k.startswith(hidden.SUBMODULE) and v.abs().max() > 1e-4 for k, v in reference.items())
    for micro, accum in [(2, 2), (1, 4)]:
        other = _step_delta(micro, accum, alpha, loss, chunk, hints)
        assert other["loss"] == pytest.approx(reference["loss"], abs=1e-6)
        for name, delta in reference.items():
            if isinstance(delta, torch.Tensor):
                torch.testing.assert_close(other[name], delta, atol=1e-5, rtol=0, msg=f"{name} ({micro}x{accum})")


def test_chunked_and_naive_paths_give_the_same_step():
    chunked, naive = _step_delta(2, 2, 0.5, "forward_kl", 5), _step_delta(2, 2, 0.5, "forward_kl", 0)
    assert chunked["loss"] == pytest.approx(naive["loss"], abs=1e-6)
    for name, delta in naive.items():
        if isinstance(delta, torch.Tensor):
            torch.testing.assert_close(chunked[name], delta, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [5, 0])
def test_bf16_training_and_validation_compute_the_same_loss(chunk):
    """Under `train.precision: bf16` the step and validation run the loss under the same autocast, so the loss the
    step optimises for a batch is the loss validation reports for it (the chunked loss takes its matmul dtype from
    the active autocast)."""
    from datasets import Dataset

    from distributed_distill.eval.evaluate import evaluate

    cfg = load_config(
        SMOKE, ["train.precision=bf16", "train.micro_batch_size=4", f"distill.chunk_size={chunk}", "train.device=cpu"]
    )
    accelerator = setup.setup_accelerator(cfg)
    student = models.load_model(cfg.student, models.arch_config(cfg.student.arch, VOCAB), seed=0)
    teacher = OnlineTeacher(models.load_model(cfg.teacher, models.arch_config(cfg.teacher.arch, VOCAB), seed=1), {})
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    student, optimizer = accelerator.prepare(student, optimizer)
    head = models.AlignedHead(accelerator.unwrap_model(student).get_output_embeddings(), VOCAB)
    batch = _global_batch()
    val_ds = Dataset.from_dict({k: v.tolist() for k, v in batch.items()}).with_format("torch")
    student.train()
    stepped = trainer.train_step(accelerator, student, head, teacher, optimizer, [batch], cfg)
    validated = evaluate(accelerator, student, head, teacher, val_ds, cfg)
    assert validated["val_tokens"] == stepped.num_tokens == 15 + 9 + 3
    assert validated["val_loss"] == pytest.approx(stepped.ce_loss, rel=1e-6, abs=1e-6)
    assert validated["val_kd_loss"] == pytest.approx(stepped.kd_loss, rel=1e-6, abs=1e-6)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
