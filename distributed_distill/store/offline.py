"""The offline teacher: a teacher source that reads targets from a store instead of computing them (the logit
store's, or the top-k a sample store keeps at every sampled token)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DistillError
from ..losses import TeacherTargets
from .format import row_hash


class OfflineTeacher:
    """A teacher source that reads the targets instead of computing them: training batches carry their own
    (`teacher_*` keys); validation batches are matched to store rows by the content hash of their token ids."""

    engine = "offline store"

    def __init__(self, manifest: dict, validation):
        # validation: the store's validation split, with `by_hash` (row hash -> row) and row indexing
        self.identity = {**manifest["teacher"], "store_config_hash": manifest["config_hash"]}
        self.validation = validation
        # What a dense scorer would need and a store has not (evaluate.evaluate_generations asks).
        self.top_k, self.samples = manifest.get("top_k"), manifest.get("samples")

    def targets(self, batch: dict) -> TeacherTargets:
        if "teacher_ids" not in batch:
            batch = self._lookup(batch["input_ids"])
        width = batch["teacher_ids"].shape[-1]
        if "teacher_counts" in batch:  # sampled targets (a logit store made with distill.store_samples)
            return TeacherTargets(
                ids=batch["teacher_ids"].reshape(-1, width),
                counts=batch["teacher_counts"].reshape(-1, width),
                entropy=batch["teacher_entropy"].reshape(-1),
            )
        return TeacherTargets(
            ids=batch["teacher_ids"].reshape(-1, width),
            logprobs=batch["teacher_logprobs"].reshape(-1, width),
            tail_logmass=batch["teacher_tail"].reshape(-1),
        )

    def _lookup(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = []
        for seq in input_ids.cpu().numpy():
            pos = self.validation.by_hash.get(row_hash(seq))
            if pos is None:
                raise DistillError("a validation sequence is not in the store: it was made from other data")
            rows.append(pos)
        found = self.validation[rows]
        return {k: v.to(input_ids.device) for k, v in found.items()}

    def num_parameters(self) -> int:
        return 0  # the teacher ran when the store was made; none runs now

    def parameter_bytes(self) -> tuple[int, int]:
        return 0, 0


@dataclass(frozen=True)
class OfflineSource:
    """What an offline run trains from: the training rows (with their targets), the validation split, the teacher
    source that reads their targets, the store's manifest, and the startup summary's data line."""

    train: object  # logits.TrainStream or samples.SampleSplit: `micro_batches(...)` yields batches with targets
    val: object  # logits.ValidationSplit or samples.SampleSplit: indexable, searchable by row hash
    teacher: OfflineTeacher
    manifest: dict
    line: str
