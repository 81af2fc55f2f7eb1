"""The pydoc task: standard-library docstrings of the running interpreter as prompt/response pairs (disjoint,
deterministic splits; the Python version recorded), its data spec, and its ROUGE-L evaluations."""

import inspect
import json
import os
import platform
import re
import subprocess
import sys

import pytest
from conftest import save_tiny_model, tiny_experiment, tiny_llama, tiny_tokenizer

from sclora.experiments import data
from sclora.experiments.evaluate import scores
from sclora.experiments.evaluate.core import evaluate_model
from sclora.experiments.evaluate.metrics import EVALUATIONS, metric
from sclora.experiments.examples import build_examples, check_disjoint, pydoc_rows, resolve_named
from sclora.experiments.spec import SPLITS, DataSpec, ExperimentConfig, as_plain, plan


def test_splits_are_disjoint_partitions_of_every_row():
    rows = data.pydoc("all")
    splits = {s: data.pydoc(s) for s in data.PYDOC_SPLITS}
    names = {s: {r["name"] for r in rows_} for s, rows_ in splits.items()}
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    assert sum(len(v) for v in splits.values()) == len(rows) == len({r["name"] for r in rows})
    assert all(r["split"] == data.pydoc_split(r["name"]) == s for s, rows_ in splits.items() for r in rows_)
    # about 80 / 10 / 10 % of well over a thousand names
    assert len(rows) > 1000
    assert all(0.05 < len(splits[s]) / len(rows) < 0.15 for s in ("val", "test"))
    assert len({r["summary"] for r in rows}) == len(rows)  # one name per summary
    low, high = data.PYDOC_SUMMARY_CHARS
    assert all(low <= len(r["summary"]) <= high and "\n" not in r["summary"] for r in rows)
    assert all(r["signature"] is None or len(r["signature"]) <= data.PYDOC_SIGNATURE_CHARS + 1 for r in rows)
    assert not any(r["signature"] and re.search(r"0x[0-9a-f]{6,}", r["signature"]) for r in rows)  # no addresses
    # in PYDOC_MODULES order
    order = [data.PYDOC_MODULES.index(r["module"]) for r in rows]
    assert order == sorted(order)
    with pytest.raises(ValueError, match="unknown pydoc split 'heldout'"):
        data.pydoc("heldout")


def test_rows_are_the_interpreters_own_docstrings():
    import json as json_module

    row = next(r for r in data.pydoc("all") if r["name"] == "json.dumps")
    first = " ".join(inspect.getdoc(json_module.dumps).split("\n\n")[0].split())
    assert row["summary"] == first
    assert row["signature"].startswith("json.dumps(obj, *, skipkeys=False") and row["signature"].endswith(", ...)")
    method = next(r for r in data.pydoc("all") if r["name"] == "str.removeprefix")
    assert method["signature"].startswith("str.removeprefix(") and "self" not in method["signature"]
    assert method["summary"] == " ".join(inspect.getdoc(str.removeprefix).split("\n\n")[0].split())


def test_rows_are_the_same_in_another_process_with_other_hashing():
    code = "from sclora.experiments import data; import json; print(json.dumps(data.pydoc_fingerprint()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == data.pydoc_fingerprint()


def test_fingerprint_records_the_python_version_and_the_rows(monkeypatch):
    fp = data.pydoc_fingerprint()
    assert fp["python"] == platform.python_version() and fp["implementation"] == sys.implementation.name
    assert fp["source"] == data.pydoc_source() and fp["source"].endswith(platform.python_version())
    assert fp["modules"] == list(data.PYDOC_MODULES)
    assert fp["sizes"] == {s: len(data.pydoc(s)) for s in data.PYDOC_SPLITS}
    assert re.fullmatch(r"[0-9a-f]{64}", fp["sha256"])
    rows = data._pydoc_rows()
    changed = ({**rows[0], "summary": rows[0]["summary"] + " (changed)"}, *rows[1:])
    monkeypatch.setattr(data, "_pydoc_rows", lambda: changed)
    assert data.pydoc_fingerprint()["sha256"] != fp["sha256"]


def test_data_spec_takes_the_kind_records_the_interpreter_and_names_what_is_wrong():
    spec = DataSpec("pydoc", 4, split="val")
    assert SPLITS["pydoc"] == ("train", "val", "test")
    assert spec.source == data.pydoc_source() == f"python{platform.python_version()}"
    assert DataSpec("pydoc", 4, source=data.pydoc_source()).source == spec.source
    with pytest.raises(ValueError, match=r"split of data spec 'pydoc' must be one of \('train', 'val', 'test'\), "
                                         r"got 'heldout'"):
        DataSpec("pydoc", 4, split="heldout")
    with pytest.raises(ValueError, match=r"source of data spec 'pydoc' is the interpreter .*'python2\.7\.18'"):
        DataSpec("pydoc", 4, source="python2.7.18")
    with pytest.raises(ValueError, match="'source' applies to kinds 'harmful' and 'pydoc' only, not 'trivia'"):
        DataSpec("trivia", 4, source="python3.11")
    with pytest.raises(ValueError, match="n of data spec 'pydoc' must be an integer >= 1"):
        DataSpec("pydoc", 0)


def test_examples_are_questions_answered_by_the_summary():
    test = build_examples(DataSpec("pydoc", 12, split="test"), seed=0)
    train = build_examples(DataSpec("pydoc", 40, split="train"), seed=0)
    check_disjoint({"train": train, "test": test})
    assert build_examples(DataSpec("pydoc", 12, split="test"), seed=0) == test  # deterministic under the seed
    assert build_examples(DataSpec("pydoc", 12, split="test"), seed=1) != test
    by_name = {r["name"]: r for r in data.pydoc("test")}
    for ex in test:
        row = by_name[ex["name"]]
        assert ex["response"] == row["summary"]
        assert ex["prompt"].startswith(f"In Python's standard library, what does `{row['name']}` do?")
        assert ex["prompt"].endswith(f" Signature: {row['signature']}" if row["signature"] else "do?")
    assert [ex["name"] for ex in resolve_named("pydoc:3:0:val", 0)] == \
        [ex["name"] for ex in build_examples(DataSpec("pydoc", 3, split="val"), 0)]
    with pytest.raises(ValueError, match=r"only \d+ examples"):
        build_examples(DataSpec("pydoc", 10_000, split="test"), seed=0)


def test_config_records_the_interpreter_for_every_pydoc_set(tmp_path):
    model_dir = save_tiny_model(tmp_path / "m")
    config = ExperimentConfig(**tiny_experiment(
        model_dir, plus={"kind": "pydoc", "n": 8}, minus={"kind": "trivia", "n": 8},
        train_data={"kind": "pydoc", "n": 8, "offset": 8},
        evaluate={"pydoc_rouge": {"kind": "pydoc", "n": 4, "split": "test", "max_new_tokens": 8},
                  "pydoc_val_rouge": {"kind": "pydoc", "n": 4, "split": "val"}}))
    plain = as_plain(config)
    source = data.pydoc_source()
    assert plain["plus"]["source"] == plain["train_data"]["source"] == source
    assert plain["evaluate"]["pydoc_rouge"]["source"] == plain["evaluate"]["pydoc_val_rouge"]["source"] == source
    assert plain["minus"]["source"] is None
    assert f"pydoc/{source}[test] n=4" in plan(config)
    with pytest.raises(ValueError, match="source of data spec 'pydoc'"):
        ExperimentConfig(**tiny_experiment(model_dir, evaluate={"pydoc_rouge": {"kind": "pydoc", "n": 4,
                                                                               "source": "python3.0.0"}}))


def test_evaluations_and_metrics_are_registered():
    assert EVALUATIONS["pydoc_rouge"].metrics == ("pydoc_rougeL",)
    assert EVALUATIONS["pydoc_val_rouge"].metrics == ("pydoc_val_rougeL",)
    assert EVALUATIONS["pydoc_rouge"].scorer is scores.pydoc_rouge
    assert EVALUATIONS["pydoc_val_rouge"].scorer is scores.pydoc_val_rouge
    assert metric("pydoc_rougeL").label == "Pydoc ROUGE-L" and metric("pydoc_rougeL").higher_is_better
    assert metric("pydoc_val_rougeL").label == "Pydoc ROUGE-L (validation)"
    assert metric("pydoc_val_rougeL").higher_is_better


def test_rouge_l_is_rouge_score_on_a_tiny_case(monkeypatch):
    from rouge_score import rouge_scorer

    from sclora.experiments.evaluate.generation import GenerationResult

    answers = {"a": "return the sine of x", "b": "Deserialize a JSON document", "c": "nothing in common"}
    items = [{"prompt": "a", "response": "Return the sine of x (measured in radians)."},
             {"prompt": "b", "response": "Deserialize s to a Python object."},
             {"prompt": "c", "response": "Return the sine of x."}]
    seen = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen.append(kwargs)
        return GenerationResult([answers[p] for p in prompts], 5 * len(prompts), 1.0)

    monkeypatch.setattr(scores, "generate", fake_generate)
    got = scores.pydoc_rouge(None, None, items)["pydoc_rougeL"]
    reference = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert got == pytest.approx([100 * reference.score(it["response"], answers[it["prompt"]])["rougeL"].fmeasure
                                 for it in items])
    # by hand: the answer is the reference's first 5 of 8 tokens: P = 1, R = 5/8, F1 = 10/13
    assert got[0] == pytest.approx(100 * 10 / 13) and got[2] == 0.0
    assert seen[-1]["max_new_tokens"] == scores.PYDOC_NEW_TOKENS and seen[-1]["desc"] == "pydoc_rouge"
    assert scores.pydoc_val_rouge(None, None, items, max_new_tokens=7) == {"pydoc_val_rougeL": got}
    assert seen[-1]["max_new_tokens"] == 7 and seen[-1]["desc"] == "pydoc_val_rouge"


def test_scorers_run_on_the_tiny_model():
    model, tok = tiny_llama(), tiny_tokenizer()
    items = pydoc_rows("val")[:3]
    metrics, per_item = evaluate_model(model, tok, {"pydoc_rouge": items, "pydoc_val_rouge": items},
                                       options={"pydoc_rouge": {"max_new_tokens": 3},
                                                "pydoc_val_rouge": {"max_new_tokens": 3}})
    for key in ("pydoc_rougeL", "pydoc_val_rougeL"):
        assert len(per_item[key]) == 3 and all(0 <= v <= 100 for v in per_item[key])
        assert f"{key}_se" in metrics
    assert per_item["pydoc_rougeL"] == per_item["pydoc_val_rougeL"]  # greedy: the same answers
    assert len(per_item["pydoc_rouge_outputs"]) == 3
    assert all(isinstance(t, str) for t in per_item["pydoc_rouge_outputs"])
