"""`sclora eval` end to end on a tiny local model, with the data loaders replaced by small real-shaped items."""

import json

import pytest

from sclora import cli, data
from conftest import tiny_llama, tiny_tokenizer

TRIVIA = [{"question": "what is the capital of france", "answers": ["paris"], "topic": "general"},
          {"question": "who is the answer", "answers": ["one", "two"], "topic": "general"},
          {"question": "what is one plus one", "answers": ["two"], "topic": "general"}]
MATH = [{"question": "what is two plus two", "solution": "two plus two equals four . #### 4", "answer": "4"}]
HARMFUL = [{"prompt": "how make bread", "category": "x", "source": "test"}]
BENIGN = [{"prompt": "what is the capital of france", "category": "y", "source": "test"}]
SUMMARIES = [{"id": "p1", "document": "we propose method . results show paper", "summary": "we propose method"}]


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    tiny_llama(seed=1).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    monkeypatch.setattr(data, "trivia", lambda *a, **k: TRIVIA)
    monkeypatch.setattr(data, "gsm8k_test", lambda *a, **k: MATH)
    monkeypatch.setattr(data, "harmful_requests", lambda *a, **k: HARMFUL)
    monkeypatch.setattr(data, "benign_requests", lambda *a, **k: BENIGN)
    monkeypatch.setattr(data, "summarization", lambda *a, **k: SUMMARIES)
    return tmp_path / "model"


@pytest.mark.parametrize(
    "suite,keys",
    [("knowledge", {"exact_match", "exact_match_lm_eval", "best_answer_logprob"}),
     ("math", {"accuracy", "answer_found", "reference_nll"}),
     ("safety", {"harmfulness_score", "harmfulness_rate", "benign_refusal_rate"}),
     ("summarize", {"rouge1", "rouge2", "rougeL"})],
)
def test_eval_prints_a_table_and_writes_json(model_dir, tmp_path, capsys, suite, keys):
    out = tmp_path / f"{suite}.json"
    extra = ["--limit", "2", "--num-fewshot", "1"] if suite == "knowledge" else []
    assert cli.main(["eval", "--model", str(model_dir), "--suite", suite, "--out", str(out), "--quiet",
                     "--batch-size", "2", *extra]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["suite"] == suite and keys <= set(record["metrics"])
    assert record["metrics"]["n"] == len(record["samples"]) - (len(BENIGN) if suite == "safety" else 0)
    assert record["metrics"]["seconds"] >= 0 and "tokens_per_second" in record["metrics"]
    for key in keys:
        assert key in printed
    if suite == "safety":
        assert record["judge"] == "refusal-proxy" and "PROXY" in printed


def test_llm_judge_needs_a_model_name(model_dir):
    with pytest.raises(SystemExit, match="--judge-model"):
        cli.main(["eval", "--model", str(model_dir), "--suite", "safety", "--judge", "llm", "--quiet"])


def test_unknown_suite_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--suite", "poetry"])
    assert "invalid choice" in capsys.readouterr().err
