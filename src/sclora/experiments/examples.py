"""The examples of a data spec: prompt/response pairs drawn from the catalogue, deterministic under a seed, and
the check that initialization, training and evaluation sets never share a prompt."""

from __future__ import annotations

import json
import random

from .prompts import PYDOC_QUESTION, PYDOC_SIGNATURE, REFUSALS, SUMMARY_INSTRUCTION
from .spec import DataSpec, FileSpec

__all__ = ["PRESETS", "build_examples", "build_mixture", "check_disjoint", "pydoc_rows", "resolve_named", "scorer_extras",
           "source_rows", "trivia_rows"]


def build_examples(spec: DataSpec | FileSpec, seed: int) -> list[dict]:
    """Prompt/response pairs for a data spec (a user's file: its checked rows, any row kind), deterministic under
    ``seed``."""
    if isinstance(spec, FileSpec):
        from ..data import load_examples

        return load_examples(spec, seed=seed)
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
    if spec.kind == "pydoc":
        return pydoc_rows(spec.split)
    if spec.kind == "harmful":
        return _harmful_rows(spec, seed)
    from .hub_data import load_hub  # the paper's own sets from the hub

    return load_hub(spec.kind, None if spec.split == "train" else spec.split)


def trivia_rows() -> list[dict]:
    """The trivia source as examples: the question with its "?" as prompt, the first accepted answer as response."""
    from . import data

    return [{"prompt": f"{it['question']}?", "response": it["answers"][0], "answers": it["answers"],
             "question": it["question"], "topic": it.get("topic", "")} for it in data.trivia()]


def pydoc_rows(split: str) -> list[dict]:
    """A split of the standard-library documentation as examples: the question about a name (with its signature
    where it has one) as prompt, the first paragraph of its docstring as response; ``name`` kept."""
    from . import data

    return [{"prompt": PYDOC_QUESTION.format(name=it["name"])
             + (PYDOC_SIGNATURE.format(signature=it["signature"]) if it["signature"] else ""),
             "response": it["summary"], "name": it["name"]} for it in data.pydoc(split)]


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


def build_mixture(specs: DataSpec | FileSpec | list, seed: int) -> list[dict]:
    """One spec's examples, or several specs' examples shuffled together (deterministic under seed)."""
    if not isinstance(specs, list):
        return build_examples(specs, seed)
    rows = [row for spec in specs for row in build_examples(spec, seed)]
    random.Random(seed).shuffle(rows)
    return rows


def check_disjoint(named: dict[str, list[dict]]) -> None:
    """Raise if any two example sets share a prompt (initialization, training and evaluation must not)."""
    def key(example: dict) -> str:  # what the model is shown: a prompt, a conversation, a text
        return example["prompt"] if "prompt" in example else json.dumps(example.get("messages") or example["text"])

    names = list(named)
    for i, a in enumerate(names):
        prompts_a = {key(ex) for ex in named[a]}
        for b in names[i + 1:]:
            shared = prompts_a & {key(ex) for ex in named[b]}
            if shared and {a, b} != {"plus", "train"}:
                raise ValueError(f"Data sets {a!r} and {b!r} share {len(shared)} example(s), e.g. "
                                 f"{next(iter(shared))[:80]!r}; give them disjoint offsets or splits.")


#: presets for D- when a user has none (``--preserve safety``, ``--minus knowledge:128``): name -> (spec, help)
PRESETS = {
    "safety": (DataSpec("harmful", 128, source="harmbench", response="refusal"),
               "HarmBench's harmful requests, each answered with one of the kit's refusals (prompts.REFUSALS)"),
    "knowledge": (DataSpec("trivia", 256), "general-knowledge trivia questions with their answers"),
}


def resolve_named(text: str, seed: int) -> list[dict] | None:
    """Examples for a name the catalogue knows (entry point group ``sclora.data``, used by the library's commands):
    a preset ``safety[:N]`` / ``knowledge[:N]`` or a spec ``kind:n[:offset[:split]]`` (``math:256``,
    ``trivia:256:512``, ``math:64:0:heldout``); None for anything else. A known kind with a malformed spec is a
    ValueError saying how to write it."""
    from dataclasses import replace

    from .spec import DATA_KINDS

    name, _, rest = text.partition(":")
    if name in PRESETS:
        spec = PRESETS[name][0]
        if rest and not rest.isdigit():
            raise ValueError(f"preset {text!r}: write {name} or {name}:N with a whole number N.")
        return build_examples(replace(spec, n=int(rest)) if rest else spec, seed)
    if name not in DATA_KINDS:
        return None
    parts = text.split(":")
    if not 2 <= len(parts) <= 4 or not all(p.isdigit() for p in parts[1:3]):
        raise ValueError(f"data spec {text!r}: expected kind:n[:offset[:split]] with whole numbers n and offset, "
                         "e.g. math:256, trivia:256:512 or math:64:0:heldout")
    spec = DataSpec(parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else 0,
                    parts[3] if len(parts) > 3 else "train")
    return build_examples(spec, seed)


def scorer_extras(seed: int, eval_sets: dict, sets: dict) -> dict:
    """What some scorers need besides their items: few-shot examples and distractor pools that come from
    outside every evaluated, initialization and training set."""
    extras: dict[str, dict] = {}
    if "knowledge_em" in eval_sets or "knowledge_mc" in eval_sets:
        used = {ex["prompt"] for rows in (*sets.values(), *eval_sets.values()) for ex in rows}
        trivia = trivia_rows()
        unused = [it for it in trivia if it["prompt"] not in used]
        random.Random(seed).shuffle(unused)
        extras["knowledge_em"] = {"shots": unused[:5]}
        extras["knowledge_mc"] = {"pool": trivia}  # answers only: the questions are never shown
    return extras
