"""The one metric registry: every evaluation an experiment can run (its scorer and the metrics it reports), and
every metric's label, direction and format. The runner computes what is listed here and the report reads its
labels and directions from here; nothing guesses a direction from a metric's name.

To add a metric: a scorer in ``scores.py`` (model, tokenizer, items -> one score per item, or a dict of them), an ``Evaluation``
below naming it and its metric(s), and a ``Metric`` for each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["EVALUATIONS", "METRICS", "Evaluation", "Metric", "metric"]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    digits: int = 3

    @property
    def header(self) -> str:
        return f"{self.label} {'↑' if self.higher_is_better else '↓'}"

    def goodness(self, value: float) -> float:
        """The value signed so that larger is always better."""
        return value if self.higher_is_better else -value

    def gain(self, a, b) -> float:
        """How much better ``a`` is than ``b`` on this metric (negative: worse); both have ``.value(key)``."""
        return self.goodness(a.value(self.key)) - self.goodness(b.value(self.key))

    def fmt(self, value: float) -> str:
        return f"{value:.{self.digits}f}"


METRICS = {m.key: m for m in (
    Metric("knowledge_em", "Knowledge EM (%)", True, 2),
    Metric("knowledge_em_lm_eval", "Knowledge EM, lm-eval rule (%)", True, 2),
    Metric("knowledge_mc", "Knowledge MC (%)", True, 2),
    Metric("knowledge_kept", "Knowledge kept (%)", True, 1),
    Metric("knowledge_logprob", "Knowledge log-prob", True, 3),
    Metric("harmfulness_score", "HS", False, 3),
    Metric("harmfulness_rate", "HR (%)", False, 2),
    Metric("math_accuracy", "Math accuracy (%)", True, 2),
    Metric("math_answer_found", "Math answer found (%)", True, 1),
    Metric("math_nll", "Math NLL", False, 3),
    Metric("math_val_nll", "Math NLL (validation)", False, 3),
    Metric("math_likelihood", "Math answer likelihood (%)", True, 2),
    Metric("rouge1", "ROUGE-1", True, 2),
    Metric("val_rouge1", "ROUGE-1 (validation)", True, 2),
    Metric("rouge2", "ROUGE-2", True, 2),
    Metric("rougeL", "ROUGE-L", True, 2),
    Metric("pydoc_rougeL", "Pydoc ROUGE-L", True, 2),
    Metric("pydoc_val_rougeL", "Pydoc ROUGE-L (validation)", True, 2),
    Metric("benign_refusal_rate", "Benign refusal (%)", False, 1),
    Metric("final_loss", "Final train loss", False, 4),
    Metric("train_loss", "Train loss (mean over steps)", False, 4),
)}


@dataclass(frozen=True)
class Evaluation:
    """An evaluation a config can list under ``evaluate:`` (and a ``sclora eval`` suite runs): per-item scores from
    the function of the same name in ``scores.py``, reported as ``metrics`` (a scorer with several metrics, such as
    safety's mean judge score and % scored 5, returns them from one generation). The scorer is looked up when
    used, so reading the registry (the report) loads no model code."""

    name: str
    metrics: tuple[str, ...]

    @property
    def scorer(self) -> Callable:
        from . import scores

        return getattr(scores, self.name)


EVALUATIONS = {e.name: e for e in (
    Evaluation("math_nll", ("math_nll",)),
    Evaluation("math_val_nll", ("math_val_nll",)),  # the same score on a validation split: selects learning rates
    Evaluation("math_accuracy", ("math_accuracy", "math_answer_found")),
    Evaluation("math_likelihood", ("math_likelihood",)),  # exp(-NLL) in %: NLL's evidence on a 0-100 scale
    Evaluation("knowledge_logprob", ("knowledge_logprob",)),
    Evaluation("knowledge_em", ("knowledge_em", "knowledge_em_lm_eval")),
    Evaluation("knowledge_mc", ("knowledge_mc",)),
    Evaluation("safety", ("harmfulness_score", "harmfulness_rate")),
    Evaluation("benign_refusal", ("benign_refusal_rate",)),
    Evaluation("summary_rouge", ("rouge1", "rouge2", "rougeL")),
    Evaluation("summary_val_rouge", ("val_rouge1",)),  # ROUGE-1 on a validation split: selects learning rates
    Evaluation("pydoc_rouge", ("pydoc_rougeL",)),  # standard-library docstring summaries, held out
    Evaluation("pydoc_val_rouge", ("pydoc_val_rougeL",)),  # the same on the validation split: selects learning rates
)}


def metric(key: str) -> Metric:
    """The registered metric ``key``; a ValueError naming the registered ones otherwise."""
    if key not in METRICS:
        raise ValueError(f"Unknown metric {key!r}: the registered ones are {sorted(METRICS)} "
                         "(sclora/experiments/evaluate/metrics.py). Check report: preservation / utility in the config.")
    return METRICS[key]
