"""The one evaluation path: registered evaluations applied to example sets, each metric reported as mean and
standard error, with the per-item scores and generated answers kept. ``sclora run`` calls it after every run
(and at chosen steps), ``sclora eval`` for one suite; both get the scorers' defaults from ``scores.py``."""

from __future__ import annotations

import time

from .metrics import EVALUATIONS

__all__ = ["evaluate_model"]


def evaluate_model(model, tokenizer, eval_sets: dict[str, list[dict]], *, options: dict | None = None,
                   judge=None, extras: dict | None = None, show_progress: bool = False) -> tuple[dict, dict]:
    """(metrics, per-item scores) of ``model`` on ``eval_sets`` ({evaluation name: items}). ``options`` and
    ``extras`` are per-evaluation keyword arguments of the scorers (settings; few-shot examples, distractor pools).
    Metrics: ``<metric>`` and ``<metric>_se`` for each registered metric, ``<evaluation>_seconds``, and for
    generating evaluations ``<evaluation>_tokens_per_second``; per-item: ``<metric>`` lists and
    ``<evaluation>_outputs`` (the generated answers). NLL / log-prob / multiple choice are forward passes only
    (cheap, smooth); accuracy / exact match / safety / ROUGE generate."""
    from .scores import Outputs, summarize

    options, extras = options or {}, extras or {}
    model.eval()
    metrics: dict[str, float] = {}
    items: dict[str, list] = {}
    for name, examples in eval_sets.items():
        if name not in EVALUATIONS:
            raise ValueError(f"Unknown evaluation {name!r}; the registered ones are {sorted(EVALUATIONS)}.")
        evaluation = EVALUATIONS[name]
        start = time.perf_counter()
        texts = Outputs()
        scores = evaluation.scorer(model, tokenizer, examples, judge=judge, show_progress=show_progress,
                                   outputs=texts, **extras.get(name, {}), **options.get(name, {}))
        per_metric = scores if isinstance(scores, dict) else {evaluation.metrics[0]: scores}
        if set(per_metric) != set(evaluation.metrics):
            raise RuntimeError(f"Scorer {name!r} returned {sorted(per_metric)}, its Evaluation names "
                               f"{sorted(evaluation.metrics)} (metrics.py).")
        for metric in evaluation.metrics:
            values = per_metric[metric]
            metrics[metric], metrics[f"{metric}_se"] = summarize(values)
            items[metric] = values
        metrics[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        if texts:  # generated answers, kept for inspection next to their scores
            items[f"{name}_outputs"] = list(texts)
            metrics[f"{name}_tokens_per_second"] = round(texts.tokens_per_second, 1)
    return metrics, items
