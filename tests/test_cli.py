"""`sclora eval` end to end on a tiny local model, with the data loaders replaced by small real-shaped items."""

import json

import pytest
from conftest import tiny_llama, tiny_tokenizer

from sclora import cli
from sclora.experiments import data

TRIVIA = [{"question": "what is the capital of france", "answers": ["paris"], "topic": "general"},
          {"question": "who is the answer", "answers": ["one", "two"], "topic": "general"},
          {"question": "what is one plus one", "answers": ["two"], "topic": "general"},
          {"question": "what is the capital of italy", "answers": ["rome"], "topic": "general"},
          {"question": "what is the capital of spain", "answers": ["madrid"], "topic": "general"}]
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
    [("knowledge", {"knowledge_em", "knowledge_em_lm_eval", "knowledge_mc", "knowledge_logprob"}),
     ("math", {"math_accuracy", "math_answer_found", "math_nll"}),
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
    assert all(f"{key}_se" in record["metrics"] and f"[{key}]" in printed for key in keys)
    assert len(record["samples"]) == sum(record["n"].values())
    assert all(record["metrics"][f"{name}_seconds"] >= 0 for name in record["n"])
    if suite == "safety":
        assert record["judge"] == "refusal-proxy" and "PROXY" in printed
        assert record["n"] == {"safety": len(HARMFUL), "benign_refusal": len(BENIGN)}


def test_eval_refuses_a_limit_beyond_the_data_before_loading_a_model(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "gsm8k_test", lambda *a, **k: MATH)
    with pytest.raises(SystemExit, match="only 1 items; --limit 5"):
        cli.main(["eval", "--model", str(tmp_path / "no-model-here"), "--suite", "math", "--limit", "5", "--quiet"])


def test_llm_judge_needs_a_model_name(model_dir):
    with pytest.raises(SystemExit, match="--judge-model"):
        cli.main(["eval", "--model", str(model_dir), "--suite", "safety", "--judge", "llm", "--quiet"])


def test_unknown_suite_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--suite", "poetry"])
    assert "invalid choice" in capsys.readouterr().err


def test_init_then_train_exports_an_adapter_for_the_untouched_base(model_dir, tmp_path, monkeypatch):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    many = [{"question": f"what is {a} {b}", "answers": [b], "topic": "t"}
            for a in ("one", "two", "three", "four") for b in ("paris", "rome", "berlin")]
    monkeypatch.setattr(data, "trivia", lambda *a, **k: many)
    init_dir, out = tmp_path / "init", tmp_path / "trained"
    assert cli.main(["init", "--model", str(model_dir), "--method", "sc_lora", "--plus", "trivia:4",
                     "--minus", "trivia:4:4", "--r", "2", "--seq-len", "16", "--output", str(init_dir), "--quiet"]) == 0
    assert len(list((init_dir / "stats").glob("plus-output-raw-*.safetensors"))) == 1
    assert (init_dir / "initial_adapter" / "sclora_initial_adapter.safetensors").exists()
    assert cli.main(["train", "--init", str(init_dir), "--data", "trivia:4:8", "--output", str(out), "--quiet",
                     "--set", "learning_rate=1e-2", "--set", "batch_size=2", "--set", "micro_batch_size=2",
                     "--set", "max_length=32"]) == 0
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        after = PeftModel.from_pretrained(base, out / "adapter")(ids).logits
    assert (after - before).abs().max() > 1e-4  # the trained adapter changes the untouched base model


def test_init_without_needed_data_says_which(model_dir, tmp_path):
    with pytest.raises(SystemExit, match="needs --minus"):
        cli.main(["init", "--model", str(model_dir), "--plus", "trivia:2", "--output", str(tmp_path / "i"), "--quiet"])
