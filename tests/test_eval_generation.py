"""Batched generation and log-likelihoods on a tiny random model."""

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from sclora.experiments.evaluate import build_prompt, continuation_logprobs, generate, rouge

PROMPTS = ["what is the capital of france ?", "two plus two", "who", "how make bread . think step by step"]


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(seed=3), tiny_tokenizer()


def test_batched_generation_equals_one_at_a_time_and_keeps_order(lm):
    model, tok = lm
    batched = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=4, show_progress=False)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1, show_progress=False).texts[0] for p in PROMPTS]
    assert batched.texts == single
    assert batched.new_tokens > 0 and batched.tokens_per_second > 0
    again = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=3, show_progress=False)
    assert again.texts == batched.texts  # deterministic


def test_stop_strings_cut_the_output(lm):
    model, tok = lm
    full = generate(model, tok, PROMPTS, max_new_tokens=12, chat=False, batch_size=4, show_progress=False).texts
    cut = generate(model, tok, PROMPTS, max_new_tokens=12, chat=False, stop=["the"], batch_size=4,
                   show_progress=False).texts
    for f, c in zip(full, cut):
        assert "the" not in c.split()
        assert f.startswith(c.rstrip()) or c == f[: len(c)]


def test_chat_template_is_applied(lm):
    _, tok = lm
    assert build_prompt(tok, "who") == "user : who\nassistant :"
    assert build_prompt(tok, "who", chat=False) == "who"
    assert build_prompt(tok, "who", system="be brief").startswith("system : be brief\n")


def test_continuation_logprobs_match_a_direct_computation(lm):
    model, tok = lm
    prompts, conts = ["what is the", "two plus two equals"], [" capital of france", " four"]
    got = continuation_logprobs(model, tok, prompts, conts, batch_size=2, show_progress=False)
    for p, c, (logprob, count) in zip(prompts, conts, got):
        p_ids, c_ids = tok(p)["input_ids"], tok(c)["input_ids"]
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0], -1)
        expected = sum(lp[len(p_ids) - 1 + k, t].item() for k, t in enumerate(c_ids))
        assert count == len(c_ids)
        assert logprob == pytest.approx(expected, abs=1e-4)


def test_rouge_extremes_and_partial_overlap():
    assert rouge(["the cat sat on the mat"], ["the cat sat on the mat"])["rouge1"] == pytest.approx(100)
    assert rouge(["dogs bark"], ["the cat sat"])["rouge1"] == 0
    partial = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert partial["rouge1"] == pytest.approx(100 * 2 * (1.0 * 0.5) / 1.5)  # P=3/3, R=3/6
    with pytest.raises(ValueError, match="equally many"):
        rouge(["a"], [])


def test_rouge_per_item_is_what_the_means_average():
    from sclora.experiments.evaluate.summarize import rouge_per_item

    preds, refs = ["the cat sat", "dogs bark", "the cat sat on the mat"], ["the cat sat on the mat"] * 3
    items = rouge_per_item(preds, refs)
    assert [i["rouge1"] for i in items] == pytest.approx([100 * 2 * 0.5 / 1.5, 0.0, 100.0])  # F1 with P=1, R=1/2
    means = rouge(preds, refs)
    assert all(means[k] == pytest.approx(sum(i[k] for i in items) / 3) for k in ("rouge1", "rouge2", "rougeL"))
    assert rouge_per_item(preds, refs, ("rouge1",))[0].keys() == {"rouge1"}  # sclora run's one metric


CONTEXT = "what is the capital of france ? paris . what is two plus two ? four . "


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_reused_prefix_gives_the_answers_of_full_prompts(lm, batch_size):
    model, tok = lm
    prompts = [CONTEXT + p for p in PROMPTS] + [CONTEXT, CONTEXT + "the"]  # one prompt is the prefix itself
    full = generate(model, tok, prompts, max_new_tokens=8, chat=False, stop=["."], batch_size=batch_size,
                    show_progress=False)
    reused = generate(model, tok, prompts, max_new_tokens=8, chat=False, stop=["."], batch_size=batch_size,
                      show_progress=False, reuse_prefix=True)
    assert reused.texts == full.texts
    assert reused.new_tokens == full.new_tokens


def test_reused_prefix_with_nothing_shared_and_on_a_peft_model(lm):
    from peft import LoraConfig, get_peft_model

    model, tok = lm
    assert generate(model, tok, PROMPTS, max_new_tokens=6, chat=False, batch_size=2, show_progress=False,
                    reuse_prefix=True).texts == \
        generate(model, tok, PROMPTS, max_new_tokens=6, chat=False, batch_size=2, show_progress=False).texts
    peft_model = get_peft_model(tiny_llama(seed=3), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
    prompts = [CONTEXT + p for p in PROMPTS]
    full = generate(peft_model, tok, prompts, max_new_tokens=6, chat=False, batch_size=4, show_progress=False)
    assert full.texts != generate(model, tok, prompts, max_new_tokens=6, chat=False, batch_size=4,
                                  show_progress=False).texts  # the adapter changes the answers ...
    assert generate(peft_model, tok, prompts, max_new_tokens=6, chat=False, batch_size=4, show_progress=False,
                    reuse_prefix=True).texts == full.texts  # ... and the reused prefix carries them


def test_reused_prefix_computes_the_shared_tokens_once_per_batch_size(lm):
    model, tok = lm
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        generate(model, tok, [CONTEXT + p for p in PROMPTS + ["one", "two three"]], max_new_tokens=2, chat=False,
                 batch_size=2, show_progress=False, reuse_prefix=True)
    finally:
        hook.remove()
    shared = len(tok(CONTEXT)["input_ids"])
    assert [s for s in seen if s[1] >= shared] == [(2, shared)]  # once for three batches of two
    assert len(seen) == 1 + 3 * 2  # then each batch: its own tokens, one step per new token
