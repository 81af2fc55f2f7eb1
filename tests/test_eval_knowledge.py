"""Exact match: our normalizations, and lm-eval's own implementation on generated strings."""

import random
import re
import string

import numpy as np
import pytest

from sclora.experiments.evaluate.knowledge import exact_match, lm_eval_exact_match, normalize_answer, prompt


def lm_eval_reference(predictions, references, regexes_to_ignore=None, ignore_case=False, ignore_punctuation=False):
    """lm-evaluation-harness 0.4.13, lm_eval/api/metrics.py::exact_match_hf_evaluate (MIT licence),
    verbatim but for the unused ignore_numbers branch; used unless lm_eval itself imports."""
    if regexes_to_ignore is not None:
        for s in regexes_to_ignore:
            predictions = np.array([re.sub(s, "", x) for x in predictions])
            references = np.array([re.sub(s, "", x) for x in references])
    else:
        predictions = np.asarray(predictions)
        references = np.asarray(references)
    if ignore_case:
        predictions = np.char.lower(predictions)
        references = np.char.lower(references)
    if ignore_punctuation:
        repl_table = string.punctuation.maketrans("", "", string.punctuation)
        predictions = np.char.translate(predictions, table=repl_table)
        references = np.char.translate(references, table=repl_table)
    return {"exact_match": np.mean(predictions == references)}


try:  # prefer the real thing when lm-eval is installed
    from lm_eval.api.metrics import exact_match_hf_evaluate as lm_eval_reference  # noqa: F811
except Exception:
    pass

TASK_OPTIONS = {
    "triviaqa": dict(ignore_case=True, ignore_punctuation=True),
    "nq_open": dict(ignore_case=True, ignore_punctuation=True, regexes_to_ignore=[r"\b(?:The |the |An |A |The |a |an )"]),
}


def generated_pairs(n=400, seed=0):
    rng = random.Random(seed)
    words = ["Paris", "the Beatles", "The Who", "a", "An", "an apple", "U.S.", "Washington, D.C.", "1984", "Mt. Everest",
             "rock 'n' roll", "THE", "Théâtre", "co-op", "!", "  ", "Jr.", "e=mc^2", "Apollo 11", "the"]
    pairs = []
    for _ in range(n):
        answer = " ".join(rng.sample(words, rng.randint(1, 3)))
        variants = [answer, answer.upper(), answer.lower(), " " + answer, answer + ".", "The " + answer,
                    answer.replace(" ", "  "), rng.choice(words), answer.replace(".", "")]
        pairs.append((rng.choice(variants), answer))
    return pairs


@pytest.mark.parametrize("task", ["triviaqa", "nq_open"])
def test_lm_eval_exact_match_agrees_with_lm_eval_on_generated_strings(task):
    pairs = generated_pairs()
    agree = 0
    for pred, gold in pairs:
        # lm-eval's remove_whitespace filter lstrips the prediction before the metric sees it.
        ref = bool(lm_eval_reference([pred.lstrip(" ")], [gold], **TASK_OPTIONS[task])["exact_match"])
        assert lm_eval_exact_match(pred, [gold], task) == ref, (pred, gold)
        agree += ref
    assert 0 < agree < len(pairs)  # the cases exercise both outcomes


@pytest.mark.parametrize(
    "prediction,answers,expected",
    [
        (" Paris", ["Paris"], True),
        ("the Beatles", ["Beatles", "The Beatles"], True),
        ("An Apple!", ["apple"], True),
        ("Washington D.C.", ["Washington, D.C."], True),
        ("washington   dc", ["Washington, D.C."], True),
        ("Rome", ["Paris", "City of Light"], False),
        ("Paris, France", ["Paris"], False),
        ("", ["Paris"], False),
        ("1984", "1984", True),
        ("theatre", ["the atre"], False),  # 'the' only removed as a whole word
    ],
)
def test_exact_match_edge_cases(prediction, answers, expected):
    assert exact_match(prediction, answers) is expected


def test_normalize_answer():
    assert normalize_answer("  The  Rock 'n' Roll, Hall-of-Fame. ") == "rock n roll halloffame"


def test_prompts_follow_lm_eval():
    assert prompt("Who wrote Hamlet?") == "Question: Who wrote Hamlet?\nAnswer:"
    assert prompt("who wrote hamlet", "nq_open") == "Q: who wrote hamlet?\nA:"
