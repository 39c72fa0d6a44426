"""Conversations: rendering through the tokenizer's chat template, with the assistant turns located as labels."""

from __future__ import annotations

from ..config import DataConfig
from ..errors import DistillError
from .batching import IGNORE_INDEX


def check_chat_template(tokenizer, dcfg: DataConfig) -> None:
    """Conversational data needs a chat template that renders a user and an assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise DistillError(
            f"data.source={dcfg.source} is conversational but the tokenizer has no chat template; "
            "set tokenizer.chat_template: PATH (a Jinja template file)"
        )
    problem = template_problem(tokenizer)
    if problem is not None:
        raise DistillError(f"the tokenizer's chat template {problem}; fix it, or set tokenizer.chat_template: PATH")


def template_problem(tokenizer) -> str | None:
    """Why the tokenizer's chat template cannot render a user turn and an assistant turn (a Jinja syntax error: its
    line and message), as the end of a sentence naming the template; None when it can."""
    import jinja2  # transformers' own dependency for chat templates

    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    try:
        tokenizer.apply_chat_template(turns, tokenize=False)
    except jinja2.TemplateSyntaxError as e:
        return f"is not valid Jinja: line {e.lineno}: {e.message}"
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
        return f"cannot render a user and an assistant turn: {' '.join(str(e).split())[:200]}"
    return None


def conversation_problem(messages) -> str | None:
    """What is wrong with one conversation (a list of {role, content} turns, a user turn before any assistant
    turn, text content), or None. Checked for every conversation before anything is tokenized."""
    if not isinstance(messages, list):
        return f"the conversation is a {type(messages).__name__}, not a list of {{role, content}} turns"
    user_seen = False
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            return f"turn {i} is not a {{role, content}} mapping ({str(turn)[:60]!r})"
        role, content = turn["role"], turn["content"]
        if not isinstance(role, str):
            return f"turn {i} has role {role!r}, not a string"
        if not isinstance(content, str):
            return f"turn {i} ({role}) has content {content!r}, not text"
        if role == "assistant" and not user_seen:
            return f"turn {i} is an assistant turn before any user turn"
        user_seen = user_seen or role == "user"
    return None


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
