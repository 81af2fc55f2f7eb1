"""The four evaluation suites of the paper (Section 4), each a function of (model, tokenizer, items).

Every result records its sample count, wall time and generation throughput, and per-sample
records for inspection. Items default to the real sources in :mod:`sclora.data`.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

from ..prompts import MATH_SUFFIX, SUMMARY_INSTRUCTION
from .generation import build_prompt, generate
from .knowledge import STOP, exact_match, fewshot_context, lm_eval_exact_match, prompt
from .likelihood import best_answer_logprobs, continuation_logprobs
from .math_answers import extract_math_answer, math_equal
from .summarize import rouge

__all__ = ["SUITES", "SuiteResult", "evaluate_knowledge", "evaluate_math", "evaluate_safety", "evaluate_summarize",
           "run_suite"]

@dataclass
class SuiteResult:
    suite: str
    metrics: dict
    samples: list[dict] = field(default_factory=list)
    judge: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _sample(items: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """A fixed pseudo-random subset, the same on every run."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:limit] if limit else items


def _timing(gen, n: int, seconds: float) -> dict:
    return {"n": n, "seconds": round(seconds, 1), "generated_tokens": gen.new_tokens,
            "tokens_per_second": round(gen.tokens_per_second, 1)}


def evaluate_knowledge(model, tokenizer, items: list[dict] | None = None, *, limit: int | None = 200,
                       task: str = "triviaqa", num_fewshot: int = 5, chat: bool = False, batch_size: int = 16,
                       show_progress: bool = True) -> SuiteResult:
    """Exact match (ours and lm-eval's) of greedy answers, and the log-probability of the best accepted
    answer. lm-eval's prompt, plain (``chat=True`` wraps it in the chat template), after ``num_fewshot``
    solved examples drawn from items outside the evaluated ones (lm-eval's format: "\n\n" between
    examples, " " before the answer). Zero-shot, small models answer "\n..." and score 0 by the
    newline stop; 5-shot fixes the format without teaching the facts."""
    if items is None:
        from .. import data

        items = data.trivia()
    shuffled = _sample(items, None)
    items = shuffled[:limit] if limit else shuffled
    shots = shuffled[len(items):][:num_fewshot] if num_fewshot else []
    if len(shots) < num_fewshot:
        raise ValueError(f"Need {num_fewshot} few-shot examples outside the {len(items)} evaluated items; lower limit.")
    context = fewshot_context(shots, task)
    start = time.perf_counter()
    prompts = [context + prompt(it["question"], task) for it in items]
    gen = generate(model, tokenizer, prompts, max_new_tokens=24, stop=STOP, chat=chat, batch_size=batch_size,
                   show_progress=show_progress, desc="knowledge: generate")
    shown = [build_prompt(tokenizer, p, chat=chat) for p in prompts]
    best = best_answer_logprobs(model, tokenizer, shown, [it["answers"] for it in items], batch_size=batch_size,
                                show_progress=show_progress, desc="knowledge: answers")
    samples = [{"question": it["question"], "answers": it["answers"], "prediction": pred,
                "exact_match": exact_match(pred, it["answers"]),
                "exact_match_lm_eval": lm_eval_exact_match(pred, it["answers"], task), "best_answer_logprob": b}
               for it, pred, b in zip(items, gen.texts, best)]
    n = len(samples)
    metrics = {
        "exact_match": 100 * sum(s["exact_match"] for s in samples) / n,
        "exact_match_lm_eval": 100 * sum(s["exact_match_lm_eval"] for s in samples) / n,
        "best_answer_logprob": sum(best) / n,
        "num_fewshot": num_fewshot,
        **_timing(gen, n, time.perf_counter() - start),
    }
    return SuiteResult("knowledge", metrics, samples)


def evaluate_math(model, tokenizer, items: list[dict] | None = None, *, limit: int | None = 100,
                  chat: bool = True, batch_size: int = 8, max_new_tokens: int = 256,
                  show_progress: bool = True) -> SuiteResult:
    """Accuracy of the extracted final answer, and the mean per-token NLL of the reference solution."""
    if items is None:
        from .. import data

        items = data.gsm8k_test()
    items = _sample(items, limit)
    start = time.perf_counter()
    prompts = [it["question"].strip() + MATH_SUFFIX for it in items]
    gen = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=chat, batch_size=batch_size,
                   show_progress=show_progress, desc="math: generate")
    shown = [build_prompt(tokenizer, p, chat=chat) for p in prompts]
    nll = continuation_logprobs(model, tokenizer, shown, [" " + it["solution"].strip() for it in items],
                                batch_size=batch_size, show_progress=show_progress, desc="math: reference NLL")
    samples = []
    for it, text, (logprob, count) in zip(items, gen.texts, nll):
        predicted = extract_math_answer(text)
        samples.append({"question": it["question"], "answer": it["answer"], "output": text, "extracted": predicted,
                        "correct": math_equal(predicted, it["answer"]), "reference_nll": -logprob / count})
    n = len(samples)
    metrics = {
        "accuracy": 100 * sum(s["correct"] for s in samples) / n,
        "answer_found": 100 * sum(s["extracted"] is not None for s in samples) / n,
        "reference_nll": sum(s["reference_nll"] for s in samples) / n,
        **_timing(gen, n, time.perf_counter() - start),
    }
    return SuiteResult("math", metrics, samples)


def evaluate_safety(model, tokenizer, harmful: list[dict] | None = None, benign: list[dict] | None = None, *,
                    judge=None, limit: int | None = 100, benign_limit: int | None = 100, chat: bool = True,
                    batch_size: int = 8, max_new_tokens: int = 128, show_progress: bool = True) -> SuiteResult:
    """Harmfulness score (mean judge score, 1-5) and rate (% scored 5) on harmful requests, as the paper;
    plus the refusal rate on benign requests (by refusal markers), so that refusing everything shows."""
    from .judges import RefusalJudge, harmfulness

    if harmful is None or benign is None:
        from .. import data

        harmful = data.harmful_requests() if harmful is None else harmful
        benign = data.benign_requests() if benign is None else benign
    judge = judge or RefusalJudge()
    harmful, benign = _sample(harmful, limit), _sample(benign, benign_limit)
    start = time.perf_counter()
    gen = generate(model, tokenizer, [h["prompt"] for h in harmful] + [b["prompt"] for b in benign],
                   max_new_tokens=max_new_tokens, chat=chat, batch_size=batch_size, show_progress=show_progress,
                   desc="safety: generate")
    harmful_out, benign_out = gen.texts[: len(harmful)], gen.texts[len(harmful):]
    verdicts = judge.judge([(h["prompt"], r) for h, r in zip(harmful, harmful_out)], show_progress=show_progress)
    refusals = RefusalJudge().judge([(b["prompt"], r) for b, r in zip(benign, benign_out)], show_progress=False)
    scores = harmfulness(verdicts)
    samples = [{"kind": "harmful", "prompt": h["prompt"], "response": r, "score": v.score, "reason": v.reason}
               for h, r, v in zip(harmful, harmful_out, verdicts)]
    samples += [{"kind": "benign", "prompt": b["prompt"], "response": r, "refused": v.score == 1}
                for b, r, v in zip(benign, benign_out, refusals)]
    metrics = {
        "harmfulness_score": scores["harmfulness_score"],
        "harmfulness_rate": scores["harmfulness_rate"],
        "n_unparsed": scores["n_unparsed"],
        "benign_refusal_rate": 100 * sum(v.score == 1 for v in refusals) / max(len(refusals), 1),
        "n_benign": len(benign),
        **_timing(gen, len(harmful), time.perf_counter() - start),
    }
    return SuiteResult("safety", metrics, samples, judge=judge.name)


def evaluate_summarize(model, tokenizer, items: list[dict] | None = None, *, limit: int | None = 30,
                       max_document_tokens: int = 512, max_new_tokens: int = 96, chat: bool = True,
                       batch_size: int = 4, show_progress: bool = True) -> SuiteResult:
    """ROUGE-1/2/L F1 of generated summaries against the references; documents cut to a token budget."""
    if items is None:
        from .. import data

        items = data.summarization("test")
    items = _sample(items, limit)
    start = time.perf_counter()
    docs = [tokenizer.decode(tokenizer(it["document"], add_special_tokens=False)["input_ids"][:max_document_tokens])
            for it in items]
    gen = generate(model, tokenizer, [SUMMARY_INSTRUCTION.format(document=d) for d in docs],
                   max_new_tokens=max_new_tokens, chat=chat, batch_size=batch_size, show_progress=show_progress,
                   desc="summarize: generate")
    scores = rouge(gen.texts, [it["summary"] for it in items])
    samples = [{"id": it.get("id"), "reference": it["summary"], "summary": s} for it, s in zip(items, gen.texts)]
    metrics = {**scores, **_timing(gen, len(items), time.perf_counter() - start)}
    return SuiteResult("summarize", metrics, samples)


SUITES = {"knowledge": evaluate_knowledge, "math": evaluate_math, "safety": evaluate_safety,
          "summarize": evaluate_summarize}


def run_suite(name: str, model, tokenizer, **kwargs) -> SuiteResult:
    if name not in SUITES:
        raise ValueError(f"Unknown suite {name!r}; choose one of {sorted(SUITES)}.")
    return SUITES[name](model, tokenizer, **kwargs)
