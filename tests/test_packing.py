"""Packing is a choice: unpacked rows give each example the loss it has alone; packed documents restart their
position_ids and, in the families whose attention honours them, never see what was packed before them."""

from __future__ import annotations

import json

import pytest
import torch

from distributed_distill import models, objective
from distributed_distill.config import ArchConfig, DataConfig, DistillConfig
from distributed_distill.data.batching import collate
from distributed_distill.data.documents import documents as read_documents
from distributed_distill.data.documents import stdlib_files
from distributed_distill.data.packed import build_datasets
from distributed_distill.models import model_inputs
from distributed_distill.teacher import OnlineTeacher
from distributed_distill.tokenizer import train_bpe_tokenizer

VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [p.read_text(errors="replace") for p in stdlib_files()[:20]]
    return train_bpe_tokenizer(iter(texts), VOCAB, tmp_path_factory.mktemp("tok") / "t")


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """Short documents of different lengths, several to a 64-token block."""
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    words = "def return lambda yield import class while for if else".split()
    rows = [{"text": " ".join(words[(i + j) % len(words)] for j in range(3 + (i * 7) % 19))} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def datasets_for(documents, tokenizer, tmp_path, packing: bool):
    dcfg = DataConfig(source=str(documents), seq_len=64, packing=packing, cache_dir=str(tmp_path), val_fraction=0.2)
    train, val, _ = build_datasets(read_documents(dcfg), tokenizer, dcfg)
    return train, val


def model(family: str, seed: int = 0):
    arch = ArchConfig(family=family, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(models.arch_config(arch, VOCAB)).double().eval()


def test_packing_off_each_example_has_its_batch_of_one_loss(documents, tokenizer, tmp_path):
    train, _ = datasets_for(documents, tokenizer, tmp_path, packing=False)
    batch = collate(train, [0, 1, 2, 3])
    lengths = (batch["labels"] != -100).sum(1)
    assert len(set(lengths.tolist())) > 1 and (batch["input_ids"][:, -1] == tokenizer.pad_token_id).any()
    student, teacher = model("llama", 0), OnlineTeacher(model("llama", 1), {})
    head = models.AlignedHead(student.get_output_embeddings(), VOCAB)
    for chunk in (0, 16):
        dcfg = DistillConfig(alpha=0.5, chunk_size=chunk, temperature=2.0)
        with torch.no_grad():
            together = objective.forward_losses(student, teacher, batch, dcfg, head)
            alone = []
            for i in range(4):
                n = int((batch["input_ids"][i] != tokenizer.pad_token_id).sum())  # the example without padding
                one = {k: v[i : i + 1, :n] for k, v in batch.items()}
                alone.append(objective.forward_losses(student, teacher, one, dcfg, head))
        for name in ("kd_sum", "ce_sum", "num_tokens"):
            want = sum(float(getattr(o, name)) for o in alone)
            assert float(getattr(together, name)) == pytest.approx(want, rel=1e-5, abs=1e-5), (chunk, name)
        # per example: its logits are those of the example alone
        with torch.no_grad():
            full = student(input_ids=batch["input_ids"]).logits
            for i in range(4):
                n = int((batch["input_ids"][i] != tokenizer.pad_token_id).sum())
                solo = student(input_ids=batch["input_ids"][i : i + 1, :n]).logits[0]
                torch.testing.assert_close(full[i, :n], solo, rtol=1e-5, atol=1e-5)


FAMILIES = [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("gpt2", "sdpa")]


@pytest.mark.parametrize("family,attention", FAMILIES)
def test_packed_documents_do_not_see_what_was_packed_before_them(documents, tokenizer, tmp_path, family, attention):
    train, _ = datasets_for(documents, tokenizer, tmp_path, packing=True)
    row = next(r for r in train if int((r["position_ids"][1:] == 0).sum()) >= 2)  # three or more documents
    ids, positions = row["input_ids"][None].long(), row["position_ids"][None].long()
    starts = (positions[0] == 0).nonzero().squeeze(1).tolist()
    a, b = starts[1], starts[2]  # the second document of the row
    m = model(family)
    m.set_attn_implementation(attention)
    with torch.no_grad():
        packed = m(**model_inputs(m, {"input_ids": ids, "position_ids": positions})).logits[0, a:b]
        alone = m(input_ids=ids[:, a:b]).logits[0]
        across = m(input_ids=ids).logits[0, a:b]  # no position ids: attends across the boundary
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert (across - alone).abs().max() > 1e-3
    # The teacher sees exactly the student's inputs: its hidden states of the document are those of it alone.
    teacher = OnlineTeacher(m, {})
    hidden = teacher.targets({"input_ids": ids, "position_ids": positions}).hidden
    solo = teacher.targets({"input_ids": ids[:, a:b]}).hidden
    torch.testing.assert_close(hidden[a : b - 1], solo, rtol=1e-5, atol=1e-5)
