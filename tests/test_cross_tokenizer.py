"""A teacher with another tokenizer (distill.cross_tokenizer, docs/cross_tokenizer.md), through the real objective.

Default tier (in-process, seconds): one tokenizer on both sides through the cross-tokenizer path gives today's forward
KL, its gradients and its CE to 1e-6; two tokenizers of different sizes trained here give a finite loss with a
gradient, the span diagnostics and the alignment's share; the config and startup refusals name their key.
Slow tier: `distill train` on two tokenizers (1 and 2 processes, a zero3 teacher, kill and exact resume) and
benchmarks/cross_tokenizer.py --tiny.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_distill import models
from distributed_distill.config import ConfigError, CrossTokenizerConfig, load_config
from distributed_distill.cross_teacher import CrossTokenizerTeacher
from distributed_distill.cross_tokenizer import Aligner, vocab_map
from distributed_distill.data.batching import collate
from distributed_distill.data.documents import documents
from distributed_distill.data.packed import build_datasets
from distributed_distill.errors import DistillError
from distributed_distill.objective import forward_losses
from distributed_distill.teacher import OnlineTeacher
from distributed_distill.tokenizer import load_tokenizer, train_bpe_tokenizer

from .helpers import ROOT, SMOKE, error_line, read_metrics, run_cli, torchrun


@pytest.fixture(scope="module")
def pair(smoke_tokenizer, tmp_path_factory):
    """The smoke tokenizer (512 tokens) and a 384-token BPE trained on the same corpus: the student's and the
    teacher's; a real packed batch of the student's; tiny smoke-sized models for each."""
    cfg = load_config(SMOKE)
    docs = documents(cfg.data)
    other = train_bpe_tokenizer((d["text"] for d in docs.train), 384, tmp_path_factory.mktemp("tok") / "bpe-384")
    student_tok = load_tokenizer(str(smoke_tokenizer))
    train, _, _ = build_datasets(docs, student_tok, cfg.data)
    batch = collate(train, list(range(4)))
    return cfg, student_tok, other, batch


def models_for(cfg, student_vocab: int, teacher_vocab: int):
    teacher = models.load_model(cfg.teacher, models.model_config(cfg.teacher, teacher_vocab, "teacher"), seed=1)
    student = models.load_model(cfg.student, models.model_config(cfg.student, student_vocab, "student"), seed=0)
    return teacher.double(), student.double()


def grads(student) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def test_one_tokenizer_through_the_cross_path_is_todays_forward_kl(pair, tmp_path):
    cfg, tok, _, batch = pair
    teacher, student = models_for(cfg, len(tok), len(tok))
    head = models.AlignedHead(student.get_output_embeddings(), len(tok))
    dense = OnlineTeacher(teacher, {}, temperature=cfg.distill.temperature, vocab=len(tok))
    plain = dataclasses.replace(cfg.distill, chunk_size=16)
    crossed_cfg = dataclasses.replace(plain, cross_tokenizer=CrossTokenizerConfig(loss="hybrid"))
    source = CrossTokenizerTeacher(
        dense, Aligner(tok, tok), vocab_map(tok, tok, tmp_path), top_k=None, temperature=cfg.distill.temperature,
        chunk_size=16,
    )  # fmt: skip
    results = {}
    for name, teacher_source, dcfg in (("plain", dense, plain), ("cross", source, crossed_cfg)):
        student.zero_grad(set_to_none=True)
        out = forward_losses(student, teacher_source, batch, dcfg, head=head, kd_weight=0.5, ce_weight=0.5)
        (0.5 * out.kd_sum + 0.5 * out.ce_sum).backward()
        results[name] = (out, grads(student))
    (plain_out, plain_grads), (cross_out, cross_grads) = results["plain"], results["cross"]
    # The logged figure, KD per counted token, to 1e-6 (both compute in float32, summing in another order).
    n = plain_out.num_tokens.item()
    assert cross_out.num_tokens.item() == n
    assert abs(cross_out.kd_sum.item() - plain_out.kd_sum.item()) / n < 1e-6
    assert cross_out.ce_sum.item() == plain_out.ce_sum.item()
    assert plain_grads.keys() == cross_grads.keys()
    for name in plain_grads:
        scale = plain_grads[name].abs().max().item()
        assert (cross_grads[name] - plain_grads[name]).abs().max().item() <= 1e-5 * scale + 1e-9, name
    assert cross_out.stats["unaligned_fraction"].item() == 0  # every counted token in a one-token span


def test_two_tokenizers_train_through_the_spans(pair, tmp_path):
    cfg, tok, other, batch = pair
    teacher, student = models_for(cfg, len(tok), len(other))
    head = models.AlignedHead(student.get_output_embeddings(), len(tok))
    dense = OnlineTeacher(teacher, {}, temperature=1.0, vocab=len(other))
    counted = int((batch["labels"][:, 1:] != -100).sum())
    for loss in ("uld", "hybrid"):
        xcfg = dataclasses.replace(
            cfg.distill, chunk_size=16, temperature=1.0, cross_tokenizer=CrossTokenizerConfig(loss=loss)
        )
        source = CrossTokenizerTeacher(
            dense, Aligner(tok, other), vocab_map(tok, other, tmp_path), top_k=None, temperature=1.0, chunk_size=16
        )
        student.zero_grad(set_to_none=True)
        out = forward_losses(student, source, batch, xcfg, head=head, kd_weight=1.0, ce_weight=0.0)
        out.kd_sum.backward()
        assert torch.isfinite(out.kd_sum) and out.kd_sum.item() > 0, loss
        assert sum(g.abs().sum() for g in grads(student).values()) > 0, loss
        assert set(out.stats) == set(CrossTokenizerTeacher.stat_names)
        unaligned = out.stats["unaligned_fraction"].item()
        assert 0 <= unaligned < 0.25 * counted  # two BPEs of one corpus: most spans align
        assert 0 <= out.stats["span_agreement"].item() <= counted


def test_a_document_beyond_the_teachers_positions_is_refused_in_one_line(pair, tmp_path):
    """In the teacher's (smaller) vocabulary a document takes more tokens than in the student's: one that would run
    past the teacher's positions stops the step with one line naming the figure, before the teacher's forward."""
    cfg, tok, other, batch = pair
    teacher, _ = models_for(cfg, len(tok), len(other))
    dense = OnlineTeacher(teacher, {}, vocab=len(other))
    longest = int(Aligner(tok, other)(batch).teacher_batch["position_ids"].max()) + 1
    for limit, refused in ((longest, False), (longest - 1, True)):
        source = CrossTokenizerTeacher(
            dense, Aligner(tok, other), vocab_map(tok, other, tmp_path), top_k=None, temperature=1.0, chunk_size=16,
            max_positions=limit,
        )  # fmt: skip
        if refused:
            with pytest.raises(DistillError, match=f"{longest} tokens long in the teacher's tokenization, beyond the "
                               f"teacher's {limit} positions"):  # fmt: skip
                source.targets(batch)
        else:
            assert source.targets(batch).cross.student.num_spans > 0


def test_a_pair_that_differs_without_the_key_is_refused_naming_it(tmp_path, smoke_tokenizer):
    # The refusal of a differing pair is test_vocab.py's (it now names distill.cross_tokenizer); here the key's own
    # refusals, each one line at config load.
    bad = {
        "distill.cross_tokenizer.loss=uld": "needs teacher.path",
        "distill.cross_tokenizer.loss=nope": "distill.cross_tokenizer.loss",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(SMOKE, [override])
    teacher = tmp_path / "teacher"
    shutil.copytree(smoke_tokenizer, teacher)
    with_path = ["teacher.arch=null", f"teacher.path={teacher}", "distill.cross_tokenizer.loss=hybrid"]
    for extra, message in {
        "distill.loss=reverse_kl": "forward KL only",
        "distill.samples=4": "sampled targets",
        "teacher.engine=remote teacher.url=http://127.0.0.1:9": "teacher.engine=remote: not supported yet",
    }.items():
        with pytest.raises(ConfigError, match=message):
            load_config(SMOKE, [*with_path, *extra.split()])
    with pytest.raises(ConfigError, match="keeps top-k targets"):
        load_config(SMOKE, [*with_path, "distill.store_samples=4"])
    # `distill serve` does not take one yet: it refuses in one line, exit 2, before any work (`distill generate`
    # samples in the teacher's tokens: tests/test_cross_samples.py).
    proc = run_cli(["serve", "--config", str(SMOKE), *with_path, f"serve.address_file={tmp_path / 'url'}"],
                   check=False)  # fmt: skip
    assert "distill serve with distill.cross_tokenizer: not supported yet" in error_line(proc)
    assert not (tmp_path / "url").exists()


# ----------------------------------------------------------------------------------------------
# distill train on two tokenizers (slow tier)


@pytest.fixture(scope="module")
def cross_teacher_dir(tmp_path_factory) -> Path:
    """A smoke-sized teacher saved with a tokenizer of its own: a 384-token BPE trained on the same corpus (the
    student's run trains the smoke config's 512-token one)."""
    cfg = load_config(SMOKE)
    out = tmp_path_factory.mktemp("cross") / "teacher-384"
    train_bpe_tokenizer((d["text"] for d in documents(cfg.data).train), 384, out)
    teacher_config = models.model_config(cfg.teacher, len(load_tokenizer(str(out))), "teacher")
    models.load_model(cfg.teacher, teacher_config, seed=1).save_pretrained(out)
    return out


CROSS_STEPS = 8


def cross_args(teacher: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(SMOKE), f"output_dir={out}", "teacher.arch=null", f"teacher.path={teacher}",
        "distill.cross_tokenizer.loss=hybrid", f"train.max_steps={CROSS_STEPS}", "train.micro_batch_size=4",
        "train.eval_every=4", "train.save_every=2", "train.log_every=1", *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_tokenizers_train_on_two_processes_with_a_zero3_teacher_as_on_one(cross_teacher_dir, tmp_path):
    """`distill train` with a 384-token teacher and the 512-token student: the startup line, the span diagnostics
    at validation; 2 processes (torchrun) with a zero3 teacher train the student one process with a replicated
    teacher trains (to 1e-5)."""
    one = tmp_path / "one"
    proc = run_cli(["train", *cross_args(cross_teacher_dir, one)], timeout=300)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("cross-tokenizer:"))
    assert "student tokenizer 512 tokens, teacher's 384" in line and "loss hybrid" in line
    assert float(re.search(r"aligned spans cover ([\d.]+)%", line).group(1)) > 90
    metrics = read_metrics(one)
    assert [r["step"] for r in metrics] == list(range(1, CROSS_STEPS + 1))
    final = [r for r in metrics if "val_loss" in r][-1]
    assert final["val_span_kl"] > 0 and 0 <= final["val_span_agreement"] <= 1
    assert 0 <= final["val_unaligned_fraction"] < 0.1 and final["val_accuracy"] > 0
    # 2 processes with a zero3 teacher (sharded across them) against 1 process with a replicated one: both the
    # data-parallel split of the spans and the engine in one run.
    out = tmp_path / "zero3"
    run_cli(cross_args(cross_teacher_dir, out, "train.micro_batch_size=2", "teacher.engine=zero3"),
            launcher=torchrun(29672, "train.py"), timeout=600)  # fmt: skip
    assert [r["step"] for r in read_metrics(out)] == list(range(1, CROSS_STEPS + 1))
    for a, b in zip(read_metrics(one), read_metrics(out)):
        for key in ("loss", "kd_loss", "ce_loss", "num_tokens", "grad_norm", "val_loss", "val_span_kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (key, a["step"])
    # (A SIGKILL and an exact resume of cross-tokenizer steps: test_cross_on_policy.py, whose run mixes on-policy
    # and data steps, and test_cross_store.py offline.)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_the_cross_tokenizer_benchmark_prints_its_paired_table(tmp_path):
    """benchmarks/cross_tokenizer.py --tiny (the command of docs/cross_tokenizer.md's table, at a few steps): a
    teacher with a 512-token tokenizer, students with a 384-token one, CE only, ULD, hybrid and ULD at alpha 0.1;
    each Δ is the paired difference to the CE-only student of its seed and the table repeats the JSON."""
    out = run_cli([str(ROOT / "benchmarks" / "cross_tokenizer.py"), "--tiny", "--output-dir", str(tmp_path)],
                  launcher=[sys.executable], timeout=600).stdout  # fmt: skip
    lines = out.splitlines(keepends=True)
    record, _ = json.JSONDecoder().raw_decode("".join(lines[next(i for i, x in enumerate(lines) if x == "{\n") :]))
    assert record == json.loads((tmp_path / "cross_tokenizer.json").read_text())
    loss = {r["recipe"]: r["val_loss"] for r in record["rows"]}
    assert list(loss) == ["CE only (student's tokenizer)", "cross-tokenizer ULD", "cross-tokenizer hybrid",
                          "cross-tokenizer ULD, alpha 0.1"]  # fmt: skip
    rows = {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in
            (x.strip().strip("|").split("|") for x in out.splitlines() if x.startswith("| "))}  # fmt: skip
    for s in record["summary"][1:]:
        [row] = [r for r in record["rows"] if r["recipe"] == s["recipe"]]
        assert row["val_loss_vs_ce"] == pytest.approx(loss[s["recipe"]] - loss["CE only (student's tokenizer)"])
        assert rows[s["recipe"]][1] == f"{s['val_loss_vs_ce']['mean']:+.4f} ± 0.0000"
        assert 0 <= row["val_unaligned_fraction"] < 0.1 and row["val_span_kl"] > 0
    assert (tmp_path / "cross_tokenizer.md").read_text() in out
