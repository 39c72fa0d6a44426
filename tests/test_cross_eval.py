"""`distill eval` of a cross-tokenizer config (distill.cross_tokenizer; docs/cross_tokenizer.md, evaluation): the
students against the teacher over aligned spans, the teacher in its own tokenization.

Default tier (in-process, seconds): one tokenizer on both sides through the cross eval gives the ordinary eval's
forward KL and top-1 agreement to 1e-6, and the teacher's own-tokens loss is its ordinary val_loss; with two
tokenizers the eval's span KL and agreement equal a float64 recomputation from the aligned spans (the Aligner's spans,
log-softmax written out) on one validation batch.
Slow tier: `distill eval` of a tiny cross-tokenizer training run's export reports the span metrics its training run
logged at its last validation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distributed_distill import models
from distributed_distill.config import load_config
from distributed_distill.cross_tokenizer import Aligner, vocab_map
from distributed_distill.data.batching import collate
from distributed_distill.data.documents import documents
from distributed_distill.data.packed import build_datasets
from distributed_distill.eval.evaluate import evaluate_models
from distributed_distill.tokenizer import load_tokenizer, train_bpe_tokenizer

from .helpers import SMOKE, read_metrics, run_cli

# One validation micro-batch of 4 rows, no prompts: the metrics of the validation tokens only.
SMALL = ["eval.prompts=0", "train.eval_batches=1", "train.micro_batch_size=4"]


def saved_teacher(out: Path, tokenizer_dir: Path | None = None, vocab: int = 384) -> Path:
    """A smoke-sized teacher saved with a tokenizer of its own: a copy of `tokenizer_dir`, or a `vocab`-token BPE
    trained on the smoke corpus."""
    cfg = load_config(SMOKE)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, out)
    else:
        train_bpe_tokenizer((d["text"] for d in documents(cfg.data).train), vocab, out)
    config = models.model_config(cfg.teacher, len(load_tokenizer(str(out))), "teacher")
    models.load_model(cfg.teacher, config, seed=1).save_pretrained(out)
    return out


def cross(teacher: Path, *extra: str) -> list[str]:
    return ["teacher.arch=null", f"teacher.path={teacher}", "distill.cross_tokenizer.loss=hybrid", *extra]


def by_model(rows: list[dict]) -> dict[str, dict]:
    return {r["model"]: r for r in rows}


def test_one_tokenizer_through_the_cross_eval_is_the_ordinary_eval(smoke_tokenizer, student_dir, tmp_path):
    """The same tokenizer on both sides (every span one token, the identity map): span KL = val_forward_kl and span
    agreement = val_top1_agreement at temperature 1, nothing unaligned, the same val_loss; the teacher's row carries
    its loss under own_* keys only, and with one tokenizer that is its ordinary val_loss."""
    teacher = saved_teacher(tmp_path / "teacher", smoke_tokenizer)
    named = {"teacher": str(teacher), "student": str(student_dir)}
    setting = [*SMALL, "distill.temperature=1"]
    plain = by_model(evaluate_models(load_config(SMOKE, [*cross(teacher)[:2], *setting]), dict(named)))
    crossed = by_model(evaluate_models(load_config(SMOKE, cross(teacher, *setting)), dict(named)))
    student, reference = crossed["student"], plain["student"]
    assert student["val_tokens"] == reference["val_tokens"] > 0
    assert student["val_span_kl"] == pytest.approx(reference["val_forward_kl"], abs=1e-6)
    assert student["val_span_agreement"] == pytest.approx(reference["val_top1_agreement"], abs=1e-6)
    assert student["val_unaligned_fraction"] == 0
    for key in ("val_loss", "val_accuracy", "val_ece"):
        assert student[key] == pytest.approx(reference[key], abs=1e-6), key
    assert "val_forward_kl" not in student  # the teacher's rows are in its vocabulary: the span metrics stand for them
    own = crossed["teacher"]
    assert not any(key.startswith("val_") for key in own), own  # nothing that reads as a student-token figure
    assert own["own_val_loss"] == pytest.approx(plain["teacher"]["val_loss"], abs=1e-6)
    assert own["own_val_tokens"] == plain["teacher"]["val_tokens"]


def test_two_tokenizers_span_metrics_equal_a_float64_recomputation_over_the_aligned_spans(
    smoke_tokenizer, student_dir, tmp_path
):
    """A 384-token teacher and the 512-token student: the eval's val_span_kl, val_span_agreement and
    val_unaligned_fraction on the first validation batch against the definitions in float64, span by span from the
    Aligner's spans: log P(u) = log_softmax(first row)(u) + the log-probs of the span's later tokens, on each side;
    KL over the teacher ids whose bytes the student has; agreement weighted by the span's student tokens."""
    teacher_path = saved_teacher(tmp_path / "teacher")
    cfg = load_config(SMOKE, cross(teacher_path, *SMALL))
    [row] = evaluate_models(cfg, {"student": str(student_dir)})
    T = cfg.distill.temperature  # 2.0: the KL carries T^2, as training's span_kl does

    student_tok, teacher_tok = load_tokenizer(str(smoke_tokenizer)), load_tokenizer(str(teacher_path))
    _, val_ds, _ = build_datasets(documents(cfg.data), student_tok, cfg.data)
    batch = collate(val_ds, list(range(4)))
    crossed = Aligner(student_tok, teacher_tok)(batch)
    to_student = vocab_map(student_tok, teacher_tok).teacher_to_student
    mapped = (to_student >= 0).nonzero().squeeze(1)

    def logprobs(path: Path, tokens: dict) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(path).double()
        with torch.no_grad():  # (forward_states: the block-diagonal mask of packed rows, as every forward gets)
            logits, _ = models.forward_states(model, tokens, (), logits=True)
        return torch.log_softmax(logits / T, -1)

    ls, lt = logprobs(student_dir, batch), logprobs(teacher_path, crossed.teacher_batch)
    s_ids, t_ids = batch["input_ids"], crossed.teacher_batch["input_ids"]
    kl = agree = 0.0
    for span in (s for s in crossed.spans if s.aligned):
        r = span.row
        s_rest = sum(ls[r, p - 1, s_ids[r, p]] for p in range(span.student_start + 1, span.student_end))
        t_rest = sum(lt[r, p - 1, t_ids[r, p]] for p in range(span.teacher_start + 1, span.teacher_end))
        log_ps = ls[r, span.student_start - 1] + s_rest  # [Vs]
        log_pt = lt[r, span.teacher_start - 1] + t_rest  # [Vt]
        kl += float((log_pt[mapped].exp() * (log_pt[mapped] - log_ps[to_student[mapped]])).sum()) * T**2
        same = int(log_ps.argmax()) == int(to_student[log_pt.argmax()])
        agree += same * (span.student_end - span.student_start)
    n = crossed.counted_tokens
    assert row["val_tokens"] == n > 0
    assert row["val_span_kl"] == pytest.approx(kl / n, rel=1e-5)
    assert row["val_span_agreement"] == pytest.approx(agree / n, abs=1e-9)
    assert row["val_unaligned_fraction"] == pytest.approx(crossed.unaligned_fraction, abs=1e-12)
    assert row["val_unaligned_fraction"] < 0.1  # two BPEs of one corpus: most spans align


@pytest.mark.slow
def test_distill_eval_of_a_cross_tokenizer_run_reports_its_final_validation_span_metrics(
    smoke_tokenizer, student_dir, tmp_path
):
    """`distill train` (4 steps, a 384-token teacher, the 512-token student), then `distill eval` with the same
    config of its export, a second student (the untrained smoke student, as a baseline is evaluated: one more
    --model) and the teacher: the table and eval.json carry the span metrics, the trained student's equal the
    training run's last validation (the same function, weights and batches) and the teacher's row is its own."""
    teacher = saved_teacher(tmp_path / "teacher")
    out = tmp_path / "run"
    args = ["--config", str(SMOKE), *cross(teacher), "train.max_steps=4", "eval.prompts=2", "train.eval_batches=2"]
    run_cli(["train", *args, f"output_dir={out}"])
    final = [r for r in read_metrics(out) if "val_span_kl" in r][-1]
    report = tmp_path / "eval.json"
    proc = run_cli(["eval", *args, "--model", f"kd={out / 'final'}", "--model", f"init={student_dir}",
                    "--model", f"teacher={teacher}", "--json", str(report)])  # fmt: skip
    assert "| span KL | span agree | unaligned |" in proc.stdout and "own-tokens val loss" in proc.stdout
    rows = by_model(json.loads(report.read_text()))
    for key in ("val_span_kl", "val_span_agreement", "val_unaligned_fraction", "val_loss"):
        assert rows["kd"][key] == pytest.approx(final[key], abs=1e-6), key
        assert key in rows["init"]
    assert rows["teacher"]["own_val_loss"] > 0 and "val_loss" not in rows["teacher"]
    assert rows["kd"]["gen_samples"] == 2 and "gen_teacher_nll" not in rows["kd"]
