"""Teacher samples read by a student of another tokenizer (distill.cross_tokenizer with a sample store;
cross_samples.py, docs/cross_tokenizer.md, teacher samples with another tokenizer).

Default tier (in-process, seconds): `distill generate` of a cross-tokenizer config samples in the teacher's tokens and
keeps the teacher's tokenizer (the store its own config writes, file for file); each sample re-tokenized for the
student decodes to exactly the sample's text, its eos the student's, and the packed rows learn exactly those
completions; the stored top-k read through the alignment equals a fresh teacher forward over the stored rows' spans
to float16 rounding; the refusals name their key.
Slow tier: `distill generate`, `distill verify-store`, then `distill train` on the samples (seq-KD, and offline from
the stored top-k).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distributed_distill.config import load_config
from distributed_distill.cross_samples import cross_sample_data, student_samples
from distributed_distill.cross_tokenizer import Aligner
from distributed_distill.data.batching import IGNORE_INDEX
from distributed_distill.errors import DistillError
from distributed_distill.store.format import read_split
from distributed_distill.store.samples import read_sample_manifest, verify_sample_store
from distributed_distill.tokenizer import load_tokenizer, tokenizer_hash

from . import test_cross_tokenizer as online_tests
from .helpers import SMOKE, read_metrics, run_cli, store_files

pair = online_tests.pair  # module-scoped fixtures shared with the online tests
cross_teacher_dir = online_tests.cross_teacher_dir

# Plain text continued by the teacher: 4 prompts per split of 8 tokens, 12 new tokens, its top-8 kept.
SAMPLING = [
    "generate.prefix_tokens=8", "generate.sampling.max_new_tokens=12", "generate.max_prompts=4",
    "generate.samples_per_prompt=1", "generate.top_k=8", "generate.shard_prompts=4", "distill.temperature=1.0",
]  # fmt: skip


def cross_overrides(teacher, *extra: str) -> list[str]:
    return ["teacher.arch=null", f"teacher.path={teacher}", "distill.cross_tokenizer.loss=hybrid", *extra]


@pytest.fixture(scope="module")
def cross_samples(cross_teacher_dir, smoke_tokenizer, tmp_path_factory):
    """A sample store of the 384-token teacher written by `distill generate` of a cross-tokenizer config (the student's
    tokenizer: the smoke config's 512-token BPE), in-process."""
    from distributed_distill.generate import generate_store

    root = tmp_path_factory.mktemp("cross-samples") / "store"
    cfg = load_config(SMOKE, cross_overrides(cross_teacher_dir, f"generate.store={root}", *SAMPLING))
    result = generate_store(cfg)
    assert result["complete"]
    return root


def test_generate_with_another_tokenizer_samples_in_the_teachers_tokens(cross_samples, cross_teacher_dir, tmp_path):
    """The store verifies, holds the teacher's tokenizer (the manifest's hash is the teacher's) and is the store the
    teacher's own config (no cross_tokenizer, no student tokenizer) writes, file for file."""
    from distributed_distill.generate import generate_store

    assert verify_sample_store(cross_samples).startswith("ok: ")
    teacher_tok = load_tokenizer(str(cross_teacher_dir))
    manifest = read_sample_manifest(cross_samples)
    assert manifest["tokenizer_sha256"] == tokenizer_hash(teacher_tok) and manifest["vocab_size"] == len(teacher_tok)
    assert tokenizer_hash(load_tokenizer(str(cross_samples / "tokenizer"))) == tokenizer_hash(teacher_tok)
    own = tmp_path / "own"
    own_config = ["teacher.arch=null", f"teacher.path={cross_teacher_dir}", f"generate.store={own}", *SAMPLING]
    generate_store(load_config(SMOKE, own_config))
    assert store_files(own) == store_files(cross_samples)


def test_each_sample_in_the_students_tokens_is_its_text_and_the_rows_learn_its_completion(
    cross_samples, pair, cross_teacher_dir
):
    """Re-tokenized through the alignment, every sample's prompt decodes to the stored prompt text and its completion
    to the stored completion text (special tokens by string or role: an eos that ends a teacher sample ends the
    student's); the packed training rows' learned tokens are exactly the student's completions, prompts unlearned."""
    cfg, student_tok, _, _ = pair
    teacher_tok = load_tokenizer(str(cross_teacher_dir))
    assert len(student_tok) != len(teacher_tok)
    manifest = read_sample_manifest(cross_samples)
    table = read_split(cross_samples, manifest, "train")
    mine = student_samples(table, Aligner(teacher_tok, student_tok))
    assert mine.num_rows == table.num_rows == 4
    differ = 0
    for theirs, prompt, completion in zip(
        table.to_pylist(), mine["prompt_ids"].to_pylist(), mine["completion_ids"].to_pylist(), strict=True
    ):
        assert student_tok.decode(prompt) == theirs["prompt"]
        assert student_tok.decode(completion, skip_special_tokens=True) == theirs["completion"]
        assert (completion[-1:] == [student_tok.eos_token_id]) == (
            theirs["completion_ids"][-1:] == [teacher_tok.eos_token_id]
        )
        differ += completion != theirs["completion_ids"]
    assert differ  # another tokenizer: other ids for the same text
    train_cfg = load_config(
        SMOKE, cross_overrides(cross_teacher_dir, f"data.source={cross_samples}", "distill.alpha=0")
    )
    train, val, _, line = cross_sample_data(train_cfg, student_tok, teacher_tok, cross_samples)
    assert "re-tokenized through the alignment" in line and len(val) > 0
    learned = []
    for i in range(len(train)):
        row = train[[i]]
        labels = row["labels"][0]
        learned += labels[labels != IGNORE_INDEX].tolist()
    assert sorted(learned) == sorted(t for c in mine["completion_ids"].to_pylist() for t in c)


def test_teacher_samples_with_another_tokenizer_refusals_name_their_key(
    cross_samples, pair, cross_teacher_dir, smoke_tokenizer
):
    """One line each, before any model loads: a store read with a teacher.path of another tokenizer (teacher.path);
    a student whose tokenizer is not named (the store's is the teacher's: tokenizer.path or student.path)."""
    from accelerate import Accelerator

    from distributed_distill.setup import plan_run

    cfg, student_tok, _, _ = pair
    other = load_config(SMOKE, cross_overrides(smoke_tokenizer, f"data.source={cross_samples}"))
    with pytest.raises(DistillError, match=r"data.source=.* not in the tokenizer of teacher.path=.*; set teacher.path"):
        cross_sample_data(other, student_tok, student_tok, cross_samples)
    unnamed = load_config(SMOKE, cross_overrides(cross_teacher_dir, f"data.source={cross_samples}"))
    with pytest.raises(DistillError, match="set tokenizer.path or student.path"):
        plan_run(unnamed, Accelerator(cpu=True))


def test_stored_topk_through_the_alignment_equals_the_teacher_on_its_rows_to_its_rounding(
    cross_samples, pair, cross_teacher_dir, tmp_path
):
    """distill.signal=offline on the sample store for the 512-token student: a training micro-batch read through the
    alignment carries the spans the Aligner finds on the stored rows (the teacher's sampled tokens), and their
    teacher side equals what the online cross teacher's reduction (losses.teacher_spans: top-8, T = 1) computes on
    those rows with the generating teacher: the same top-k ids, log-probs within float16 rounding, rest sums (the
    stored float32 token log-probs) within 1e-4, the span loss to 1e-4. (Not the online teacher on the student's
    batch: it re-tokenizes the text canonically, and a sample's tokens often are not.) distill.temperature other than
    1 is refused in one line."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from distributed_distill import models
    from distributed_distill.config import CrossTokenizerConfig
    from distributed_distill.cross_samples import open_cross_sample_targets
    from distributed_distill.cross_store import stored_cross_targets
    from distributed_distill.cross_teacher import CrossTargets
    from distributed_distill.cross_tokenizer import vocab_map
    from distributed_distill.losses import TeacherTargets, teacher_spans
    from distributed_distill.objective import forward_losses
    from distributed_distill.teacher import OnlineTeacher

    cfg, student_tok, _, _ = pair
    teacher_tok = load_tokenizer(str(cross_teacher_dir))
    offline = cross_overrides(
        cross_teacher_dir, "distill.signal=offline", f"distill.store={cross_samples}", "distill.temperature=1.0"
    )
    source = open_cross_sample_targets(
        load_config(SMOKE, offline), student_tok, teacher_tok, Accelerator(cpu=True), None
    )
    mine = next(source.train.micro_batches(4, 1, 0))
    stored = source.train.stream[mine["index"].tolist()]  # the same rows in the teacher's tokens
    vmap = vocab_map(student_tok, teacher_tok, tmp_path)
    got = stored_cross_targets(mine, vmap.teacher_to_student)
    crossed = Aligner(teacher_tok, student_tok)(stored, label_counted=True)  # (its "teacher" side: the student's)
    for name in ("first", "rest", "rest_span"):
        assert torch.equal(getattr(got.student, name), getattr(crossed.teacher, name)), name
    assert got.student.num_spans > 0
    teacher = AutoModelForCausalLM.from_pretrained(str(cross_teacher_dir)).eval()
    found = OnlineTeacher(teacher, {}, temperature=1.0, vocab=len(teacher_tok)).targets(stored)
    labels = stored["labels"][:, 1:].reshape(-1)
    want = teacher_spans(
        found.hidden, found.weight, found.bias, labels, crossed.student, temperature=1.0, top_k=8, chunk_size=16
    )
    assert torch.equal(got.teacher.ids, want.ids)
    fp16 = 2.0**-11
    assert ((got.teacher.logprobs - want.logprobs).abs() <= want.logprobs.abs() * fp16 + 1e-5).all()
    assert ((got.teacher.rest_logsum - want.rest_logsum).abs() <= 1e-4).all()
    # The span loss on the student batch, from the store and from the fresh values.
    fresh = CrossTargets(got.student, want, vmap.teacher_to_student, got.unaligned_tokens)
    _, student = online_tests.models_for(cfg, len(student_tok), len(teacher_tok))
    head = models.AlignedHead(student.get_output_embeddings(), len(student_tok))
    dcfg = dataclasses.replace(
        cfg.distill, chunk_size=16, temperature=1.0, cross_tokenizer=CrossTokenizerConfig(loss="hybrid")
    )
    kd = {}
    for name, teacher_source in (("store", source.teacher), ("fresh", _Fixed(TeacherTargets(cross=fresh)))):
        kd[name] = forward_losses(student, teacher_source, mine, dcfg, head=head, kd_weight=1.0, ce_weight=0.0).kd_sum
    assert kd["store"].item() > 0 and kd["store"].item() == pytest.approx(kd["fresh"].item(), rel=1e-4)
    hot = load_config(SMOKE, [*offline, "distill.temperature=2.0"])
    with pytest.raises(DistillError, match="needs distill.temperature=1, not 2.0"):
        open_cross_sample_targets(hot, student_tok, teacher_tok, Accelerator(cpu=True), None)


class _Fixed:
    """A teacher source that returns the same targets for any batch."""

    def __init__(self, targets):
        self.found = targets

    def targets(self, batch: dict):
        return self.found


@pytest.mark.slow
def test_generate_then_train_a_student_of_another_tokenizer_on_the_samples(
    cross_teacher_dir, smoke_tokenizer, tmp_path
):
    """The user's commands: `distill generate` of the cross-tokenizer config, `distill verify-store`, then `distill
    train` on the samples: seq-KD (distill.alpha=0: CE on the re-tokenized completions) and offline from the stored
    top-8 through the alignment (span metrics logged, validation included)."""
    store = tmp_path / "store"
    common = ["--config", str(SMOKE), *cross_overrides(cross_teacher_dir), *SAMPLING]
    run_cli(["generate", *common, f"generate.store={store}"], timeout=300)
    assert run_cli(["verify-store", str(store)]).stdout.startswith("ok: sample store")
    student = [
        f"tokenizer.path={smoke_tokenizer}",
        "train.max_steps=3",
        "train.eval_every=3",
        "train.micro_batch_size=2",
    ]
    seq_kd = tmp_path / "seq_kd"
    proc = run_cli(["train", *common, *student, f"output_dir={seq_kd}", f"data.source={store}", "distill.alpha=0"])
    assert "re-tokenized through the alignment by the student's tokenizer (512 tokens)" in proc.stdout
    records = [r for r in read_metrics(seq_kd) if "ce_loss" in r]
    assert len(records) == 3 and all(r["ce_loss"] > 0 for r in records)
    offline = tmp_path / "offline"
    run_cli(["train", *common, *student, f"output_dir={offline}", "distill.signal=offline", f"distill.store={store}"])
    records = read_metrics(offline)
    assert [r["step"] for r in records if "kd_loss" in r] == [1, 2, 3]
    assert all(r["kd_loss"] > 0 and 0 <= r["unaligned_fraction"] < 0.25 for r in records if "kd_loss" in r)
    assert any("val_span_kl" in r for r in records)
