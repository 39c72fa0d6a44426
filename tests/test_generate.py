"""`distill generate` and training on its sample store (configs/generate.yaml: a tiny chat teacher completing the
built-in conversations' prompts, top-8 kept): the store verifies, reads with plain `datasets`, and its top-k equals a
fresh teacher forward; 1 and 2 processes (torchrun, accelerate launch), a killed-and-rerun run and a ZeRO-3 teacher
write the same samples; seq-KD and stored-top-k training run on 1 and 2 processes and resume exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from distributed_distill import models, on_policy
from distributed_distill.config import load_config
from distributed_distill.data.documents import DocKind
from distributed_distill.errors import DistillError
from distributed_distill.tokenizer import load_tokenizer

from .helpers import (
    ROOT,
    accelerate_launch,
    kill_after_shards,
    read_metrics,
    run_cli,
    store_files,
    torchrun,
    training_records,
)

CONFIG = ROOT / "configs" / "generate.yaml"
# float16 keeps 11 significant bits: a stored log-prob is within 2^-11 of its magnitude of the float32 value.
FP16 = 2.0**-11


def _store(name: str) -> Path:
    return Path(os.environ["DISTILL_CACHE"]) / "sample_stores" / name


@pytest.fixture(scope="module")
def reference() -> Path:
    """configs/generate.yaml's store, written once by one process."""
    root = _store("reference")
    if not (root / "manifest.json").is_file():
        run_cli(["generate", "--config", str(CONFIG), f"generate.store={root}"], timeout=300)
    return root


def test_generate_writes_a_verified_store_whose_topk_is_a_fresh_teacher_forward(tmp_path):
    """Default tier, in-process: a small store; verify-store's checks pass; plain `datasets` reads it; every stored
    top-k log-prob and tail mass equals a float32 forward of the teacher over prompt + completion at
    distill.temperature, within float16 rounding (and the ids are that forward's top-k); the log-prob of each
    sampled token is the forward's at temperature 1."""
    from distributed_distill.generate import generate_store
    from distributed_distill.store.samples import verify_sample_store

    root = tmp_path / "samples"
    cfg = load_config(
        CONFIG, [f"generate.store={root}", "generate.max_prompts=6", "generate.sampling.max_new_tokens=12"]
    )
    result = generate_store(cfg)
    assert result["complete"] and result["shards_written"] == result["shards"]
    assert verify_sample_store(root).startswith("ok: ")
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["sampling"]["temperature"] == 1.0 and manifest["temperature"] == 2.0 and manifest["top_k"] == 8
    rows = datasets.load_dataset("parquet", data_files=str(root / "train" / "*.parquet"), split="train")
    assert len(rows) == 6 * 2 and set(rows["finish_reason"]) <= {"eos", "stop", "length"}

    tokenizer = load_tokenizer(str(root / "tokenizer"))
    # One end-token rule (generation.sampling_setup) for the teacher here and the student on-policy: eos, and for
    # conversations the chat template's end of turn.
    chat_ends = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})
    assert manifest["sampling"]["eos_ids"] == chat_ends and len(chat_ends) == 2
    on_policy_cfg = load_config(CONFIG, ["distill.on_policy=1", "data.packing=false"])
    chat = on_policy.StudentSampler.build(on_policy_cfg, tokenizer, DocKind.CHAT, synced=False)
    assert list(chat.sampling.eos_ids) == chat_ends
    prompt = on_policy.StudentSampler.build(on_policy_cfg, tokenizer, DocKind.PROMPT, synced=False)
    assert list(prompt.sampling.eos_ids) == [tokenizer.eos_token_id]
    teacher = models.load_model(cfg.teacher, models.model_config(cfg.teacher, len(tokenizer), "teacher"), seed=1)
    worst = 0.0
    for row in rows:
        prompt, completion = row["prompt_ids"], row["completion_ids"]
        with torch.no_grad():
            logits = teacher(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1, : len(tokenizer)]
        at_t = (logits.float() / 2.0).log_softmax(-1)
        top, ids = at_t.topk(8, dim=-1)
        stored_ids = torch.tensor(row["teacher_ids"]).view(-1, 8)
        stored = torch.tensor(row["teacher_logprobs"], dtype=torch.float32).view(-1, 8)
        tail = torch.tensor(row["teacher_tail"], dtype=torch.float32)
        fresh_tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
        assert torch.equal(stored_ids, ids)
        assert ((stored - top).abs() <= top.abs() * FP16 + 1e-5).all()
        assert ((tail - fresh_tail).abs() <= fresh_tail.abs() * FP16 + 1e-4).all()
        sampled = logits.float().log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        worst = max(worst, float((torch.tensor(row["token_logprobs"]) - sampled).abs().max()))
        assert row["logprob"] == pytest.approx(float(sampled.sum()), abs=1e-4)
        assert row["completion"] == tokenizer.decode(completion, skip_special_tokens=True)
    assert worst < 1e-5


@pytest.mark.slow
def test_prompt_and_store_mistakes_are_one_line_before_the_teacher_loads(tmp_path):
    from distributed_distill.generate import generate_store

    with pytest.raises(DistillError, match="plain text, not prompts"):
        generate_store(load_config(CONFIG, [f"generate.store={tmp_path / 'a'}", "data.source=python-stdlib"]))
    with pytest.raises(DistillError, match="needs generate.store"):
        generate_store(load_config(CONFIG, ["generate.store=null"]))
    with pytest.raises(DistillError, match="no room for a prompt"):
        generate_store(
            load_config(CONFIG, [f"generate.store={tmp_path / 'b'}", "generate.sampling.max_new_tokens=256"])
        )
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(DistillError, match="not a store"):
        generate_store(load_config(CONFIG, [f"generate.store={tmp_path / 'c'}"]))
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.multiprocess
# accelerate in the release tier (CI's hour, docs/testing.md); CI's sibling: torchrun, the same writer
@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("accelerate", marks=pytest.mark.release)])
def test_two_processes_write_the_store_one_process_writes(reference, tmp_path, launcher):
    out = tmp_path / "two"
    args = ["-m", "distributed_distill.cli", "generate", "--config", str(CONFIG), f"generate.store={out}"]
    if launcher == "torchrun":
        run_cli(args, launcher=torchrun(29900), timeout=600)
    else:
        run_cli(args, launcher=accelerate_launch("cpu.yaml", 29901), env={"ACCELERATE_USE_CPU": "true"}, timeout=600)
    assert run_cli(["verify-store", str(out)]).stdout.startswith("ok: ")
    assert store_files(out) == store_files(reference)


@pytest.mark.slow
def test_another_thread_count_samples_the_same_tokens_with_log_probs_close(reference, tmp_path):
    """docs/generate.md's condition, both halves: byte-identical stores need the same threads per process (the
    reference runs with 1, like every torchrun worker); one process on 2 threads samples the same tokens (ids, text,
    finish reasons, row hashes and top-k ids identical), and its float log-probs differ at most in the last bits."""
    out = tmp_path / "two_threads"
    run_cli(["generate", "--config", str(CONFIG), f"generate.store={out}"], env={"OMP_NUM_THREADS": "2"}, timeout=300)
    a, b = (
        datasets.load_dataset("parquet", data_files=str(r / "*" / "*.parquet"), split="train") for r in (reference, out)
    )
    for column in ("row_hash", "prompt_ids", "completion_ids", "completion", "finish_reason", "teacher_ids"):
        assert a[column] == b[column], column
    for column in ("token_logprobs", "teacher_logprobs", "teacher_tail"):
        x, y = (np.concatenate([np.asarray(r, dtype=np.float64) for r in d[column]]) for d in (a, b))
        fp16 = column != "token_logprobs"  # (stored as float16: a last-bit change may move one float16 step)
        assert np.allclose(x, y, rtol=2**-10 if fp16 else 0, atol=1e-5), column
    assert b["logprob"] == pytest.approx(a["logprob"], abs=1e-4)


@pytest.mark.slow
def test_killed_generate_resumes_to_the_identical_store(reference, tmp_path):
    out = tmp_path / "killed"
    args = ["generate", "--config", str(CONFIG), f"generate.store={out}"]
    assert kill_after_shards([sys.executable, "-m", "distributed_distill.cli", *args], out, 2) == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    done_before = len(list((out / "train").glob("*.json")))
    result = json.loads(run_cli(args, timeout=300).stdout.strip().splitlines()[-1])
    assert result["shards_written"] == result["shards"] - done_before  # only the remaining shards
    assert store_files(out) == store_files(reference)  # same rows and bytes: no duplicate, no missing sample


@pytest.mark.slow
def test_parts_of_a_job_array_write_the_store_one_run_writes(reference, tmp_path):
    """DISTILL_STORE_PART=I/N (launch/slurm's job arrays): two parts run one after the other fill one store; the
    first leaves it without a manifest, the second writes it; the same bytes as one run."""
    out = tmp_path / "parts"
    args = ["generate", "--config", str(CONFIG), f"generate.store={out}"]
    first = json.loads(run_cli(args, env={"DISTILL_STORE_PART": "0/2"}).stdout.strip().splitlines()[-1])
    assert not first["complete"] and not (out / "manifest.json").exists()
    second = json.loads(run_cli(args, env={"DISTILL_STORE_PART": "1/2"}).stdout.strip().splitlines()[-1])
    assert second["complete"] and first["shards_written"] + second["shards_written"] == second["shards"]
    assert store_files(out) == store_files(reference)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_teacher_samples_in_lockstep_and_matches_the_replicated_teacher(reference, tmp_path):
    """Completions end at very different lengths (many tokens end a sample, and validation prompts are few, so the
    ranks also have different numbers of batches): the ZeRO-3 ranks keep stepping together until all are done."""
    vocab = json.loads((reference / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    enders = json.dumps(sorted(vocab, key=vocab.get)[300:340])  # 40 ordinary tokens: a sample ends early, or not
    common = ["--config", str(CONFIG), f"generate.sampling.eos_tokens={enders}", "generate.sampling.max_new_tokens=40"]
    common += ["generate.max_prompts=6", "generate.batch_size=4"]  # ranks: 4 and 2 batches (2 filler)
    replicated, zero3 = tmp_path / "replicated", tmp_path / "zero3"
    run_cli(["generate", *common, f"generate.store={replicated}"], timeout=300)
    args = ["-m", "distributed_distill.cli", "generate", *common, f"generate.store={zero3}", "teacher.engine=zero3"]
    run_cli(args, launcher=torchrun(29902), timeout=600)
    a, b = (
        datasets.load_dataset("parquet", data_files=str(root / "*" / "*.parquet"), split="train")
        for root in (replicated, zero3)
    )
    lengths = [len(c) for c in a["completion_ids"]]
    assert min(lengths) <= 5 and max(lengths) >= 30 and "eos" in a["finish_reason"]
    assert a["completion_ids"] == b["completion_ids"] and a["finish_reason"] == b["finish_reason"]
    assert b["logprob"] == pytest.approx(a["logprob"], abs=1e-4)
    assert run_cli(["verify-store", str(zero3)]).stdout.startswith("ok: ")


def _train(out: Path, *extra: str, launcher=None) -> None:
    args = ["--config", str(CONFIG), f"output_dir={out}", *extra]
    if launcher is None:
        run_cli(["train", *args], timeout=300)
    else:
        run_cli(["train.py", *args], launcher=launcher, timeout=600)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["seq_kd", "stored_topk"])
def test_training_on_samples_one_and_two_processes_and_resume(reference, tmp_path, mode):
    """Sequence-level KD (CE on the samples, no teacher) and KD from the stored top-k (offline, no teacher in
    memory): 2 processes train what 1 process trains (the same global batch), and the 2-process run's step-2
    checkpoint resumed (on 1 process) gives the uninterrupted run's records. The stored-top-k run also equals an
    online teacher emitting its top-8 over the same batches."""
    if mode == "seq_kd":
        signal_args = [f"data.source={reference}", "teacher=null", "distill.alpha=0"]
    else:
        signal_args = ["distill.signal=offline", f"distill.store={reference}"]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    _train(one, *signal_args)
    _train(two, *signal_args, "train.micro_batch_size=2", launcher=torchrun(29903))
    assert [r["step"] for r in read_metrics(one)] == [1, 2, 3, 4]
    for a, b in zip(read_metrics(one), read_metrics(two), strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "num_tokens"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), (key, a["step"])
    resumed.mkdir()
    shutil.copytree(two / "step-0000002", resumed / "step-0000002")
    shutil.copy(two / "metrics.jsonl", resumed / "metrics.jsonl")
    _train(resumed, *signal_args)
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4]
    for a, b in zip(training_records(one), training_records(resumed), strict=True):
        assert b == pytest.approx(a, abs=1e-4)
    assert (resumed / "final" / "config.json").is_file()
    if mode == "stored_topk":
        online = tmp_path / "online"
        _train(online, f"data.source={reference}", "distill.top_k=8")
        for a, b in zip(read_metrics(one), read_metrics(online), strict=True):
            assert b["kd_loss"] == pytest.approx(a["kd_loss"], rel=1e-3), a["step"]


# ----------------------------------------------------------------------------------------------
# Sampled targets (generate.samples): draws from the teacher at every completion token, in a sample store

# A small store: 4 prompts per split, 2 samples each, 12 new tokens, 8 draws per token (one shard per split).
SMALL = ["generate.max_prompts=4", "generate.sampling.max_new_tokens=12", "generate.top_k=null"]
SAMPLED = [*SMALL, "generate.samples=8"]


def _generated(root: Path, settings: list[str], part: tuple[int, int] | None = None) -> Path:
    from distributed_distill.generate import generate_store

    generate_store(load_config(CONFIG, [f"generate.store={root}", *settings]), part)
    return root


def _rows(root: Path, split: str = "*") -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_files=str(root / split / "*.parquet"), split="train")


@pytest.fixture(scope="module")
def sampled_store(tmp_path_factory) -> Path:
    """configs/generate.yaml's teacher with 8 sampled draws per completion token instead of its top-8, in-process."""
    return _generated(tmp_path_factory.mktemp("sampled") / "store", SAMPLED)


def test_sampled_targets_leave_the_samples_unchanged_and_are_the_teachers_draws(sampled_store, tmp_path):
    """The draws use their own generators, so a store without targets holds the same completions (ids, text, finish
    reasons, per-token log-probs); every stored (ids, counts) is `draw_from_logits` of a fresh float32 teacher forward
    at distill.temperature with the uniforms of `target_generator(seed, split, prompt, sample)`, one torch.rand(8)
    per step, and the entropy that forward's within float16 rounding."""
    from distributed_distill.generate import target_generator
    from distributed_distill.teacher import draw_from_logits

    plain = _generated(tmp_path / "plain", SMALL)
    a, b = _rows(sampled_store), _rows(plain)
    for column in ("row_hash", "completion_ids", "completion", "finish_reason", "token_logprobs", "logprob"):
        assert a[column] == b[column], column
    manifest = json.loads((sampled_store / "manifest.json").read_text())
    assert (manifest["version"], manifest["samples"], manifest["top_k"], manifest["temperature"]) == (2, 8, None, 2.0)

    cfg = load_config(CONFIG, SAMPLED)
    tokenizer = load_tokenizer(str(sampled_store / "tokenizer"))
    teacher = models.load_model(cfg.teacher, models.model_config(cfg.teacher, len(tokenizer), "teacher"), seed=1)
    for split in ("train", "validation"):
        for row in _rows(sampled_store, split):
            prompt, completion, n = row["prompt_ids"], row["completion_ids"], len(row["completion_ids"])
            with torch.no_grad():
                logits = teacher(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1, : len(tokenizer)]
            gen = target_generator(cfg.train.seed, split, row["index"], row["sample"])
            uniforms = torch.stack([torch.rand(8, generator=gen, dtype=torch.float64) for _ in range(n)])
            fresh = draw_from_logits(logits.float().clone(), 2.0, uniforms)
            kept = fresh.counts > 0
            assert row["teacher_unique"] == kept.sum(-1).tolist()
            assert row["teacher_ids"] == fresh.ids[kept].tolist()
            assert row["teacher_counts"] == (fresh.counts[kept] * 8).round().long().tolist()
            entropy = torch.tensor(row["teacher_entropy"], dtype=torch.float32)
            assert ((entropy - fresh.entropy).abs() <= fresh.entropy.abs() * 2 * FP16 + 1e-4).all()
    # A version 1 store (before generate.samples: no `samples` key) still verifies and reads.
    old = tmp_path / "version1"
    shutil.copytree(plain, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.pop("samples")
    (old / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    from distributed_distill.store.samples import open_sample_targets, verify_sample_store

    assert verify_sample_store(old).startswith("ok: ") and "top_k=None" in verify_sample_store(old)
    with pytest.raises(DistillError, match="holds no teacher targets"):
        open_sample_targets(load_config(CONFIG, ["distill.signal=offline", f"distill.store={old}"]), tokenizer, old)


def test_a_sampled_sample_store_verifies_adds_up_and_is_the_same_bytes_in_two_parts(sampled_store, tmp_path):
    """`distill verify-store` names samples=8; every completion token has 1 to 8 unique ascending ids whose counts add
    up to 8; the store generated again, as two parts of a job array (the second part first), is byte-identical."""
    line = run_cli(["verify-store", str(sampled_store)]).stdout.strip()
    assert line.startswith("ok: ") and "samples=8" in line and "top_k" not in line
    for row in _rows(sampled_store):
        unique, counts = np.asarray(row["teacher_unique"]), np.asarray(row["teacher_counts"])
        assert len(unique) == len(row["completion_ids"]) and len(counts) == len(row["teacher_ids"]) == unique.sum()
        assert ((unique >= 1) & (unique <= 8)).all()
        starts = np.concatenate([[0], np.cumsum(unique)[:-1]])
        assert (np.add.reduceat(counts, starts) == 8).all()
        for ids in np.split(np.asarray(row["teacher_ids"]), np.cumsum(unique)[:-1]):
            assert (np.diff(ids) > 0).all()
    parts = tmp_path / "parts"
    _generated(parts, SAMPLED, part=(1, 2))
    assert not (parts / "manifest.json").exists()
    _generated(parts, SAMPLED, part=(0, 2))
    assert store_files(parts) == store_files(sampled_store)


def test_offline_training_on_sampled_samples_and_its_refusals(sampled_store, tmp_path):
    """distill.signal=offline on the sampled sample store trains (forward KL from the stored draws: finite losses,
    validation included); another divergence is refused in one line (exit 2) before any model loads, and so are
    distill.top_k and other draws (distill.samples)."""
    from distributed_distill.store.samples import SampleSplit, open_sample_targets
    from distributed_distill.trainer import train

    offline = ["distill.signal=offline", f"distill.store={sampled_store}"]
    result = train(load_config(CONFIG, [f"output_dir={tmp_path / 'run'}", *offline, "train.max_steps=2"]))
    records = [r for r in read_metrics(tmp_path / "run") if "kd_loss" in r]
    assert len(records) == 2 and all(np.isfinite(r["kd_loss"]) and np.isfinite(r["loss"]) for r in records)
    assert np.isfinite(result["val_kd_loss"])
    # The rows a batch reads are the stored targets, padded: the weights of every learned token sum to 1.
    tokenizer = load_tokenizer(str(sampled_store / "tokenizer"))
    source = open_sample_targets(load_config(CONFIG, offline), tokenizer, sampled_store)
    assert isinstance(source.train, SampleSplit)
    batch = source.train[[0]]
    learned = batch["labels"][:, 1:] != -100
    assert learned.any() and batch["teacher_counts"].shape[-1] == batch["teacher_ids"].shape[-1] == 8
    assert torch.allclose(batch["teacher_counts"].sum(-1)[learned], torch.ones(int(learned.sum())))

    refused = ["train", "--config", str(CONFIG), f"output_dir={tmp_path / 'rkl'}", *offline, "distill.loss=reverse_kl"]
    proc = run_cli(refused, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "sampled targets, which estimate forward KL only" in proc.stderr and "distill.loss=reverse_kl" in proc.stderr
    assert not (tmp_path / "rkl" / "metrics.jsonl").exists()
    for override, message in (("distill.top_k=8", "unset distill.top_k"), ("distill.samples=4", "8 draws per token")):
        with pytest.raises(DistillError, match=message):
            open_sample_targets(load_config(CONFIG, [*offline, override]), tokenizer, sampled_store)


def test_generate_top_k_and_samples_are_exclusive():
    from distributed_distill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"generate\.samples=8 and generate\.top_k=8"):
        load_config(CONFIG, ["generate.samples=8"])  # (configs/generate.yaml keeps its top-8)
    with pytest.raises(ConfigError, match=r"generate\.samples=256 must be between 1 and 255"):
        load_config(CONFIG, ["generate.top_k=null", "generate.samples=256"])
