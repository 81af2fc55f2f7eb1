"""Evaluation as the paper measures it: math accuracy, world-knowledge exact match, ROUGE, safety.

Scorers live in ``scores.py``, the registry in ``metrics.py``, the one evaluation path in ``core.py`` (used by
``sclora run`` and by ``sclora eval``'s suites, :mod:`sclora.experiments.suites`); the building blocks are
importable from here.
"""

from .generation import GenerationResult, build_prompt, generate
from .judges import Judge, Judgement, LLMJudge, LocalJudge, RefusalJudge, harmfulness, make_judge, parse_score
from .knowledge import exact_match, lm_eval_exact_match, normalize_answer
from .likelihood import continuation_logprobs
from .math_answers import extract_math_answer, math_equal
from .summarize import rouge

__all__ = [
    "GenerationResult",
    "Judge",
    "Judgement",
    "LLMJudge",
    "LocalJudge",
    "RefusalJudge",
    "harmfulness",
    "make_judge",
    "parse_score",
    "build_prompt",
    "continuation_logprobs",
    "exact_match",
    "extract_math_answer",
    "generate",
    "lm_eval_exact_match",
    "math_equal",
    "normalize_answer",
    "rouge",
]
