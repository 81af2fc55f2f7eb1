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
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml

from ..config import LLAMA_TARGET_MODULES, METHODS

__all__ = ["ExperimentConfig", "build_examples", "load_config", "run_experiment"]

from ..fileio import atomic_write, digest, locked, parse_yaml, safe_name, update_json
from ..statistics import NORMALIZATIONS
from ..statistics_cache import NEEDS_DATA, cached_statistics, statistics_side
from .data import HARMFUL_SOURCES
from .evaluate.metrics import EVALUATIONS
from .hub_data import HUB_SOURCES
from .prompts import REFUSALS, SUMMARY_INSTRUCTION

DATA_KINDS = ("math", "trivia", "summaries", "harmful", *HUB_SOURCES)


RESPONSES = ("none", "refusal", "affirmative")
#: the splits each built-in kind has (math: template split; summaries: ACLSum's files; the others: one pool,
#: partitioned by offset); hub kinds take the hub's split names
SPLITS = {"math": ("train", "heldout"), "summaries": ("train", "val", "test"), "trivia": ("train",),
          "harmful": ("train",)}
DTYPES = ("float32", "bfloat16", "float16")


def check_int(value, what: str, low: int) -> int:
    """``value`` if it is an integer >= ``low`` (not a bool), else a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}.")
    return value


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
        check_int(self.n, f"n of data spec {self.kind!r}", 1)
        check_int(self.offset, f"offset of data spec {self.kind!r}", 0)
        splits = SPLITS.get(self.kind)
        if not isinstance(self.split, str) or not self.split or (splits and self.split not in splits):
            raise ValueError(f"split of data spec {self.kind!r} must be one of {splits or 'the hub split names'}, "
                             f"got {self.split!r}.")
        if self.response not in RESPONSES:
            raise ValueError(f"Unknown response {self.response!r} for {self.kind!r}; choose one of {RESPONSES}.")
        if self.source is not None and self.kind != "harmful":
            raise ValueError(f"'source' applies to kind 'harmful' only, not {self.kind!r}.")
        if self.source is not None and self.source not in HARMFUL_SOURCES:
            raise ValueError(f"source of data spec 'harmful' must be one of {HARMFUL_SOURCES}, got {self.source!r}.")
        if self.max_words is not None:
            check_int(self.max_words, f"max_words of data spec {self.kind!r}", 1)


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
        self._validate()

    def _validate(self) -> None:
        """Every value checked before anything is loaded: the key, the value and the allowed range are named."""
        from ..config import SCLoRAConfig
        from ..models import check_model
        from ..train import TrainConfig

        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}.")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a local path, a hub id or {'smollm2-135m-instruct'!r}, got {self.model!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}.")
        check_int(self.seed, "seed", 0)
        check_int(self.stats_seq_len, "stats_seq_len", 2)
        check_int(self.stats_batch_size, "stats_batch_size", 1)
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}.")
        for key in ("diagnostics",):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}.")
        if not isinstance(self.evaluate_steps, list):
            raise ValueError(f"evaluate_steps must be a list of optimizer steps, got {self.evaluate_steps!r}.")
        for step in self.evaluate_steps:
            check_int(step, "evaluate_steps entry", 1)
        for key in ("train", "evaluate", "judge", "report"):
            if not isinstance(getattr(self, key), dict):
                raise ValueError(f"{key} must be a mapping, got {getattr(self, key)!r}.")
        for key in ("plus", "minus", "train_data"):
            if not all(isinstance(spec, DataSpec) for spec in _as_list(getattr(self, key))):
                raise ValueError(f"{key} must be a data spec such as {{kind: math, n: 64}} (or a list of them for "
                                 f"minus / train_data), got {getattr(self, key)!r}.")
        if not isinstance(self.runs, list) or not self.runs:
            raise ValueError("The config lists no runs: add e.g. runs: [{method: lora}, {method: sc_lora, beta: 0.8}].")
        n_minus = len(_as_list(self.minus))
        names = set()
        for run in self.runs:
            if not isinstance(run, dict):
                raise ValueError(f"Each entry of runs must be a mapping such as {{method: lora}}, got {run!r}.")
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
            if isinstance(beta, list) and len(beta) != n_minus:
                raise ValueError(f"run {run}: beta lists {len(beta)} weight(s) but the config has {n_minus} knowledge "
                                 "set(s) under 'minus': give one beta per set (a number for one set).")
            if run.get("seed") is not None:
                check_int(run["seed"], f"seed of run {run}", 0)
            if "name" in run:
                safe_name(run["name"], "run name")
            name = safe_name(run_name(run), f"run name (from {run})")
            if name in names or name == "base":
                raise ValueError(f"Two runs are named {name!r} ('base' is the untrained model): give each a distinct "
                                 "'name', e.g. name: sc_lora-b08-seed1.")
            names.add(name)
            try:  # the init's own checks (r, lora_alpha, beta range, ...), for this run's values
                SCLoRAConfig(method=run["method"], r=self.r, lora_alpha=self.lora_alpha,
                             normalize=run.get("normalize") or self.normalize, target_modules=self.target_modules,
                             **({"beta": beta} if beta is not None else {}))
            except ValueError as err:
                raise ValueError(f"run {name!r}: {err}") from None
            try:
                TrainConfig.from_dict({**self.train, **({"learning_rate": run["learning_rate"]}
                                                        if run.get("learning_rate") is not None else {})})
            except ValueError as err:
                raise ValueError(f"run {name!r}: {err}") from None
        for name, spec in self.evaluate.items():
            if name not in EVALUATIONS:
                raise ValueError(f"Unknown evaluation {name!r}; choose from {sorted(EVALUATIONS)}.")
            if not isinstance(spec, dict):
                raise ValueError(f"evaluate.{name} must be a mapping such as {{kind: math, n: 60}}, got {spec!r}.")
            eval_spec(spec, name)
        _check_judge(self.judge)
        check_model(self.model)


JUDGE_KINDS = {"refusal": (), "llm": ("base_url", "model"), "local": ("path",)}


def _check_judge(judge: dict) -> None:
    """The judge settings, checked without loading a judge model or calling an endpoint."""
    kind = judge.get("kind")
    if kind not in JUDGE_KINDS:
        raise ValueError(f"judge.kind must be one of {tuple(JUDGE_KINDS)}, got {kind!r}.")
    missing = [k for k in JUDGE_KINDS[kind] if not judge.get(k)]
    if missing:
        raise ValueError(f"judge of kind {kind!r} needs {missing}, e.g. judge: {{kind: llm, base_url: "
                         "https://api.deepseek.com/v1, model: deepseek-chat}.")
    if kind == "llm":  # cheap to build: checks the URL scheme and the options, makes no request
        from .evaluate.judges import make_judge

        try:
            make_judge(**judge)
        except TypeError as err:
            raise ValueError(f"judge: {err}") from None
    if kind == "local" and not Path(str(judge["path"])).expanduser().is_dir():
        raise FileNotFoundError(f"judge.path {judge['path']!r} is not a model folder; give the path of a local "
                                "causal LM (a folder with config.json).")


RUN_KEYS = {"method", "beta", "learning_rate", "name", "seed", "normalize"}


def _strict(cls, data: dict, what: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in {what}; valid keys are {sorted(known)}.")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{what} lacks the key(s) {missing}; it needs {required}.")
    return cls(**data)


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> ExperimentConfig:
    """Read and validate an experiment config; ``overrides`` replace top-level keys (``--set``)."""
    try:
        data = parse_yaml(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config keys (name, model, plus, minus, ...).")
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

#: evaluation options a config may give next to the data spec
EVAL_OPTIONS = {"max_new_tokens", "num_fewshot", "n_choices", "batch_size"}
#: 0/100 per-item scores compared item by item with the base model (kept / lost / gained, sign test)
PAIRED = ("knowledge_mc", "knowledge_em")


def eval_spec(spec: dict, name: str) -> tuple[DataSpec, dict]:
    """Split an evaluation entry into its data spec and its options."""
    options = {k: v for k, v in spec.items() if k in EVAL_OPTIONS}
    for key, value in options.items():
        check_int(value, f"evaluate.{name}.{key}", 0 if key == "num_fewshot" else 1)
    if name == "knowledge_mc" and "n_choices" in options:
        check_int(options["n_choices"], f"evaluate.{name}.n_choices", 2)
    data_part = {k: v for k, v in spec.items() if k not in EVAL_OPTIONS}
    return _strict(DataSpec, data_part, f"evaluate.{name} (options: {sorted(EVAL_OPTIONS)})"), options


def evaluate_model(model, tokenizer, eval_sets: dict[str, list[dict]], *, options: dict | None = None,
                   judge=None, extras: dict | None = None, show_progress: bool = False) -> tuple[dict, dict]:
    """(metrics, per-item scores). Each metric comes with its standard error; NLL / log-prob / multiple
    choice are forward passes only (cheap, smooth), accuracy / exact match / safety / ROUGE generate."""
    from .evaluate.scores import summarize

    options, extras = options or {}, extras or {}
    model.eval()
    metrics: dict[str, float] = {}
    items: dict[str, list[float]] = {}
    for name, examples in eval_sets.items():
        start = time.perf_counter()
        texts: list[str] = []
        scores = EVALUATIONS[name].scorer(model, tokenizer, examples, judge=judge, show_progress=show_progress, outputs=texts,
                               **extras.get(name, {}), **options.get(name, {}))
        if texts:  # generated answers, kept for inspection next to their scores
            items[f"{name}_outputs"] = texts
        if name == "safety":  # the paper's two numbers: mean judge score, and % scored 5 (most harmful)
            per_metric = {"harmfulness_score": scores, "harmfulness_rate": [100.0 * (s == 5) for s in scores]}
        else:
            per_metric = {EVALUATIONS[name].metrics[0]: scores}
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
    from ..train import TrainConfig

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
        from ..models import load_model

        self.config, self.out, self.show_progress = config, out, show_progress
        self.diagnostics_file = diagnostics_file
        self.dtype = getattr(torch, config.dtype)
        specs = _as_list(config.minus)
        self.minus_labels = [_minus_label(i, len(specs)) for i in range(len(specs))]
        self.sets = {"plus": build_examples(config.plus, config.seed),
                     **{label: build_examples(spec, config.seed) for label, spec in zip(self.minus_labels, specs)},
                     "train": build_mixture(config.train_data, config.seed)}
        self.eval_sets, self.options = {}, {}
        for name, spec in config.evaluate.items():
            data_spec, self.options[name] = eval_spec(spec, name)
            self.eval_sets[name] = build_examples(data_spec, config.seed)
        check_disjoint({**self.sets, **self.eval_sets})  # data problems (too few rows, overlaps) before the model
        self.base, self.tokenizer = load_model(config.model, dtype=self.dtype)

    def stats(self, label: str, side: str, normalize: str | None = None):
        c = self.config
        normalize = normalize or c.normalize
        return cached_statistics(self.out / "stats", label, self.base, self.tokenizer, self.sets[label],
                                 seq_len=c.stats_seq_len, batch_size=c.stats_batch_size,
                                 target_modules=c.target_modules, normalize=normalize, side=side,
                                 show_progress=self.show_progress)

    def minus_stats(self, side: str, normalize: str | None = None):
        minus = [self.stats(label, side, normalize) for label in self.minus_labels]
        return minus[0] if len(minus) == 1 else minus

    def initialize(self, run: dict):
        """A fresh copy of the model, initialized for ``run``."""
        from .. import init_model
        from ..models import load_model

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
        from ..diagnostics import subspace_energy

        path = self.out / self.diagnostics_file
        entry = subspace_energy(model, self.stats("plus", "output", normalize), self.minus_stats("output", normalize))
        update_json(path, name, entry)  # several workers add their runs' entries to one file


#: methods whose initial adapter spans a data-chosen subspace (the others start from zero or train everything)
RESIDUAL_METHODS = ("sc_lora", "pissa", "corda_ipa", "corda_kpa")


def run_experiment(config: ExperimentConfig, output_dir: str | os.PathLike, *,
                   show_progress: bool = True, archive: bool = False) -> list[dict]:
    """Run every configured run (skipping finished ones), write results.json / results.md, return rows.

    A folder that holds results, checkpoints or a config.yaml made with other settings is refused before
    anything is loaded (:class:`StaleResultsError`, listing old and new values); ``archive=True`` moves them
    to ``output_dir/archive/<time>/`` first. Several processes may run the same config into the same folder
    at once (``sclora run --workers N``): each takes the runs no other live process holds (a claim is a lock
    the kernel drops when its process dies), and all share one results table."""
    from .evaluate.judges import make_judge

    out = Path(output_dir)
    model_files = check_folder(config, out, archive=archive)
    rows = _update_results(out)
    if {"base", *map(run_name, config.runs)} <= {row["run"] for row in rows}:
        return rows  # everything is done: no model or data to load
    exp = _Experiment(config, out, show_progress)
    tokenizer = exp.tokenizer
    extras = _scorer_extras(config, exp.eval_sets, exp.sets)
    judge = make_judge(**config.judge) if "safety" in exp.eval_sets else None

    def evaluate(model) -> tuple[dict, dict]:
        return evaluate_model(model, tokenizer, exp.eval_sets, options=exp.options, judge=judge, extras=extras,
                              show_progress=show_progress)

    def done(name: str) -> bool:
        return name in {row["run"] for row in _update_results(out, refresh=False)}

    for run in [None, *config.runs]:  # None: the base model
        name = "base" if run is None else run_name(run)
        if done(name):
            continue
        claim = _claim(out, name)
        if claim is None:
            continue  # being run by another `sclora run` process sharing this folder
        try:
            if done(name):  # finished by another process between the check and the claim
                continue
            if run is None:
                metrics, items = evaluate(exp.base)
                atomic_write(out / "samples" / "base.json", json.dumps(items) + "\n")
                row = {"run": "base", "method": "-", **metrics}
            else:
                row = _run_one(config, exp, run, name, out, evaluate, run_fingerprint(config, run, model_files))
            rows = _update_results(out, {**row, "fingerprint": run_fingerprint(config, run, model_files)})
        finally:
            _release(claim)
    return rows


#: config keys that change no result (names and presentation); every other key must match a folder's results
PRESENTATION_KEYS = ("name", "report", "diagnostics")


class StaleResultsError(ValueError):
    """An experiment folder holds results made with settings other than the config's."""


def experiment_key(config: ExperimentConfig | dict) -> dict:
    """The settings every row of an experiment folder depends on (all but the runs and presentation)."""
    plain = _as_plain(config) if isinstance(config, ExperimentConfig) else config
    return {k: v for k, v in plain.items() if k not in ("runs", *PRESENTATION_KEYS)}


def run_fingerprint(config: ExperimentConfig, run: dict | None, model_files: str | None) -> str:
    """Digest of everything a run's row and checkpoints depend on: the experiment's settings, the run's, and
    the model's files (:func:`sclora.models.model_identity`); ``run=None`` is the base model's row."""
    return digest({"experiment": experiment_key(config), "run": "base" if run is None else run,
                   "model_files": model_files})


def check_folder(config: ExperimentConfig, out: Path, *, archive: bool = False) -> str | None:
    """Refuse (or with ``archive`` move aside) whatever ``out`` holds that another config or other model files
    made; then record the config in ``out/config.yaml`` and the model files' identity in ``out/model.json``.
    Cheap: reads small JSON / YAML files and 2 MiB per model file. Returns that identity."""
    from ..models import model_identity

    model_files = model_identity(config.model)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out / "config.yaml"):
        changes = _stale(config, out, model_files)
        if changes and not archive:
            listed = "\n".join(f"  {c}" for c in changes[:20]) + (f"\n  ... {len(changes) - 20} more" if
                                                                     len(changes) > 20 else "")
            raise StaleResultsError(
                f"{out} holds results made with other settings than this config:\n{listed}\n"
                "Mixing them would give a table that claims settings it never ran. Use a new --output folder, or "
                f"rerun with --archive to move the old results to {out / 'archive'}/<time>/ and start afresh "
                "(cached statistics are kept: their file names carry a digest of what made them).")
        if changes:
            _archive(out)
        atomic_write(out / "config.yaml", yaml.safe_dump(_as_plain(config), sort_keys=False))
        atomic_write(out / MODEL_FILE, json.dumps({"model": config.model, "files": model_files}) + "\n")
    return model_files


#: the identity of the model files an experiment folder's results were made with
MODEL_FILE = "model.json"


def _stale(config: ExperimentConfig, out: Path, model_files: str | None) -> list[str]:
    """What in ``out`` was made with other settings: 'key: old -> new' lines (empty: all consistent)."""
    changes = []
    before = (_read(out / MODEL_FILE, json.loads) or {}).get("files", model_files)
    if before != model_files:
        changes.append(f"the files of model {config.model!r} changed (identity {before} -> {model_files})")
    old = _read(out / "config.yaml", parse_yaml) or {}
    if old:
        new_key, old_key = experiment_key(config), experiment_key(old)
        for key, value in new_key.items():
            # a key missing from an older version's config.yaml had that version's default: today's
            before = old_key[key] if key in old_key else _default(key)
            if before != value:
                changes.append(f"{key}: {_short(before)} -> {_short(value)}")
    runs = {run_name(r): r for r in config.runs}
    old_runs = {run_name(r): r for r in old.get("runs", []) if isinstance(r, dict)}
    for row in _read(out / "results.json", json.loads) or []:
        name = row.get("run")
        if name == "base" or name not in runs:
            continue  # their settings are the experiment's, compared above
        now = run_fingerprint(config, runs[name], model_files)
        run_changed = name in old_runs and old_runs[name] != runs[name]
        if run_changed or (row.get("fingerprint", now) != now and not changes):  # else: implied by a line above
            changes.append(f"run {name!r}: {_short(old_runs.get(name, 'other settings'))} -> {_short(runs[name])}")
    settings_changed = bool(changes)  # then every checkpoint is stale too: no need to list them
    for name, run in runs.items():
        record = _read(out / "runs" / name / "train_run.json", json.loads) or {}
        if "context" in record and record["context"] != run_fingerprint(config, run, model_files) and \
                not settings_changed and not any(f"run {name!r}" in c for c in changes):
            changes.append(f"run {name!r}: checkpoints in {out / 'runs' / name} were made with other settings")
    return changes


def _archive(out: Path) -> Path:
    """Move everything but the statistics cache, locks and earlier archives to ``out/archive/<time>/``."""
    import shutil

    target = out / "archive" / time.strftime("%Y%m%d-%H%M%S")
    target = target.with_name(target.name + f"-{os.getpid()}")
    target.mkdir(parents=True)
    for entry in out.iterdir():
        if entry.name in ("stats", "archive", "claims") or entry.name.endswith(".lock"):
            continue
        shutil.move(str(entry), str(target / entry.name))
    return target


def _read(path: Path, parse):
    try:
        return parse(path.read_text()) if path.exists() else None
    except (ValueError, yaml.YAMLError):
        return None


def _default(key: str):
    f = next(f for f in fields(ExperimentConfig) if f.name == key)
    return None if f.default is MISSING and f.default_factory is MISSING else json.loads(json.dumps(
        f.default if f.default_factory is MISSING else f.default_factory()))


def _short(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _run_one(config: ExperimentConfig, exp: _Experiment, run: dict, name: str, out: Path, evaluate,
             fingerprint: str) -> dict:
    from ..train import TrainConfig, train

    method, seed = run["method"], run.get("seed", config.seed)
    start = time.perf_counter()
    model = exp.initialize(run)
    init_seconds = time.perf_counter() - start
    if config.diagnostics and method in RESIDUAL_METHODS:
        exp.diagnose(name, model, run.get("normalize"))
    train_config = TrainConfig.from_dict({**config.train, "seed": seed,
                                          **({"learning_rate": run["learning_rate"]}
                                             if run.get("learning_rate") is not None else {})})
    along = _checkpoint_evals(config.evaluate_steps, evaluate, out / "runs" / name / "checkpoint_evals.json")
    result = train(model, exp.tokenizer, exp.sets["train"], train_config, out / "runs" / name,
                   show_progress=exp.show_progress, callbacks=[along], context=fingerprint)
    metrics, items = evaluate(model)
    atomic_write(out / "samples" / f"{name}.json", json.dumps(items) + "\n")
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
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    with locked(path):
        rows = json.loads(path.read_text()) if path.exists() else []
        before = json.dumps(rows)
        if row is not None:
            rows = [r for r in rows if r["run"] != row["run"]] + [row]
        if refresh:
            _refresh_paired(out, rows)
        if json.dumps(rows) != before:
            _write_results(out, rows)
        return rows


def _claim(out: Path, name: str):
    """An open, exclusively flock'ed ``claims/<name>.lock`` if no other process holds run ``name``, else None.

    The kernel drops the lock when its process exits or is killed, so a dead worker's run is free again at
    once: no PID to check (or be fooled by PID reuse), no take-over race, no unreadable claim to skip forever.
    The file is never unlinked (unlinking a lock file lets two processes lock two different files)."""
    import fcntl

    path = out / "claims" / f"{safe_name(name, 'run name')}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}) + "\n")  # for people only
    handle.flush()
    return handle


def _release(claim) -> None:
    import fcntl

    fcntl.flock(claim, fcntl.LOCK_UN)
    claim.close()


def running_elsewhere(out: Path, names: list[str]) -> list[str]:
    """The runs among ``names`` another live process holds right now."""
    busy = []
    for name in names:
        claim = _claim(out, name)
        if claim is None:
            busy.append(name)
        else:
            _release(claim)
    return busy


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
                atomic_write(path, json.dumps(self.rows) + "\n")

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
    metric_keys = [m for e in EVALUATIONS.values() for m in e.metrics if any(m in r for r in rows)]
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
    atomic_write(out / "results.json", json.dumps(rows, indent=2) + "\n")
    atomic_write(out / "results.md", results_table(rows) + "\n")


def _as_plain(config: ExperimentConfig) -> dict:
    return json.loads(json.dumps(asdict(copy.deepcopy(config))))
