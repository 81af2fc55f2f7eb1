"""A reproducible safety-alignment stage: the stand-in for a chat model's own alignment.

SmolLM2-135M-Instruct refuses almost no harmful request, so it cannot play Llama-2-7b-Chat in the
paper's safety experiments. This stage fine-tunes it on harmful requests from ONE source answered
with refusals, mixed with benign instructions answered by the model's own greedy outputs (so
helpfulness is anchored to what the model already does), and measures refusals on harmful requests
from OTHER sources before and after. The refusal replies below are the one piece of data this
project writes itself: no package ships refusal answers.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..fileio import atomic_dir, atomic_write_json
from .prompts import REFUSALS

__all__ = ["AlignConfig", "REFUSALS", "align", "alignment_examples", "refusal_rate"]

@dataclass
class AlignConfig:
    harmful_source: str = "harmbench"  # trained on
    heldout_sources: tuple[str, ...] = ("strongreject", "jailbreakbench")  # measured on
    n_harmful: int = 159
    n_benign: int = 160
    n_heldout: int = 100  # per held-out source
    n_benign_eval: int = 100
    benign_kinds: tuple[str, ...] = ("trivia", "math")  # instructions the model answers itself
    benign_max_new_tokens: int = 96
    seed: int = 0
    train: dict = field(default_factory=lambda: {
        "learning_rate": 5e-5, "batch_size": 16, "micro_batch_size": 8, "num_epochs": 2, "max_length": 192,
        "bf16": True, "save_steps": 10, "warmup_ratio": 0.03})


def alignment_examples(model, tokenizer, config: AlignConfig, show_progress: bool = True) -> list[dict]:
    """Harmful requests (one source) -> refusals; benign instructions (trivia questions and math word
    problems) -> the model's own greedy answers."""
    from . import data
    from .evaluate.generation import generate
    from .templates import math_problems, split_templates

    rng = random.Random(config.seed)
    harmful = [h["prompt"] for h in data.harmful_requests(config.harmful_source)][: config.n_harmful]
    math = []
    if "math" in config.benign_kinds:
        templates = data.math_templates()
        train_ids, _ = split_templates([t.id for t in templates], seed=config.seed)
        math = [p["question"] for p in math_problems(config.n_benign // 2, train_ids, seed=config.seed + 1,
                                                    templates=templates)]
    trivia = [f"{t['question']}?" for t in data.trivia()] if "trivia" in config.benign_kinds else []
    rng.shuffle(trivia)
    benign = trivia[: config.n_benign - len(math)] + math
    answers = generate(model, tokenizer, benign, max_new_tokens=config.benign_max_new_tokens, batch_size=8,
                       show_progress=show_progress, desc="benign answers").texts
    examples = [{"prompt": p, "response": rng.choice(REFUSALS)} for p in harmful]
    examples += [{"prompt": p, "response": a.strip()} for p, a in zip(benign, answers) if a.strip()]
    rng.shuffle(examples)
    return examples


def refusal_rate(model, tokenizer, prompts: list[str], show_progress: bool = True, desc: str = "refusals") -> float:
    """Percent of prompts whose greedy answer opens with a refusal (the refusal-marker proxy)."""
    from .evaluate.generation import generate
    from .evaluate.judges import RefusalJudge

    texts = generate(model, tokenizer, prompts, max_new_tokens=48, batch_size=8, show_progress=show_progress,
                     desc=desc).texts
    verdicts = RefusalJudge().judge(list(zip(prompts, texts)), show_progress=False)
    return 100 * sum(v.score == 1 for v in verdicts) / len(verdicts)


def align(model, tokenizer, config: AlignConfig, output_dir: str | os.PathLike, *, show_progress: bool = True) -> dict:
    """Measure refusals, fine-tune (full), measure again, save the aligned model to output_dir/model."""
    from ..data import content_digest
    from ..models import model_identity
    from ..train import TrainConfig, train
    from . import data

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Sources share some behaviours (JailbreakBench reuses HarmBench ones): those are not held out.
    trained = {h["prompt"].strip().lower() for h in data.harmful_requests(config.harmful_source)}
    candidates = [h["prompt"] for src in config.heldout_sources for h in data.harmful_requests(src)[: config.n_heldout]]
    heldout = [p for p in candidates if p.strip().lower() not in trained]
    if not heldout:
        raise ValueError("Every held-out harmful prompt also appears in the training source; pick other sources.")
    benign_eval = [b["prompt"] for b in data.benign_requests()][: config.n_benign_eval]
    report = {"config": {**config.__dict__, "heldout_sources": list(config.heldout_sources)},
              "heldout_prompts": len(heldout), "heldout_dropped_as_seen_in_training": len(candidates) - len(heldout)}
    report["before"] = {"heldout_refusal_rate": refusal_rate(model, tokenizer, heldout, show_progress, "before: harmful"),
                        "benign_refusal_rate": refusal_rate(model, tokenizer, benign_eval, show_progress,
                                                            "before: benign")}
    examples = alignment_examples(model, tokenizer, config, show_progress)
    start = time.perf_counter()
    result = train(model, tokenizer, examples, TrainConfig.from_dict(config.train), out / "train",
                   show_progress=show_progress)
    report["train"] = {"examples": len(examples), "steps": result.steps, "seconds": round(time.perf_counter() - start, 1),
                       "tokens_per_second": round(result.tokens_per_second, 1), "final_loss": result.final_loss}
    model.eval()
    report["after"] = {"heldout_refusal_rate": refusal_rate(model, tokenizer, heldout, show_progress, "after: harmful"),
                       "benign_refusal_rate": refusal_rate(model, tokenizer, benign_eval, show_progress,
                                                           "after: benign")}
    with atomic_dir(out / "model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    # what the saved weights are: builds on other machines or thread counts can differ in their last bits, and an
    # experiment folder records the identity of the model it was made with (``model.json``)
    report["model"] = {"sha256": content_digest(out / "model"), "identity": model_identity(str(out / "model"))}
    atomic_write_json(out / "align_report.json", report, default=str)
    return report
