"""The text a model sees for a prompt or an example: the one place a chat template is applied (training,
statistics, generation all render prompts and examples the same way)."""

from __future__ import annotations

__all__ = ["build_prompt", "example_segments", "render_example"]


def build_prompt(tokenizer, user: str, *, chat: bool = True, system: str | None = None) -> str:
    """The text the model sees: the tokenizer's chat template around ``user`` (when it has one and
    ``chat`` is set), else ``user`` unchanged.

    Most templates place the message verbatim between a fixed prefix and suffix; for those the two are rendered
    once (checked with two probe messages that must come back verbatim, whitespace and control characters
    included) and reused, which is much faster than rendering Jinja for every example (docs/performance.md).
    A template that changes the message (trims it, branches on it) fails the check and is rendered every time."""
    template = getattr(tokenizer, "chat_template", None)
    if not chat or template is None:
        return user
    parts = _fixed_parts(tokenizer, template, system)
    if parts is not None:
        return parts[0] + user + parts[1]
    return _render(tokenizer, user, system)


def _render(tokenizer, user: str, system: str | None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


_PROBES = ("\n  probe-A \t\x01 {{ x }} ", " Probe b\r\n\n")
_PARTS: dict = {}


def _fixed_parts(tokenizer, template: str, system: str | None) -> tuple[str, str] | None:
    """(prefix, suffix) when the template renders every message as prefix + message + suffix, else None."""
    key = (template, system, getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None))
    if key not in _PARTS:
        first, second = (_render(tokenizer, probe, system) for probe in _PROBES)
        parts = None
        if first.count(_PROBES[0]) == 1:
            prefix, suffix = first.split(_PROBES[0])
            if second == prefix + _PROBES[1] + suffix:
                parts = (prefix, suffix)
        _PARTS[key] = parts
    return _PARTS[key]


def example_segments(tokenizer, example, *, chat: bool = True) -> list[tuple[str, bool]]:
    """An example as the model sees it, in pieces ``(text, trained)``: the loss is on the ``trained`` pieces.

    - ``{"prompt", "response"}``: the prompt through :func:`build_prompt` (untrained), then the response (trained);
    - ``{"messages": [{"role", "content"}, ...]}``: the tokenizer's chat template over the conversation, the
      assistant turns (with the template's end-of-turn text) trained, everything else not;
    - ``{"text"}``: the text, all trained.

    The pieces concatenate to the whole rendered text; chat conversations are cut where the template renders a
    prefix of the conversation, so every boundary is exact (a template whose renderings are not prefixes of one
    another is refused)."""
    if not isinstance(example, dict):
        raise ValueError(f"An example must be a dict, got {type(example).__name__} {example!r:.100}.")
    if "messages" in example:
        return _conversation_segments(tokenizer, example["messages"])
    if "text" in example and "prompt" not in example:
        if not isinstance(example["text"], str):
            raise ValueError(f"An example's 'text' must be a string, got {example['text']!r:.100}.")
        return [(example["text"], True)]
    if not all(isinstance(example.get(k), str) for k in ("prompt", "response")):
        raise ValueError(f"An example must have string 'prompt' and 'response' (or 'messages', or 'text'), got "
                         f"{example!r:.200}.")
    return [(build_prompt(tokenizer, example["prompt"], chat=chat), False), (example["response"], True)]


def render_example(tokenizer, example, *, chat: bool = True) -> str:
    """The whole text of an example, as :func:`example_segments` renders it (statistics see this text)."""
    return "".join(text for text, _ in example_segments(tokenizer, example, chat=chat))


def _conversation_segments(tokenizer, messages) -> list[tuple[str, bool]]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("Chat rows ('messages') need a tokenizer with a chat template; this one has none. Use "
                         "prompt / response rows, or set tokenizer.chat_template.")

    def render(part, prompt=False):
        return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=prompt)

    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], prompt=True) if i else ""
        through = render(messages[:i + 1])
        if not before.startswith(done) or not through.startswith(before):
            raise ValueError("This chat template does not render a conversation's beginning as a prefix of the "
                             "whole, so the assistant turns cannot be cut out exactly; use prompt / response rows.")
        segments += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    whole = render(messages)
    if not whole.startswith(done):
        raise ValueError("This chat template renders the whole conversation differently from its beginning; use "
                         "prompt / response rows.")
    if whole[len(done):]:
        segments.append((whole[len(done):], False))
    return [(text, trained) for text, trained in segments if text]
