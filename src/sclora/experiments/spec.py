"""An experiment config: its schema (``ExperimentConfig``, ``DataSpec``), its validation — every value checked
before anything is loaded, naming the key, the value and the allowed range — and its plan (``--dry-run``)."""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..config import LLAMA_TARGET_MODULES, METHODS, SCLoRAConfig
from ..data import DataSource, content_digest
from ..fileio import parse_yaml, safe_name
from ..registry import method_spec
from ..statistics import NORMALIZATIONS
from ..train import TrainConfig
from .data import HARMFUL_SOURCES, pydoc_source
from .evaluate.metrics import EVALUATIONS
from .hub_data import HUB_SOURCES

__all__ = [
    "DataSpec",
    "ExperimentConfig",
    "FileSpec",
    "as_list",
    "as_plain",
    "check_int",
    "data_spec",
    "eval_spec",
    "load_config",
    "minus_label",
    "plan",
    "run_init_config",
    "run_name",
    "run_normalize",
    "run_train_config",
]


DATA_KINDS = ("math", "trivia", "summaries", "pydoc", "harmful", *HUB_SOURCES)


RESPONSES = ("none", "refusal", "affirmative")


#: the splits each built-in kind has (math: template split; summaries: ACLSum's files; pydoc: partitions by a hash
#: of the qualified name; the others: one pool, partitioned by offset); hub kinds take the hub's split names
SPLITS = {"math": ("train", "heldout"), "summaries": ("train", "val", "test"), "pydoc": ("train", "val", "test"),
          "trivia": ("train",), "harmful": ("train",)}


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
    # harmful: harmbench (default), harmbench_val, strongreject, jailbreakbench, donotanswer; pydoc: the interpreter
    # whose docstrings are read, filled in (data.pydoc_source(), e.g. python3.11.7), so that it is part of the config
    source: str | None = None
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
        if self.kind == "pydoc":
            here = pydoc_source()
            if self.source is None:
                self.source = here
            elif self.source != here:
                raise ValueError(f"source of data spec 'pydoc' is the interpreter whose docstrings it reads, "
                                 f"{here!r} here, got {self.source!r}: the data differ between Python versions. Run "
                                 f"under {self.source} or drop source (this interpreter's data).")
        elif self.source is not None and self.kind != "harmful":
            raise ValueError(f"'source' applies to kinds 'harmful' and 'pydoc' only, not {self.kind!r}.")
        elif self.source is not None and self.source not in HARMFUL_SOURCES:
            raise ValueError(f"source of data spec 'harmful' must be one of {HARMFUL_SOURCES}, got {self.source!r}.")
        if self.max_words is not None:
            check_int(self.max_words, f"max_words of data spec {self.kind!r}", 1)


@dataclass(frozen=True)
class FileSpec(DataSource):
    """A user's file as a data set in a config (``{path: qa.csv, prompt: question, response: answer, n: 256}``, the
    keys of :class:`sclora.data.DataSource`), with the sha256 of its contents, computed when the config is read:
    a results folder made from other contents at the same path is stale."""

    sha256: str | None = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "sha256", content_digest(self.path))


def data_spec(value: dict, what: str) -> DataSpec | FileSpec:
    """A catalogue spec (``{kind: math, n: 64}``) or, with ``path``, a user's file."""
    return _strict(FileSpec if "path" in value else DataSpec, value, what)


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
    # arguments of sclora.experiments.evaluate.judges.make_judge
    judge: dict = field(default_factory=lambda: {"kind": "refusal"})
    report: dict = field(default_factory=dict)  # for `sclora report`: title, utility / preservation metric names

    def __post_init__(self):
        for key in ("plus", "minus", "train_data"):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, data_spec(value, f"data spec '{key}'"))
            elif isinstance(value, list) and key != "plus":
                if not value:
                    raise ValueError(f"'{key}' is an empty list; give at least one data spec.")
                setattr(self, key, [data_spec(v, f"data spec '{key}[{i}]'") if isinstance(v, dict) else v
                                    for i, v in enumerate(value)])
        if isinstance(self.evaluate, dict):  # a pydoc set records its interpreter here too, as DataSpec does above
            self.evaluate = {name: {**spec, "source": pydoc_source()} if isinstance(spec, dict) and
                             spec.get("kind") == "pydoc" and spec.get("source") is None else spec
                             for name, spec in self.evaluate.items()}
        self._validate()

    def _validate(self) -> None:
        """Every value checked before anything is loaded: the key, the value and the allowed range are named."""
        from ..models import check_model

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
            if not all(isinstance(spec, (DataSpec, FileSpec)) for spec in as_list(getattr(self, key))):
                raise ValueError(f"{key} must be a data spec such as {{kind: math, n: 64}} or a file such as "
                                 f"{{path: qa.jsonl, n: 256}} (or a list of them for minus / train_data), got "
                                 f"{getattr(self, key)!r}.")
        if not isinstance(self.runs, list) or not self.runs:
            raise ValueError("The config lists no runs: add e.g. runs: [{method: lora}, {method: sc_lora, beta: 0.8}].")
        n_minus = len(as_list(self.minus))
        names = set()
        for run in self.runs:
            if not isinstance(run, dict):
                raise ValueError(f"Each entry of runs must be a mapping such as {{method: lora}}, got {run!r}.")
            unknown = set(run) - RUN_KEYS
            if unknown:
                raise ValueError(f"Unknown run key(s) {sorted(unknown)}; a run takes {sorted(RUN_KEYS)}.")
            if run.get("method") not in METHODS:
                raise ValueError(f"Unknown method {run.get('method')!r} in runs; choose one of {METHODS}.")
            if run.get("seed") is not None:
                check_int(run["seed"], f"seed of run {run}", 0)
            if "name" in run:
                safe_name(run["name"], "run name")
            name = safe_name(run_name(run), f"run name (from {run})")
            if name in names or name == "base":
                raise ValueError(f"Two runs are named {name!r} ('base' is the untrained model): give each a distinct "
                                 "'name', e.g. name: sc_lora-b08-seed1.")
            names.add(name)
            if "safe_lora" in run:
                _check_safe_lora(run)
            try:  # the init's own checks (r, lora_alpha, beta range, one beta per knowledge set, ...)
                run_init_config(self, run).check_sets(n_minus)
                run_train_config(self, run)
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


#: a run's keys: its name, and any field of SCLoRAConfig or TrainConfig (over the experiment's r, lora_alpha, normalize
#: and train values); target_modules and the decomposition dtype are the experiment's, shared by its statistics
RUN_INIT_KEYS = tuple(f.name for f in fields(SCLoRAConfig) if f.name not in ("target_modules", "dtype"))
RUN_TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig))
RUN_KEYS = {"name", "safe_lora", *RUN_INIT_KEYS, *RUN_TRAIN_KEYS}
#: ``safe_lora:`` of a run: Safe LoRA after training, C from the experiment's (aligned) model and ``unaligned``
SAFE_LORA_KEYS = ("unaligned", "num_proj_layers", "threshold")


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


def as_list(specs: DataSpec | list[DataSpec]) -> list[DataSpec]:
    return specs if isinstance(specs, list) else [specs]


#: evaluation options a config may give next to the data spec
EVAL_OPTIONS = {"max_new_tokens", "num_fewshot", "n_choices", "batch_size", "reuse_context"}


def eval_spec(spec: dict, name: str) -> tuple[DataSpec | FileSpec, dict]:
    """Split an evaluation entry into its data spec and its options."""
    options = {k: v for k, v in spec.items() if k in EVAL_OPTIONS}
    for key, value in options.items():
        if key == "reuse_context":
            if name != "knowledge_em" or not isinstance(value, bool):
                raise ValueError(f"evaluate.{name}.reuse_context: true or false, for knowledge_em only (its few-shot "
                                 f"context's keys/values computed once); got {value!r}.")
            continue
        check_int(value, f"evaluate.{name}.{key}", 0 if key == "num_fewshot" else 1)
    if name == "knowledge_mc" and "n_choices" in options:
        check_int(options["n_choices"], f"evaluate.{name}.n_choices", 2)
    data_part = {k: v for k, v in spec.items() if k not in EVAL_OPTIONS}
    return data_spec(data_part, f"evaluate.{name} (options: {sorted(EVAL_OPTIONS)})"), options


def _check_safe_lora(run: dict) -> None:
    options = run["safe_lora"]
    if not isinstance(options, dict) or not isinstance(options.get("unaligned"), str) or set(options) - set(
            SAFE_LORA_KEYS):
        raise ValueError(f"run {run}: safe_lora takes a mapping with unaligned (the aligned model's unaligned base, "
                         f"e.g. smollm2-135m-instruct) and num_proj_layers or threshold; keys {SAFE_LORA_KEYS}.")
    if method_spec(run["method"]).residual or not method_spec(run["method"]).adapter:
        raise ValueError(f"run {run}: Safe LoRA projects an update B A; method {run['method']!r} has none (a residual "
                         "init or full fine-tuning). Use it with lora, mica or eva.")
    if "num_proj_layers" in options:
        check_int(options["num_proj_layers"], "safe_lora.num_proj_layers", 1)
    threshold = options.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not -1 <= threshold <= 1):
        raise ValueError(f"run {run}: safe_lora.threshold must be a cosine in [-1, 1], got {threshold!r}.")


def run_normalize(config: ExperimentConfig, run: dict) -> str:
    """The statistics normalization a run uses: its own ``normalize``, else the method's own where it has one
    (CorDA: its authors' and PEFT's per-sample scaling, ``abs_of_max``), else the experiment's."""
    own = method_spec(run["method"]).normalize
    return run.get("normalize") or (own if own != "none" else config.normalize)


def run_init_config(config: ExperimentConfig, run: dict) -> SCLoRAConfig:
    """The SCLoRAConfig of a run: the experiment's r, lora_alpha and target_modules, the run's normalization
    (:func:`run_normalize`) and every SCLoRAConfig field the run sets."""
    values = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": config.target_modules,
              **{k: run[k] for k in RUN_INIT_KEYS if run.get(k) is not None}}
    return SCLoRAConfig(**{**values, "normalize": run_normalize(config, run)})


def run_train_config(config: ExperimentConfig, run: dict) -> TrainConfig:
    """The TrainConfig of a run: the experiment's ``train`` values, its seed, and every TrainConfig field the run
    sets (e.g. ``learning_rate``)."""
    return TrainConfig.from_dict({**config.train, "seed": run.get("seed", config.seed),
                                  **{k: run[k] for k in RUN_TRAIN_KEYS if run.get(k) is not None}})


def run_name(run: dict) -> str:
    name = run.get("name") or run["method"]
    if "name" not in run and run.get("beta") is not None:
        beta = run["beta"]
        name += "-beta" + ("+".join(str(b) for b in beta) if isinstance(beta, list) else str(beta))
        if beta == "auto":
            budget = run.get("preserve_budget")
            name += "-budget" + ("+".join(str(b) for b in budget) if isinstance(budget, list) else str(budget))
    if "name" not in run and run.get("learning_rate") is not None:
        name += f"-lr{run['learning_rate']}"
    if "name" not in run and run.get("lock_subspace"):
        name += "-locked"
    if "name" not in run and run.get("normalize") is not None:
        name += f"-{run['normalize']}"
    if "name" not in run and run.get("safe_lora"):
        name += "-safelora"
    if "name" not in run and run.get("seed") is not None:
        name += f"-seed{run['seed']}"
    return name


def plan(config: ExperimentConfig) -> str:
    """What `sclora run` would do, without loading a model or any data (``--dry-run``)."""
    from ..train import TrainConfig

    def describe(specs) -> str:
        return " + ".join(f"file {s.path} n={s.n or 'all'} from {s.offset} (sha256 {s.sha256[:12]})"
                          if isinstance(s, FileSpec) else
                          f"{s.kind}{'/' + s.source if s.source else ''}[{s.split}] n={s.n} from {s.offset}"
                          + (f" ({s.response})" if s.response != "none" else "") for s in as_list(specs))

    train = TrainConfig.from_dict(config.train)
    n_train = sum(s.n for s in as_list(config.train_data))
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


def minus_label(i: int, n: int) -> str:
    return "minus" if n == 1 else f"minus{i}"


def as_plain(config: ExperimentConfig) -> dict:
    return json.loads(json.dumps(asdict(copy.deepcopy(config))))
