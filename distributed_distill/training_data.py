"""What a run trains on, from one factory: `training_data(plan)` returns one typed value whatever the source.

    distill.signal=offline, distill.store = a logit store     the store's rows and targets     store/logits.py
    distill.signal=offline, distill.store = a sample store    its samples and stored top-k     store/samples.py
    data.source = a sample store                              its samples, as prompt/completion data
    either, with distill.cross_tokenizer                      the same, re-tokenized for the student  cross_samples.py
    data.streaming                                            documents streamed, packed on the fly   data/stream.py
    anything else                                             the packed splits of the documents      data/packed.py

Each is checked against the run (tokenizer, sequence length, temperature, k, shard files) before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from .data.documents import DocKind
from .data.packed import build_datasets, rows_without_prompt
from .data.stream import DocumentStream, streaming_validation
from .setup import RunPlan
from .store.logits import open_logit_store
from .store.offline import OfflineTeacher
from .store.samples import open_sample_targets, sample_data, training_store


@dataclass(frozen=True)
class TrainingData:
    """The training and validation data of a run, and what comes with them."""

    train: object  # the training rows: indexable by data.train_indices, or (streamed) `micro_batches(...)`
    val: object  # the validation rows, indexable (data.eval_batches)
    kind: DocKind | None  # the documents' kind (on-policy steps need prompts); None: a logit store's packed rows
    teacher: OfflineTeacher | None  # offline: reads the targets the store holds; None: an online teacher, or none
    store_hash: str | None  # the store's content hash (a resumed offline run must train from the same store)
    line: str  # the startup summary's data line
    streamed: bool  # the training rows come as a stream (offline stores, data.streaming), from a data position
    unprompted: int = 0  # on-policy runs: training rows that start mid-completion (data/packed.rows_without_prompt)

    @property
    def sequences(self) -> int | None:
        """Training sequences; None for data.streaming (unknown until the stream has been read)."""
        return None if isinstance(self.train, DocumentStream) else len(self.train)


def training_data(plan: RunPlan) -> TrainingData:
    cfg, accelerator, tokenizer = plan.cfg, plan.accelerator, plan.tokenizer
    samples = training_store(cfg)  # the teacher's own samples (distill generate), as targets or as data
    if cfg.distill.signal == "offline":
        limit = getattr(plan.student_config.get_text_config(), "max_position_embeddings", None)
        if samples is not None and plan.teacher_tokenizer is not None:  # the teacher's samples and top-k, aligned
            from .cross_samples import open_cross_sample_targets

            theirs = plan.teacher_tokenizer
            source, kind = open_cross_sample_targets(cfg, tokenizer, theirs, accelerator, limit), DocKind.PROMPT
        elif samples is not None:
            source, kind = open_sample_targets(cfg, tokenizer, samples), DocKind.PROMPT
        elif plan.teacher_tokenizer is not None:  # a store in the teacher's tokenization, read through the alignment
            from .cross_store import open_cross_store

            source, kind = open_cross_store(cfg, tokenizer, plan.teacher_tokenizer, accelerator, limit), None
        else:
            source, kind = open_logit_store(cfg, tokenizer, accelerator), None
        hash_ = source.manifest["config_hash"]
        return TrainingData(source.train, source.val, kind, source.teacher, hash_, source.line, streamed=True)
    unprompted = 0
    with accelerator.main_process_first():
        if samples is not None and plan.teacher_tokenizer is not None:  # the teacher's samples, in the student's tokens
            from .cross_samples import cross_sample_data

            train, val, kind, line = cross_sample_data(cfg, tokenizer, plan.teacher_tokenizer, samples)
        elif samples is not None:  # prompt/completion documents, only the completions learned
            train, val, kind, line = sample_data(cfg, tokenizer, samples)
        elif cfg.data.streaming:
            train = DocumentStream(cfg.data, tokenizer, cfg.train.seed)
            (val, line), kind = streaming_validation(cfg.data, tokenizer), train.kind
        else:
            docs = plan.documents()
            (train, val, line), kind = build_datasets(docs, tokenizer, cfg.data), docs.kind
            # (a sample store's documents and conversations are never split across rows; a stream is not known yet)
            unprompted = rows_without_prompt(train) if cfg.distill.on_policy > 0 and not kind.is_chat else 0
    if plan.teacher_tokenizer is not None and not cfg.data.streaming:  # distill.cross_tokenizer, before any weights
        from .cross_teacher import startup_check

        startup_check(cfg, tokenizer, plan.teacher_tokenizer, train, accelerator.print)
    return TrainingData(train, val, kind, None, None, line, cfg.data.streaming, unprompted)
