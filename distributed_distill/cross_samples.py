"""Teacher samples read by a student of another tokenizer (distill.cross_tokenizer with a sample store;
docs/cross_tokenizer.md, teacher samples with another tokenizer).

    distill generate --config cross.yaml generate.store=S           # the teacher samples in its own tokens
    distill train --config cross.yaml data.source=S distill.alpha=0  # seq-KD: the samples as the student's documents
    distill train --config cross.yaml distill.signal=offline distill.store=S distill.temperature=1   # + the top-k

`distill generate` of a cross-tokenizer config samples in the teacher's tokenization and keeps the teacher's
tokenizer in the store (generate.py, RunPlan.teacher_side_tokenizer), so the store is the one the teacher's own
config writes. Training on it as data (`cross_sample_data`):

    each sample (the teacher's prompt ids, completion ids: prompt unlearned, completion learned)
      --cross_tokenizer.Aligner(teacher -> student)--> the same text in the student's tokens, prompt and completion
        re-tokenized apart (the label mask cuts the runs), special tokens by string or role (bos; the eos that ends
        a completion), the text of the rest by its bytes
      -> prompt/completion documents in the student's tokens, packed into data.seq_len student tokens exactly as the
         same tokenizer's samples are (store/samples.SampleSplit: only the completion learned)

An online teacher at distill.alpha > 0 then re-tokenizes the student's rows again, as for any cross-tokenizer data.

With the teacher's top-k kept (generate.top_k) and distill.signal=offline distill.store=S
(`open_cross_sample_targets`), the store's packed rows (the teacher's tokens, only completions learned) are read as a
logit store in the teacher's tokenization is (cross_store.cross_source: each stored batch re-tokenized for the
student, each span's first row's top-k and its later rows' label log-probs): the label log-prob of a completion
token is its stored `token_logprobs` (the teacher's, at temperature 1: distill.temperature must be 1).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch

from .config import Config
from .cross_store import cross_source
from .cross_tokenizer import Aligner
from .data.batching import IGNORE_INDEX
from .data.documents import DocKind
from .errors import DistillError
from .store.format import SPLITS, read_split
from .store.offline import OfflineSource
from .store.samples import (
    SampleSplit,
    check_learnable,
    describe_sample_splits,
    open_sample_targets,
    read_sample_manifest,
    sample_kind,
    sample_store_targets,
)
from .tokenizer import tokenizer_hash

ALIGN_ROWS = 64  # samples re-tokenized per call of the Aligner (one batched call of the student's tokenizer)


def check_teacher_samples(cfg: Config, teacher_tokenizer, root: Path, key: str) -> dict:
    """The store's manifest, after checking its samples are in the teacher's tokens (teacher.path: the teacher that
    generated them), as a student of another tokenizer reads them."""
    manifest = read_sample_manifest(root)
    if tokenizer_hash(teacher_tokenizer) != manifest["tokenizer_sha256"]:
        raise DistillError(
            f"{key}={root} with distill.cross_tokenizer: its samples are not in the tokenizer of teacher.path="
            f"{cfg.teacher.path} (sha256 {manifest['tokenizer_sha256'][:12]}, the teacher's "
            f"{tokenizer_hash(teacher_tokenizer)[:12]}); set teacher.path to the teacher that generated it"
        )
    return manifest


def student_samples(table: pa.Table, aligner: Aligner) -> pa.Table:
    """A split's samples (`prompt_ids`, `completion_ids` in the teacher's tokens) as the same text in the student's
    tokens, the same two columns: each sample one row of a batch (prompt unlearned, completion learned), re-tokenized
    by `aligner` (teacher -> student); a row's student tokens up to the end of its last unlearned span are its
    prompt, the rest its completion (the label mask cuts the runs, so no span crosses the boundary)."""
    prompts, completions = table["prompt_ids"].to_pylist(), table["completion_ids"].to_pylist()
    out = {"prompt_ids": [], "completion_ids": []}
    pad = aligner.student_pad  # (the Aligner's "student" is the side it reads: here the teacher's)
    for start in range(0, len(prompts), ALIGN_ROWS):
        rows = list(zip(prompts[start : start + ALIGN_ROWS], completions[start : start + ALIGN_ROWS]))
        width = max(len(p) + len(c) for p, c in rows)
        ids, labels, positions = [], [], []
        for p, c in rows:
            n = len(p) + len(c)
            ids.append(p + c + [pad] * (width - n))
            labels.append([IGNORE_INDEX] * len(p) + c + [IGNORE_INDEX] * (width - n))
            positions.append([*range(n), *range(width - n)])  # the padding: a document of its own, dropped
        batch = {
            name: torch.tensor(v) for name, v in (("input_ids", ids), ("labels", labels), ("position_ids", positions))
        }
        crossed = aligner(batch)
        ends, prompt_ends = [0] * len(rows), [0] * len(rows)
        for span in crossed.spans:
            ends[span.row] = max(ends[span.row], span.teacher_end)
            if not span.counted:
                prompt_ends[span.row] = max(prompt_ends[span.row], span.teacher_end)
        mine = crossed.teacher_batch["input_ids"].tolist()
        for r, row in enumerate(mine):
            out["prompt_ids"].append(row[: prompt_ends[r]])
            out["completion_ids"].append(row[prompt_ends[r] : ends[r]])
    return pa.table({name: pa.array(v, pa.list_(pa.int64())) for name, v in out.items()})


def cross_sample_data(
    cfg: Config, student_tokenizer, teacher_tokenizer, root: Path
) -> tuple[SampleSplit, SampleSplit, DocKind, str]:
    """Training on the teacher's samples as prompt/completion data in the student's tokens (seq-KD CE, or KD from
    the online cross-tokenizer teacher): what store/samples.sample_data returns for a run of the store's own
    tokenizer, each sample re-tokenized through the alignment (`student_samples`) and packed into data.seq_len
    student tokens."""
    manifest = check_teacher_samples(cfg, teacher_tokenizer, root, "data.source")
    aligner = Aligner(teacher_tokenizer, student_tokenizer)  # the stored side is the one re-tokenized
    pad, seed = student_tokenizer.pad_token_id, cfg.train.seed
    train, val = (
        SampleSplit(student_samples(read_split(root, manifest, split), aligner), cfg.data, pad, None, seed)
        for split in SPLITS
    )
    check_learnable([train, val], root, cfg.data.seq_len, "student tokens")
    line = describe_sample_splits(train, val, root)
    line += f"; re-tokenized through the alignment by the student's tokenizer ({len(student_tokenizer)} tokens)"
    return train, val, sample_kind(manifest), line


def open_cross_sample_targets(
    cfg: Config, student_tokenizer, teacher_tokenizer, accelerator, max_positions: int | None
) -> OfflineSource:
    """distill.signal=offline on a sample store for a student of another tokenizer: the stored top-k of every sampled
    token (generate.top_k) and its token_logprobs as the label log-probs, read through the alignment as a logit
    store in the teacher's tokenization is (cross_store.cross_source: a span's first row's top-k, the sum of its
    later rows' label log-probs). token_logprobs are the teacher's at temperature 1, so distill.temperature must be 1;
    sampled targets (generate.samples) are not aligned across tokenizers."""
    root = Path(cfg.distill.store)
    manifest = check_teacher_samples(cfg, teacher_tokenizer, root, "distill.store")
    draws = sample_store_targets(manifest)[1]
    if draws:
        raise DistillError(
            f"distill.store={root} holds sampled targets ({draws} draws per token), which are not aligned across "
            "tokenizers; generate it with generate.top_k, or train on its samples with data.source"
        )
    if cfg.distill.temperature != 1:
        raise DistillError(
            f"distill.store={root} with distill.cross_tokenizer needs distill.temperature=1, not "
            f"{cfg.distill.temperature}: the spans' chain rule reads the store's token_logprobs, the teacher's "
            "log-probs at temperature 1; generate and train with distill.temperature=1"
        )
    source = open_sample_targets(cfg, teacher_tokenizer, root, label_logprobs=True)
    return cross_source(cfg, source, student_tokenizer, teacher_tokenizer, accelerator, max_positions)
