"""Stores: what a teacher produced, kept on disk, verifiable, and read back into training (docs/store.md).

format.py   the format core both stores share: names, id dtypes, the row hash, shard write with its sidecar,
            manifest read and checks against a run, checked shard reads, the verification of every shard
logits.py   the logit store (`distill precompute`): top-k targets of every packed sequence, streamed offline
samples.py  the sample store (`distill generate`): the teacher's completions (+ its top-k at every sampled token)
offline.py  the offline teacher: a teacher source that reads targets instead of computing them
writer.py   the sharded writer job both commands share (plan, lock, parts, resume, lockstep, manifest)
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config
from .format import MANIFEST
from .logits import verify_logit_store
from .samples import SAMPLE_FORMAT, is_sample_store, verify_sample_store


def verify_store(root: str | Path) -> str:
    """`distill verify-store`: a logit store or a sample store, checked completely; a one-line verdict, or a
    DistillError naming the first faulty shard (and row, where one can be found)."""
    return verify_sample_store(root) if is_sample_store(root) else verify_logit_store(root)


def _manifest(cfg: Config) -> dict | None:
    try:
        manifest = json.loads((Path(cfg.distill.store).expanduser() / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _source(manifest: dict | None, cfg: Config) -> str | None:
    if manifest is None:
        return None
    if manifest.get("format") == SAMPLE_FORMAT:
        return cfg.distill.store
    return (manifest.get("data") or {}).get("source")


def offline_data_source(cfg: Config) -> str | None:
    """What an offline run trains on, as data.source names it: a sample store is its own source (its samples are the
    documents), a logit store the source it was precomputed from. None when distill.store holds no readable manifest
    (opening the store says why)."""
    return _source(_manifest(cfg), cfg)


def offline_sources(cfg: Config) -> list[str]:
    """Every data.source an offline run may name without contradiction: offline_data_source, and for a sample store
    also the source its prompts came from (the config that generated the samples, reused to train on them)."""
    manifest = _manifest(cfg)
    source = _source(manifest, cfg)
    if source is None:
        return []
    prompts = ((manifest.get("prompts") or {}).get("data") or {}).get("source")
    return [source, prompts] if manifest.get("format") == SAMPLE_FORMAT and isinstance(prompts, str) else [source]
