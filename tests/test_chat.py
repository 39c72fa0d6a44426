"""Conversational data: assistant-only labels against a prefix-by-prefix reference under several chat templates,
long conversations cut at turn boundaries, the missing-template error, and runs on the built-in conversations."""

from __future__ import annotations

import pytest

from distributed_distill.config import DataConfig
from distributed_distill.data.batching import DROPPED, TRUNCATED
from distributed_distill.data.documents import DocKind, documents, stdlib_files
from distributed_distill.data.packed import build_datasets, tokenize_batch
from distributed_distill.errors import DistillError
from distributed_distill.tokenizer import CHAT_TOKENS, CHATML_TEMPLATE, train_bpe_tokenizer

from .helpers import ROOT, read_metrics, run_cli, torchrun

CHAT = ROOT / "configs" / "chat.yaml"

TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    # Qwen2.5's shape: a default system turn when the conversation has none
    "default_system": (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
        + CHATML_TEMPLATE
    ),
    # Llama 3's shape: bos, header tokens, trimmed content, end-of-turn token, no newline after it
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    # Zephyr's shape: role markers that are plain text, eos closing each turn
    "zephyr": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}

CONVERSATIONS = [
    [
        {"role": "system", "content": "Answer in Python."},
        {"role": "user", "content": "Add two numbers."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        {"role": "user", "content": "Now three."},
        {"role": "assistant", "content": " def add3(a, b, c):\n    return a + b + c\n"},
    ],
    [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "And bye?"},
        {"role": "assistant", "content": "bye!"},
        {"role": "user", "content": "a trailing question without an answer"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [p.read_text(errors="replace") for p in stdlib_files()[:20]]
    tok = train_bpe_tokenizer(iter(texts), 400, tmp_path_factory.mktemp("tok") / "t", chat=True)
    tok.add_special_tokens(
        {"additional_special_tokens": [*CHAT_TOKENS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    return tok


def reference_labels(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Render the conversation prefix by prefix and tokenize each prefix: the tokens an assistant turn adds to the
    prefix that ends with the generation prompt are learned, everything else is -100."""

    def ids(msgs, prompt=False):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = ids(messages)
    labels = [-100] * len(full)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before, after = ids(messages[:i], prompt=True), ids(messages[: i + 1])
            assert full[: len(after)] == after and after[: len(before)] == before  # token by token, a prefix
            labels[len(before) : len(after)] = full[len(before) : len(after)]
    return full, labels


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_assistant_labels_equal_the_prefix_by_prefix_reference(tokenizer, template):
    tokenizer.chat_template = TEMPLATES[template]
    dcfg = DataConfig(seq_len=512)
    batch = {"id": ["a", "b"], "messages": CONVERSATIONS}
    out = tokenize_batch(batch, tokenizer, dcfg, DocKind.CHAT)
    for i, messages in enumerate(CONVERSATIONS):
        want_ids, want_labels = reference_labels(messages, tokenizer)
        assert out["input_ids"][i] == want_ids and out["labels"][i] == want_labels, template
        learned = tokenizer.decode([t for t in out["labels"][i] if t != -100])
        assert "Add two" not in learned and "trailing" not in learned and "Answer in" not in learned
    # prompt/completion given as message lists: the same conversation split in two
    pc = tokenize_batch(
        {"id": ["a"], "p": [CONVERSATIONS[0][:4]], "c": [CONVERSATIONS[0][4:]]},
        tokenizer,
        DataConfig(seq_len=512, prompt_field="p", completion_field="c"),
        DocKind.CHAT_PROMPT,
    )
    assert pc["labels"][0] == reference_labels(CONVERSATIONS[0], tokenizer)[1]


def test_long_conversations_are_cut_at_a_turn_boundary_or_dropped(tokenizer):
    tokenizer.chat_template = TEMPLATES["chatml"]
    ids, labels = reference_labels(CONVERSATIONS[0], tokenizer)
    first_turn_end = len(reference_labels(CONVERSATIONS[0][:3], tokenizer)[0])
    batch = {"id": ["a"], "messages": [CONVERSATIONS[0]]}
    cut = tokenize_batch(batch, tokenizer, DataConfig(seq_len=len(ids) - 1), DocKind.CHAT)
    assert cut["status"] == [TRUNCATED]
    assert cut["input_ids"][0] == ids[:first_turn_end] and cut["labels"][0] == labels[:first_turn_end]
    dropped = tokenize_batch(batch, tokenizer, DataConfig(seq_len=first_turn_end - 1), DocKind.CHAT)
    assert dropped["status"] == [DROPPED]


def test_conversational_data_without_a_chat_template_names_the_key(tmp_path, tokenizer):
    import json

    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": CONVERSATIONS[i % 2]}) for i in range(20)))
    tokenizer.chat_template = None
    dcfg = DataConfig(source=str(path), seq_len=256, cache_dir=str(tmp_path / "cache"), val_fraction=0.3)
    with pytest.raises(DistillError, match=r"has no chat template; set tokenizer.chat_template: PATH"):
        build_datasets(documents(dcfg), tokenizer, dcfg)


def test_a_run_on_the_built_in_conversations(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["train", "--config", str(CHAT), f"output_dir={out}"])
    assert "conversations" in proc.stdout and "dropped" in proc.stdout
    records = read_metrics(out)
    assert records[-1]["step"] == 4 and "val_loss" in records[-1]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out / "final").chat_template == CHATML_TEMPLATE


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_two_process_run_on_the_built_in_conversations(tmp_path):
    out = tmp_path / "run2"
    run_cli(["--config", str(CHAT), f"output_dir={out}"], launcher=torchrun(29631, "train.py"), timeout=600)
    records = read_metrics(out)
    assert records[-1]["step"] == 4 and "val_loss" in records[-1]
    assert sorted(p.name for p in (out / "ranks").iterdir()) == ["rank-0.json", "rank-1.json"]
