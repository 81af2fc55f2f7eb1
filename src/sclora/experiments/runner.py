"""A whole experiment from one YAML file: data -> statistics (once) -> init -> train -> evaluate -> table.

    sclora run configs/demo.yaml --output runs/demo

Every run (a method, optionally a beta and a learning rate) starts from a fresh copy of the model.
Statistics of D+ and D- are computed once and cached in the output folder; finished runs are
skipped on a rerun (results.json is rewritten atomically after each run), so an interrupted
experiment resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from ..fileio import atomic_write, update_json
from ..registry import method_spec
from ..statistics_cache import cached_statistics
from .evaluate.core import evaluate_model
from .examples import build_examples, build_mixture, check_disjoint, scorer_extras
from .folder import check_folder, claim_run, record_failure, release_run, run_fingerprint, update_results
from .spec import (
    ExperimentConfig,
    as_list,
    eval_spec,
    minus_label,
    run_init_config,
    run_name,
    run_normalize,
    run_train_config,
)

__all__ = ["diagnose_experiment", "run_experiment"]


class _Experiment:
    """What every run of an experiment shares: the base model, the example sets, cached statistics."""

    def __init__(self, config: ExperimentConfig, out: Path, show_progress: bool,
                 diagnostics_file: str = "diagnostics.json"):
        from ..models import load_model

        self.config, self.out, self.show_progress = config, out, show_progress
        self.diagnostics_file = diagnostics_file
        self.dtype = getattr(torch, config.dtype)
        specs = as_list(config.minus)
        self.minus_labels = [minus_label(i, len(specs)) for i in range(len(specs))]
        self.sets = {"plus": build_examples(config.plus, config.seed),
                     **{label: build_examples(spec, config.seed) for label, spec in zip(self.minus_labels, specs)},
                     "train": build_mixture(config.train_data, config.seed)}
        self.eval_sets, self.options = {}, {}
        for name, spec in config.evaluate.items():
            data_spec, self.options[name] = eval_spec(spec, name)
            self.eval_sets[name] = build_examples(data_spec, config.seed)
            if any("prompt" not in row for row in self.eval_sets[name]):
                raise ValueError(f"evaluate.{name}: its rows need a prompt (and a response where it is scored against "
                                 "one); a file for an evaluation holds prompt / response rows.")
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
        spec = method_spec(method)
        normalize = run_normalize(c, run)  # a run may compare another normalization
        plus = minus = None
        if spec.data_form == "batches":  # PEFT's EVA runs its own incremental SVD over D+ batches
            from ..statistics_cache import statistics_batches

            plus = statistics_batches(self.tokenizer, self.sets["plus"], c.stats_seq_len, c.stats_batch_size)
        elif spec.side is not None:
            plus = self.stats("plus", spec.side, normalize) if "plus" in spec.needs else None
            minus = self.minus_stats(spec.side, normalize) if "minus" in spec.needs else None
        config = run_init_config(c, run)
        choice = None
        if config.beta == "auto":  # the smallest beta meeting the budget(s), chosen here so the row can report it
            from .. import choose_beta

            choice = choose_beta(model, plus, minus, r=config.r, budget=config.preserve_budget,
                                 target_modules=config.target_modules, dtype=config.torch_dtype,
                                 solver=config.eigen_solver, show_progress=self.show_progress)
            config = config.replace(beta=choice.beta, preserve_budget=None)
        model = init_model(model, config, plus=plus, minus=minus, show_progress=self.show_progress)
        return model, choice

    def diagnose(self, name: str, model, normalize: str | None = None) -> None:
        """Save the share of D+ and D- output energy the initial adapter captures, per module (residual inits
        only: a zero-initialized LoRA adapter has no subspace yet)."""
        from ..diagnostics import subspace_energy

        path = self.out / self.diagnostics_file
        entry = subspace_energy(model, self.stats("plus", "output", normalize), self.minus_stats("output", normalize))
        update_json(path, name, entry)  # several workers add their runs' entries to one file


def run_experiment(config: ExperimentConfig, output_dir: str | os.PathLike, *,
                   show_progress: bool = True, archive: bool = False, keep_going: bool = False) -> list[dict]:
    """Run every configured run (skipping finished ones), write results.json / results.md, return rows.

    A run that raises stops the sweep, unless ``keep_going``: then its error and traceback go to
    ``output_dir/failures.json`` (:func:`~sclora.experiments.folder.read_failures`) and the next run starts; a
    later call retries it, and its entry goes once it finishes.

    A folder that holds results, checkpoints or a config.yaml made with other settings is refused before
    anything is loaded (:class:`StaleResultsError`, listing old and new values); ``archive=True`` moves them
    to ``output_dir/archive/<time>/`` first. Several processes may run the same config into the same folder
    at once (``sclora run --workers N``): each takes the runs no other live process holds (a claim is a lock
    the kernel drops when its process dies), and all share one results table."""
    from .evaluate.judges import make_judge

    out = Path(output_dir)
    model_files = check_folder(config, out, archive=archive)
    rows = update_results(out)
    if {"base", *map(run_name, config.runs)} <= {row["run"] for row in rows}:
        return rows  # everything is done: no model or data to load
    exp = _Experiment(config, out, show_progress)
    tokenizer = exp.tokenizer
    extras = scorer_extras(config.seed, exp.eval_sets, exp.sets)
    judge = make_judge(**config.judge) if "safety" in exp.eval_sets else None

    def evaluate(model, resume: tuple[Path, str] | None = None) -> tuple[dict, dict]:
        return evaluate_model(model, tokenizer, exp.eval_sets, options=exp.options, judge=judge, extras=extras,
                              show_progress=show_progress, resume=resume)

    def done(name: str) -> bool:
        return name in {row["run"] for row in update_results(out, refresh=False)}

    for run in [None, *config.runs]:  # None: the base model
        name = "base" if run is None else run_name(run)
        if done(name):
            continue
        claim = claim_run(out, name)
        if claim is None:
            continue  # being run by another `sclora run` process sharing this folder
        fingerprint = run_fingerprint(config, run, model_files)
        try:
            if done(name):  # finished by another process between the check and the claim
                continue
            if run is None:
                metrics, items = evaluate(exp.base, (out / "runs" / "base" / "evaluations", fingerprint))
                atomic_write(out / "samples" / "base.json", json.dumps(items) + "\n")
                row = {"run": "base", "method": "-", **metrics}
            else:
                twin = _lora_twin(run)  # Safe LoRA projects the adapter its plain LoRA twin trained
                twin = twin and (run_name(twin), run_fingerprint(config, twin, model_files))
                row = _run_one(config, exp, run, name, out, evaluate, fingerprint, twin)
            rows = update_results(out, {**row, "fingerprint": fingerprint})
            record_failure(out, name, None)
        except Exception as err:
            if not keep_going:
                raise
            record_failure(out, name, {"error": f"{type(err).__name__}: {err}", "fingerprint": fingerprint,
                                       "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                       "traceback": traceback.format_exc(limit=-8)})
            print(f"sclora run: {name} failed ({type(err).__name__}: {err}); going on with the next run "
                  "(failures.json)", file=sys.stderr)
        finally:
            release_run(claim)
    return rows


def _lora_twin(run: dict | None) -> dict | None:
    """The run a Safe LoRA run trains the same adapter as: the same settings without ``safe_lora``."""
    if run is None or not run.get("safe_lora") or "name" in run:
        return None
    return {k: v for k, v in run.items() if k != "safe_lora"}


def _finished_twin(out: Path, twin: tuple[str, str] | None) -> tuple[dict, Path] | None:
    """The row and adapter of the twin run named ``twin[0]``, when it finished with fingerprint ``twin[1]``
    (the row is written after the adapter, so a row with that fingerprint vouches for the adapter)."""
    if twin is None:
        return None
    name, fingerprint = twin
    row = next((r for r in update_results(out, refresh=False) if r["run"] == name), None)
    adapter = out / "runs" / name / "adapter"
    if row is None or row.get("fingerprint") != fingerprint or not (adapter / "adapter_model.safetensors").exists():
        return None
    return row, adapter


def _run_one(config: ExperimentConfig, exp: _Experiment, run: dict, name: str, out: Path, evaluate,
             fingerprint: str, twin: tuple[str, str] | None = None) -> dict:
    from ..train import rounded, train

    method, seed = run["method"], run.get("seed", config.seed)
    start = time.perf_counter()
    model, choice = exp.initialize(run)
    if hasattr(model, "peft_config"):  # a resumed run continues from the init its checkpoints were trained from
        from ..export import restore_initial_adapter, save_initial_adapter

        initial = out / "runs" / name / "initial_adapter"
        if not restore_initial_adapter(model, initial, fingerprint, residual=method_spec(method).residual):
            save_initial_adapter(model, initial, fingerprint)
    init_seconds = time.perf_counter() - start
    if config.diagnostics and method_spec(method).residual:
        exp.diagnose(name, model, run.get("normalize"))
    train_config = run_train_config(config, run)
    finished = None if method_spec(method).residual else _finished_twin(out, twin)
    if finished is not None:  # the twin's trained adapter: the same training, not run again
        from ..export import load_lora

        trained, adapter = finished
        load_lora(model, adapter)
        fields = {k: trained[k] for k in ("train_seconds", "train_tokens_per_second", "final_loss", "loss_history",
                                          "checkpoints") if k in trained}
        fields["trained_in"] = trained["run"]
    else:
        along = _checkpoint_evals(config.evaluate_steps, evaluate, out / "runs" / name / "checkpoint_evals.json")
        result = train(model, exp.tokenizer, exp.sets["train"], train_config, out / "runs" / name,
                       show_progress=exp.show_progress, callbacks=[along], context=fingerprint)
        # the whole training, also when the run resumed from a checkpoint (None: a checkpoint without a record)
        fields = {"train_seconds": rounded(result.total_train_seconds),
                  "train_tokens_per_second": rounded(result.total_tokens_per_second),
                  "final_loss": result.final_loss, "loss_history": result.loss_history,
                  **({"checkpoints": along.rows} if config.evaluate_steps else {})}
    safe = _apply_safe_lora(model, exp, run["safe_lora"]) if run.get("safe_lora") else {}
    if hasattr(model, "peft_config"):  # a plain PEFT LoRA adapter for the untouched base: loads without sclora
        from ..export import export_lora

        export_lora(model, out / "runs" / name / "adapter")
    # each finished evaluation is kept: a run killed while evaluating resumes at the evaluation it was in
    metrics, items = evaluate(model, (out / "runs" / name / "evaluations", fingerprint))
    atomic_write(out / "samples" / f"{name}.json", json.dumps(items) + "\n")
    row = {
        "run": name, "method": "safe_lora" if safe else method, "learning_rate": train_config.learning_rate, **safe,
        **_beta_fields(run, choice),
        "seed": seed, **({"normalize": run["normalize"]} if run.get("normalize") else {}),
        **({"lock_subspace": True} if run.get("lock_subspace") else {}),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "init_seconds": round(init_seconds, 1), **fields, **metrics,
    }
    return row


def _apply_safe_lora(model, exp: _Experiment, options: dict) -> dict:
    """Safe LoRA on the trained adapter: C from the experiment's model (the aligned one) and ``options["unaligned"]``
    (its base); returns the row's fields (layers projected, the cosine threshold)."""
    from ..methods.safe_lora import apply_safe_lora
    from ..models import load_model

    unaligned, _ = load_model(options["unaligned"], dtype=exp.dtype)
    result = apply_safe_lora(model, exp.base, unaligned, threshold=options.get("threshold"),
                             num_proj_layers=options.get("num_proj_layers", 10))
    return {"safe_lora_projected": len(result.projected), "safe_lora_threshold": result.threshold,
            "safe_lora_layers": len(result.cosines)}


def _beta_fields(run: dict, choice) -> dict:
    """A row's beta: the run's, or for beta: auto the one chosen, with its budget and what the subspace keeps."""
    if choice is None:
        return {"beta": run.get("beta")}
    return {"beta": choice.beta, "beta_auto_budget": choice.budget, "beta_auto_minus_energy": choice.minus_energy,
            "beta_auto_plus_energy": choice.plus_energy}


def diagnose_experiment(config: ExperimentConfig, output_dir: str | os.PathLike, *, show_progress: bool = True,
                        diagnostics_file: str = "diagnostics.json") -> dict:
    """Subspace diagnostics of every residual-init run of a config, without training (cheap: statistics are
    cached in ``output_dir/stats``); writes ``diagnostics_file``. For experiments run without them, or to see
    what another ``normalize`` or beta would do (``--set``) before training anything."""
    out = Path(output_dir)
    exp = _Experiment(config, out, show_progress, diagnostics_file)
    for run in config.runs:
        if method_spec(run["method"]).residual:
            exp.diagnose(run_name(run), exp.initialize(run)[0], run.get("normalize"))
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
