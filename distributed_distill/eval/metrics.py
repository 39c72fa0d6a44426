"""Evaluation metrics as small pure functions (docs/eval.md).

Every metric is kept as sums that ranks add (an all-reduce), then turned into means once: each validation token and
each held-out prompt counts exactly once however the split divides across processes.

    token_sums(student_logits, labels, teacher, bins) -> TOKEN_SUMS sums (+ 3 x bins calibration sums)
    token_means(sums, bins)                            -> forward/reverse KL, top-1 agreement, ECE
    rouge_l(candidate, reference)                      -> ROUGE-L F1 over whitespace tokens
    repeated_ngrams(ids, n)                            -> (repeated, total) n-grams of one completion
    python_parses(head, completion)                    -> whether a function head plus a completed body parse
"""

from __future__ import annotations

import ast
import re

import torch
import torch.nn.functional as F

from ..data.batching import IGNORE_INDEX
from ..losses import TeacherTargets, kd_loss, sampled_kd_loss, sparse_kd_loss

# The per-token sums kept for every validation token, in this order, then 3 x bins calibration sums (count,
# confidence, correct per bin). `kl_tokens` counts the tokens the forward-KL sum covers, `reverse_kl_tokens` those
# the reverse-KL sum covers (both 0 without a teacher, or for sparse or sampled targets at a temperature other than
# 1, whose KL at T=1 is unknown; sampled targets have no reverse KL, and a forward one only with their entropy);
# `agreement_tokens` those with agreement.
TOKEN_SUMS = (
    "tokens",
    "forward_kl",
    "reverse_kl",
    "kl_tokens",
    "top1_agreement",
    "agreement_tokens",
    "reverse_kl_tokens",
)


@torch.no_grad()
def token_sums(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: TeacherTargets | None,
    bins: int,
    *,
    teacher_temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """float64 sums over the counted rows of [N, V] student logits (labels [N], IGNORE_INDEX = not counted).

    Against the teacher, at temperature 1: KL(p_T || p_S), KL(p_S || p_T) and whether both rank the same token first.
    Calibration of the student's next-token probabilities: per equal-width confidence bin, the number of tokens, the
    sum of the top-1 probability and the number whose top-1 token is the label. Sparse (top-k) targets give the KL
    of the k ids plus the tail bucket, as the loss compares them, and only at the temperature they were taken at 1.
    Sampled targets (ids with counts) give forward KL only, as the loss's unbiased estimate -H - sum_i w_i log p_S
    (sampled_kd_loss), and only when taken at temperature 1 and given with their entropy (without it the estimate
    is of the cross-entropy, not of KL); reverse KL needs p_T at ids not drawn, so its tokens are not counted and
    val_reverse_kl is not reported. Their top-1 agreement is with the most drawn id (ties: the first of the ids).
    """
    keep = labels != ignore_index
    s = student_logits[keep].float()
    y = labels[keep]
    out = torch.zeros(len(TOKEN_SUMS) + 3 * bins, dtype=torch.float64, device=student_logits.device)
    n = s.shape[0]
    out[0] = n
    if n == 0:
        return out
    if teacher is not None and teacher.present:
        if teacher.sampled:
            ids, w = teacher.ids[keep], teacher.counts[keep]
            if teacher_temperature == 1.0 and teacher.entropy is not None:
                out[1] = sampled_kd_loss(s, ids, w, teacher_entropy=teacher.entropy[keep], reduction="sum")
                out[3] = n
            teacher_top = ids.gather(1, w.argmax(-1, keepdim=True)).squeeze(1)
        elif teacher.sparse:
            ids, lp = teacher.ids[keep], teacher.logprobs[keep]
            tail = None if teacher.tail_logmass is None else teacher.tail_logmass[keep]
            if teacher_temperature == 1.0:
                for i, kind in ((1, "forward_kl"), (2, "reverse_kl")):
                    out[i] = sparse_kd_loss(s, ids, lp, kind=kind, reduction="sum", teacher_tail_logmass=tail)
                out[3] = out[6] = n
            teacher_top = ids[:, 0]  # top-k ids are sorted: the first is the teacher's most likely token
        else:
            t = teacher.dense_logits()[keep].float()
            for i, kind in ((1, "forward_kl"), (2, "reverse_kl")):
                out[i] = kd_loss(s, t, kind=kind, reduction="sum")
            out[3] = out[6] = n
            teacher_top = t.argmax(-1)
        out[4] = (s.argmax(-1) == teacher_top).sum()
        out[5] = n
    conf, top = F.softmax(s, dim=-1).max(-1)
    which = (conf * bins).long().clamp(max=bins - 1)
    base = len(TOKEN_SUMS)
    out[base : base + bins] = torch.bincount(which, minlength=bins).double()
    out[base + bins : base + 2 * bins] = torch.bincount(which, weights=conf.double(), minlength=bins)
    out[base + 2 * bins :] = torch.bincount(which, weights=(top == y).double(), minlength=bins)
    return out


def token_means(sums: list[float], bins: int) -> dict[str, float]:
    """The metrics of all ranks' summed `token_sums`: KL and agreement per token, and
    ECE = sum_b n_b / N * |acc_b - conf_b| = sum_b |correct_b - confidence_sum_b| / N."""
    named = dict(zip(TOKEN_SUMS, sums))
    base = len(TOKEN_SUMS)
    conf, correct = sums[base + bins : base + 2 * bins], sums[base + 2 * bins :]  # (the first bins: counts)
    tokens = max(named["tokens"], 1.0)
    result = {"val_ece": sum(abs(a - c) for a, c in zip(correct, conf)) / tokens}
    result["val_accuracy"] = sum(correct) / tokens
    if named["kl_tokens"]:
        result["val_forward_kl"] = named["forward_kl"] / named["kl_tokens"]
    if named["reverse_kl_tokens"]:
        result["val_reverse_kl"] = named["reverse_kl"] / named["reverse_kl_tokens"]
    if named["agreement_tokens"]:
        result["val_top1_agreement"] = named["top1_agreement"] / named["agreement_tokens"]
    return result


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) of two texts split on whitespace: from the longest common subsequence of tokens."""
    a, b = candidate.split(), reference.split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b, 1):
            row.append(prev[j - 1] + 1 if x == y else max(prev[j], row[j - 1]))
        prev = row
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def repeated_ngrams(ids: list[int], n: int) -> tuple[int, int]:
    """(how many of the sequence's n-grams occurred earlier in it, how many n-grams it has)."""
    seen: set[tuple[int, ...]] = set()
    repeated = 0
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated, len(grams)


_FENCE = re.compile(r"```(?:python)?\n(.*?)(?:\n```|$)", re.S)


def fenced_code(text: str) -> str:
    """The first ```python fenced block of a text (to its end when the fence is never closed), else the text."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def python_parses(head: str, completion: str) -> bool:
    """The built-in `python-stdlib-chat` task check: the function's signature and docstring (from the request)
    followed by the completed body (the completion's fenced code) parse as Python."""
    try:
        ast.parse(fenced_code(head) + "\n" + fenced_code(completion))
    except (SyntaxError, ValueError):
        return False
    return True
