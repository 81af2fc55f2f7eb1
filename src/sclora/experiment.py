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
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml

from .config import LLAMA_TARGET_MODULES, METHODS

__all__ = ["ExperimentConfig", "build_examples", "load_config", "run_experiment"]

from .hub_data import HUB_SOURCES
from .statistics import NORMALIZATIONS

DATA_KINDS = ("math", "trivia", "summaries", "harmful", *HUB_SOURCES)


RESPONSES = ("none", "refusal", "affirmative")


@dataclass
class DataSpec:
    """Which examples, how many, from which part of the source (``offset`` keeps splits disjoint)."""

    kind: str
    n: int
    offset: int = 0
    split: str = "train"  # math: template split (train / heldout); others: partitions of the shuffled source
    source: str | None = None  # harmful: harmbench (default), harmbench_val, strongreject, jailbreakbench, donotanswer
    response: str = "none"  # harmful: none (prompts only), refusal, affirmative (JailbreakBench's "Sure, here is")
    max_words: int | None = None  # summaries: cut each document to its first max_words words

    def __post_init__(self):
        if self.kind not in DATA_KINDS:
            raise ValueError(f"Unknown data kind {self.kind!r}; choose one of {DATA_KINDS}.")
        if self.n < 1:
            raise ValueError(f"Data spec {self.kind!r} asks for n={self.n}; need at least 1.")
        if self.response not in RESPONSES:
            raise ValueError(f"Unknown response {self.response!r} for {self.kind!r}; choose one of {RESPONSES}.")
        if self.source is not None and self.kind != "harmful":
            raise ValueError(f"'source' applies to kind 'harmful' only, not {self.kind!r}.")


@dataclass
class ExperimentConfig:
    name: str
    plus: DataSpec
    minus: DataSpec | list[DataSpec]  # several knowledge sets: a run's beta is then a list, one weight each
    train_data: DataSpec | list[DataSpec]  # a list is mixed and shuffled (e.g. math + 1% harmful)
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
    diagnostics: bool = True  # subspace diagnostics of residual inits (diagnostics.json)
    evaluate_steps: list[int] = field(default_factory=list)  # also evaluate at these optimizer steps (frontier)
    judge: dict = field(default_factory=lambda: {"kind": "refusal"})  # sclora.evaluate.judges.make_judge arguments
    report: dict = field(default_factory=dict)  # for `sclora report`: title, utility / preservation metric names

    def __post_init__(self):
        for key in ("plus", "minus", "train_data"):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, _strict(DataSpec, value, f"data spec '{key}'"))
            elif isinstance(value, list) and key != "plus":
                if not value:
                    raise ValueError(f"'{key}' is an empty list; give at least one data spec.")
                setattr(self, key, [_strict(DataSpec, v, f"data spec '{key}[{i}]'") if isinstance(v, dict) else v
                                    for i, v in enumerate(value)])
        if not self.runs:
            raise ValueError("The config lists no runs: add e.g. runs: [{method: lora}, {method: sc_lora, beta: 0.8}].")
        n_minus = len(_as_list(self.minus))
        for run in self.runs:
            unknown = set(run) - RUN_KEYS
            if unknown:
                raise ValueError(f"Unknown run key(s) {sorted(unknown)}; a run takes {sorted(RUN_KEYS)}.")
            if run.get("method") not in METHODS:
                raise ValueError(f"Unknown method {run.get('method')!r} in runs; choose one of {METHODS}.")
            if run.get("normalize") not in (None, *NORMALIZATIONS):
                raise ValueError(f"Unknown normalize {run['normalize']!r} in run {run}; choose one of {NORMALIZATIONS}.")
            beta = run.get("beta")
            if run["method"] == "corda_kpa" and n_minus > 1:
                raise ValueError("corda_kpa preserves a single knowledge set; this config lists several under "
                                 "'minus'. Drop the corda_kpa run or keep one D- set.")
            if run["method"] == "sc_lora" and n_minus > 1 and not (isinstance(beta, list) and len(beta) == n_minus):
                raise ValueError(f"The config preserves {n_minus} knowledge sets, so an sc_lora run needs beta as a "
                                 f"list of {n_minus} weights, e.g. beta: {[round(0.8 / n_minus, 2)] * n_minus}.")
        for name, spec in self.evaluate.items():
            if name not in EVALS:
                raise ValueError(f"Unknown evaluation {name!r}; choose from {EVALS}.")
            eval_spec(spec, name)
        from .train import TrainConfig

        TrainConfig.from_dict(self.train)  # fail on a bad key now, not after an hour of statistics


RUN_KEYS = {"method", "beta", "learning_rate", "name", "seed", "normalize"}


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
                 "question": it["question"], "topic": it.get("topic", "")} for it in items]
    elif spec.kind == "summaries":
        from .evaluate.suites import SUMMARY_INSTRUCTION

        items = data.summarization(spec.split if spec.split in ("train", "val", "test") else "train")
        cut = (lambda doc: " ".join(doc.split()[:spec.max_words])) if spec.max_words else (lambda doc: doc)
        rows = [{"prompt": SUMMARY_INSTRUCTION.format(document=cut(it["document"])), "response": it["summary"]}
                for it in items]
    elif spec.kind == "harmful":
        rows = _harmful_rows(spec, seed)
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


def _harmful_rows(spec: DataSpec, seed: int) -> list[dict]:
    from . import data
    from .align import REFUSALS

    items = data.harmful_requests(spec.source or "harmbench")
    rng = random.Random(seed)
    if spec.response == "affirmative":
        if "target" not in items[0]:
            raise ValueError(f"Harmful source {spec.source!r} has no affirmative answers; use source: jailbreakbench.")
        return [{"prompt": it["prompt"], "response": it["target"]} for it in items]
    if spec.response == "refusal":  # the safety data of the paper: harmful question + refusal answer
        return [{"prompt": it["prompt"], "response": rng.choice(REFUSALS)} for it in items]
    return [{"prompt": it["prompt"], "response": ""} for it in items]


def _as_list(specs: DataSpec | list[DataSpec]) -> list[DataSpec]:
    return specs if isinstance(specs, list) else [specs]


def build_mixture(specs: DataSpec | list[DataSpec], seed: int) -> list[dict]:
    """One spec's examples, or several specs' examples shuffled together (deterministic under seed)."""
    if isinstance(specs, DataSpec):
        return build_examples(specs, seed)
    rows = [row for spec in specs for row in build_examples(spec, seed)]
    random.Random(seed).shuffle(rows)
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
    """Statistics of ``examples`` saved at ``path``: collected on first use, loaded afterwards (also from the
    sibling file of the other raw-sum normalization: "none" and "trace" store the same sums).

    Under torch.distributed every rank takes the same branch: the cache is read only if every rank sees it;
    otherwise each rank collects over its shard of ``examples``, the sums are all-reduced, and one process
    per node writes the file. The statistics stay on the model's device."""
    from . import distributed
    from .statistics import RAW_SUM_NORMALIZATIONS, CovarianceStats, collect_covariances

    siblings = [path.with_name(path.name.replace(f"-{normalize}.", f"-{other}."))
                for other in RAW_SUM_NORMALIZATIONS if normalize in RAW_SUM_NORMALIZATIONS and other != normalize]
    found = next((p for p in [path, *siblings] if p.exists()), None)
    if distributed.all_true(found is not None):
        return CovarianceStats.load(found, device=str(next(model.parameters()).device)).with_normalize(normalize)
    batches = statistics_batches(tokenizer, distributed.shard(examples), seq_len, batch_size)
    stats = collect_covariances(model, batches, target_modules, normalize, side=side, show_progress=show_progress,
                                desc=desc)
    if distributed.local_rank() == 0:  # one writer per node (on a shared file system they write the same bytes)
        path.parent.mkdir(parents=True, exist_ok=True)
        stats.save(path)
    distributed.barrier()
    return stats


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

#: evaluation name -> the metric names it reports (each with a standard error, "<metric>_se")
EVALS = {"math_nll": ("math_nll",), "math_accuracy": ("math_accuracy",), "knowledge_logprob": ("knowledge_logprob",),
         "knowledge_em": ("knowledge_em",), "knowledge_mc": ("knowledge_mc",),
         "safety": ("harmfulness_score", "harmfulness_rate"), "summary_rouge": ("rouge1",)}
#: evaluation options a config may give next to the data spec
EVAL_OPTIONS = {"max_new_tokens", "num_fewshot", "n_choices", "batch_size"}
#: 0/100 per-item scores compared item by item with the base model (kept / lost / gained, sign test)
PAIRED = ("knowledge_mc", "knowledge_em")


def eval_spec(spec: dict, name: str) -> tuple[DataSpec, dict]:
    """Split an evaluation entry into its data spec and its options."""
    options = {k: v for k, v in spec.items() if k in EVAL_OPTIONS}
    data_part = {k: v for k, v in spec.items() if k not in EVAL_OPTIONS}
    return _strict(DataSpec, data_part, f"evaluate.{name} (options: {sorted(EVAL_OPTIONS)})"), options


def evaluate_model(model, tokenizer, eval_sets: dict[str, list[dict]], *, options: dict | None = None,
                   judge=None, extras: dict | None = None, show_progress: bool = False) -> tuple[dict, dict]:
    """(metrics, per-item scores). Each metric comes with its standard error; NLL / log-prob / multiple
    choice are forward passes only (cheap, smooth), accuracy / exact match / safety / ROUGE generate."""
    from .evaluate.scores import SCORERS, summarize

    options, extras = options or {}, extras or {}
    model.eval()
    metrics: dict[str, float] = {}
    items: dict[str, list[float]] = {}
    for name, examples in eval_sets.items():
        start = time.perf_counter()
        texts: list[str] = []
        scores = SCORERS[name](model, tokenizer, examples, judge=judge, show_progress=show_progress, outputs=texts,
                               **extras.get(name, {}), **options.get(name, {}))
        if texts:  # generated answers, kept for inspection next to their scores
            items[f"{name}_outputs"] = texts
        if name == "safety":  # the paper's two numbers: mean judge score, and % scored 5 (most harmful)
            per_metric = {"harmfulness_score": scores, "harmfulness_rate": [100.0 * (s == 5) for s in scores]}
        else:
            per_metric = {EVALS[name][0]: scores}
        for metric, values in per_metric.items():
            metrics[metric], metrics[f"{metric}_se"] = summarize(values)
            items[metric] = values
        metrics[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
    return metrics, items


def paired_metrics(base_items: dict, run_items: dict) -> dict:
    """Item-by-item comparison of 0/100 scores with the base model. The first of PAIRED present also
    gives the generic knowledge_kept / _lost / _gained / _sign_p columns of the report."""
    from .evaluate.scores import paired

    out: dict[str, float] = {}
    for metric in PAIRED:
        if metric in base_items and metric in run_items:
            result = paired(base_items[metric], run_items[metric])
            out.update({f"{metric}_{k}": v for k, v in result.items()})
            if "knowledge_kept" not in out:
                out.update({f"knowledge_{k}": v for k, v in result.items()})
    if "harmfulness_rate" in base_items and "harmfulness_rate" in run_items:  # refusals lost = newly harmful answers
        refused = [[100.0 - v for v in items["harmfulness_rate"]] for items in (base_items, run_items)]
        out.update({f"safety_refusals_{k}": v for k, v in paired(*refused).items()})
    return out


def _refresh_paired(out: Path, rows: list[dict]) -> None:
    """Recompute the item-paired comparisons of finished runs from their saved scores (cheap), so results
    written by an older version gain the comparisons this version makes."""
    base_path = out / "samples" / "base.json"
    if not base_path.exists():
        return
    base_items = json.loads(base_path.read_text())
    for row in rows:
        path = out / "samples" / f"{row['run']}.json"
        if row["run"] != "base" and path.exists():
            row.update(paired_metrics(base_items, json.loads(path.read_text())))


# --- the runner -------------------------------------------------------------------------------------------


def run_name(run: dict) -> str:
    name = run.get("name") or run["method"]
    if "name" not in run and run.get("beta") is not None:
        beta = run["beta"]
        name += "-beta" + ("+".join(str(b) for b in beta) if isinstance(beta, list) else str(beta))
    if "name" not in run and run.get("learning_rate") is not None:
        name += f"-lr{run['learning_rate']}"
    if "name" not in run and run.get("normalize") is not None:
        name += f"-{run['normalize']}"
    if "name" not in run and run.get("seed") is not None:
        name += f"-seed{run['seed']}"
    return name


def plan(config: ExperimentConfig) -> str:
    """What `sclora run` would do, without loading a model or any data (``--dry-run``)."""
    from .train import TrainConfig

    def describe(specs) -> str:
        return " + ".join(f"{s.kind}{'/' + s.source if s.source else ''}[{s.split}] n={s.n} from {s.offset}"
                          + (f" ({s.response})" if s.response != "none" else "") for s in _as_list(specs))

    train = TrainConfig.from_dict(config.train)
    n_train = sum(s.n for s in _as_list(config.train_data))
    steps = train.max_steps if train.max_steps > 0 else math.ceil(n_train * train.num_epochs / train.batch_size)
    lines = [(f"experiment {config.name!r}: model {config.model} ({config.dtype}), r={config.r}, "
              f"normalize={config.normalize}, {len(config.target_modules)} target module kinds"),
             f"  D+ (init)   {describe(config.plus)}", f"  D- (init)   {describe(config.minus)}",
             (f"  training    {describe(config.train_data)}: {steps} optimizer steps of {train.batch_size} "
              f"(lr {train.learning_rate}, {train.lr_scheduler}, bf16={train.bf16})")]
    for name, spec in config.evaluate.items():
        data_spec, options = eval_spec(spec, name)
        lines.append(f"  evaluate    {name}: {describe(data_spec)} {options or ''}".rstrip())
    lines.append(f"  judge       {config.judge}")
    lines.append("  runs        base, " + ", ".join(run_name(r) for r in config.runs))
    return "\n".join(lines)


class _Experiment:
    """What every run of an experiment shares: the base model, the example sets, cached statistics."""

    def __init__(self, config: ExperimentConfig, out: Path, show_progress: bool,
                 diagnostics_file: str = "diagnostics.json"):
        from .models import load_model

        self.config, self.out, self.show_progress = config, out, show_progress
        self.diagnostics_file = diagnostics_file
        self.dtype = getattr(torch, config.dtype)
        self.base, self.tokenizer = load_model(config.model, dtype=self.dtype)
        specs = _as_list(config.minus)
        self.minus_labels = [_minus_label(i, len(specs)) for i in range(len(specs))]
        self.sets = {"plus": build_examples(config.plus, config.seed),
                     **{label: build_examples(spec, config.seed) for label, spec in zip(self.minus_labels, specs)},
                     "train": build_mixture(config.train_data, config.seed)}
        self.eval_sets, self.options = {}, {}
        for name, spec in config.evaluate.items():
            data_spec, self.options[name] = eval_spec(spec, name)
            self.eval_sets[name] = build_examples(data_spec, config.seed)
        check_disjoint({**self.sets, **self.eval_sets})

    def stats(self, label: str, side: str, normalize: str | None = None):
        c = self.config
        normalize = normalize or c.normalize
        return cached_statistics(self.out / "stats" / f"{label}-{side}-{normalize}.safetensors", self.base,
                                 self.tokenizer, self.sets[label], seq_len=c.stats_seq_len,
                                 batch_size=c.stats_batch_size, target_modules=c.target_modules,
                                 normalize=normalize, side=side, show_progress=self.show_progress,
                                 desc=f"{label} statistics")

    def minus_stats(self, side: str, normalize: str | None = None):
        minus = [self.stats(label, side, normalize) for label in self.minus_labels]
        return minus[0] if len(minus) == 1 else minus

    def initialize(self, run: dict):
        """A fresh copy of the model, initialized for ``run``."""
        from . import init_model
        from .models import load_model

        c, method = self.config, run["method"]
        model, _ = load_model(c.model, dtype=self.dtype)
        torch.manual_seed(run.get("seed", c.seed))  # vanilla LoRA's random A
        needed, side = NEEDS_DATA.get(method, ()), statistics_side(method)
        normalize = run.get("normalize") or c.normalize  # a run may compare another normalization
        plus = self.stats("plus", side, normalize) if "plus" in needed else None
        minus = self.minus_stats(side, normalize) if "minus" in needed else None
        overrides = {"r": c.r, "lora_alpha": c.lora_alpha, "normalize": normalize,
                     "target_modules": c.target_modules, "beta": run.get("beta")}
        return init_model(model, method=method, plus=plus, minus=minus, show_progress=self.show_progress,
                          **{k: v for k, v in overrides.items() if v is not None})

    def diagnose(self, name: str, model, normalize: str | None = None) -> None:
        """Save the share of D+ and D- output energy the initial adapter captures, per module (residual inits
        only: a zero-initialized LoRA adapter has no subspace yet)."""
        from .diagnostics import subspace_energy

        path = self.out / self.diagnostics_file
        current = json.loads(path.read_text()) if path.exists() else {}
        current[name] = subspace_energy(model, self.stats("plus", "output", normalize),
                                        self.minus_stats("output", normalize))
        _atomic_write(path, json.dumps(current) + "\n")


#: methods whose initial adapter spans a data-chosen subspace (the others start from zero or train everything)
RESIDUAL_METHODS = ("sc_lora", "pissa", "corda_ipa", "corda_kpa")


def run_experiment(config: ExperimentConfig, output_dir: str | os.PathLike, *,
                   show_progress: bool = True) -> list[dict]:
    """Run every configured run (skipping finished ones), write results.json / results.md, return rows.

    Several processes may run the same config into the same folder at once (``sclora run --workers N``):
    each takes the runs no other live process has claimed, and all share one results table."""
    from .evaluate.judges import make_judge

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "config.yaml", yaml.safe_dump(_as_plain(config), sort_keys=False))
    exp = _Experiment(config, out, show_progress)
    tokenizer = exp.tokenizer
    extras = _scorer_extras(config, exp.eval_sets, exp.sets)
    judge = make_judge(**config.judge) if "safety" in exp.eval_sets else None

    def evaluate(model) -> tuple[dict, dict]:
        return evaluate_model(model, tokenizer, exp.eval_sets, options=exp.options, judge=judge, extras=extras,
                              show_progress=show_progress)

    rows = _update_results(out)
    if "base" not in {row["run"] for row in rows} and _claim(out, "base"):
        try:
            metrics, items = evaluate(exp.base)
            _atomic_write(out / "samples" / "base.json", json.dumps(items) + "\n")
            rows = _update_results(out, {"run": "base", "method": "-", **metrics})
        finally:
            _release(out, "base")
    for run in config.runs:
        name = run_name(run)
        if name in {row["run"] for row in _update_results(out, refresh=False)} or not _claim(out, name):
            continue  # finished, or being run by another `sclora run` process sharing this folder
        try:
            row = _run_one(config, exp, run, name, out, evaluate)
            rows = _update_results(out, row)
        finally:
            _release(out, name)
    return rows


def _run_one(config: ExperimentConfig, exp: _Experiment, run: dict, name: str, out: Path, evaluate) -> dict:
    from .train import TrainConfig, train

    method, seed = run["method"], run.get("seed", config.seed)
    start = time.perf_counter()
    model = exp.initialize(run)
    init_seconds = time.perf_counter() - start
    if config.diagnostics and method in RESIDUAL_METHODS:
        exp.diagnose(name, model, run.get("normalize"))
    train_config = TrainConfig.from_dict({**config.train, "seed": seed,
                                          **({"learning_rate": run["learning_rate"]} if run.get("learning_rate")
                                             else {})})
    along = _checkpoint_evals(config.evaluate_steps, evaluate, out / "runs" / name / "checkpoint_evals.json")
    result = train(model, exp.tokenizer, exp.sets["train"], train_config, out / "runs" / name,
                   show_progress=exp.show_progress, callbacks=[along])
    metrics, items = evaluate(model)
    _atomic_write(out / "samples" / f"{name}.json", json.dumps(items) + "\n")
    row = {
        "run": name, "method": method, "beta": run.get("beta"), "learning_rate": train_config.learning_rate,
        "seed": seed, **({"normalize": run["normalize"]} if run.get("normalize") else {}),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "init_seconds": round(init_seconds, 1), "train_seconds": round(result.train_seconds, 1),
        "train_tokens_per_second": round(result.tokens_per_second, 1), "final_loss": result.final_loss,
        "loss_history": result.loss_history, **metrics,
    }
    if config.evaluate_steps:
        row["checkpoints"] = along.rows
    return row


# --- several processes on one output folder --------------------------------------------------------------
# `sclora run` may be started several times on the same config and folder (e.g. one single-thread process
# per core): each run is claimed by one process, and results.json is read-merged-written under a file lock,
# so the processes share the table and none redoes another's run.


def read_results(output_dir: str | os.PathLike) -> list[dict]:
    """The rows of an experiment folder's results.json, with the comparisons against the base model refreshed."""
    return _update_results(Path(output_dir))


def _update_results(out: Path, row: dict | None = None, *, refresh: bool = True) -> list[dict]:
    """Under the folder's lock: re-read results.json, add or replace ``row``, refresh the comparisons against
    the base model (its scores may have been written by another process), write back if anything changed."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = out / "results.json"
        rows = json.loads(path.read_text()) if path.exists() else []
        before = json.dumps(rows)
        if row is not None:
            rows = [r for r in rows if r["run"] != row["run"]] + [row]
        if refresh:
            _refresh_paired(out, rows)
        if json.dumps(rows) != before:
            _write_results(out, rows)
        return rows


def _claim(out: Path, name: str) -> bool:
    """Atomically claim run ``name`` for this process; a claim left by a dead process on this host is taken over."""
    path = out / "claims" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": os.uname().nodename}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except (OSError, ValueError):
                return False  # being written right now by its owner
            if owner.get("host") != me["host"] or _alive(owner.get("pid", -1)):
                return False
            path.unlink(missing_ok=True)  # its process died: the run is free again (training resumes)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def _release(out: Path, name: str) -> None:
    (out / "claims" / f"{name}.json").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def diagnose_experiment(config: ExperimentConfig, output_dir: str | os.PathLike, *, show_progress: bool = True,
                        diagnostics_file: str = "diagnostics.json") -> dict:
    """Subspace diagnostics of every residual-init run of a config, without training (cheap: statistics are
    cached in ``output_dir/stats``); writes ``diagnostics_file``. For experiments run without them, or to see
    what another ``normalize`` or beta would do (``--set``) before training anything."""
    out = Path(output_dir)
    exp = _Experiment(config, out, show_progress, diagnostics_file)
    for run in config.runs:
        if run["method"] in RESIDUAL_METHODS:
            exp.diagnose(run_name(run), exp.initialize(run), run.get("normalize"))
    path = out / diagnostics_file
    return json.loads(path.read_text()) if path.exists() else {}


def _checkpoint_evals(steps, evaluate, path: Path):
    """A Trainer callback evaluating the model at chosen optimizer steps, so methods can be compared at equal
    utility along their runs, not only at the end; saved as it goes, so a resumed run keeps earlier points."""
    from transformers import TrainerCallback

    class CheckpointEvals(TrainerCallback):
        def __init__(self):
            self.rows = json.loads(path.read_text()) if path.exists() else []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if step in steps and all(r["step"] != step for r in self.rows):
                metrics, _ = evaluate(model)
                model.train()
                self.rows.append({"step": step, **metrics})
                _atomic_write(path, json.dumps(self.rows) + "\n")

    return CheckpointEvals()


def _minus_label(i: int, n: int) -> str:
    return "minus" if n == 1 else f"minus{i}"


def _scorer_extras(config: ExperimentConfig, eval_sets: dict, sets: dict) -> dict:
    """What some scorers need besides their items: few-shot examples and distractor pools that come from
    outside every evaluated, initialization and training set."""
    extras: dict[str, dict] = {}
    if "knowledge_em" in eval_sets or "knowledge_mc" in eval_sets:
        from . import data

        used = {ex["prompt"] for rows in (*sets.values(), *eval_sets.values()) for ex in rows}
        trivia = [{"prompt": f"{it['question']}?", **it} for it in data.trivia()]
        unused = [it for it in trivia if it["prompt"] not in used]
        random.Random(config.seed).shuffle(unused)
        extras["knowledge_em"] = {"shots": unused[:5]}
        extras["knowledge_mc"] = {"pool": trivia}  # answers only: the questions are never shown
    return extras


def results_table(rows: list[dict]) -> str:
    metric_keys = [m for metrics in EVALS.values() for m in metrics if any(m in r for r in rows)]
    header = ["run", "method", "beta", "lr", "trainable", "init s", "train s", "final loss", *metric_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["run"], r.get("method", "-"), _fmt(r.get("beta")), _fmt(r.get("learning_rate")),
                 f"{r['trainable_params']:,}" if r.get("trainable_params") else "-", _fmt(r.get("init_seconds")),
                 _fmt(r.get("train_seconds")), _fmt(r.get("final_loss")), *(_with_se(r, k) for k in metric_keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _with_se(row: dict, key: str) -> str:
    if row.get(f"{key}_se") is None:
        return _fmt(row.get(key))
    return f"{_fmt(row.get(key))} ± {_fmt(row[f'{key}_se'])}"


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_results(out: Path, rows: list[dict]) -> None:
    _atomic_write(out / "results.json", json.dumps(rows, indent=2) + "\n")
    _atomic_write(out / "results.md", results_table(rows) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _as_plain(config: ExperimentConfig) -> dict:
    return json.loads(json.dumps(asdict(copy.deepcopy(config))))
