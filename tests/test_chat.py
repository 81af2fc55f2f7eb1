"""sclora.chat: the text a model sees. build_prompt's reuse of a template's fixed prefix and suffix must give
exactly what the template renders, for any message, and templates that change the message are rendered."""

from __future__ import annotations

import pytest
from conftest import tiny_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from sclora import chat

TEMPLATES = {
    "verbatim": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}",
    "trims": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant:{% endif %}",
    "branches": "{% for m in messages %}{% if m['content'] | length > 12 %}LONG {% endif %}{{ m['content'] }}"
                "{% endfor %}{% if add_generation_prompt %}>{% endif %}",
}


@pytest.fixture(scope="module")
def tokenizers():
    out = {}
    for name, template in TEMPLATES.items():
        tok = tiny_tokenizer()
        tok.chat_template = template
        out[name] = tok
    return out


@settings(max_examples=60, deadline=None)
@given(user=st.text(max_size=40), system=st.one_of(st.none(), st.text(min_size=1, max_size=10)))
def test_build_prompt_is_exactly_the_template(tokenizers, user, system):
    for tok in tokenizers.values():
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        assert chat.build_prompt(tok, user, system=system) == tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_only_templates_that_keep_the_message_verbatim_are_reused(tokenizers):
    chat.build_prompt(tokenizers["verbatim"], "x")
    assert chat._fixed_parts(tokenizers["verbatim"], TEMPLATES["verbatim"], None) == ("<user>", "</s>\n<assistant>")
    assert chat._fixed_parts(tokenizers["trims"], TEMPLATES["trims"], None) is None
    assert chat._fixed_parts(tokenizers["branches"], TEMPLATES["branches"], None) is None
    assert chat.build_prompt(tokenizers["verbatim"], "hi", chat=False) == "hi"
