"""The paper's own data sets from the Hugging Face hub, for users with network, behind the same
example format as :mod:`sclora.data` (``kind: metamathqa`` etc. in a data spec).

Needs the ``datasets`` package and network access; without either the error says so and names the
offline sources that stand in for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["HUB_SOURCES", "load_hub"]


def _final_answer(text: str) -> str:
    for marker in ("####", "The answer is:"):
        if marker in text:
            return text.rsplit(marker, 1)[1].strip().replace(",", "")
    return ""


@dataclass(frozen=True)
class HubSource:
    repo: str
    config: str | None
    split: str
    to_example: Callable[[dict], dict]
    offline_alternative: str


HUB_SOURCES = {
    "metamathqa": HubSource("meta-math/MetaMathQA", None, "train",
                            lambda r: {"prompt": r["query"], "response": r["response"],
                                       "answer": _final_answer(r["response"])}, "math"),
    "gsm8k": HubSource("openai/gsm8k", "main", "test",
                       lambda r: {"prompt": r["question"], "response": r["answer"],
                                  "answer": _final_answer(r["answer"])}, "math"),
    "nq_open": HubSource("google-research-datasets/nq_open", None, "validation",
                         lambda r: {"prompt": f"{r['question']}?", "response": r["answer"][0],
                                    "question": r["question"], "answers": list(r["answer"])}, "trivia"),
    "triviaqa": HubSource("mandarjoshi/trivia_qa", "rc.nocontext", "validation",
                          lambda r: {"prompt": f"{r['question'].rstrip('?')}?", "response": r["answer"]["value"],
                                     "question": r["question"].rstrip("?"), "answers": list(r["answer"]["aliases"])},
                          "trivia"),
    "webqs": HubSource("stanfordnlp/web_questions", None, "test",
                       lambda r: {"prompt": r["question"], "response": r["answers"][0],
                                  "question": r["question"].rstrip("?"), "answers": list(r["answers"])}, "trivia"),
    "samsum": HubSource("Samsung/samsum", None, "train",
                        lambda r: {"prompt": f"Summarize this dialogue.\n\n{r['dialogue']}", "response": r["summary"]},
                        "summaries"),
    "advbench": HubSource("walledai/AdvBench", None, "train",
                          lambda r: {"prompt": r["prompt"], "response": "", "target": r.get("target", "")}, "harmful"),
}


def load_hub(kind: str, split: str | None = None) -> list[dict]:
    """Rows of a hub data set as sclora examples (prompt, response, and the fields evaluations need)."""
    if kind not in HUB_SOURCES:
        raise ValueError(f"Unknown hub data set {kind!r}; choose one of {sorted(HUB_SOURCES)}.")
    source = HUB_SOURCES[kind]
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError(f"Hub data set {kind!r} needs the `datasets` package: pip install datasets. "
                           f"Offline, use kind: {source.offline_alternative}.") from e
    try:
        rows = datasets.load_dataset(source.repo, source.config, split=split or source.split)
    except (ConnectionError, OSError) as e:
        raise RuntimeError(
            f"Could not download {source.repo} from the Hugging Face hub ({type(e).__name__}: {e}). It needs network "
            f"access (or a populated HF_DATASETS_CACHE). Offline, use kind: {source.offline_alternative}."
        ) from e
    return [source.to_example(dict(row)) for row in rows]
