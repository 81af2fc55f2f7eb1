"""The one evaluation path: registered evaluations applied to example sets, each metric reported as mean and
standard error, with the per-item scores and generated answers kept. ``sclora run`` calls it after every run
(and at chosen steps), ``sclora eval`` for one suite; both get the scorers' defaults from ``scores.py``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ...fileio import atomic_write_json
from .metrics import EVALUATIONS

__all__ = ["evaluate_model", "saved_evaluation", "save_evaluation"]


def evaluate_model(model, tokenizer, eval_sets: dict[str, list[dict]], *, options: dict | None = None,
                   judge=None, extras: dict | None = None, show_progress: bool = False,
                   resume: tuple[Path, str] | None = None) -> tuple[dict, dict]:
    """(metrics, per-item scores) of ``model`` on ``eval_sets`` ({evaluation name: items}). ``options`` and
    ``extras`` are per-evaluation keyword arguments of the scorers (settings; few-shot examples, distractor pools).
    Metrics: ``<metric>`` and ``<metric>_se`` for each registered metric, ``<evaluation>_seconds``, and for
    generating evaluations ``<evaluation>_tokens_per_second``; per-item: ``<metric>`` lists and
    ``<evaluation>_outputs`` (the generated answers). NLL / log-prob / multiple choice are forward passes only
    (cheap, smooth); accuracy / exact match / safety / ROUGE generate.

    ``resume=(folder, fingerprint)``: each evaluation's metrics and per-item scores go to ``folder/<name>.json`` as
    soon as it finishes, and one found there with the same ``fingerprint`` (what made the model and the settings) is
    not run again: a run killed during its evaluations resumes at the one it was in. Only for a model that the
    fingerprint fixes (a finished run), never for one still training."""
    from .scores import Outputs, summarize

    options, extras = options or {}, extras or {}
    unknown = sorted(set(eval_sets) - set(EVALUATIONS))
    if unknown:
        raise ValueError(f"Unknown evaluation {unknown[0]!r}; the registered ones are {sorted(EVALUATIONS)}.")
    model.eval()
    metrics: dict[str, float] = {}
    items: dict[str, list] = {}
    for name, examples in eval_sets.items():
        saved = saved_evaluation(Path(resume[0]) / f"{name}.json", resume[1]) if resume is not None else None
        if saved is not None:
            metrics.update(saved["metrics"])
            items.update(saved["items"])
            continue
        evaluation = EVALUATIONS[name]
        done = set(metrics), set(items)
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
        if resume is not None:
            save_evaluation(Path(resume[0]) / f"{name}.json", resume[1],
                            {k: v for k, v in metrics.items() if k not in done[0]},
                            {k: v for k, v in items.items() if k not in done[1]})
    return metrics, items


def save_evaluation(path: Path, fingerprint: str, metrics: dict, items: dict) -> None:
    """Write an evaluation's metrics and per-item scores atomically, with the ``fingerprint`` of what made them."""
    atomic_write_json(path, {"fingerprint": fingerprint, "metrics": metrics, "items": items}, indent=None)


def saved_evaluation(path: Path, fingerprint: str) -> dict | None:
    """What :func:`save_evaluation` wrote at ``path`` ({fingerprint, metrics, items}), if the same ``fingerprint``
    made it; None when there is none, another fingerprint made it, or it cannot be read (then it is redone)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint or not all(
            isinstance(saved.get(k), dict) for k in ("metrics", "items")):
        return None
    return saved
