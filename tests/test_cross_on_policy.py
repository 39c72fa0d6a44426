"""On-policy steps with a teacher of another tokenizer (distill.on_policy with distill.cross_tokenizer,
docs/cross_tokenizer.md, on-policy): the student's samples are re-tokenized for the teacher, scored and aligned back.

Default tier (in-process, seconds): one tokenizer on both sides through the cross path on a sampled batch (a sample
ended on eos and padded, one cut mid-character, stray bytes the random student wrote) gives today's on-policy forward
KL, its gradients and the teacher's log-probability of the samples to 1e-6 over the tokens the alignment keeps, and
counts the others as unaligned; two tokenizers give a finite loss with a gradient, span diagnostics that add up and
`sample_teacher_logprob`; the combinations still refused name their key.
Slow tier: `distill train` with a 384-token teacher at distill.on_policy=0.5, killed with SIGKILL and resumed,
ends bit-identical.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from distributed_distill import models, on_policy
from distributed_distill.config import ConfigError, CrossTokenizerConfig, load_config
from distributed_distill.cross_teacher import CrossTokenizerTeacher
from distributed_distill.cross_tokenizer import ALIGNED, NOT_UTF8, Aligner, vocab_map
from distributed_distill.data.batching import IGNORE_INDEX, collate
from distributed_distill.data.documents import documents
from distributed_distill.data.packed import build_datasets
from distributed_distill.generation import Sampling
from distributed_distill.objective import forward_losses
from distributed_distill.teacher import OnlineTeacher
from distributed_distill.trainer import train_step

from . import test_cross_tokenizer
from .helpers import SMOKE, interrupt, read_metrics, run_cli, training_records
from .test_cross_tokenizer import assert_same_weights, grads, models_for

# test_cross_tokenizer.py's fixtures: its two tokenizers and a batch (`pair`), the saved 384-token teacher
pair, cross_teacher_dir = test_cross_tokenizer.pair, test_cross_tokenizer.cross_teacher_dir
ON_POLICY = ["data.packing=false", "data.prompt_field=prompt", "data.completion_field=completion"]


@pytest.fixture(scope="module")
def sampled(pair, prompt_pairs):
    """The smoke student's own samples of 4 prompts (prompt/completion rows of stdlib lines; the real sampler, 8 new
    tokens at temperature 1), then made to hold what samples end with: row 0 ends on eos after 3 tokens (padding
    after it), row 1 on the first byte of a 3-byte character (cut by max_new_tokens mid-character)."""
    cfg, tok, other, _ = pair
    data = dataclasses.replace(
        cfg.data, source=str(prompt_pairs), prompt_field="prompt", completion_field="completion", packing=False,
        max_documents=None,
    )  # fmt: skip
    train, _, _ = build_datasets(documents(data), tok, data)
    batch = collate(train, list(range(4)))
    student = models.load_model(cfg.student, models.model_config(cfg.student, len(tok), "student"), seed=0)
    sampling = Sampling(temperature=1.0, max_new_tokens=8, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    [mb], _ = on_policy.StudentSampler(sampling, 0, False).sample(student, [batch], [on_policy.positions(0, 1, 0, 4)])
    lengths = on_policy.prompt_lengths(mb["labels"])
    completions = [[t for t in mb["input_ids"][i, n:].tolist() if t != tok.pad_token_id] for i, n in enumerate(lengths)]
    completions[0] = completions[0][:3] + [tok.eos_token_id]
    completions[1] = completions[1] + [Aligner(tok, tok).student_bytes.index(b"\xe2")]
    return on_policy.sampled_batch(batch["input_ids"], lengths, completions, tok.pad_token_id)


def kept_labels(batch: dict, aligner: Aligner) -> tuple[dict, int]:
    """The batch with its labels kept only on the tokens of aligned spans, and how many counted tokens are not."""
    cross = aligner(batch)
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    for span in cross.spans:
        if span.aligned:
            labels[span.row, span.student_start : span.student_end] = batch["labels"][
                span.row, span.student_start : span.student_end
            ]
    return {**batch, "labels": labels}, cross.counted_tokens - cross.aligned_tokens


def cross_source(teacher, student_tok, teacher_tok, tmp_path, temperature: float) -> CrossTokenizerTeacher:
    dense = OnlineTeacher(teacher, {}, temperature=temperature, vocab=len(teacher_tok))
    aligner, vmap = Aligner(student_tok, teacher_tok), vocab_map(student_tok, teacher_tok, tmp_path)
    return CrossTokenizerTeacher(
        dense, aligner, vmap, top_k=None, temperature=temperature, chunk_size=16, score_text=True
    )


def test_one_tokenizer_on_a_sampled_batch_is_todays_on_policy_forward_kl(pair, sampled, tmp_path):
    """The same tokenizer on both sides through the cross path on the student's samples: KD sum, gradients (CE off,
    as on an on-policy step) and the teacher's log-probability of the samples equal the plain path's over the tokens
    of aligned spans (every one a one-token span); the counted tokens outside them are the sample's broken bytes,
    each counted in unaligned_fraction. The eos a sample ended on aligns; the padding after it is not counted."""
    cfg, tok, _, _ = pair
    teacher, student = models_for(cfg, len(tok), len(tok))
    head = models.AlignedHead(student.get_output_embeddings(), len(tok))
    T = cfg.distill.temperature
    source = cross_source(teacher, tok, tok, tmp_path, T)
    cross = source.aligner(sampled)
    assert all(s.reason in (ALIGNED, NOT_UTF8) for s in cross.spans if s.counted)
    assert all(s.student_end - s.student_start == 1 for s in cross.spans if s.aligned)
    eos_at = (sampled["input_ids"][0] == tok.eos_token_id).nonzero().flatten().tolist()
    assert [(s.student_start, s.reason) for s in cross.spans if s.row == 0 and s.student_start in eos_at] == [
        (eos_at[-1], ALIGNED)
    ]
    last = int((sampled["labels"][1] != IGNORE_INDEX).nonzero().max())
    assert next(s for s in cross.spans if s.row == 1 and s.student_end == last + 1).reason == NOT_UTF8
    plain_batch, unaligned = kept_labels(sampled, source.aligner)
    assert 0 < unaligned < cross.counted_tokens  # the random student's stray bytes and the cut character

    plain_cfg = dataclasses.replace(cfg.distill, chunk_size=16, on_policy=1.0)
    cross_cfg = dataclasses.replace(plain_cfg, cross_tokenizer=CrossTokenizerConfig(loss="hybrid"))
    results = {}
    for name, teacher_source, dcfg, batch in (
        ("plain", source.inner, plain_cfg, plain_batch),
        ("cross", source, cross_cfg, sampled),
    ):
        student.zero_grad(set_to_none=True)
        out = forward_losses(student, teacher_source, batch, dcfg, head=head, kd_weight=0.5, ce_weight=0.0)
        (0.5 * out.kd_sum).backward()
        results[name] = (out, grads(student))
    (plain_out, plain_grads), (cross_out, cross_grads) = results["plain"], results["cross"]
    n = plain_out.num_tokens.item()
    assert cross_out.num_tokens.item() == n + unaligned
    assert abs(cross_out.kd_sum.item() - plain_out.kd_sum.item()) / n < 1e-6
    assert plain_grads.keys() == cross_grads.keys()
    for name in plain_grads:
        scale = plain_grads[name].abs().max().item()
        assert (cross_grads[name] - plain_grads[name]).abs().max().item() <= 1e-5 * scale + 1e-9, name
    assert cross_out.stats["unaligned_fraction"].item() == unaligned
    # The teacher's log-probability of the kept sampled tokens (T = 1): the same figure from the spans' chain rule.
    span_logprob, plain_logprob = cross_out.stats["span_teacher_logprob"].item(), plain_out.stats["teacher_logprob"]
    assert abs(span_logprob - plain_logprob.item()) / n < 1e-6


def test_two_tokenizers_train_on_the_students_samples(pair, sampled, tmp_path):
    """A 384-token teacher scores the 512-token student's samples through train_step's on-policy step (CE off): a
    finite loss with a gradient, span diagnostics that add up, and sample_teacher_logprob the teacher's
    log-probability of the aligned text per student token of it."""
    cfg, tok, other, _ = pair
    teacher, student = models_for(cfg, len(tok), len(other))
    source = cross_source(teacher, tok, other, tmp_path, 1.0)
    assert source.stat_names[-1] == "span_teacher_logprob"
    cross = source.aligner(sampled)
    counted = cross.counted_tokens
    assert 0 < cross.aligned_tokens < counted
    run_cfg = load_config(
        SMOKE, [*ON_POLICY, "distill.on_policy=1", "distill.temperature=1", "distill.chunk_size=16",
                "teacher.arch=null", f"teacher.path={tmp_path}", "distill.cross_tokenizer.loss=hybrid",
                "train.max_grad_norm=0"],
    )  # fmt: skip
    accelerator = Accelerator(cpu=True)
    before = {k: v.detach().clone() for k, v in student.named_parameters()}
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    student, optimizer = accelerator.prepare(student, optimizer)
    head = models.AlignedHead(student.get_output_embeddings(), len(tok))
    res = train_step(accelerator, student, head, source, optimizer, [sampled], run_cfg, ce=False)
    assert res.num_tokens == counted and not res.skipped
    assert res.loss > 0 and res.loss == pytest.approx(run_cfg.distill.alpha * res.kd_loss)
    assert any((before[k] - p.detach()).abs().sum() > 0 for k, p in student.named_parameters())
    assert res.stats["unaligned_fraction"] == pytest.approx(1 - cross.aligned_tokens / counted)
    assert 0 <= res.stats["span_agreement"] <= 1 - res.stats["unaligned_fraction"] + 1e-9
    assert res.stats["span_kl"] > 0 and res.stats["span_teacher_logprob"] < 0
    record = on_policy.Sampled(4, counted, 0.1).record(accelerator, 1.0, res.stats, res.ce_loss)
    per_aligned = res.stats["span_teacher_logprob"] * counted / cross.aligned_tokens
    assert record["sample_teacher_logprob"] == pytest.approx(per_aligned)
    assert record["sample_student_logprob"] == -res.ce_loss


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], None),
        (["distill.loss=reverse_kl"], "with distill.loss=reverse_kl: .* forward KL only"),
        (["distill.alpha=0"], "distill.on_policy=0.5 with distill.alpha=0"),
        (["distill.signal=offline", "distill.store=x"], "distill.on_policy=0.5 needs distill.signal=online"),
        (["data.packing=true"], "distill.on_policy=0.5 needs data.packing=false"),
        (["teacher.engine=remote", "teacher.url=http://127.0.0.1:9"], "teacher.engine=remote: not supported yet"),
    ],
    ids=["accepted", "reverse_kl", "alpha0", "offline", "packing", "remote"],
)
def test_on_policy_with_another_tokenizer_is_accepted_and_bad_combinations_refused(tmp_path, extra, message):
    """distill.on_policy with distill.cross_tokenizer loads; what either refuses is still refused in one line."""
    overrides = [*ON_POLICY, "teacher.arch=null", f"teacher.path={tmp_path}", "distill.cross_tokenizer.loss=hybrid",
                 "distill.on_policy=0.5", *extra]  # fmt: skip
    if message is None:
        cfg = load_config(SMOKE, overrides)
        assert cfg.distill.on_policy == 0.5 and cfg.distill.cross_tokenizer.loss == "hybrid"
        return
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE, overrides)


# ----------------------------------------------------------------------------------------------
# distill train, on-policy with a 384-token teacher (slow tier)

STEPS = 6


def run_args(teacher: Path, data: Path, tokenizer: Path, out: Path) -> list[str]:
    return [
        "--config", str(SMOKE), f"output_dir={out}", f"data.source={data}", "data.max_documents=null",
        f"tokenizer.path={tokenizer}", *ON_POLICY, "teacher.arch=null", f"teacher.path={teacher}",
        "distill.cross_tokenizer.loss=hybrid", "distill.on_policy=0.5", "distill.sampling.max_new_tokens=12",
        f"train.max_steps={STEPS}", "train.micro_batch_size=2", "train.save_every=2", "train.eval_every=0",
        "train.log_every=1",
    ]  # fmt: skip


@pytest.mark.slow
def test_on_policy_with_another_tokenizer_trains_and_resumes_exactly(
    cross_teacher_dir, prompt_pairs, smoke_tokenizer, tmp_path
):
    """`distill train` with the 384-token teacher at distill.on_policy=0.5: on-policy steps log the span
    diagnostics and sample_teacher_logprob; a run killed with SIGKILL at an on-policy step after a checkpoint and
    resumed ends with the same records and bit-identical weights."""
    launcher = [sys.executable, "train.py"]
    ref, out = tmp_path / "reference", tmp_path / "run"
    proc = run_cli(run_args(cross_teacher_dir, prompt_pairs, smoke_tokenizer, ref), launcher=launcher)
    assert "teacher's 384" in proc.stdout
    metrics = read_metrics(ref)
    kinds = [r["on_policy"] for r in metrics]
    assert kinds == [on_policy.is_on_policy(0, s, 0.5) for s in range(1, STEPS + 1)] and any(kinds)
    for r in metrics:
        assert 0 <= r["unaligned_fraction"] < 1 and r["span_kl"] > 0, r
        if r["on_policy"]:
            assert r["sample_teacher_logprob"] < 0 and r["generated_tokens"] > 0, r
    at_step = next(s for s in range(3, STEPS, 2) if kinds[s - 1])  # on-policy, after the checkpoint before it
    killed = interrupt([*launcher, *run_args(cross_teacher_dir, prompt_pairs, smoke_tokenizer, out)], out, at_step,
                       signal.SIGKILL)  # fmt: skip
    assert killed.returncode != 0 and not (out / "final").exists()
    run_cli(run_args(cross_teacher_dir, prompt_pairs, smoke_tokenizer, out), launcher=launcher)
    strip = [{k: v for k, v in r.items() if k != "generation_time_share"} for r in training_records(ref)]
    assert [{k: v for k, v in r.items() if k != "generation_time_share"} for r in training_records(out)] == strip
    assert_same_weights(ref, out)
