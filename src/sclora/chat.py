"""The text a model sees for a prompt: the one place a chat template is applied (training, statistics,
generation all render prompts the same way)."""

from __future__ import annotations

__all__ = ["build_prompt"]


def build_prompt(tokenizer, user: str, *, chat: bool = True, system: str | None = None) -> str:
    """The text the model sees: the tokenizer's chat template around ``user`` (when it has one and
    ``chat`` is set), else ``user`` unchanged."""
    if not chat or getattr(tokenizer, "chat_template", None) is None:
        return user
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
