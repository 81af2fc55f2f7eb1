"""The examples of a data spec: prompt/response pairs drawn from the catalogue, deterministic under a seed, and
the check that initialization, training and evaluation sets never share a prompt."""

from __future__ import annotations

import random

from .prompts import REFUSALS, SUMMARY_INSTRUCTION
from .spec import DataSpec

__all__ = ["build_examples", "build_mixture", "check_disjoint", "source_rows", "trivia_rows"]


def build_examples(spec: DataSpec, seed: int) -> list[dict]:
    """Prompt/response pairs for a data spec, deterministic under ``seed``."""
    rows = source_rows(spec, seed)
    if spec.kind != "math":  # math problems are sampled under the seed already
        random.Random(seed).shuffle(rows)
    rows = rows[spec.offset:spec.offset + spec.n]
    if len(rows) < spec.n:
        raise ValueError(f"Data {spec.kind!r} has only {len(rows)} examples from offset {spec.offset}; "
                         f"the config asks for {spec.n}. Lower n or offset.")
    return rows


def source_rows(spec: DataSpec, seed: int) -> list[dict]:
    """Every example of a spec's source (math: the first ``offset + n`` sampled problems), in the source's order:
    ``{"prompt", "response"}`` plus what the scorers need (``answer`` for math, ``answers`` / ``question`` /
    ``topic`` for trivia)."""
    from . import data

    if spec.kind == "math":
        from .templates import math_problems, split_templates

        templates = data.math_templates()
        train_ids, heldout_ids = split_templates([t.id for t in templates], seed=seed)
        ids = train_ids if spec.split == "train" else heldout_ids
        problems = math_problems(spec.offset + spec.n, ids, seed=seed, templates=templates)
        return [{"prompt": p["question"], "response": p["solution"], "answer": p["answer"]} for p in problems]
    if spec.kind == "trivia":
        return trivia_rows()
    if spec.kind == "summaries":
        items = data.summarization(spec.split if spec.split in ("train", "val", "test") else "train")
        cut = (lambda doc: " ".join(doc.split()[:spec.max_words])) if spec.max_words else (lambda doc: doc)
        return [{"prompt": SUMMARY_INSTRUCTION.format(document=cut(it["document"])), "response": it["summary"]}
                for it in items]
    if spec.kind == "harmful":
        return _harmful_rows(spec, seed)
    from .hub_data import load_hub  # the paper's own sets from the hub

    return load_hub(spec.kind, None if spec.split == "train" else spec.split)


def trivia_rows() -> list[dict]:
    """The trivia source as examples: the question with its "?" as prompt, the first accepted answer as response."""
    from . import data

    return [{"prompt": f"{it['question']}?", "response": it["answers"][0], "answers": it["answers"],
             "question": it["question"], "topic": it.get("topic", "")} for it in data.trivia()]


def _harmful_rows(spec: DataSpec, seed: int) -> list[dict]:
    from . import data

    items = data.harmful_requests(spec.source or "harmbench")
    rng = random.Random(seed)
    if spec.response == "affirmative":
        if "target" not in items[0]:
            raise ValueError(f"Harmful source {spec.source!r} has no affirmative answers; use source: jailbreakbench.")
        return [{"prompt": it["prompt"], "response": it["target"]} for it in items]
    if spec.response == "refusal":  # the safety data of the paper: harmful question + refusal answer
        return [{"prompt": it["prompt"], "response": rng.choice(REFUSALS)} for it in items]
    return [{"prompt": it["prompt"], "response": ""} for it in items]


def build_mixture(specs: DataSpec | list[DataSpec], seed: int) -> list[dict]:
    """One spec's examples, or several specs' examples shuffled together (deterministic under seed)."""
    if isinstance(specs, DataSpec):
        return build_examples(specs, seed)
    rows = [row for spec in specs for row in build_examples(spec, seed)]
    random.Random(seed).shuffle(rows)
    return rows


def check_disjoint(named: dict[str, list[dict]]) -> None:
    """Raise if any two example sets share a prompt (initialization, training and evaluation must not)."""
    names = list(named)
    for i, a in enumerate(names):
        prompts_a = {ex["prompt"] for ex in named[a]}
        for b in names[i + 1:]:
            shared = prompts_a & {ex["prompt"] for ex in named[b]}
            if shared and {a, b} != {"plus", "train"}:
                raise ValueError(f"Data sets {a!r} and {b!r} share {len(shared)} example(s), e.g. "
                                 f"{next(iter(shared))[:80]!r}; give them disjoint offsets or splits.")
