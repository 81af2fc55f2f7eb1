"""Hub data sets: row mapping with a fake `datasets`, and clear errors without it or without network."""

import sys
import types

import pytest

from sclora.experiments.examples import build_examples
from sclora.experiments.hub_data import load_hub
from sclora.experiments.spec import DataSpec


def fake_datasets(monkeypatch, rows=None, error=None):
    module = types.ModuleType("datasets")

    def load_dataset(repo, config=None, split=None):
        if error:
            raise error
        module.called = (repo, config, split)
        return rows

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return module


def test_gsm8k_and_triviaqa_rows_become_examples(monkeypatch):
    module = fake_datasets(monkeypatch, [{"question": "2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"}])
    (row,) = load_hub("gsm8k")
    assert row == {"prompt": "2+2?", "response": "2+2=<<2+2=4>>4\n#### 4", "answer": "4"}
    assert module.called == ("openai/gsm8k", "main", "test")
    fake_datasets(monkeypatch, [{"question": "Capital of France?", "answer": {"value": "Paris",
                                                                            "aliases": ["Paris", "paris"]}}])
    (row,) = load_hub("triviaqa")
    assert row["question"] == "Capital of France" and row["answers"] == ["Paris", "paris"]


def test_metamathqa_through_a_data_spec(monkeypatch):
    fake_datasets(monkeypatch, [{"query": f"q{i}", "response": f"so... The answer is: {i}"} for i in range(5)])
    rows = build_examples(DataSpec("metamathqa", 2, offset=1), seed=0)
    assert len(rows) == 2 and all(r["answer"] == r["response"].rsplit(": ", 1)[1] for r in rows)


def test_no_network_says_so_and_names_the_offline_source(monkeypatch):
    fake_datasets(monkeypatch, error=ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub"))
    with pytest.raises(RuntimeError, match="needs network access.*kind: math"):
        load_hub("gsm8k")


def test_missing_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(RuntimeError, match="pip install datasets.*kind: trivia"):
        load_hub("nq_open")


def test_unknown_hub_set():
    with pytest.raises(ValueError, match="Unknown hub data set"):
        load_hub("hexphi")
