"""ROUGE F1 for summarization, with Google's rouge-score (stemming on, as commonly reported): the one place ROUGE
is computed, per item (``sclora run``'s per-item scores) and as means (``sclora eval``'s suite)."""

from __future__ import annotations

__all__ = ["rouge", "rouge_per_item"]

KINDS = ("rouge1", "rouge2", "rougeL")


def rouge_per_item(predictions: list[str], references: list[str], kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """ROUGE F1 (in %) of each prediction against its reference, one dict ``{kind: value}`` per pair."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"Need equally many predictions and references, got {len(predictions)} and {len(references)}.")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    return [{key: 100 * score.fmeasure for key, score in scorer.score(ref, pred).items()}
            for pred, ref in zip(predictions, references)]


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (in %) over pairs."""
    items = rouge_per_item(predictions, references)
    return {key: sum(item[key] for item in items) / len(items) for key in KINDS}
