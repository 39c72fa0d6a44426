"""Conversations: rendering through the tokenizer's chat template, with the assistant turns located as labels."""

from __future__ import annotations

from ..config import DataConfig
from ..errors import DistillError
from .batching import IGNORE_INDEX


def check_chat_template(tokenizer, dcfg: DataConfig) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DistillError(
            f"data.source={dcfg.source} is conversational but the tokenizer has no chat template; "
            "set tokenizer.chat_template: PATH (a Jinja template file)"
        )


def render_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Render a conversation with the tokenizer's chat template: (ids, labels, turn_ends).

    Labels are the assistant turns' tokens (their content and the template's end-of-turn text), -100 elsewhere.
    The assistant spans are found on the text: a turn starts where the template's rendering of the conversation up
    to it, with the generation prompt, ends, and stops where the rendering including it ends; the whole
    conversation is tokenized once and a token is learned when it starts inside a span. `turn_ends` are the token
    counts after each assistant turn: the places a long conversation may be cut.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]

    def render(msgs: list[dict], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = render(messages[:i], prompt=True), render(messages[: i + 1])
        if not (full.startswith(start) and full.startswith(end)):
            raise DistillError(
                "the chat template renders a conversation's beginning differently from the whole conversation "
                f"(turn {i}); assistant tokens cannot be located: use a template without history-dependent output"
            )
        spans.append((len(start), len(end)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels, turn_ends, span = [IGNORE_INDEX] * len(ids), [], 0
    for j, (char, _) in enumerate(offsets):
        while span < len(spans) and char >= spans[span][1]:
            turn_ends.append(j)
            span += 1
        if span < len(spans) and char >= spans[span][0]:
            labels[j] = ids[j]
    turn_ends += [len(ids)] * (len(spans) - span)
    return ids, labels, turn_ends
