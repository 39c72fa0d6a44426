"""A logit store precomputed in the teacher's tokenization and read by a student of another tokenizer
(distill.cross_tokenizer with distill.signal=offline; cross_store.py, docs/cross_tokenizer.md).

Default tier (in-process, seconds): stored rows written and read back through Arrow (float16), re-tokenized for the
student, give the spans and the loss the online cross-tokenizer teacher gives on that student batch, to the store's
rounding; the spans of a batch whose labels are all ignored drop out; the refusals.
Slow tier: `distill precompute` of a cross-tokenizer config, `distill verify-store`, and `distill train` from it on
1 and on 2 processes (equal to 1e-5).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys

import pytest
import torch

from distributed_distill import models
from distributed_distill.config import CrossTokenizerConfig
from distributed_distill.cross_store import CROSS_KEYS, StoreAligner, stored_cross_targets
from distributed_distill.cross_teacher import CrossTokenizerTeacher, row_targets
from distributed_distill.cross_tokenizer import Aligner, vocab_map
from distributed_distill.data.batching import IGNORE_INDEX, collate
from distributed_distill.data.documents import documents
from distributed_distill.data.packed import build_datasets
from distributed_distill.errors import DistillError
from distributed_distill.losses import TeacherTargets
from distributed_distill.objective import forward_losses
from distributed_distill.store.logits import LABEL_LOGPROB, decode_logit_rows, encode_logit_rows
from distributed_distill.teacher import OnlineTeacher

from . import test_cross_tokenizer as online_tests
from .helpers import SMOKE, error_line, interrupt, read_metrics, run_cli, torchrun, training_records
from .test_cross_tokenizer import CROSS_STEPS, assert_same_weights, cross_args, models_for

TOP_K = 16
pair = online_tests.pair  # the two tokenizers and models (module-scoped fixtures, shared with the online tests)
cross_teacher_dir = online_tests.cross_teacher_dir


class _Stored:
    """The offline teacher's reading of a batch's spans (OfflineCrossTeacher without a store directory)."""

    def __init__(self, teacher_to_student: torch.Tensor):
        self.teacher_to_student = teacher_to_student

    def targets(self, batch: dict) -> TeacherTargets:
        return TeacherTargets(cross=stored_cross_targets(batch, self.teacher_to_student))


def stored_rows(teacher_source: OnlineTeacher, batch: dict, temperature: float) -> dict:
    """What `distill precompute` keeps of a teacher-tokenized micro-batch, written to Arrow and read back."""
    found = teacher_source.targets(batch)
    labels = batch["labels"][:, 1:].reshape(-1)
    targets, label_logprobs = row_targets(found, labels, TOP_K, temperature, 16)
    vocab = teacher_source.vocab
    table = encode_logit_rows(
        list(range(len(batch["input_ids"]))), batch["input_ids"], batch["labels"], targets, vocab,
        batch.get("position_ids"), label_logprobs=label_logprobs,
    )  # fmt: skip
    manifest = {"targets": "top_k", "encoding": "plain", "top_k": TOP_K, "vocab_size": vocab}
    return decode_logit_rows(table, manifest)


@pytest.fixture(scope="module")
def crossed(pair):
    """The pair's student (512-token) and teacher (384-token) tokenizers; a real packed batch in the teacher's
    tokenization; tiny float64 models of each."""
    cfg, student_tok, teacher_tok, _ = pair
    train, _, _ = build_datasets(documents(cfg.data), teacher_tok, cfg.data)
    teacher, student = models_for(cfg, len(student_tok), len(teacher_tok))
    return cfg, student_tok, teacher_tok, collate(train, list(range(4))), teacher, student


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_store_read_by_another_tokenizer_equals_the_online_teacher_to_its_rounding(crossed, tmp_path, temperature):
    cfg, student_tok, teacher_tok, teacher_batch, teacher, student = crossed
    dense = OnlineTeacher(teacher, {}, temperature=temperature, vocab=len(teacher_tok))
    stored = stored_rows(dense, teacher_batch, temperature)
    assert stored[LABEL_LOGPROB].shape == teacher_batch["labels"][:, 1:].shape
    mine = StoreAligner(student_tok, teacher_tok, None)(stored)
    assert set(CROSS_KEYS) <= set(mine)
    student_batch = {k: mine[k] for k in ("input_ids", "labels", "position_ids")}
    vmap = vocab_map(student_tok, teacher_tok, tmp_path)
    online = CrossTokenizerTeacher(
        dense, Aligner(student_tok, teacher_tok), vmap, top_k=TOP_K, temperature=temperature, chunk_size=16
    )
    # The online teacher re-tokenizes the student's batch: it sees the stored rows again (the same teacher input).
    assert torch.equal(online.aligner(student_batch).teacher_batch["input_ids"], teacher_batch["input_ids"])
    want = online.targets(student_batch).cross
    got = _Stored(vmap.teacher_to_student).targets(mine).cross
    for name in ("first", "rest", "rest_span"):  # the same spans, read from either side
        assert torch.equal(getattr(got.student, name), getattr(want.student, name)), name
    assert got.unaligned_tokens == want.unaligned_tokens
    assert torch.equal(got.teacher.ids, want.teacher.ids)
    # The store rounds through float16: the first rows' log-probs are exactly the online ones rounded, the rest
    # sums (of rounded label log-probs) within 2^-11 of them, relatively.
    assert torch.equal(got.teacher.logprobs, want.teacher.logprobs.half().float())
    assert torch.equal(got.teacher.tail_logmass, want.teacher.tail_logmass.half().float())
    rest_tol = 2.0**-11 * (want.teacher.rest_logsum.abs() + 1)
    assert ((got.teacher.rest_logsum - want.teacher.rest_logsum).abs() <= rest_tol).all()
    # The loss and its gradients on the student batch: offline from the store against online.
    head = models.AlignedHead(student.get_output_embeddings(), len(student_tok))
    dcfg = dataclasses.replace(
        cfg.distill, chunk_size=16, temperature=temperature, cross_tokenizer=CrossTokenizerConfig(loss="hybrid")
    )
    results = {}
    for name, source, batch in (("online", online, student_batch), ("store", _Stored(vmap.teacher_to_student), mine)):
        student.zero_grad(set_to_none=True)
        out = forward_losses(student, source, batch, dcfg, head=head, kd_weight=0.5, ce_weight=0.5)
        (0.5 * out.kd_sum + 0.5 * out.ce_sum).backward()
        results[name] = (out, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    (on, on_grads), (off, off_grads) = results["online"], results["store"]
    assert off.ce_sum.item() == on.ce_sum.item() and off.num_tokens.item() == on.num_tokens.item()
    # The rounding of each stored value (2^-11 relatively) averages out over the spans: measured 2e-6 and 2e-5 of
    # the KD sum (T = 1, 2), at most 2.4e-5 of a gradient's largest entry.
    assert off.kd_sum.item() == pytest.approx(on.kd_sum.item(), rel=1e-4)
    for name in on_grads:
        scale = on_grads[name].abs().max().item()
        assert (off_grads[name] - on_grads[name]).abs().max().item() <= 1e-4 * scale + 1e-9, name


def test_a_store_batch_with_every_label_ignored_has_no_spans(crossed, tmp_path):
    """A validation rank past the end reads a batch whose labels are all ignored (data.batching.eval_batches): its
    spans drop out and nothing counts as unaligned; a student row too long for the student's positions is refused."""
    cfg, student_tok, teacher_tok, teacher_batch, teacher, _ = crossed
    dense = OnlineTeacher(teacher, {}, vocab=len(teacher_tok))
    mine = StoreAligner(student_tok, teacher_tok, None)(stored_rows(dense, teacher_batch, 1.0))
    vmap = vocab_map(student_tok, teacher_tok, tmp_path)
    assert stored_cross_targets(mine, vmap.teacher_to_student).student.num_spans > 0
    mine["labels"].fill_(IGNORE_INDEX)
    empty = stored_cross_targets(mine, vmap.teacher_to_student)
    assert empty.student.num_spans == 0 and empty.student.rest.numel() == 0 and empty.unaligned_tokens == 0
    stored = stored_rows(dense, teacher_batch, 1.0)
    longest = int(StoreAligner(student_tok, teacher_tok, None)(stored)["position_ids"].max())
    with pytest.raises(DistillError, match=f"beyond the student's {longest} positions"):
        StoreAligner(student_tok, teacher_tok, longest)(stored)
    with pytest.raises(DistillError, match="no teacher label log-probs"):
        StoreAligner(student_tok, teacher_tok, None)(dict(teacher_batch))


# ----------------------------------------------------------------------------------------------
# distill precompute and distill train from it (slow tier)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_cross_tokenizer_store_is_precomputed_verified_and_trains_resumes_and_runs_on_two_processes(
    cross_teacher_dir, tmp_path
):
    """`distill precompute` of the cross-tokenizer smoke config writes a store in the 384-token teacher's
    tokenization (label log-probs kept, verify-store passes); `distill train` of the 512-token student from it
    reports the alignment at startup and the span metrics at validation; a run killed with SIGKILL and resumed ends
    bit-identical; 2 processes train as 1 (to 1e-5); a run
    of the student's own tokenizer without distill.cross_tokenizer is refused in one line."""
    store = tmp_path / "store"
    run_cli(["precompute", *cross_args(cross_teacher_dir, tmp_path / "unused", f"distill.top_k={TOP_K}",
                                       f"distill.store={store}")], timeout=300)  # fmt: skip
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["label_logprobs"] is True and manifest["vocab_size"] == 384 and manifest["top_k"] == TOP_K
    run_cli(["verify-store", str(store)], timeout=120)
    offline = ["distill.signal=offline", f"distill.store={store}", f"distill.top_k={TOP_K}", "distill.shuffle_buffer=0"]
    one = tmp_path / "one"
    proc = run_cli(["train", *cross_args(cross_teacher_dir, one, *offline)], timeout=300)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("cross-tokenizer:"))
    assert "student tokenizer 512 tokens, teacher's 384" in line
    assert "read through the alignment" in proc.stdout
    metrics = read_metrics(one)
    assert [r["step"] for r in metrics] == list(range(1, CROSS_STEPS + 1))
    final = [r for r in metrics if "val_loss" in r][-1]
    assert final["val_span_kl"] > 0 and 0 <= final["val_span_agreement"] <= 1 and final["val_unaligned_fraction"] < 0.1
    # Killed with SIGKILL and resumed: the stream continues at the checkpoint's row, bit-identical.
    killed = tmp_path / "killed"
    interrupt([sys.executable, "train.py", *cross_args(cross_teacher_dir, killed, *offline)], killed, at_step=5,
              sig=signal.SIGKILL)  # fmt: skip
    run_cli(cross_args(cross_teacher_dir, killed, *offline), launcher=[sys.executable, "train.py"], timeout=300)
    assert training_records(killed) == training_records(one)
    assert_same_weights(one, killed)
    two = tmp_path / "two"
    run_cli(cross_args(cross_teacher_dir, two, *offline, "train.micro_batch_size=2"),
            launcher=torchrun(29674, "train.py"), timeout=600)  # fmt: skip
    for a, b in zip(read_metrics(one), read_metrics(two), strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "num_tokens", "grad_norm", "val_loss", "val_span_kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (key, a["step"])
    # A same-tokenizer run cannot read it: its rows are the teacher's tokens (refused before any model loads).
    proc = run_cli(["train", "--config", str(SMOKE), f"output_dir={tmp_path / 'plain'}", *offline], check=False)
    assert proc.returncode == 2 and "precompute a store with this run's tokenizer" in error_line(proc)
