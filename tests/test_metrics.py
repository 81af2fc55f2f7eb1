"""The one metric registry: every evaluation has a scorer and registered metrics; nothing guesses a direction."""

import inspect

import pytest

from sclora.experiments.evaluate.metrics import EVALUATIONS, METRICS, metric
from sclora.experiments.spec import ExperimentConfig


def test_every_evaluation_has_a_scorer_and_registered_metrics():
    for name, evaluation in EVALUATIONS.items():
        params = inspect.signature(evaluation.scorer).parameters
        assert list(params)[:3] == ["model", "tokenizer", "items"], name
        assert evaluation.metrics and all(m in METRICS for m in evaluation.metrics), name


def test_directions_are_declared_not_guessed():
    assert not metric("math_nll").higher_is_better and not metric("harmfulness_rate").higher_is_better
    assert metric("knowledge_mc").higher_is_better and metric("rouge1").higher_is_better
    assert metric("math_nll").goodness(0.5) > metric("math_nll").goodness(0.9)  # lower NLL is better
    with pytest.raises(ValueError, match="Unknown metric 'my_error'.*registered"):
        metric("my_error")  # the old report guessed 'lower is better' from the word "error"


def test_a_config_can_only_name_registered_evaluations():
    fields = {"name": "x", "plus": {"kind": "trivia", "n": 2}, "minus": {"kind": "trivia", "n": 2, "offset": 2},
              "train_data": {"kind": "trivia", "n": 2, "offset": 4}, "runs": [{"method": "lora"}],
              "model": "smollm2-135m-instruct"}
    with pytest.raises(ValueError, match="Unknown evaluation 'bleu'"):
        ExperimentConfig(**fields, evaluate={"bleu": {"kind": "trivia", "n": 2, "offset": 6}})
