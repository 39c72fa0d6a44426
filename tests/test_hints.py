"""Hidden-state distillation (`distill.hidden`, hints; docs/hints.md): the hint loss and its gradients against a
float64 reference, packing and masks, the layer mapping, FitNets' stages and the KD balance, the projections in
checkpoints and beside final/, gradient checkpointing, LoRA, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from distributed_distill import hidden, models, setup, trainer
from distributed_distill.config import load_config
from distributed_distill.data.batching import IGNORE_INDEX
from distributed_distill.teacher import OnlineTeacher

from .helpers import SMOKE

VOCAB, SEQ = 97, 16
# Tiny models of different depths and widths: student 2 blocks of 32, teacher 3 blocks of 48.
ARCH = "{{family: llama, hidden_size: {h}, num_layers: {n}, num_heads: 4, max_position_embeddings: 64}}"
MODELS = [f"student.arch={ARCH.format(h=32, n=2)}", f"teacher.arch={ARCH.format(h=48, n=3)}"]
# The embedding output, a middle block onto a deeper one, and the final norms' outputs.
PAIRS = "distill.hidden.layers=[[0,0],[1,2],[final,final]]"


def packed_batch() -> dict:
    """Two rows: two packed documents (7 + 9 tokens, position_ids restarting; each bos masked), and one document
    whose first 6 labels are a prompt and whose last 3 are padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    positions = torch.stack([torch.cat([torch.arange(7), torch.arange(9)]), torch.arange(SEQ)])
    labels = ids.clone()
    labels[0, [0, 7]] = IGNORE_INDEX
    labels[1, :6] = IGNORE_INDEX
    labels[1, -3:] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def build(overrides: list[str], seed_student: int = 0):
    """An accelerator, the config, a student with its projections (prepared, SGD lr=1: the update is minus the
    gradient), the teacher and the step's hints; as the trainer builds them (hidden.attach before prepare)."""
    cfg = load_config(SMOKE, [*MODELS, "train.max_grad_norm=0", "train.device=cpu", *overrides])
    accelerator = setup.setup_accelerator(cfg)
    s_config, t_config = (models.arch_config(m.arch, VOCAB) for m in (cfg.student, cfg.teacher))
    student, teacher = (
        models.load_model(cfg.student, s_config, seed=seed_student),
        models.load_model(cfg.teacher, t_config, seed=1),
    )
    for model in (student, teacher):  # unit-scale embeddings (init has 0.02): every hidden state and gradient O(1)
        torch.nn.init.normal_(model.get_input_embeddings().weight, generator=torch.Generator().manual_seed(2))
    student = models.prepare_student(student, cfg.student)
    pairs = hidden.resolve_pairs(cfg.distill.hidden, s_config, t_config)
    hidden.attach(student, cfg.distill.hidden, pairs, s_config, t_config, cfg.train.seed)
    teacher = OnlineTeacher(teacher, {})
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1.0)
    student, optimizer = accelerator.prepare(student, optimizer)
    head = models.AlignedHead(accelerator.unwrap_model(student).get_output_embeddings(), VOCAB)
    return accelerator, cfg, student, teacher, optimizer, head


def step(overrides: list[str], micro_batches: list[dict], step_number: int = 1, scale: float | None = None):
    """One train_step with hints: its result and each parameter's change (minus the gradient), before-state kept."""
    accelerator, cfg, student, teacher, optimizer, head = build(overrides)
    unwrapped = accelerator.unwrap_model(student)
    before = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
    hints = hidden.for_step(cfg.distill.hidden, hidden.projections(unwrapped), step_number, scale)
    result = trainer.train_step(accelerator, student, head, teacher, optimizer, micro_batches, cfg, hints=hints)
    after = unwrapped.state_dict()
    return result, {k: before[k] - after[k] for k in before}, (unwrapped, teacher, before)


def reference_hints(student, teacher, state: dict, batch: dict, pairs, kind: str, weight: float):
    """The hint term in float64, written out plainly: every hidden state from transformers (no selection), the
    counted next-token positions, the projection as a matrix, the per-position formula. Returns the per-pair
    means and the gradient of every student parameter (projections included), by name."""
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher.model).double()
    s64.load_state_dict({k: v.double() for k, v in state.items()})
    params = dict(s64.named_parameters())
    s_states = s64(**models.model_inputs(s64, batch), output_hidden_states=True).hidden_states
    with torch.no_grad():
        t_states = t64(**models.model_inputs(t64, batch), output_hidden_states=True).hidden_states
    counted = batch["labels"][:, 1:].reshape(-1) != IGNORE_INDEX
    means = []
    for i, pair in enumerate(pairs):
        s = s_states[pair.student][:, :-1].reshape(-1, s_states[0].shape[-1])[counted]
        t = t_states[pair.teacher][:, :-1].reshape(-1, t_states[0].shape[-1])[counted]
        s = s @ params[f"{hidden.SUBMODULE}.maps.{i}.weight"].T
        if kind == "mse":
            per_position = ((s - t) ** 2).mean(-1)
        else:
            per_position = 1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
        means.append(per_position.sum() / counted.sum())
    loss = weight * torch.stack(means).mean()
    loss.backward()
    return [m.item() for m in means], {k: torch.zeros_like(p) if p.grad is None else p.grad for k, p in params.items()}


def test_hint_step_equals_a_float64_reference():
    """FitNets' first stage (hints alone): the logged hint loss of each pair, and the update of every student
    parameter and projection, equal a float64 reference to 1e-5, for mse and cosine, on packed documents and a
    masked prompt with padding. The KD and CE terms are computed (logged) but weighted 0: no gradient from them."""
    batch = packed_batch()
    for kind in ("mse", "cosine"):
        overrides = [PAIRS, f"distill.hidden.loss={kind}", "distill.hidden.weight=20", "distill.hidden.until_step=5"]
        result, delta, (student, teacher, before) = step(overrides, [batch])
        pairs = hidden.projections(student).pairs
        assert [(p.student, p.teacher) for p in pairs] == [(0, 0), (1, 2), (2, 3)]
        assert result.num_tokens == (15 - 1) + (15 - 5 - 3)  # less the second document's bos, the prompt, the padding
        means, grads = reference_hints(student, teacher, before, batch, pairs, kind, weight=20.0)
        assert result.hint_losses == pytest.approx(means, abs=1e-5)
        assert result.loss == pytest.approx(20 * sum(means) / 3, abs=1e-4)  # the hint term alone is optimised
        assert result.kd_loss > 0 and result.ce_loss > 0  # still measured
        for name, g in grads.items():  # (the layers above the deepest hint have none: zero)
            torch.testing.assert_close(delta[name].double(), g, atol=1e-5, rtol=0, msg=f"{kind}: {name}")
        for name in (f"{hidden.SUBMODULE}.maps.1.weight", "model.layers.0.mlp.down_proj.weight"):
            assert delta[name].abs().max() > 1e-3, name  # a gradient large enough for the 1e-5 to mean something
        assert delta["lm_head.weight"].abs().max() == 0  # above the deepest hint (the final norm): untouched
