"""Final answers of math solutions, extracted and compared the way the community does.

GSM8K references end in ``#### N``; MetaMath-style models end in ``The answer is: N``; MATH-style
answers are LaTeX (``\\boxed{...}``) and go to ``math-verify``. Numbers lose thousands separators,
currency signs, units and trailing periods, then compare numerically.
"""

from __future__ import annotations

import re

__all__ = ["extract_math_answer", "math_equal", "normalize_number"]

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_PATTERNS = [
    re.compile(r"####\s*(.+)"),
    re.compile(r"[Tt]he (?:final )?answer is[:\s]*(.+)"),
    re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}"),
]


def extract_math_answer(text: str) -> str | None:
    """The final answer in ``text``: after the last ``####``, else after the last "The answer is",
    else in the last ``\\boxed{}``, else the last number. Numbers come back normalized ("1,234.50" ->
    "1234.5"); other answers (LaTeX, words) come back stripped; None when there is nothing."""
    if not text:
        return None
    for pattern in _PATTERNS:
        hits = pattern.findall(text)
        if hits:
            candidate = hits[-1].strip()
            number = re.search(_NUMBER, candidate.replace("$", ""))
            if pattern.pattern.startswith(r"\\boxed"):
                return normalize_number(candidate) or candidate
            if number and _leading_number(candidate):
                return normalize_number(number.group())
            if candidate:
                return candidate.rstrip(".").strip() or None
    numbers = re.findall(_NUMBER, text.replace("$", ""))
    return normalize_number(numbers[-1]) if numbers else None


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '-3.0' -> '-3', '$12' -> '12', '45%' -> '45'; None if not a number."""
    cleaned = text.strip().replace("$", "").replace(",", "").rstrip(".").rstrip("%").strip()
    cleaned = re.sub(r"\s*(dollars?|cents?|units?|meters?|km|kg|hours?|minutes?|days?)$", "", cleaned, flags=re.I)
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


def math_equal(prediction: str | None, reference: str | None) -> bool:
    """Numeric comparison when both are numbers, else symbolic equivalence by math-verify."""
    if prediction is None or reference is None:
        return False
    a, b = normalize_number(prediction), normalize_number(reference)
    if a is not None and b is not None:
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    from math_verify import parse, verify  # LaTeX / symbolic answers (MATH)

    return bool(verify(parse(_as_latex(reference)), parse(_as_latex(prediction))))


def _as_latex(text: str) -> str:
    return text if "$" in text or "\\" in text else f"${text}$"


def _leading_number(candidate: str) -> bool:
    return bool(re.match(r"\s*\$?\s*" + f"(?:{_NUMBER})", candidate))
