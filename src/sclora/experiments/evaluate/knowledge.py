"""World-knowledge exact match, with lm-evaluation-harness's prompts and normalization.

TriviaQA: ``Question: {q}?\\nAnswer:``; NQ-open: ``Q: {q}?\\nA:``; greedy until newline, ``.`` or
``,``. lm-eval scores with HF-evaluate's exact match: leading whitespace removed, (NQ-open only)
articles removed by regex, lowercased, ``string.punctuation`` deleted, then string equality with
any accepted answer. :func:`exact_match` is the more forgiving SQuAD-style normalization
(articles removed everywhere, whitespace collapsed).
"""

from __future__ import annotations

import re
import string

__all__ = ["PROMPTS", "STOP", "exact_match", "fewshot_context", "lm_eval_exact_match", "normalize_answer", "prompt"]

PROMPTS = {"triviaqa": "Question: {question}?\nAnswer:", "nq_open": "Q: {question}?\nA:"}
STOP = ["\n", ".", ","]
_LM_EVAL_REGEXES = {"triviaqa": [], "nq_open": [r"\b(?:The |the |An |A |The |a |an )"]}
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def prompt(question: str, task: str = "triviaqa") -> str:
    return PROMPTS[task].format(question=question.strip().rstrip("?"))


def fewshot_context(shots: list[dict], task: str = "triviaqa") -> str:
    """Solved examples in lm-eval's format: each prompt, " " + its first answer, then a blank line."""
    return "".join(f"{prompt(s['question'], task)} {s['answers'][0]}\n\n" for s in shots)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> bool:
    """True when the normalized prediction equals any normalized accepted answer."""
    if isinstance(answers, str):
        answers = [answers]
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def lm_eval_exact_match(prediction: str, answers: list[str], task: str = "triviaqa") -> bool:
    """lm-eval's own rule (``remove_whitespace`` filter, then ``exact_match`` with the task's options)."""
    if isinstance(answers, str):
        answers = [answers]

    def norm(text: str) -> str:
        for regex in _LM_EVAL_REGEXES[task]:
            text = re.sub(regex, "", text)
        return text.lower().translate(_PUNCTUATION)

    pred = norm(prediction.lstrip(" "))
    return any(pred == norm(a) for a in answers)
