"""Suite mechanics: few-shot context, disjoint shots, metric arithmetic on controlled generations."""

import pytest
from conftest import tiny_llama, tiny_tokenizer

from sclora.experiments.evaluate import suites
from sclora.experiments.evaluate.generation import GenerationResult

ITEMS = [{"question": f"q{i}", "answers": [f"a{i}"], "topic": "t"} for i in range(6)]


@pytest.fixture
def fake_generate(monkeypatch):
    seen = {}

    def fake(model, tokenizer, prompts, **kwargs):
        seen["prompts"] = prompts
        # Answer correctly exactly when the question number is even.
        texts = [f" a{p.rsplit('Question: q', 1)[1][0]}" if int(p.rsplit("Question: q", 1)[1][0]) % 2 == 0 else " no"
                 for p in prompts]
        return GenerationResult(texts, len(prompts), 1.0)

    monkeypatch.setattr(suites, "generate", fake)
    return seen


def test_knowledge_few_shot_context_and_scores(fake_generate):
    result = suites.evaluate_knowledge(tiny_llama(), tiny_tokenizer(), ITEMS, limit=4, num_fewshot=2,
                                       batch_size=2, show_progress=False)
    evaluated = {s["question"] for s in result.samples}
    prompts = fake_generate["prompts"]
    shots = [line[len("Question: "):-1] for line in prompts[0].split("\n") if line.startswith("Question: ")][:-1]
    assert len(shots) == 2 and not set(shots) & evaluated  # examples never include an evaluated question
    assert all(p.startswith(prompts[0].rsplit("Question:", 1)[0]) for p in prompts)  # same context for all
    assert prompts[0].endswith("?\nAnswer:")
    expected = 100 * sum(int(q[1:]) % 2 == 0 for q in evaluated) / 4
    assert result.metrics["exact_match"] == expected == result.metrics["exact_match_lm_eval"]
    assert result.metrics["n"] == 4 and result.metrics["num_fewshot"] == 2


def test_knowledge_needs_enough_items_for_the_shots():
    with pytest.raises(ValueError, match="few-shot examples"):
        suites.evaluate_knowledge(tiny_llama(), tiny_tokenizer(), ITEMS, limit=5, num_fewshot=2, show_progress=False)


def test_unknown_suite():
    with pytest.raises(ValueError, match="Unknown suite"):
        suites.run_suite("poetry", None, None)
