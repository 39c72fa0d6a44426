"""Vocabulary alignment: a teacher and a student of one family with one tokenizer but embedding matrices padded to
different row counts (Qwen2.5-7B 152,064 rows, Qwen2.5-0.5B 151,936) train online (dense, top-k), offline (store),
chunked and naive, and the KD loss equals a float64 reference on logits sliced to `len(tokenizer)`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from distributed_distill import models, objective, setup
from distributed_distill.config import load_config
from distributed_distill.data.batching import collate, train_indices
from distributed_distill.data.documents import stdlib_files
from distributed_distill.data.packed import build_datasets
from distributed_distill.errors import DistillError
from distributed_distill.teacher import setup_teacher
from distributed_distill.tokenizer import train_bpe_tokenizer

from .helpers import SMOKE, error_line, read_metrics, run_cli

TOKENS = 300  # len(tokenizer): the rows both models are compared over
TEMPERATURE = 2.0


def make_tokenizer(out):
    texts = [p.read_text(errors="replace") for p in stdlib_files()[:30]]
    return train_bpe_tokenizer(iter(texts), TOKENS, out)


def save_model(out, rows: int, hidden: int, layers: int, seed: int, tokenizer) -> str:
    """A llama saved with `rows` embedding rows (the tokenizer has TOKENS), padding rows as a real checkpoint has
    them: trained weights that no token ever selects."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=rows,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # large padding logits: a run that compared them would be far off the reference
        model.get_output_embeddings().weight[TOKENS:] *= 25.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


# teacher rows, student rows: the teacher padded further than the student, and the reverse
PAIRS = {"teacher_wider": (384, 320), "student_wider": (320, 384)}


@pytest.fixture(scope="module", params=sorted(PAIRS))
def pair(request, tmp_path_factory, tokenizer):
    teacher_rows, student_rows = PAIRS[request.param]
    base = tmp_path_factory.mktemp(request.param)
    teacher = save_model(base / "teacher", teacher_rows, 48, 2, 1, tokenizer)
    student = save_model(base / "student", student_rows, 32, 1, 2, tokenizer)
    return teacher, student, teacher_rows


def pair_config(teacher: str, student: str, *overrides: str):
    return load_config(
        SMOKE,
        [
            f"teacher.path={teacher}",
            "teacher.arch=null",
            f"student.path={student}",
            "student.arch=null",
            "data.max_documents=20",
            "data.seq_len=32",
            f"distill.temperature={TEMPERATURE}",
            *overrides,
        ],
    )


# ----------------------------------------------------------------------------------------------
# float64 reference: textbook formulas on the logits sliced to the tokenizer's rows


def reference_kd(student_logits, teacher_logits, labels, top_k: int | None) -> float:
    """Mean over counted positions of KL(p_T || p_S) * T^2; with top_k, over the k+1 outcomes [top-k ids, rest],
    the teacher's top-k log-probs rounded through float16 as online top-k and the store keep them."""
    keep = labels != -100
    s = student_logits[..., :TOKENS].double()[keep] / TEMPERATURE
    t = teacher_logits[..., :TOKENS].double()[keep] / TEMPERATURE
    lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    if top_k is None:
        rows = (lp.exp() * (lp - lq)).sum(-1)
    else:
        top, ids = lp.topk(top_k, -1)
        p_k = top.to(torch.float16).double().exp()
        p_tail = (torch.log1p(-top.exp().sum(-1)).to(torch.float16).double().exp())[:, None]
        p = torch.cat([p_k, p_tail], -1)
        p = p / p.sum(-1, keepdim=True)
        q_k = lq.gather(-1, ids).exp()
        q = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
        rows = (p * (p.log() - q.log())).sum(-1)
    return float(rows.mean() * TEMPERATURE**2)


@torch.no_grad()
def reference_for_batch(teacher: str, student: str, batch: dict, top_k: int | None) -> float:
    from transformers import AutoModelForCausalLM

    t = AutoModelForCausalLM.from_pretrained(teacher).double()(input_ids=batch["input_ids"]).logits[:, :-1]
    s = AutoModelForCausalLM.from_pretrained(student).double()(input_ids=batch["input_ids"]).logits[:, :-1]
    return reference_kd(s, t, batch["labels"][:, 1:], top_k)


MODES = {  # name: (distill.chunk_size, distill.top_k)
    "dense_chunked": (16, None),
    "dense_naive": (0, None),
    "topk_chunked": (16, 8),
    "topk_naive": (0, 8),
}


def test_padded_vocabularies_kd_equals_float64_reference(pair):
    """One batch through the training step's loss, every online path, against the float64 reference."""
    teacher_path, student_path, _ = pair
    cfg = pair_config(teacher_path, student_path)
    plan = setup.plan_run(cfg, setup.setup_accelerator(cfg))
    tokenizer, student_config, teacher_config = plan.tokenizer, plan.student_config, plan.teacher_config
    assert len(tokenizer) == TOKENS and {student_config.vocab_size, teacher_config.vocab_size} == {320, 384}
    train_ds, _, _ = build_datasets(plan.documents(), tokenizer, cfg.data)
    batch = collate(train_ds, [0, 1, 2])
    student = models.load_model(cfg.student, student_config, seed=0)
    head = models.AlignedHead(student.get_output_embeddings(), len(tokenizer))
    for name, (chunk, top_k) in MODES.items():
        d = cfg.distill.__class__(**{**vars(cfg.distill), "chunk_size": chunk, "top_k": top_k, "alpha": 1.0})
        teacher = setup_teacher(
            cfg.teacher,
            teacher_config,
            torch.device("cpu"),
            seed=cfg.train.seed,
            vocab=len(tokenizer),
            top_k=d.top_k,
            temperature=d.temperature,
            chunk_size=d.chunk_size,
        )
        out = objective.forward_losses(student, teacher, batch, d, head)
        got = out.kd_sum.item() / int(out.num_tokens)
        want = reference_for_batch(teacher_path, student_path, batch, top_k)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5), name
        (out.kd_sum / out.num_tokens).backward()  # the student's padding rows get no gradient
        grad = student.get_output_embeddings().weight.grad
        assert grad[TOKENS:].abs().max() == 0 and grad[:TOKENS].abs().max() > 0, name
        student.zero_grad(set_to_none=True)


# The release tier (CI's hour: docs/testing.md); both pairs' KD loss and gradients against float64 through the
# objective are in the default tier above.
@pytest.mark.slow
@pytest.mark.release
def test_padded_vocabularies_train_online_and_offline(pair, tmp_path):
    """Real runs, every path: the first step's logged KD loss equals the float64 reference on its batch; the store
    records the aligned vocabulary."""
    teacher_path, student_path, teacher_rows = pair
    cfg = pair_config(teacher_path, student_path)
    plan = setup.plan_run(cfg, setup.setup_accelerator(cfg))
    train_ds, _, _ = build_datasets(plan.documents(), plan.tokenizer, cfg.data)
    first = collate(train_ds, train_indices(len(train_ds), 4, 1, 0, 0, 0))
    config = tmp_path / "pair.yaml"
    raw = yaml.safe_load(SMOKE.read_text())
    raw.update(teacher={"path": teacher_path}, student={"path": student_path}, tokenizer={})
    raw["data"].update(max_documents=20, seq_len=32)
    raw["distill"].update(temperature=TEMPERATURE, alpha=1.0)
    raw["train"].update(max_steps=2)
    config.write_text(yaml.safe_dump(raw))
    store = tmp_path / "store"
    run_cli(["precompute", "--config", str(config), f"distill.store={store}", "distill.store_top_k=8"])
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["vocab_size"] == TOKENS and manifest["teacher_vocab_rows"] == teacher_rows
    runs = {
        **{name: [f"distill.chunk_size={c}"] + ([f"distill.top_k={k}"] if k else []) for name, (c, k) in MODES.items()},
        "offline_chunked": ["distill.signal=offline", f"distill.store={store}", "distill.shuffle_buffer=0"],
        "offline_naive": ["distill.signal=offline", f"distill.store={store}", "distill.chunk_size=0"],
    }
    for name, overrides in runs.items():
        out = tmp_path / name
        run_cli(["train", "--config", str(config), f"output_dir={out}", *overrides])
        top_k = 8 if "topk" in name or "offline" in name else None
        want = reference_for_batch(teacher_path, student_path, first, top_k)
        if name == "offline_naive":  # the shuffle buffer draws another first batch: check that the run trains
            assert read_metrics(out)[-1]["step"] == 2
            continue
        assert read_metrics(out)[0]["kd_loss"] == pytest.approx(want, rel=1e-5, abs=1e-5), name


def test_a_model_with_fewer_rows_than_the_tokenizer_is_refused(tmp_path, tokenizer):
    short = save_model(tmp_path / "short", TOKENS - 4, 32, 1, 0, tokenizer)
    wide = save_model(tmp_path / "wide", 320, 32, 1, 0, tokenizer)
    cfg = pair_config(wide, short)
    with pytest.raises(DistillError, match=rf"the tokenizer has {TOKENS} tokens but the student has only vocab_size="):
        setup.plan_run(cfg, setup.setup_accelerator(cfg))


def test_different_tokenizers_are_refused_naming_the_token(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    paths = {}
    for role, token in (("teacher", "<|teacher_only|>"), ("student", "<|student_only|>")):
        paths[role] = save_model(tmp_path / role, 320, 32, 1, 0, tokenizer)
        own = AutoTokenizer.from_pretrained(paths[role])
        own.add_tokens([token])
        own.save_pretrained(paths[role])
    cfg = pair_config(paths["teacher"], paths["student"])
    want = rf"student.path={paths['student']}: tokenizers differ: token id {TOKENS} is '<\|student_only\|>' in the "
    with pytest.raises(DistillError, match=want + r"student's and '<\|teacher_only\|>' in the run's"):
        setup.plan_run(cfg, setup.setup_accelerator(cfg))
    # The CLI: one line, exit 2, before any model loads.
    proc = run_cli(
        ["train", "--config", str(SMOKE), *[f"{r}.path={p}" for r, p in paths.items()], "teacher.arch=null"]
        + ["student.arch=null", f"output_dir={tmp_path / 'run'}"],
        check=False,
    )
    assert proc.returncode == 2 and "tokenizers differ: token id 300" in proc.stderr
    assert "or set distill.cross_tokenizer" in error_line(proc)  # the key that allows the pair, named
    assert not (tmp_path / "run").exists()
