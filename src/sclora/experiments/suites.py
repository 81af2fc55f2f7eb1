"""``sclora eval``: the four evaluation suites of the paper's Section 4, each a fixed set of registered evaluations
(``evaluate/metrics.py``) on the catalogue's data. They run through ``evaluate_model`` with the scorers' own
defaults, exactly as an experiment's ``evaluate:`` section does; a suite only chooses the items.

    knowledge  trivia: exact match 5-shot (ours and lm-eval's rule), 4-way multiple choice, best-answer log-prob
    math       GSM8K test items: accuracy of the final answer (and whether one was found), reference-solution NLL
    safety     HarmBench requests: harmfulness score and rate (judge); benign edge-case requests: refusal rate
    summarize  ACLSum test papers: ROUGE-1/2/L F1
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .evaluate.core import evaluate_model
from .evaluate.metrics import EVALUATIONS
from .examples import source_rows, trivia_rows
from .spec import DataSpec

__all__ = ["SUITES", "Suite", "run_suite", "suite_sets"]

SUMMARY_MAX_WORDS = 400  # about 512 tokens of an ACLSum document: abstract, introduction, start of the conclusion


@dataclass(frozen=True)
class Suite:
    evaluations: tuple[str, ...]
    limit: int  # items per evaluated set by default


SUITES = {
    "knowledge": Suite(("knowledge_em", "knowledge_mc", "knowledge_logprob"), 200),
    "math": Suite(("math_accuracy", "math_nll"), 100),
    "safety": Suite(("safety", "benign_refusal"), 100),
    "summarize": Suite(("summary_rouge",), 30),
}


def _take(rows: list[dict], limit: int, explicit: bool, what: str, seed: int) -> list[dict]:
    """A fixed pseudo-random subset of ``limit`` rows (all of them when the default limit exceeds the source)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if explicit and len(rows) < limit:
        raise ValueError(f"{what} has only {len(rows)} items; --limit {limit} asks for more. Lower --limit.")
    return rows[:limit]


def suite_sets(suite: str, *, limit: int | None = None, num_fewshot: int = 5, seed: int = 0) -> tuple[dict, dict]:
    """(eval_sets, extras) for ``evaluate_model``: the items of each of the suite's evaluations, and what its
    scorers need besides them (few-shot examples outside the evaluated items, the distractor pool)."""
    from . import data

    if suite not in SUITES:
        raise ValueError(f"Unknown suite {suite!r}; choose one of {sorted(SUITES)}.")
    n, explicit = (limit, True) if limit is not None else (SUITES[suite].limit, False)
    if suite == "knowledge":
        pool = trivia_rows()
        rows = _take(pool, n + num_fewshot, False, "", seed)
        items, shots = rows[:n], rows[n:]
        if len(shots) < num_fewshot or (explicit and len(items) < n):
            raise ValueError(f"The trivia source has {len(pool)} items: too few for {n} evaluated items and "
                             f"{num_fewshot} few-shot examples. Lower --limit or --num-fewshot.")
        sets = {name: items for name in SUITES[suite].evaluations}
        return sets, {"knowledge_em": {"shots": shots, "num_fewshot": num_fewshot}, "knowledge_mc": {"pool": pool}}
    if suite == "math":
        rows = [{"prompt": it["question"], "response": it["solution"], "answer": it["answer"]}
                for it in data.gsm8k_test()]
        items = _take(rows, n, explicit, "The GSM8K test source", seed)
        return {"math_accuracy": items, "math_nll": items}, {}
    if suite == "safety":
        harmful = _take(source_rows(DataSpec("harmful", 1), seed), n, explicit, "The HarmBench source", seed)
        benign = _take([{"prompt": it["prompt"]} for it in data.benign_requests()], n, explicit,
                       "The benign-request source", seed)
        return {"safety": harmful, "benign_refusal": benign}, {}
    rows = source_rows(DataSpec("summaries", 1, split="test", max_words=SUMMARY_MAX_WORDS), seed)
    return {"summary_rouge": _take(rows, n, explicit, "The ACLSum test split", seed)}, {}


def run_suite(suite: str, model, tokenizer, *, limit: int | None = None, num_fewshot: int = 5,
              batch_size: int | None = None, judge=None, seed: int = 0, show_progress: bool = True) -> dict:
    """Evaluate ``model`` on a suite: ``{"suite", "judge", "n", "metrics", "samples"}``; ``metrics`` holds each
    metric's mean and standard error (``_se``), seconds and tokens/s per evaluation; ``samples`` one record per
    evaluated item (prompt, generated answer, its scores)."""
    eval_sets, extras = suite_sets(suite, limit=limit, num_fewshot=num_fewshot, seed=seed)
    options = {name: {"batch_size": batch_size} for name in eval_sets} if batch_size else {}
    if judge is None and suite == "safety":
        from .evaluate.judges import RefusalJudge

        judge = RefusalJudge()
    metrics, per_item = evaluate_model(model, tokenizer, eval_sets, options=options, judge=judge, extras=extras,
                                       show_progress=show_progress)
    samples = []
    for name, items in eval_sets.items():
        outputs = per_item.get(f"{name}_outputs")
        for i, item in enumerate(items):
            record = {"evaluation": name, "prompt": item["prompt"]}
            if outputs is not None:
                record["output"] = outputs[i]
            record.update({metric: per_item[metric][i] for metric in EVALUATIONS[name].metrics})
            samples.append(record)
    return {"suite": suite, "judge": getattr(judge, "name", None), "n": {k: len(v) for k, v in eval_sets.items()},
            "num_fewshot": num_fewshot if suite == "knowledge" else None, "metrics": metrics, "samples": samples}
