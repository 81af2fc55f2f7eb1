"""A continual fine-tuning experiment from one YAML file with a ``stages:`` list: every run learns the stages' tasks
one after another (each stage :func:`sclora.finetune` with ``after=`` the previous one), and after every stage
the model is evaluated on every task and on the always-kept sets, which gives the accuracy matrix a(i, j).

    sclora run configs/continual-three-tasks.yaml --output runs/continual

A run may list several learning rates: each stage then trains at each of them from the same previous stage and
the one with the best validation score on that stage's task (``validate:``, never the test items) continues the
chain. Every stage folder resumes after a kill (sclora.finetune), every evaluation is written atomically with a
fingerprint of what made it, and a folder made from another config is refused (``--archive`` moves it aside).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ..config import METHODS, SCLoRAConfig
from ..fileio import atomic_write, atomic_write_json, digest, locked, safe_name
from ..registry import method_spec
from ..train import TrainConfig
from .evaluate.metrics import EVALUATIONS, METRICS
from .examples import scorer_extras
from .folder import StaleResultsError, archive_folder, claim_run, release_run
from .spec import _check_judge, check_int, data_spec, eval_spec

__all__ = ["ContinualConfig", "is_continual", "load_continual", "plan_continual", "run_continual"]

#: a run's keys besides SCLoRAConfig / TrainConfig fields (learning_rate may be a list: selected per stage)
RUN_OWN_KEYS = ("name", "seeds", "keep_earlier", "replay")
RUN_INIT_KEYS = tuple(f.name for f in fields(SCLoRAConfig) if f.name not in ("target_modules", "dtype"))
RUN_TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "seed")


@dataclass
class ContinualConfig:
    name: str
    stages: list[dict]  # name, data, evaluate (test: the a(i, j) score), validate (selects learning rates), metric
    runs: list[dict]
    keep: dict = field(default_factory=dict)  # name -> {data (D- from the first stage on), evaluate, metric}
    model: str = "smollm2-135m-instruct"
    seed: int = 0
    r: int = 16
    normalize: str = "trace"
    stats_seq_len: int = 256
    stats_samples: int = 256
    train: dict = field(default_factory=dict)
    judge: dict = field(default_factory=lambda: {"kind": "refusal"})  # for a kept safety set
    report: dict = field(default_factory=dict)

    def __post_init__(self):
        from ..models import check_model

        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}.")
        for key in ("seed", "r", "stats_seq_len", "stats_samples"):
            check_int(getattr(self, key), key, 0 if key == "seed" else 1)
        if not isinstance(self.stages, list) or len(self.stages) < 2:
            raise ValueError("stages must list at least two stages, each {name, data, evaluate, validate, metric}.")
        evaluations = set()
        for i, stage in enumerate(self.stages):
            _check_part(stage, f"stages[{i}]", ("name", "data", "evaluate", "validate", "metric"), ("validate",))
            evaluations |= _check_evaluations(stage, f"stage {stage['name']!r}", evaluations)
        if not isinstance(self.keep, dict):
            raise ValueError(f"keep must map a name to {{data, evaluate, metric}}, got {self.keep!r}.")
        for name, part in self.keep.items():
            _check_part(part, f"keep.{name}", ("data", "evaluate", "metric"), ())
            evaluations |= _check_evaluations(part, f"keep.{name}", evaluations)
        names = [s["name"] for s in self.stages] + list(self.keep)
        if len(set(names)) != len(names):
            raise ValueError(f"stage and keep names must be distinct, got {names}.")
        TrainConfig.from_dict(self.train)
        if not isinstance(self.runs, list) or not self.runs:
            raise ValueError("runs lists no run: add e.g. runs: [{name: lora, method: lora}].")
        seen = set()
        for run in self.runs:
            _check_run(self, run)
            if run["name"] in seen:
                raise ValueError(f"two runs are named {run['name']!r}; give each a distinct name.")
            seen.add(run["name"])
        _check_judge(self.judge)
        check_model(self.model)

    def plain(self) -> dict:
        return json.loads(json.dumps({f.name: getattr(self, f.name) for f in fields(self)}))


def _check_part(part, what: str, keys: tuple, optional: tuple) -> None:
    if not isinstance(part, dict):
        raise ValueError(f"{what} must be a mapping with keys {keys}, got {part!r}.")
    unknown, missing = set(part) - set(keys), [k for k in keys if k not in part and k not in optional]
    if unknown or missing:
        raise ValueError(f"{what}: unknown key(s) {sorted(unknown)}, missing {missing}; it takes {keys}.")
    if "name" in part:
        safe_name(part["name"], f"{what} name")
    data_spec(part["data"], f"{what}.data")


def _check_evaluations(part: dict, what: str, before: set) -> set:
    """The evaluation names of ``part`` (test and validation), checked: registered, distinct across the config
    (one evaluation per task), and holding ``metric``."""
    names = set()
    for key in ("evaluate", "validate"):
        if key not in part:
            continue
        value = part[key]
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError(f"{what}.{key} must be one evaluation such as {{math_accuracy: {{kind: math, n: 100, "
                             f"split: heldout}}}}, got {value!r}.")
        (name, spec), = value.items()
        if name not in EVALUATIONS:
            raise ValueError(f"{what}.{key}: unknown evaluation {name!r}; choose from {sorted(EVALUATIONS)}.")
        if name in before or name in names:
            raise ValueError(f"{what}.{key}: evaluation {name!r} is used twice; each task needs its own evaluation.")
        eval_spec(spec, name)
        names.add(name)
    (test,) = part["evaluate"]
    if part["metric"] not in EVALUATIONS[test].metrics:
        raise ValueError(f"{what}.metric {part['metric']!r} is not a metric of {test} ({EVALUATIONS[test].metrics}).")
    return names


def _check_run(config: ContinualConfig, run) -> None:
    if not isinstance(run, dict) or "name" not in run:
        raise ValueError(f"each run needs a name and a method, e.g. {{name: lora, method: lora}}; got {run!r}.")
    safe_name(run["name"], "run name")
    unknown = set(run) - {*RUN_OWN_KEYS, *RUN_INIT_KEYS, *RUN_TRAIN_KEYS}
    if unknown:
        raise ValueError(f"run {run['name']!r}: unknown key(s) {sorted(unknown)}; a run takes {sorted(RUN_OWN_KEYS)}, "
                         "SCLoRAConfig and TrainConfig fields (learning_rate may be a list: selected per stage).")
    if run.get("method") not in METHODS or not method_spec(run["method"]).adapter:
        raise ValueError(f"run {run['name']!r}: method must be an adapter method of {METHODS}, got "
                         f"{run.get('method')!r}.")
    for seed in run.get("seeds", [config.seed]):
        check_int(seed, f"run {run['name']!r} seeds entry", 0)
    rates = learning_rates(config, run)
    if any(isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0 for r in rates) or not rates:
        raise ValueError(f"run {run['name']!r}: learning_rate must be a positive number or a list of them, got "
                         f"{run.get('learning_rate')!r}.")
    if len(rates) > 1 and any("validate" not in s for s in config.stages):
        raise ValueError(f"run {run['name']!r} lists {len(rates)} learning rates: every stage needs validate: (the "
                         "split they are selected on).")
    for key in ("beta", "preserve_budget"):
        if isinstance(run.get(key), list):
            raise ValueError(f"run {run['name']!r}: {key} is one number for every stage (beta: split evenly over the "
                             "stage's knowledge sets; preserve_budget: for each), as the number of sets grows.")
    for i in range(len(config.stages)):  # the init's and training's own checks, per stage
        try:
            stage_init_config(config, run, i).check_sets(n_kept(config, run, i))
            stage_train_config(config, run, rates[0], 0, i)
        except ValueError as err:
            raise ValueError(f"run {run['name']!r}, stage {i}: {err}") from None


def learning_rates(config: ContinualConfig, run: dict) -> list:
    value = run.get("learning_rate", config.train.get("learning_rate", TrainConfig.learning_rate))
    return list(value) if isinstance(value, list) else [value]


def n_kept(config: ContinualConfig, run: dict, stage: int) -> int:
    """Knowledge sets stage ``stage`` keeps: the ``keep:`` sets and, with keep_earlier, each earlier task."""
    return len(config.keep) + (stage if run.get("keep_earlier", True) else 0)


def stage_init_config(config: ContinualConfig, run: dict, stage: int) -> SCLoRAConfig:
    """The run's SCLoRAConfig at ``stage``: its beta (the total weight of D-, which the betas of the sets share:
    they sum to at most 1) split evenly over the knowledge sets kept there, its budget repeated for each."""
    values = {"r": config.r, "normalize": config.normalize, **{k: run[k] for k in RUN_INIT_KEYS if k in run}}
    n = n_kept(config, run, stage)
    if values.get("method") == "sc_lora" and n > 1:
        if isinstance(values.get("beta"), (int, float)) and not isinstance(values["beta"], bool):
            values["beta"] = [values["beta"] / n] * n
        if isinstance(values.get("preserve_budget"), (int, float)) and not isinstance(values["preserve_budget"], bool):
            values["preserve_budget"] = [values["preserve_budget"]] * n
    return SCLoRAConfig(**values)


def stage_train_config(config: ContinualConfig, run: dict, learning_rate: float, seed: int, stage: int
                       ) -> TrainConfig:
    """The run's TrainConfig at ``stage``; O-LoRA's penalty starts at the second stage (nothing to be orthogonal
    to before)."""
    values = {**config.train, **{k: run[k] for k in RUN_TRAIN_KEYS if k in run}, "learning_rate": learning_rate,
              "seed": seed}
    if stage == 0:
        values["orthogonal_penalty"] = 0.0
    return TrainConfig.from_dict(values)


def stage_owner(config: ContinualConfig, run: dict, stage: int, learning_rate: float, seed: int) -> dict:
    """The run whose folder holds ``run``'s ``stage`` at ``learning_rate`` and ``seed``: the first run of the config
    that trains the same adapter there. At the first stage runs that differ only in what they do with earlier
    stages (replay, O-LoRA's penalty, keep_earlier) train the same, so the first of them trains it and the others
    continue from it; every later stage is each run's own."""
    if stage > 0:
        return run

    def settings(r: dict):
        return (stage_init_config(config, r, 0).to_dict(), stage_train_config(config, r, learning_rate, seed, 0).to_dict())

    mine = settings(run)
    return next(other for other in config.runs if learning_rate in learning_rates(config, other)
                and seed in other.get("seeds", [config.seed]) and settings(other) == mine)


def is_continual(path: str | os.PathLike) -> bool:
    """Whether the YAML file at ``path`` is a continual experiment (it has ``stages:``)."""
    from ..fileio import parse_yaml

    try:
        data = parse_yaml(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "stages" in data


def load_continual(path: str | os.PathLike, overrides: dict | None = None) -> ContinualConfig:
    from ..fileio import parse_yaml

    data = {**(parse_yaml(Path(path).read_text()) or {}), **(overrides or {})}
    known = {f.name for f in fields(ContinualConfig)}
    if set(data) - known:
        raise ValueError(f"{path}: unknown key(s) {sorted(set(data) - known)}; a continual experiment takes "
                         f"{sorted(known)}.")
    return ContinualConfig(**data)


def plan_continual(config: ContinualConfig) -> str:
    """What `sclora run` would do for a continual config, without loading a model or data (``--dry-run``)."""
    lines = [f"continual experiment {config.name!r}: model {config.model}, r={config.r}, {len(config.stages)} stages"]
    for i, stage in enumerate(config.stages):
        lines.append(f"  stage {i} {stage['name']}: train {stage['data']}; test {list(stage['evaluate'])} "
                     f"({stage['metric']}); validate {list(stage.get('validate', {})) or '-'}")
    for name, part in config.keep.items():
        lines.append(f"  keep {name}: D- {part['data']}; test {list(part['evaluate'])} ({part['metric']})")
    for run in config.runs:
        rates = learning_rates(config, run)
        lines.append(f"  run {run['name']}: {run['method']}, seeds {run.get('seeds', [config.seed])}, learning "
                     f"rate{'s' if len(rates) > 1 else ''} {rates}, " + ", ".join(
                         f"{k} {run[k]}" for k in run if k not in ("name", "method", "seeds", "learning_rate")))
    return "\n".join(lines)


class _Sets:
    """The examples of every stage and kept set, built once and checked disjoint before any model loads."""

    def __init__(self, config: ContinualConfig):
        from .examples import build_examples, check_disjoint

        seed = config.seed
        self.train = {s["name"]: build_examples(data_spec(s["data"], s["name"]), seed) for s in config.stages}
        self.keep = {k: build_examples(data_spec(v["data"], k), seed) for k, v in config.keep.items()}
        self.test, self.validate, self.options = {}, {}, {}
        for part in [*config.stages, *config.keep.values()]:
            for key, target in (("evaluate", self.test), ("validate", self.validate)):
                for name, spec in part.get(key, {}).items():
                    data, self.options[name] = eval_spec(spec, name)
                    target[name] = build_examples(data, seed)
        check_disjoint({**{f"train:{k}": v for k, v in self.train.items()},
                        **{f"keep:{k}": v for k, v in self.keep.items()}, **self.test, **self.validate})


def check_continual_folder(config: ContinualConfig, out: Path, archive: bool = False) -> str:
    """Refuse (or archive) a folder made from another config or model files; record this one's."""
    from ..models import model_identity

    files = model_identity(config.model)
    key = {"config": {k: v for k, v in config.plain().items() if k not in ("runs", "report")}, "model_files": files}
    specs = [spec for part in [*config.stages, *config.keep.values()]
             for spec in [part["data"], *part["evaluate"].values(), *part.get("validate", {}).values()]]
    if any(spec.get("kind") == "pydoc" for spec in specs):
        from .data import pydoc_source

        key["pydoc_source"] = pydoc_source()  # the docstrings are the running interpreter's
    out.mkdir(parents=True, exist_ok=True)
    path = out / "experiment.json"
    if path.exists():
        before = json.loads(path.read_text())
        if before != key:
            changed = sorted(k for k in set(before["config"]) | set(key["config"])
                             if before["config"].get(k) != key["config"].get(k))
            changed += ["model files"] if before.get("model_files") != files else []
            if not archive:
                raise StaleResultsError(f"{out} holds a continual experiment made with other settings ({', '.join(changed)}"
                                        "); use a new --output folder, or --archive to move it to "
                                        f"{out / 'archive'}/<time>/ and start afresh.")
            archive_folder(out)
    atomic_write_json(path, key)
    atomic_write(out / "config.yaml", yaml.safe_dump(config.plain(), sort_keys=False))
    return digest(key)


def run_continual(config: ContinualConfig, output_dir: str | os.PathLike, *, show_progress: bool = True,
                  archive: bool = False) -> dict:
    """Every run's chain of stages (finished stages and evaluations are skipped on a rerun); writes
    ``continual.json`` (per run and seed: each stage's learning rate, validation scores, timings and the metrics
    of every task and kept set after it) and per-item scores under ``samples/``. Returns continual.json's data.

    Several processes may run the same config into the same folder (``sclora run --workers N``): a chain (one run
    at one seed) and each seed's base evaluation are claimed by one process (:func:`~.folder.claim_run`), and
    each entry is merged into ``continual.json`` under its lock."""
    from .evaluate.core import evaluate_model, save_evaluation, saved_evaluation

    out = Path(output_dir)
    key = check_continual_folder(config, out, archive)
    sets = _Sets(config)
    model_name = config.model
    from ..models import load_model

    def base_model():
        return load_model(model_name)

    _, tokenizer = base_model()
    results = {"base": {}, "runs": {}}
    extras = scorer_extras(config.seed, sets.test, {**sets.train, **sets.keep, **sets.validate})
    judge = None
    if "safety" in sets.test:
        from .evaluate.judges import make_judge

        judge = make_judge(**config.judge)

    def evaluate(model, what: dict, path: Path, fingerprint: str, source: Path | None = None) -> dict:
        """Metrics of ``model`` on ``what`` (evaluation -> items), per-item scores in ``path``; reused when
        ``path`` (or ``source``, another run's file of the same stage, then copied to ``path``) was made by the
        same ``fingerprint``."""
        saved = saved_evaluation(path, fingerprint)
        if saved is None and source is not None and source != path:
            saved = saved_evaluation(source, fingerprint)
            if saved is not None:
                atomic_write(path, source.read_text())
        if saved is not None:
            return saved["metrics"]
        metrics, items = evaluate_model(model, tokenizer, what, options=sets.options, judge=judge, extras=extras,
                                        show_progress=show_progress)
        save_evaluation(path, fingerprint, metrics, items)
        return metrics

    names = [run["name"] for run in config.runs]
    for seed in sorted({s for run in config.runs for s in run.get("seeds", [config.seed])}):
        claim = claim_run(out, f"base-seed{seed}")
        if claim is None:
            continue  # evaluated by another `sclora run` process sharing this folder
        try:
            model, _ = base_model()
            result = evaluate(model, sets.test, out / "samples" / "base" / f"seed{seed}.json", digest([key, "base"]))
            _record(out, names, ("base", str(seed)), result)
        finally:
            release_run(claim)
    for run in config.runs:
        for seed in run.get("seeds", [config.seed]):
            claim = claim_run(out, chain_claim(run["name"], seed))
            if claim is None:
                continue
            try:
                where = ("runs", run["name"], str(seed))
                # each finished stage is recorded at once, so a chain stopped later still reports its first stages
                _run_chain(config, run, seed, sets, out, key, base_model, evaluate, show_progress,
                           record=lambda rows, where=where: _record(out, names, where, rows))
            finally:
                release_run(claim)
    return _record(out, names)


def chain_claim(name: str, seed: int) -> str:
    """The claim (lock) name of run ``name``'s chain at ``seed``."""
    return f"chain-{name}-seed{seed}"


def _record(out: Path, names: list[str], where: tuple[str, ...] = (), value=None) -> dict:
    """Under the lock of ``continual.json``: set the entry at ``where`` (("base", seed) or ("runs", run, seed)) to
    ``value``, drop runs the config no longer has, write the file back; returns its data."""
    path = out / "continual.json"
    with locked(path):
        data = json.loads(path.read_text()) if path.exists() else {"base": {}, "runs": {}}
        if where:
            slot = data
            for part in where[:-1]:
                slot = slot.setdefault(part, {})
            slot[where[-1]] = value
        data["runs"] = {name: data["runs"][name] for name in names if name in data["runs"]}  # the config's order
        atomic_write_json(path, data)
        return data


def _run_chain(config, run, seed, sets, out, key, base_model, evaluate, show_progress, record) -> None:
    """One run's stages at one seed: per stage its selected learning rate and the metrics after it, passed to
    ``record(rows)`` with the stages finished so far after each stage."""
    import sclora

    rows, after = [], None
    # the kept sets enter the chain at its first stage, for the methods that keep knowledge sets
    keep = list(sets.keep.values()) if sets.keep and "minus" in method_spec(run["method"]).needs else None
    for i, stage in enumerate(config.stages):
        candidates = []
        for lr in learning_rates(config, run):
            owner = stage_owner(config, run, i, lr, seed)  # another run's folder when it trains the same here
            folder = out / "runs" / owner["name"] / f"seed{seed}" / f"{i}-{stage['name']}-lr{lr:g}"
            with locked(folder):  # a worker running the owner's chain trains it once; this one then reads it
                model, tokenizer = base_model()
                result = sclora.finetune(
                    model, tokenizer, sets.train[stage["name"]], keep if i == 0 else None,
                    after=after, keep_earlier=run.get("keep_earlier", True),
                    replay=run.get("replay", 0.0) if i else 0.0, config=stage_init_config(config, run, i),
                    train_config=stage_train_config(config, run, lr, seed, i), output_dir=folder,
                    stats_dir=out / "stats", stats_samples=config.stats_samples, seq_len=config.stats_seq_len,
                    seed=seed, show_progress=show_progress, context={"experiment": key, "model": config.model})
                seconds = result.summary["init_seconds"] + result.summary["train_seconds"]
                fingerprint = digest([key, owner, seed, i, lr, sclora.stages.stage_digest(folder)])
                validation = evaluate(result.model, {n: sets.validate[n] for n in stage.get("validate", {})},
                                      folder / "validation.json", fingerprint) if "validate" in stage else {}
            candidates.append((lr, owner, folder, result, validation, seconds, fingerprint))
        lr, owner, folder, result, validation, seconds, fingerprint = max(
            candidates, key=lambda c: _goodness(stage, c[4]))
        def samples(name: str) -> Path:
            return out / "samples" / name / f"seed{seed}" / f"{i}.json"

        with locked(samples(owner["name"])):  # the owner's evaluation, made once and copied
            metrics = evaluate(result.model, sets.test, samples(run["name"]), fingerprint, samples(owner["name"]))
        s = result.summary
        rows.append({"stage": stage["name"], "learning_rate": lr, "folder": str(folder.relative_to(out)),
                     "validation": {f"{c[0]:g}": c[4] for c in candidates}, "metrics": metrics,
                     "kept_sets": s["kept_sets"], "replayed_examples": s["replayed_examples"],
                     # the stage's statistics: collected by one candidate, read from the cache by the others
                     "statistics_seconds": max(c[3].summary["statistics_seconds"] for c in candidates),
                     "merge_seconds": s["merge_seconds"],
                     "train_seconds": s["train_seconds"], "stage_seconds": round(seconds, 1),
                     "steps": s["steps"], "final_loss": s["final_loss"]})
        record(list(rows))
        after = folder


def _goodness(stage: dict, validation: dict) -> float:
    """The validation score of a candidate, signed so that larger is better (0 without validate:)."""
    if not validation:
        return 0.0
    (name,) = stage["validate"]
    metric = METRICS[EVALUATIONS[name].metrics[0]]
    return metric.goodness(validation[metric.key])
