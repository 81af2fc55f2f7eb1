"""A whole experiment from one YAML file: data -> statistics (once) -> init -> train -> evaluate -> table.

    sclora run configs/demo.yaml --output runs/demo

Every run (a method, optionally a beta and a learning rate) starts from a fresh copy of the model.
Statistics of D+ and D- are computed once and cached in the output folder; finished runs are
skipped on a rerun (results.json is rewritten atomically after each run), so an interrupted
experiment resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml

from .config import LLAMA_TARGET_MODULES, METHODS

__all__ = ["ExperimentConfig", "load_config", "run_experiment", "build_examples"]

from .hub_data import HUB_SOURCES

DATA_KINDS = ("math", "trivia", "summaries", "harmful", *HUB_SOURCES)


@dataclass
class DataSpec:
    """Which examples, how many, from which part of the source (``offset`` keeps splits disjoint)."""

    kind: str
    n: int
    offset: int = 0
    split: str = "train"  # math: template split (train / heldout); others: partitions of the shuffled source

    def __post_init__(self):
        if self.kind not in DATA_KINDS:
            raise ValueError(f"Unknown data kind {self.kind!r}; choose one of {DATA_KINDS}.")
        if self.n < 1:
            raise ValueError(f"Data spec {self.kind!r} asks for n={self.n}; need at least 1.")


@dataclass
class ExperimentConfig:
    name: str
    plus: DataSpec
    minus: DataSpec
    train_data: DataSpec
    runs: list[dict]
    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    seed: int = 0
    stats_seq_len: int = 128
    stats_batch_size: int = 8
    r: int = 16
    lora_alpha: float | None = None
    normalize: str = "none"
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGET_MODULES))
    train: dict = field(default_factory=dict)
    evaluate: dict = field(default_factory=dict)

    def __post_init__(self):
        for key in ("plus", "minus", "train_data"):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, _strict(DataSpec, value, f"data spec '{key}'"))
        if not self.runs:
            raise ValueError("The config lists no runs: add e.g. runs: [{method: lora}, {method: sc_lora, beta: 0.8}].")
        for run in self.runs:
            unknown = set(run) - {"method", "beta", "learning_rate", "name"}
            if unknown:
                raise ValueError(f"Unknown run key(s) {sorted(unknown)}; a run takes method, beta, learning_rate, name.")
            if run.get("method") not in METHODS:
                raise ValueError(f"Unknown method {run.get('method')!r} in runs; choose one of {METHODS}.")
        from .train import TrainConfig

        TrainConfig.from_dict(self.train)  # fail on a bad key now, not after an hour of statistics


def _strict(cls, data: dict, what: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in {what}; valid keys are {sorted(known)}.")
    return cls(**data)


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> ExperimentConfig:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    data.update(overrides or {})
    return _strict(ExperimentConfig, data, str(path))


# --- data ------------------------------------------------------------------------------------------


def build_examples(spec: DataSpec, seed: int) -> list[dict]:
    """Prompt/response pairs for a data spec, deterministic under ``seed``."""
    from . import data

    if spec.kind == "math":
        from .templates import math_problems, split_templates

        templates = data.math_templates()
        train_ids, heldout_ids = split_templates([t.id for t in templates], seed=seed)
        ids = train_ids if spec.split == "train" else heldout_ids
        problems = math_problems(spec.offset + spec.n, ids, seed=seed, templates=templates)
        rows = [{"prompt": p["question"], "response": p["solution"], "answer": p["answer"]} for p in problems]
    elif spec.kind == "trivia":
        items = data.trivia()
        rows = [{"prompt": f"{it['question']}?", "response": it["answers"][0], "answers": it["answers"],
                 "question": it["question"]} for it in items]
    elif spec.kind == "summaries":
        from .evaluate.suites import SUMMARY_INSTRUCTION

        items = data.summarization(spec.split if spec.split in ("train", "val", "test") else "train")
        rows = [{"prompt": SUMMARY_INSTRUCTION.format(document=it["document"]), "response": it["summary"]}
                for it in items]
    elif spec.kind == "harmful":
        items = data.harmful_requests()
        rows = [{"prompt": it["prompt"], "response": ""} for it in items]
    else:  # the paper's own sets from the hub
        from .hub_data import load_hub

        rows = load_hub(spec.kind, None if spec.split == "train" else spec.split)
    if spec.kind != "math":
        random.Random(seed).shuffle(rows)
    rows = rows[spec.offset:spec.offset + spec.n]
    if len(rows) < spec.n:
        raise ValueError(f"Data {spec.kind!r} has only {len(rows)} examples from offset {spec.offset}; "
                         f"the config asks for {spec.n}. Lower n or offset.")
    return rows


def statistics_batches(tokenizer, examples: list[dict], seq_len: int, batch_size: int) -> list[dict]:
    """Prompt + response through the chat template, right-padded/truncated to ``seq_len`` tokens."""
    from .evaluate.generation import build_prompt

    texts = [build_prompt(tokenizer, ex["prompt"]) + ex["response"] for ex in examples]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], max_length=seq_len, truncation=True, padding=True,
                        add_special_tokens=False, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


#: Which statistics each init method needs, and on which side of the layers.
NEEDS_DATA = {"sc_lora": ("plus", "minus"), "corda_ipa": ("plus",), "corda_kpa": ("minus",)}


def statistics_side(method: str) -> str:
    return "input" if method.startswith("corda") else "output"


def cached_statistics(path: Path, model, tokenizer, examples: list[dict], *, seq_len: int, batch_size: int,
                      target_modules, normalize: str, side: str, show_progress: bool = True, desc: str = "statistics"):
    """Statistics of ``examples`` saved at ``path``: collected on first use, loaded afterwards."""
    from .statistics import CovarianceStats, collect_covariances

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        batches = statistics_batches(tokenizer, examples, seq_len, batch_size)
        collect_covariances(model, batches, target_modules, normalize, side=side, show_progress=show_progress,
                            desc=desc).save(path)
    return CovarianceStats.load(path)


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


# --- evaluation inside an experiment ------------------------------------------------------------------

EVALS = ("math_nll", "math_accuracy", "knowledge_logprob", "knowledge_em")


def evaluate_model(model, tokenizer, eval_sets: dict[str, list[dict]], batch_size: int = 8) -> dict:
    """Utility and preservation metrics. NLL / log-prob ones are forward passes only (cheap, smooth);
    accuracy / exact match generate."""
    from .evaluate.generation import build_prompt
    from .evaluate.knowledge import prompt as knowledge_prompt
    from .evaluate.likelihood import best_answer_logprobs, continuation_logprobs
    from .evaluate.suites import evaluate_knowledge, evaluate_math

    metrics: dict[str, float] = {}
    for name, items in eval_sets.items():
        start = time.perf_counter()
        if name == "math_nll":
            scores = continuation_logprobs(model, tokenizer, [build_prompt(tokenizer, it["prompt"]) for it in items],
                                           [it["response"] for it in items], batch_size=batch_size, show_progress=False)
            metrics["math_nll"] = sum(-s / n for s, n in scores) / len(scores)
        elif name == "math_accuracy":
            res = evaluate_math(model, tokenizer, [{"question": it["prompt"], "solution": it["response"],
                                                    "answer": it["answer"]} for it in items],
                                limit=None, batch_size=batch_size, show_progress=False)
            metrics["math_accuracy"] = res.metrics["accuracy"]
        elif name == "knowledge_logprob":
            best = best_answer_logprobs(model, tokenizer, [knowledge_prompt(it["question"]) for it in items],
                                        [it["answers"] for it in items], batch_size=batch_size, show_progress=False)
            metrics["knowledge_logprob"] = sum(best) / len(best)
        elif name == "knowledge_em":
            res = evaluate_knowledge(model, tokenizer, [{"question": it["question"], "answers": it["answers"]}
                                                        for it in items], limit=len(items) - 5, num_fewshot=5,
                                     batch_size=batch_size, show_progress=False)
            metrics["knowledge_em"] = res.metrics["exact_match"]
        metrics[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
    return metrics


# --- the runner -------------------------------------------------------------------------------------------


def run_name(run: dict) -> str:
    name = run.get("name") or run["method"]
    if "name" not in run and run.get("beta") is not None:
        name += f"-beta{run['beta']}"
    if "name" not in run and run.get("learning_rate") is not None:
        name += f"-lr{run['learning_rate']}"
    return name


def run_experiment(config: ExperimentConfig, output_dir: str | os.PathLike, *, show_progress: bool = True) -> list[dict]:
    """Run every configured run (skipping finished ones), write results.json / results.md, return rows."""
    from . import init_model
    from .models import load_model
    from .train import TrainConfig, train

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "config.yaml", yaml.safe_dump(_as_plain(config), sort_keys=False))
    dtype = getattr(torch, config.dtype)
    base, tokenizer = load_model(config.model, dtype=dtype)

    sets = {"plus": build_examples(config.plus, config.seed), "minus": build_examples(config.minus, config.seed),
            "train": build_examples(config.train_data, config.seed)}
    eval_sets = {}
    for name, spec in config.evaluate.items():
        if name not in EVALS:
            raise ValueError(f"Unknown evaluation {name!r}; choose from {EVALS}.")
        eval_sets[name] = build_examples(_strict(DataSpec, spec, f"evaluate.{name}"), config.seed)
    check_disjoint({**sets, **eval_sets})

    def stats(label: str, side: str):
        return cached_statistics(out / "stats" / f"{label}-{side}-{config.normalize}.safetensors", base, tokenizer,
                                 sets[label], seq_len=config.stats_seq_len, batch_size=config.stats_batch_size,
                                 target_modules=config.target_modules, normalize=config.normalize, side=side,
                                 show_progress=show_progress, desc=f"{label} statistics")

    results_path = out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {row["run"] for row in rows}
    if "base" not in done:
        rows.append({"run": "base", "method": "-", **evaluate_model(base, tokenizer, eval_sets)})
        _write_results(out, rows)
    for run in config.runs:
        name = run_name(run)
        if name in done:
            continue
        method = run["method"]
        model, _ = load_model(config.model, dtype=dtype)
        start = time.perf_counter()
        needed, side = NEEDS_DATA.get(method, ()), statistics_side(method)
        plus = stats("plus", side) if "plus" in needed else None
        minus = stats("minus", side) if "minus" in needed else None
        overrides = {k: v for k, v in dict(r=config.r, lora_alpha=config.lora_alpha, normalize=config.normalize,
                                           target_modules=config.target_modules, beta=run.get("beta")).items()
                     if v is not None}
        model = init_model(model, method=method, plus=plus, minus=minus, show_progress=show_progress, **overrides)
        init_seconds = time.perf_counter() - start
        train_config = TrainConfig.from_dict({**config.train, **({"learning_rate": run["learning_rate"]}
                                                                 if run.get("learning_rate") else {})})
        result = train(model, tokenizer, sets["train"], train_config, out / "runs" / name, show_progress=show_progress)
        row = {
            "run": name, "method": method, "beta": run.get("beta"), "learning_rate": train_config.learning_rate,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "init_seconds": round(init_seconds, 1), "train_seconds": round(result.train_seconds, 1),
            "train_tokens_per_second": round(result.tokens_per_second, 1), "final_loss": result.final_loss,
            "loss_history": result.loss_history,
            **evaluate_model(model, tokenizer, eval_sets),
        }
        rows.append(row)
        _write_results(out, rows)
    return rows


def results_table(rows: list[dict]) -> str:
    metric_keys = [k for k in ("math_nll", "math_accuracy", "knowledge_logprob", "knowledge_em")
                   if any(k in r for r in rows)]
    header = ["run", "method", "beta", "lr", "trainable", "init s", "train s", "final loss", *metric_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["run"], r.get("method", "-"), _fmt(r.get("beta")), _fmt(r.get("learning_rate")),
                 f"{r['trainable_params']:,}" if r.get("trainable_params") else "-", _fmt(r.get("init_seconds")),
                 _fmt(r.get("train_seconds")), _fmt(r.get("final_loss")), *(_fmt(r.get(k)) for k in metric_keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_results(out: Path, rows: list[dict]) -> None:
    _atomic_write(out / "results.json", json.dumps(rows, indent=2) + "\n")
    _atomic_write(out / "results.md", results_table(rows) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _as_plain(config: ExperimentConfig) -> dict:
    return json.loads(json.dumps(asdict(copy.deepcopy(config))))
