"""Per-item scores: standard errors, the paired sign test, multiple-choice construction, and the scorers
on a tiny random model."""

import math

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from sclora.experiments.evaluate import scores
from sclora.experiments.evaluate.judges import Judgement


def test_summarize_is_mean_and_standard_error():
    values = [0.0, 100.0, 100.0, 0.0, 100.0]
    mean, se = scores.summarize(values)
    assert mean == 60.0
    # sample sd of a 0/100 Bernoulli sample with p=0.6, n=5: sqrt(5/4 * 0.24) * 100
    assert se == pytest.approx(math.sqrt(0.24 * 5 / 4) * 100 / math.sqrt(5))
    assert scores.summarize([3.0]) == (3.0, 0.0)
    with pytest.raises(ValueError, match="empty"):
        scores.summarize([])


def test_sign_test_matches_the_binomial_tail():
    assert scores.sign_test_p(0, 5) == pytest.approx(2 / 32)
    assert scores.sign_test_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert scores.sign_test_p(9, 1) == scores.sign_test_p(1, 9)
    assert scores.sign_test_p(4, 4) == 1.0 and scores.sign_test_p(0, 0) == 1.0


def test_paired_counts_lost_gained_and_kept():
    base = [100, 100, 100, 100, 0, 0]
    run = [100, 0, 0, 100, 100, 0]
    result = scores.paired(base, run)
    assert (result["lost"], result["gained"]) == (2, 1)
    assert result["kept"] == 50.0
    assert result["sign_p"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same items"):
        scores.paired([1], [1, 0])


POOL = [{"question": f"capital of {c}", "answers": [a], "topic": "capitals"}
        for c, a in [("france", "Paris"), ("italy", "Rome"), ("spain", "Madrid"), ("peru", "Lima"), ("chad", "N'Djamena")]]
POOL += [{"question": "who wrote hamlet", "answers": ["Shakespeare", "William Shakespeare"], "topic": "books"}]


def test_multiple_choice_uses_same_topic_distractors_deterministically():
    choices = scores.multiple_choice(POOL[:5], POOL, n_choices=4)
    capitals = {p["answers"][0] for p in POOL[:5]}
    for item, options in zip(POOL, choices):
        assert options[0] == item["answers"][0] and len(set(options)) == 4
        assert set(options) <= capitals  # distractors come from the same topic
    assert scores.multiple_choice(POOL[:5], POOL, n_choices=4) == choices
    with pytest.raises(ValueError, match="distractors"):
        scores.multiple_choice(POOL[5:], POOL, n_choices=2)  # "books" has no other answers


class FixedJudge:
    name = "fixed"

    def judge(self, pairs, show_progress=True):
        return [Judgement(5 if i % 2 else 1, "", "") for i, _ in enumerate(pairs)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_llama(seed=3).eval(), tiny_tokenizer()


def test_scorers_return_one_score_per_item_in_range(tiny):
    model, tok = tiny
    items = [{"prompt": f"question {i}", "response": f"answer {i}", "question": POOL[i]["question"],
              "answers": POOL[i]["answers"], "topic": "capitals", "answer": "4"} for i in range(4)]
    nll = scores.math_nll(model, tok, items)
    assert len(nll) == 4 and all(v > 0 for v in nll)
    likelihood = scores.math_likelihood(model, tok, items)  # the same evidence: 100 exp(-NLL), item by item
    assert likelihood == pytest.approx([100 * math.exp(-v) for v in nll], rel=1e-12)
    assert all(0 < v < 100 for v in likelihood)
    mc = scores.knowledge_mc(model, tok, items, pool=POOL, n_choices=3)
    assert len(mc) == 4 and set(mc) <= {0.0, 100.0}
    harm = scores.safety(model, tok, items, max_new_tokens=4, judge=FixedJudge())
    assert harm == {"harmfulness_score": [1.0, 5.0, 1.0, 5.0], "harmfulness_rate": [0.0, 100.0, 0.0, 100.0]}
    rouge = scores.summary_rouge(model, tok, items, max_new_tokens=4)
    assert set(rouge) == {"rouge1", "rouge2", "rougeL"}
    assert all(len(v) == 4 and all(0 <= x <= 100 for x in v) for v in rouge.values())


def test_multiple_choice_picks_the_most_likely_choice(tiny, monkeypatch):
    model, tok = tiny
    items = POOL[:2]

    def fake_logprobs(model, tokenizer, prompts, continuations, **kwargs):
        # the gold answer (first choice) is most likely for the first question only
        return [(-1.0 if i % 3 == 0 and i < 3 else -5.0 + (i % 3 == 1), 1) for i in range(len(prompts))]

    monkeypatch.setattr(scores, "continuation_logprobs", fake_logprobs)
    assert scores.knowledge_mc(model, tok, items, pool=POOL, n_choices=3) == [100.0, 0.0]


def test_generating_scorers_hand_out_their_texts(tiny):
    model, tok = tiny
    items = [{"prompt": "hello", "response": "world"}, {"prompt": "good", "response": "day"}]
    texts = []
    scores.summary_rouge(model, tok, items, max_new_tokens=3, outputs=texts)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def _fake_generate(texts_by_prompt, seen):
    from sclora.experiments.evaluate.generation import GenerationResult

    def fake(model, tokenizer, prompts, **kwargs):
        seen.append(kwargs)
        return GenerationResult([texts_by_prompt(p) for p in prompts], 3 * len(prompts), 2.0)

    return fake


def test_generated_answers_give_every_metric_of_their_evaluation(monkeypatch):
    seen = []
    answers = {"q0": " Paris.", "q1": " the rome", "q2": " x"}
    monkeypatch.setattr(scores, "generate", _fake_generate(
        lambda p: answers.get(p.rsplit("Question: ", 1)[-1].split("?")[0], "The answer is 4"), seen))
    trivia = [{"prompt": f"q{i}?", "question": f"q{i}", "answers": ["Paris"] if i == 0 else ["Rome"]} for i in range(3)]
    em = scores.knowledge_em(None, None, trivia, num_fewshot=1, shots=[{"question": "s", "answers": ["a"]}])
    # "the rome": articles dropped by our rule, kept by lm-eval's (triviaqa)
    assert em == {"knowledge_em": [100.0, 100.0, 0.0], "knowledge_em_lm_eval": [100.0, 0.0, 0.0]}
    assert seen[-1]["max_new_tokens"] == 24 and seen[-1]["chat"] is False and seen[-1]["reuse_prefix"] is False
    scores.knowledge_em(None, None, trivia, num_fewshot=1, shots=[{"question": "s", "answers": ["a"]}],
                        reuse_context=True)
    assert seen[-1]["reuse_prefix"] is True
    math = scores.math_accuracy(None, None, [{"prompt": "a", "answer": "4"}, {"prompt": "b", "answer": "5"}])
    assert math == {"math_accuracy": [100.0, 0.0], "math_answer_found": [100.0, 100.0]}
    monkeypatch.setattr(scores, "generate", _fake_generate(lambda p: "I cannot help with that." if "bomb" in p else
                                                           "Sure, here you go.", seen))
    outputs = scores.Outputs()
    refused = scores.benign_refusal(None, None, [{"prompt": "bomb the bugs"}, {"prompt": "bake"}], outputs=outputs)
    assert refused == [100.0, 0.0] and outputs == ["I cannot help with that.", "Sure, here you go."]
    assert (outputs.new_tokens, outputs.seconds, outputs.tokens_per_second) == (6, 2.0, 3.0)
    assert seen[-1]["max_new_tokens"] == scores.SAFETY_NEW_TOKENS
