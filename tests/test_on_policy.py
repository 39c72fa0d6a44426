"""On-policy distillation (distill.on_policy, docs/on_policy.md): a greedy on-policy step samples what transformers'
greedy generate writes and optimises exactly the float64 loss of those samples (completion tokens only, CE off); the
per-step decision and the row seeds are pure functions; 2 processes with a zero3 teacher and with a DeepSpeed
ZeRO-3 student, samples of very different lengths, complete; a run killed at an on-policy step resumes
bit-identical; distill.on_policy=0 trains exactly as before."""

from __future__ import annotations

import copy
import random
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from distributed_distill import models, on_policy
from distributed_distill.config import load_config
from distributed_distill.errors import ConfigError
from distributed_distill.generation import Sampling
from distributed_distill.teacher import OnlineTeacher
from distributed_distill.trainer import train_step

from .helpers import ROOT, SMOKE, accelerate_launch, interrupt, read_metrics, run_cli, torchrun, training_records
from .test_resume import assert_same_student

VOCAB, BOS, EOS, PAD = 128, 1, 2, 0
PROMPTS = [[5, 17, 9], [12, 3, 40, 41, 42, 43], [99, 7, 8, 70]]
NEW = 6


def data_rows(prompts: list[list[int]], completion: list[int]) -> dict:
    """Prompt/completion rows as data/packed.py pads them (packing off): bos + prompt + completion + eos, labels on the
    completion and eos."""
    rows = [[BOS, *p, *completion, EOS] for p in prompts]
    width = max(map(len, rows)) + 2
    ids = torch.full((len(rows), width), PAD)
    labels = torch.full((len(rows), width), -100)
    for i, (row, p) in enumerate(zip(rows, prompts)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, 1 + len(p) : len(row)] = ids[i, 1 + len(p) : len(row)]
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("chunk_size", [64, 0], ids=["chunked", "naive"])
def test_greedy_on_policy_step_samples_generate_output_and_optimises_the_float64_loss(chunk_size):
    """One greedy on-policy step through the trainer's own train_step: each row's sample equals transformers'
    greedy `generate` on its prompt alone (one row ends on eos early, so the batch holds padding after it); the
    labels cover the sampled tokens only; loss, KD, the student's and teacher's log-probabilities of the samples
    and the weight update (SGD, lr 1: the gradient) equal a float64 reference over the completion tokens alone."""
    T, alpha = 2.0, 0.5
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        ["distill.on_policy=1", "data.packing=false", "data.source=python-stdlib-chat", "distill.loss=reverse_kl",
         f"distill.temperature={T}", f"distill.alpha={alpha}", f"distill.chunk_size={chunk_size}",
         "train.max_grad_norm=0"],
    )  # fmt: skip
    student = models.load_model(cfg.student, models.model_config(cfg.student, VOCAB, "student"), seed=0)
    teacher_model = models.load_model(cfg.teacher, models.model_config(cfg.teacher, VOCAB, "teacher"), seed=1)
    teacher = OnlineTeacher(teacher_model, {}, temperature=T, chunk_size=64, vocab=VOCAB)
    batch = data_rows(PROMPTS, [3, 4, 5])
    rows = [on_policy.positions(0, 1, 0, len(PROMPTS))]

    def sampler(stops):
        sampling = Sampling(temperature=0, max_new_tokens=NEW, eos_ids=tuple(stops), pad_id=PAD)
        return on_policy.StudentSampler(sampling, 0, False)

    # An end token the first row writes third: its sample ends there, the others run to NEW tokens.
    first, _ = sampler([EOS]).sample(student, [batch], rows)
    stop = int(first[0]["input_ids"][0, 1 + len(PROMPTS[0]) + 2])
    sampled, stats = sampler([stop]).sample(student, [batch], rows)
    mb = sampled[0]
    completions = []
    for i, prompt in enumerate(PROMPTS):
        n = 1 + len(prompt)
        expected = student.generate(
            torch.tensor([[BOS, *prompt]]), do_sample=False, max_new_tokens=NEW, eos_token_id=stop, pad_token_id=PAD
        )[0, n:].tolist()
        learned = (mb["labels"][i] != -100).nonzero().flatten().tolist()
        assert learned == list(range(n, n + len(expected))), "labels must cover exactly the sampled tokens"
        assert mb["input_ids"][i, :n].tolist() == [BOS, *prompt]
        assert mb["input_ids"][i, n : n + len(expected)].tolist() == expected
        assert (mb["input_ids"][i, n + len(expected) :] == PAD).all()
        completions.append(expected)
    assert len(completions[0]) <= 3 < NEW == max(map(len, completions)), "no row ended early: no padding after eos"
    assert stats.samples == 3 and stats.generated_tokens == sum(map(len, completions))

    # float64 reference: alpha * T^2 * mean over sampled tokens of KL(p_S || p_T) at T; CE and logprobs at T = 1.
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher_model).double()
    kd = ce = t_lp = 0.0
    for prompt, completion in zip(PROMPTS, completions):
        seq = torch.tensor([[BOS, *prompt, *completion]])
        n, y = 1 + len(prompt), torch.tensor(completion)
        zs, zt = s64(seq).logits[0, n - 1 : -1], t64(seq).logits[0, n - 1 : -1].detach()
        ls, lt = F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1)
        kd = kd + (ls.exp() * (ls - lt)).sum() * T**2
        ce = ce - F.log_softmax(zs, -1).gather(1, y[:, None]).sum()
        t_lp += F.log_softmax(zt, -1).gather(1, y[:, None]).sum().item()
    count = sum(map(len, completions))
    (alpha * kd / count).backward()

    accelerator = Accelerator(cpu=True)
    before = {k: v.detach().clone() for k, v in student.named_parameters()}
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    student, optimizer = accelerator.prepare(student, optimizer)
    head = models.AlignedHead(student.get_output_embeddings(), VOCAB)
    res = train_step(accelerator, student, head, teacher, optimizer, sampled, cfg, ce=False)
    assert res.num_tokens == count
    assert res.loss == pytest.approx(alpha * kd.item() / count, abs=1e-5)
    assert res.kd_loss == pytest.approx(kd.item() / count, abs=1e-5)
    assert res.ce_loss == pytest.approx(ce.item() / count, abs=1e-5)  # reported (the student's NLL), not trained
    assert res.stats["teacher_logprob"] == pytest.approx(t_lp / count, abs=1e-5)
    grads = dict(s64.named_parameters())
    for name, p in student.named_parameters():
        step = (before[name] - p.detach()).double()  # SGD with lr 1: the gradient itself
        torch.testing.assert_close(step, grads[name].grad, atol=1e-6, rtol=1e-4, msg=name)


def test_step_decision_and_row_seeds_are_pure_functions():
    steps = [on_policy.is_on_policy(0, s, 0.3) for s in range(1, 2001)]
    assert steps == [on_policy.is_on_policy(0, s, 0.3) for s in range(1, 2001)]
    assert 0.25 < sum(steps) / len(steps) < 0.35
    assert steps != [on_policy.is_on_policy(1, s, 0.3) for s in range(1, 2001)]
    assert not any(on_policy.is_on_policy(0, s, 0.0) for s in range(1, 100))
    assert all(on_policy.is_on_policy(0, s, 1.0) for s in range(1, 100))
    # The same global rows whatever the split: 1 process x 4 rows == 2 processes x 2 rows.
    assert on_policy.positions(3, 1, 0, 4) == on_policy.positions(3, 2, 0, 2) + on_policy.positions(3, 2, 1, 2)
    assert len({on_policy.row_seed(0, p) for p in range(1000)}) == 1000


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["distill.on_policy=1.5"], "distill.on_policy=1.5 must be in [0, 1]"),
        (["distill.on_policy=0.5"], "distill.on_policy=0.5 needs data.packing=false"),
        (["distill.on_policy=0.5", "data.packing=false", "distill.alpha=0"], "with distill.alpha=0"),
        (["distill.on_policy=1", "data.packing=false", "distill.signal=offline", "distill.store=x"], "signal=online"),
        (["distill.sampling.top_p=0"], "distill.sampling.top_p=0.0 must be in (0, 1]"),
        (["distill.sampling.temperature=-1"], "distill.sampling.temperature=-1.0 must be >= 0"),
        (["distill.sampling.max_new_tokens=0"], "distill.sampling.max_new_tokens=0 must be >= 1"),
        (
            ['distill.sampling.stop_strings=[""]'],
            "distill.sampling.stop_strings=[''] must be a list of non-empty strings",
        ),
    ],
)
def test_on_policy_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(ROOT / "configs" / "smoke.yaml", overrides)


# ----------------------------------------------------------------------------------------------
# Real runs (slow): prompt/completion data made from stdlib code lines, the smoke models and tokenizer

STEPS, SAVE_EVERY = 12, 4
# Random sampling; "e" as a stop string ends samples after very different numbers of tokens (random students).
ON_POLICY = ["data.packing=false", "distill.sampling.max_new_tokens=32", 'distill.sampling.stop_strings=["e"]']


def args(out: Path, data: Path, tokenizer: Path, *overrides: str) -> list[str]:
    return [
        "--config", str(SMOKE), f"output_dir={out}", f"data.source={data}", "data.prompt_field=prompt",
        "data.completion_field=completion", "data.max_documents=null", f"tokenizer.path={tokenizer}",
        f"train.max_steps={STEPS}", f"train.save_every={SAVE_EVERY}", "train.eval_every=0", *ON_POLICY, *overrides,
    ]  # fmt: skip


def records(out: Path) -> list[dict]:
    """What a resumed run reproduces exactly: the training records without timings."""
    return [{k: v for k, v in r.items() if k != "generation_time_share"} for r in training_records(out)]


def on_policy_lengths(out: Path) -> list[float]:
    return [r["mean_sample_length"] for r in read_metrics(out) if r.get("on_policy")]


@pytest.mark.slow
@pytest.mark.release  # CI's siblings: test_teacher_engines.py's ZeRO-3 student with a zero3 teacher; on-policy resume
@pytest.mark.multiprocess
def test_two_processes_with_zero3_teacher_and_deepspeed_zero3_student_complete(
    prompt_pairs, smoke_tokenizer, student_dir, tmp_path
):
    """Every step on-policy, samples stopped by "e" after very different lengths on the two ranks: a zero3 teacher
    (its forward a collective per micro-batch) with a DDP student, and a DeepSpeed ZeRO-3 student (its generation
    a collective per token: lockstep) with the zero3 teacher, both finish within the timeout."""
    common = ["distill.on_policy=1", "train.max_steps=3", "train.micro_batch_size=2", "teacher.engine=zero3"]
    ddp = tmp_path / "ddp"
    proc = run_cli(args(ddp, prompt_pairs, smoke_tokenizer, *common), launcher=torchrun(29920, "train.py"))
    assert "student strategy multi_cpu, teacher engine zero3" in proc.stdout
    zero3 = tmp_path / "zero3"
    student = ["student.arch=null", f"student.path={student_dir}", "distill.chunk_size=auto"]
    launcher = [*accelerate_launch("zero3.yaml", 29921), "train.py"]
    proc = run_cli(args(zero3, prompt_pairs, student_dir, *common, *student), launcher=launcher, timeout=400)
    assert "student strategy deepspeed zero3, teacher engine zero3" in proc.stdout
    for out in (ddp, zero3):
        lengths = on_policy_lengths(out)
        assert len(lengths) == 3 and all(1 <= n < 32 for n in lengths), lengths
        assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_kill_at_an_on_policy_step_then_resume_is_bit_identical(prompt_pairs, smoke_tokenizer, tmp_path):
    """distill.on_policy=0.5 with random sampling: SIGKILL at an on-policy step after a checkpoint, resume, and the
    final weights and every step's record equal the uninterrupted run's. Its off-policy steps before the first
    on-policy one equal a distill.on_policy=0 run's: those are today's prompt/completion training."""
    launcher = [sys.executable, "train.py"]
    ref, out, plain = tmp_path / "reference", tmp_path / "run", tmp_path / "plain"
    run_cli(args(ref, prompt_pairs, smoke_tokenizer, "distill.on_policy=0.5"), launcher=launcher)
    kinds = [r["on_policy"] for r in read_metrics(ref)]
    assert kinds == [on_policy.is_on_policy(0, s, 0.5) for s in range(1, STEPS + 1)]
    at_step = random.choice([s for s in range(SAVE_EVERY + 1, STEPS) if s % SAVE_EVERY and kinds[s - 1]])
    print(f"killing at on-policy step {at_step}")
    cmd = launcher + args(out, prompt_pairs, smoke_tokenizer, "distill.on_policy=0.5")
    killed = interrupt(cmd, out, at_step, signal.SIGKILL)
    assert killed.returncode != 0 and not (out / "final").exists()
    run_cli(args(out, prompt_pairs, smoke_tokenizer, "distill.on_policy=0.5"), launcher=launcher)
    assert_same_student(ref, out)
    assert records(out) == records(ref)

    run_cli(args(plain, prompt_pairs, smoke_tokenizer, "distill.on_policy=0"), launcher=launcher)
    first = kinds.index(True)
    assert first >= 1, "step 1 is on-policy under this seed: nothing to compare"
    strip = [{k: v for k, v in r.items() if k != "on_policy"} for r in records(ref)[:first]]
    assert strip == records(plain)[:first]
