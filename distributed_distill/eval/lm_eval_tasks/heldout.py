"""The documents of lm-eval's `distill_heldout` task (distill_heldout.yaml): the validation split of a data source,
cut as `distill train` cuts it. Options come from `lm_eval --metadata '{"source": ..., "max_documents": ...}'`."""

from __future__ import annotations

import re

import datasets

from distributed_distill.config import DataConfig
from distributed_distill.data.documents import document_fields, documents


def load_heldout(
    source: str = "python-stdlib", max_documents: int | None = 500, val_fraction: float = 0.05, **_
) -> dict[str, datasets.Dataset]:
    """{"test": the held-out documents as one `text` column} (prompt/completion rows joined, chats flattened)."""
    dcfg = DataConfig(source=source, max_documents=max_documents, val_fraction=val_fraction)
    docs = documents(dcfg)
    val, fields = docs.val, document_fields(docs.kind, dcfg)

    def text(row: dict) -> dict:
        parts = [row[f] for f in fields]
        flat = ["\n".join(m["content"] for m in p) if isinstance(p, list) else p for p in parts]
        return {"text": "\n".join(flat)}

    return {"test": val.map(text, remove_columns=val.column_names)}


def process_results(doc: dict, results: list) -> dict:
    """lm-eval's rolling log-likelihood of a document, per word and per byte (the wikitext task's definitions)."""
    (loglikelihood,) = results
    words, size = len(re.split(r"\s+", doc["text"])), len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, size),
        "bits_per_byte": (loglikelihood, size),
    }
