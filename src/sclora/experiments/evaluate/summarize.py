"""ROUGE-1/2/L F1 for summarization, with Google's rouge-score (stemming on, as commonly reported)."""

from __future__ import annotations

__all__ = ["rouge"]


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (in %) over pairs."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"Need equally many predictions and references, got {len(predictions)} and {len(references)}.")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        for key, score in scorer.score(ref, pred).items():
            totals[key] += score.fmeasure
    return {key: 100 * value / len(predictions) for key, value in totals.items()}
