"""Teacher samples read by a student of another tokenizer (distill.cross_tokenizer with a sample store;
cross_samples.py, docs/cross_tokenizer.md).

Default tier (in-process, seconds): `distill generate` of a cross-tokenizer config samples in the teacher's tokens and
keeps the teacher's tokenizer (the store its own config writes, byte for byte); each sample re-tokenized for the
student decodes to exactly the sample's text, its eos the student's, and the packed rows learn exactly those
completions; the refusals name their key.
Slow tier: `distill generate`, then `distill train` on the samples (seq-KD and online cross KD).
"""

from __future__ import annotations

import pytest

from distributed_distill.config import load_config
from distributed_distill.cross_samples import cross_sample_data, student_samples
from distributed_distill.cross_tokenizer import Aligner
from distributed_distill.data.batching import IGNORE_INDEX
from distributed_distill.errors import DistillError
from distributed_distill.store.format import read_split
from distributed_distill.store.samples import read_sample_manifest, verify_sample_store
from distributed_distill.tokenizer import load_tokenizer, tokenizer_hash

from . import test_cross_tokenizer as online_tests
from .helpers import SMOKE, store_files

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
