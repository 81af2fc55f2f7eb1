"""`sclora eval`'s suites: the items each evaluation gets, and that a suite goes through the same scorers with the
same defaults as an experiment's `evaluate:` section (one evaluation path)."""

import pytest
from conftest import tiny_llama, tiny_tokenizer

from sclora.experiments import data, suites
from sclora.experiments.evaluate import scores
from sclora.experiments.evaluate.core import evaluate_model
from sclora.experiments.evaluate.generation import GenerationResult

TRIVIA = [{"question": f"q{i}", "answers": [f"a{i}"], "topic": "t"} for i in range(12)]
HARMFUL = [{"prompt": f"harmful {i}", "category": "c", "source": "harmbench"} for i in range(5)]
BENIGN = [{"prompt": f"benign {i}", "category": "c", "source": "x"} for i in range(4)]


@pytest.fixture
def sources(monkeypatch):
    monkeypatch.setattr(data, "trivia", lambda *a, **k: TRIVIA)
    monkeypatch.setattr(data, "harmful_requests", lambda *a, **k: HARMFUL)
    monkeypatch.setattr(data, "benign_requests", lambda *a, **k: BENIGN)


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def fake(model, tokenizer, prompts, **kwargs):
        seen.append({"prompts": list(prompts), **kwargs})
        return GenerationResult(["I cannot help with that." if "1" in p else "Sure." for p in prompts], len(prompts), 1.0)

    monkeypatch.setattr(scores, "generate", fake)
    return seen


def test_knowledge_shots_come_from_outside_the_evaluated_items(sources):
    sets, extras = suites.suite_sets("knowledge", limit=6, num_fewshot=3)
    assert set(sets) == {"knowledge_em", "knowledge_mc", "knowledge_logprob"}
    evaluated = {it["question"] for it in sets["knowledge_em"]}
    shots = {it["question"] for it in extras["knowledge_em"]["shots"]}
    assert len(evaluated) == 6 and len(shots) == 3 and not evaluated & shots
    assert all(rows == sets["knowledge_em"] for rows in sets.values())  # one item set, three views of it
    assert suites.suite_sets("knowledge", limit=6, num_fewshot=3) == (sets, extras)  # the same on every run
    with pytest.raises(ValueError, match="Lower --limit or --num-fewshot"):
        suites.suite_sets("knowledge", limit=10, num_fewshot=3)


def test_an_explicit_limit_beyond_the_source_is_an_error_and_the_default_is_capped(sources):
    with pytest.raises(ValueError, match="only 5 items; --limit 7"):
        suites.suite_sets("safety", limit=7)
    sets, _ = suites.suite_sets("safety")  # default 100, capped to the sources
    assert (len(sets["safety"]), len(sets["benign_refusal"])) == (5, 4)
    with pytest.raises(ValueError, match="Unknown suite"):
        suites.suite_sets("poetry")


def test_a_suite_and_an_experiment_evaluate_the_same_items_the_same_way(sources, calls):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    record = suites.run_suite("safety", model, tokenizer, show_progress=False)
    sets, _ = suites.suite_sets("safety")
    metrics, _ = evaluate_model(model, tokenizer, sets, show_progress=False)  # as `sclora run` calls it
    suite_calls, run_calls = calls[:2], calls[2:]
    assert suite_calls == run_calls  # same prompts, same max_new_tokens, same options
    assert suite_calls[0]["max_new_tokens"] == scores.SAFETY_NEW_TOKENS
    assert {k: v for k, v in record["metrics"].items() if not k.endswith("_seconds")} == \
        {k: v for k, v in metrics.items() if not k.endswith("_seconds")}
    # "harmful 1" is refused (score 1), the other four are not (score 5); "benign 1" is refused
    assert record["metrics"]["harmfulness_score"] == pytest.approx((1 + 4 * 5) / 5)
    assert record["metrics"]["harmfulness_rate"] == 80.0 and record["metrics"]["benign_refusal_rate"] == 25.0
    assert record["judge"] == "refusal-proxy" and record["n"] == {"safety": 5, "benign_refusal": 4}
    harmful = [s for s in record["samples"] if s["evaluation"] == "safety"]
    assert {s["prompt"] for s in harmful} == {h["prompt"] for h in HARMFUL}
    assert all(s["harmfulness_score"] == (1.0 if s["output"].startswith("I cannot") else 5.0) for s in harmful)


def test_a_scorer_that_breaks_its_registry_entry_is_caught(monkeypatch):
    monkeypatch.setattr(scores, "math_nll", lambda *a, **k: {"nll": [1.0]})
    with pytest.raises(RuntimeError, match="returned \\['nll'\\]"):
        evaluate_model(tiny_llama(), None, {"math_nll": [{"prompt": "p", "response": "r"}]})
    with pytest.raises(ValueError, match="Unknown evaluation 'poetry'"):
        evaluate_model(tiny_llama(), None, {"poetry": []})


def test_finished_evaluations_are_reused_only_for_the_same_fingerprint(sources, calls, tmp_path):
    """evaluate_model(resume=(folder, fingerprint)): an evaluation saved under the same fingerprint is loaded, not
    run; another fingerprint or an unreadable file runs it again (and rewrites the file)."""
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    sets, _ = suites.suite_sets("safety")
    first = evaluate_model(model, tokenizer, sets, resume=(tmp_path, "fp1"))
    assert len(calls) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["benign_refusal.json", "safety.json"]
    assert evaluate_model(model, tokenizer, sets, resume=(tmp_path, "fp1")) == first and len(calls) == 2
    (tmp_path / "safety.json").write_text('{"fingerprint": "fp1", "metr')  # a torn file (no atomic write)
    again = evaluate_model(model, tokenizer, sets, resume=(tmp_path, "fp1"))
    assert len(calls) == 3 and calls[-1]["prompts"] == calls[0]["prompts"]  # safety only, evaluated again
    assert {k: v for k, v in again[0].items() if not k.endswith("_seconds")} == \
        {k: v for k, v in first[0].items() if not k.endswith("_seconds")} and again[1] == first[1]
    evaluate_model(model, tokenizer, sets, resume=(tmp_path, "fp2"))  # another model or settings: both again
    assert len(calls) == 5
