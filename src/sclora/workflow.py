"""The practitioner's workflow in one call: your data and the knowledge to keep -> statistics -> initialization
-> training -> a PEFT adapter (and a merged model), with a summary of what was done.

    result = sclora.finetune(model, tokenizer, "task.jsonl", preserve="keep.jsonl",
                             config=sclora.SCLoRAConfig(r=16, beta=0.8), output_dir="out/")
    print(result.text)

Statistics are cached in ``output_dir/stats`` under names that fingerprint them, training resumes from its last
complete checkpoint in ``output_dir/checkpoints``, and every output is written atomically, so calling it again
after a crash continues where it stopped. ``sclora finetune`` on the command line is this function.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .config import SCLoRAConfig
from .diagnostics import logit_drift
from .fileio import atomic_dir, atomic_write_json, digest
from .registry import method_spec
from .train import TrainConfig, TrainResult, rounded, train

__all__ = ["FinetuneResult", "finetune", "suggest_train_config"]

#: fewer optimizer steps than this rarely move an adapter: the practitioner is warned before training
MIN_STEPS = 20
#: the optimizer steps the suggested settings aim at, at least (more data: one epoch of more steps)
TARGET_STEPS = 40
#: learning rates that suit adapters (LoRA and its inits) and full fine-tuning, with AdamW
ADAPTER_LEARNING_RATE = 2e-4
FULL_LEARNING_RATE = 2e-5


@dataclass
class FinetuneResult:
    """What :func:`finetune` did and wrote."""

    output_dir: Path
    #: the PEFT LoRA adapter for the untouched base model (None for full fine-tuning)
    adapter_dir: Path | None
    #: the base model with the adapter merged in (with ``merge=True``), or the fine-tuned model (full)
    merged_dir: Path | None
    #: the initialization's config as used (with beta="auto": the beta chosen)
    config: SCLoRAConfig
    train_config: TrainConfig
    #: beta="auto": what :func:`sclora.choose_beta` chose, else None
    beta_choice: object | None
    #: shares of D+'s and each D-'s output energy the initial subspace holds (means over modules)
    energy: dict
    #: how far the model at init is from the base as given: ``max_abs_logit`` and ``kl`` on D+ examples
    #: (0 up to rounding for residual inits in full precision, Theorem 2; not 0 on a quantized base)
    init_drift: dict | None
    training: TrainResult
    #: the settings the training steps were chosen from (:func:`suggest_train_config`), key -> value
    chosen: dict
    summary: dict
    #: the summary as printed by ``sclora finetune``
    text: str
    model: nn.Module = field(repr=False)


def suggest_train_config(n_examples: int, *, adapter: bool = True, given: Mapping | None = None
                         ) -> tuple[TrainConfig, dict]:
    """Training settings that give a small data set enough optimizer steps to learn, and a large one the
    paper's batch of 128: ``(config, chosen)``, where ``chosen`` lists the values picked here. ``given`` values
    (e.g. from ``--set``) are kept as they are.

    The effective batch is the largest power of two (from the micro-batch up to 128) leaving at least
    ``TARGET_STEPS`` steps per epoch; the epochs are raised (up to 10) until about ``TARGET_STEPS`` steps; the
    learning rate is 2e-4 for adapters (LoRA's usual rate; the paper's 2e-5 is for its 100k-example sets) and
    2e-5 for full fine-tuning."""
    given = dict(given or {})
    micro = given.get("micro_batch_size", TrainConfig.micro_batch_size)
    chosen = {}
    if "learning_rate" not in given:
        chosen["learning_rate"] = ADAPTER_LEARNING_RATE if adapter else FULL_LEARNING_RATE
    batch = given.get("batch_size")
    if batch is None and isinstance(micro, int) and micro > 0:
        batch = micro
        while batch * 2 <= 128 and n_examples / (batch * 2) >= TARGET_STEPS:
            batch *= 2
        chosen["batch_size"] = batch
    if "num_epochs" not in given and given.get("max_steps", -1) == -1 and isinstance(batch, int) and batch > 0:
        per_epoch = max(1, n_examples // batch)
        chosen["num_epochs"] = float(min(10, max(1, math.ceil(TARGET_STEPS / per_epoch))))
    return TrainConfig.from_dict({**given, **chosen}), chosen


def planned_steps(n_examples: int, config: TrainConfig) -> int:
    """Optimizer steps ``config`` takes over ``n_examples`` (Trainer's count for one process)."""
    if config.max_steps > 0:
        return config.max_steps
    # Trainer counts a last, shorter accumulation as a step
    per_epoch = max(1, math.ceil(math.ceil(n_examples / config.micro_batch_size) / config.gradient_accumulation_steps))
    return math.ceil(per_epoch * config.num_epochs)


def finetune(
    model: nn.Module,
    tokenizer,
    data,
    preserve=None,
    *,
    after=None,
    keep_earlier: bool = True,
    replay: float = 0.0,
    config: SCLoRAConfig | None = None,
    train_config: TrainConfig | Mapping | None = None,
    output_dir: str | Path,
    plus=None,
    stats_samples: int | None = 256,
    seq_len: int = 256,
    seed: int = 0,
    merge: bool = False,
    show_progress: bool = True,
    context=None,
    stats_dir: str | Path | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` with an adapter initialized by ``config.method``, keeping ``preserve``.

    ``data`` (what to learn; also D+ for the statistics unless ``plus`` is given) and each knowledge set are
    examples (dicts ``{"prompt", "response"}``, ``{"messages"}`` or ``{"text"}``) or a source
    :func:`sclora.load_examples` reads (a .jsonl/.json/.csv/.parquet file, a saved dataset, ``PATH:N``).
    ``preserve`` is one knowledge set (D-) or a list of several, each with its own beta
    (``config=SCLoRAConfig(beta=[0.4, 0.4])``) or budget (``beta="auto", preserve_budget=[0.05, 0.05]``).
    The statistics use the first ``stats_samples`` examples of each set, ``seq_len`` tokens each.

    ``train_config=None`` chooses the training settings from the data (:func:`suggest_train_config`: enough
    optimizer steps to learn, 2e-4 for adapters); a mapping of TrainConfig values keeps those and chooses the
    rest; with fewer than 20 planned steps a warning is given before training. The model may be loaded in 4-bit or 8-bit (bitsandbytes): statistics come from its own forward,
    the decomposition runs on the dequantized weights, the residual is stored back in the layer's format, and
    :attr:`FinetuneResult.init_drift` says how far the model at init is from the quantized base.

    Writes ``output_dir/adapter`` (a PEFT LoRA adapter for the untouched base model; full fine-tuning:
    ``output_dir/model``), with ``merge`` also ``output_dir/merged``, and ``output_dir/summary.json``.
    ``context`` is anything further a resume must match (e.g. the model files' identity). The statistics are
    cached in ``stats_dir`` (default ``output_dir/stats``); runs that share one folder, e.g. the learning-rate
    candidates of one stage, collect each set once: the file names fingerprint the model and the data.

    Continual fine-tuning (:mod:`sclora.stages`): ``after`` is an earlier stage (its FinetuneResult or output
    folder) and ``model`` the base that chain started from. The earlier stages' adapters are merged into it, their
    knowledge sets and (``keep_earlier``) their tasks join D- before ``preserve``'s sets (one beta or budget per set,
    in that order; the error lists them), and ``replay`` (a share, e.g. 0.1) of each earlier task's examples joins
    the training data. ``output_dir/stage.json`` records the chain, so a later stage can continue it and a stage
    whose earlier ones changed is refused as stale.
    """
    from . import stages

    from .data import resolve_data

    config = config if config is not None else SCLoRAConfig()
    spec = method_spec(config.method)
    out = Path(output_dir)
    chain = stages.read_chain(after)  # a missing, unfinished or changed earlier stage: refused before any work
    if isinstance(replay, bool) or not isinstance(replay, (int, float)) or not 0 <= replay < 1:
        raise ValueError(f"replay must be a share in [0, 1) of each earlier task's examples, got {replay!r}.")
    if replay and not chain:
        raise ValueError("replay mixes in earlier stages' examples; none were given (after=).")
    if chain and not spec.adapter:
        raise ValueError(f"method {config.method!r} trains no adapter; a stage after earlier ones needs an adapter "
                         "method (each stage's adapter is merged into the next stage's base).")
    if chain and _quantized_base(model):
        raise ValueError("after= on a 4-bit / 8-bit base: merging the earlier stages' adapters into quantized weights "
                         "would round them; load the base in full precision (or bf16) for a chain of stages.")

    def examples_of(value, what: str) -> list[dict]:
        if isinstance(value, (list, tuple)) and all(isinstance(row, Mapping) for row in value):
            return list(value)
        try:
            return resolve_data(value, seed)
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None

    examples = examples_of(data, "data")
    if not examples:
        raise ValueError("data holds no examples; give at least one example to learn.")
    sets = {"plus": examples_of(plus, "plus") if plus is not None else examples}
    given = _knowledge_sets(preserve)
    kept = stages.distinct(stages.inherited_sets(chain, keep_earlier) + [
        ("preserve" if len(given) == 1 else f"preserve[{i}]", examples_of(value, "preserve" if len(given) == 1
                                                                           else f"preserve[{i}]"))
        for i, value in enumerate(given)])  # a set given again (e.g. the same knowledge set) counts once
    if "minus" in spec.needs and not kept:
        raise ValueError(f"method {config.method!r} needs the knowledge to keep: pass preserve= (a file or "
                         "examples; a list of them for several sets).")
    if given and "minus" not in spec.needs:
        warnings.warn(f"method {config.method!r} does not use preserve=; it is ignored.", stacklevel=2)
    if "minus" in spec.needs:
        try:
            config.check_sets(max(1, len(kept)))
        except ValueError as err:
            if not chain:
                raise
            names = "; ".join(f"{i + 1}. {name}" for i, (name, _) in enumerate(kept))
            raise ValueError(f"{err} This stage keeps {len(kept)} knowledge set(s), in this order: {names}.") from None
        for i, (_, rows) in enumerate(kept):
            sets[_minus_label(i, len(kept))] = rows
    sets = {label: rows for label, rows in sets.items() if label.startswith("minus") or label in spec.needs}
    task = examples
    examples = examples + stages.replay_examples(chain, replay, seed)
    if stats_samples is not None:
        sets = {label: rows[:stats_samples] for label, rows in sets.items()}

    chosen = {}
    if not isinstance(train_config, TrainConfig):
        given = {"max_length": seq_len, **(train_config or {})}
        train_config, chosen = suggest_train_config(len(examples), adapter=spec.adapter, given=given)
    check_trainable(tokenizer, examples, train_config)
    if train_config.orthogonal_penalty > 0 and not chain:
        raise ValueError("orthogonal_penalty > 0 (O-LoRA) keeps the adapter orthogonal to earlier stages' adapters; "
                         "none were given: pass after= (or set orthogonal_penalty=0).")
    steps = planned_steps(len(examples), train_config)
    if steps < MIN_STEPS and distributed.is_main_process():
        warnings.warn(f"{len(examples)} examples at batch_size={train_config.batch_size} and num_epochs="
                      f"{train_config.num_epochs:g} give {steps} optimizer step(s): too few for the adapter to "
                      f"learn much. Lower batch_size or raise num_epochs for at least {MIN_STEPS}.", stacklevel=2)

    links = [{"output_dir": c["output_dir"], "digest": c["digest"]} for c in chain]
    stages.check_not_stale(out, links)
    fingerprint = stages.base_fingerprint(model, config.target_modules)
    if chain:
        stages.check_base(model, chain, fingerprint)
    base = chain[0]["record"]["base"] if chain else {"fingerprint": fingerprint, "context": context}
    # everything the stage's result depends on: a finished stage made from the same is returned as it is on disk
    set_digests = {k: digest(v) for k, v in sets.items()}  # hashed once: the inputs and the checkpoints' context
    inputs = digest({"base": fingerprint, "context": context, "chain": links, "config": config.to_dict(),
                     "train": train_config.to_dict(), "examples": digest(examples),
                     "sets": set_digests, "seq_len": seq_len, "merge": merge})
    done = stages.finished_stage(out, inputs)  # one made from other inputs: refused
    if done is not None and not _quantized_base(model) and config.quantize_residual is None:
        return _finished_result(model, chain, out, done, train_config, chosen)
    out.mkdir(parents=True, exist_ok=True)
    record = {"status": "running", "inputs": inputs, "base": base, "chain": links, "method": config.method,
              "keep_earlier": keep_earlier, "replay": replay,
              "task": stages.write_examples(out, "task", task),
              "preserved": [{"name": name, "task": stages.is_task(name),
                             **stages.write_examples(out, f"preserve_{i}", rows)}
                            for i, (name, rows) in enumerate(kept)]}
    if distributed.is_main_process():
        stages.write_stage(out, {**record, "config": config.to_dict()})
    start = time.perf_counter()
    merge_seconds = 0.0
    if chain:
        model = stages.apply_chain(model, chain)
        merge_seconds = time.perf_counter() - start
    stats_dir = Path(stats_dir) if stats_dir is not None else out / "stats"
    stats, data_args = init_data(model, tokenizer, config, sets, stats_dir, seq_len, show_progress)
    stats_seconds = time.perf_counter() - start - merge_seconds
    probe = _probe_batch(tokenizer, sets.get("plus") or examples, seq_len) if spec.residual or \
        config.quantize_residual else None
    before = _logits(model, probe) if probe is not None else None
    quantized_base = _quantized_base(model)
    choice = None
    if config.beta == "auto" and spec.name == "sc_lora":
        from .methods import choose_beta

        cache = _beta_choice_path(stats_dir, config, stats)
        choice = _saved_beta_choice(cache)
        if choice is None:
            choice = choose_beta(model, data_args["plus"], data_args["minus"], r=config.r,
                                 budget=config.preserve_budget, target_modules=config.target_modules,
                                 dtype=config.torch_dtype, solver=config.eigen_solver, show_progress=show_progress)
            if cache is not None and distributed.is_main_process():
                atomic_write_json(cache, asdict(choice))
        config = config.replace(beta=choice.beta, preserve_budget=None)
    if distributed.is_main_process():
        config.save_pretrained(out)
    from .methods import init_model

    model = init_model(model, config.replace(quantize_residual=None), plus=data_args.get("plus"),
                       minus=data_args.get("minus"), show_progress=show_progress)
    restored = False
    if hasattr(model, "peft_config"):  # an interrupted run of this stage resumes from the init it trained from
        from .export import restore_initial_adapter

        restored = restore_initial_adapter(model, out / "initial_adapter", inputs, residual=spec.residual)
    quantization = None
    if config.quantize_residual is not None:  # after the full-precision init, the frozen base in 4-bit
        from .quantize import quantize_frozen_linears

        quantization = quantize_frozen_linears(model, config.quantize_residual)
    init_seconds = time.perf_counter() - start
    drift = logit_drift(before, _logits(model, probe), probe["attention_mask"]) if probe is not None else None
    energy = {}
    if hasattr(model, "peft_config") and spec.residual and "plus" in stats:
        from .diagnostics import subspace_energy, summarize_energy

        energy = summarize_energy(subspace_energy(model, stats["plus"], _minus(stats)))["overall"]
    if distributed.is_main_process() and hasattr(model, "peft_config") and not restored:
        from .export import save_initial_adapter

        save_initial_adapter(model, out / "initial_adapter", inputs)
    # what a resume of the checkpoints must match beyond the training config and examples (train() checks those)
    run_context = digest({"config": config.to_dict(), "sets": set_digests,
                          "seq_len": seq_len, "context": context, **({"chain": links} if links else {})})
    result = train(model, tokenizer, examples, train_config, out / "checkpoints", show_progress=show_progress,
                   context=run_context,
                   orthogonal_to=stages.earlier_lora_A(chain) if train_config.orthogonal_penalty > 0 else None)
    adapter_dir, merged_dir = export_model(model, tokenizer, out, merge)
    summary = {
        "method": config.method, "r": config.r,
        "beta": config.beta if spec.name == "sc_lora" else None,
        "beta_chosen_for_budget": choice.budget if choice else None,
        "examples": {"data": len(examples), **{k: len(v) for k, v in sets.items()}},
        "after": [c["output_dir"] for c in chain],
        "kept_sets": [name for name, _ in kept] if "minus" in spec.needs else [],  # D-: none for LoRA
        "replayed_examples": len(examples) - len(task), "statistics_seconds": round(stats_seconds, 1),
        "merge_seconds": round(merge_seconds, 1),
        "train": {k: getattr(train_config, k) for k in ("learning_rate", "batch_size", "num_epochs", "max_steps")},
        "chosen": chosen, "planned_steps": steps,
        "initial_subspace_energy": energy, "init_drift": drift, "quantization": quantization,
        "quantized_base": quantized_base, "init_seconds": round(init_seconds, 1), "init_restored": restored,
        "steps": result.steps, "final_loss": result.final_loss, "loss_fell": loss_fell(result.loss_history),
        "loss_history": [list(p) for p in result.loss_history],
        "beta_choice": asdict(choice) if choice else None,
        # the whole stage's training, also when it resumed from a checkpoint (None: a checkpoint without a record)
        "train_seconds": rounded(result.total_train_seconds),
        "tokens_per_second": rounded(result.total_tokens_per_second),
        "resumed_from_step": result.resumed_from, "truncated_examples": result.truncated_examples,
        "dropped_examples": result.dropped_examples,
        "written": [str(p) for p in (adapter_dir, merged_dir) if p is not None],
    }
    summary = json.loads(json.dumps(summary))  # as summary.json holds it (tuples as lists)
    text = summary_text(summary)
    if distributed.is_main_process():
        atomic_write_json(out / "summary.json", summary)
        stages.write_stage(out, {**record, "config": config.to_dict(), "status": "done",
                                 "adapter": adapter_dir.name if adapter_dir else None,
                                 "merged": merged_dir.name if merged_dir else None})
    return FinetuneResult(out, adapter_dir, merged_dir, config, train_config, choice,
                          energy, drift, result, chosen, summary, text, model)


def _finished_result(base: nn.Module, chain: list[dict], out: Path, record: dict, train_config: TrainConfig,
                     chosen: dict) -> FinetuneResult:
    """The FinetuneResult of the finished stage in ``out``, read from disk without recomputing anything: the base
    with the earlier stages' adapters merged in and this stage's adapter loaded on top (a recomputed init could
    differ in its last bits on another machine or thread count, and would make the stages after it stale)."""
    from peft import PeftModel

    from . import stages

    summary = json.loads((out / "summary.json").read_text())  # train_seconds: what the stage's training took
    summary["resumed_from_step"] = summary["steps"]
    model = PeftModel.from_pretrained(stages.apply_chain(base, chain), out / record["adapter"])
    config = SCLoRAConfig.from_pretrained(out)
    choice = summary.get("beta_choice")
    training = TrainResult(steps=summary["steps"], train_seconds=0.0, tokens_per_second=0.0,  # nothing trained now
                           total_train_seconds=summary["train_seconds"],
                           loss_history=[tuple(p) for p in summary.get("loss_history", [])],
                           final_loss=summary["final_loss"], resumed_from=summary["steps"],
                           dropped_examples=summary["dropped_examples"],
                           truncated_examples=summary["truncated_examples"])
    merged = out / record["merged"] if record.get("merged") else None
    return FinetuneResult(out, out / record["adapter"], merged, config, train_config,
                          _beta_choice(choice) if choice else None, summary["initial_subspace_energy"],
                          summary["init_drift"], training, chosen, summary, summary_text(summary), model)


def _beta_choice(saved: dict):
    """A BetaChoice from its summary.json form (JSON lists back to the tuples of several sets)."""
    from .methods import BetaChoice

    def tuples(value):
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    return BetaChoice(**{k: [tuples(t) for t in v] if k == "tried" else tuples(v) for k, v in saved.items()})


def _beta_choice_path(stats_dir: Path, config: SCLoRAConfig, stats: dict) -> Path | None:
    """Where the β chosen for a budget is cached next to the statistics it was searched on: the name carries the
    statistics files' names (which fingerprint model and data), the whole config (budget, r, solver, ...) and
    the search's version, so the learning-rate candidates of one stage search once. None when a set's statistics have no file."""
    files = [getattr(getattr(s, "sums", None), "path", None) for s in stats.values()]  # sclora.statistics.FileSums
    names = [Path(f).name if f else None for f in files]
    if not names or None in names:
        return None
    from .methods.sc_lora import BETA_SEARCH_VERSION

    key = {'stats': names, 'config': config.to_dict(), 'search': BETA_SEARCH_VERSION}
    return stats_dir / f"beta-choice-{digest(key)}.json"


def _saved_beta_choice(path: Path | None):
    """The BetaChoice cached at ``path``, or None (no file, or one that cannot be read: it is searched again)."""
    if path is None or not path.exists():
        return None
    try:
        return _beta_choice(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError):
        warnings.warn(f"{path} cannot be read; choosing beta again.", stacklevel=3)
        return None


def _knowledge_sets(preserve) -> list:
    """``preserve`` as a list of knowledge sets: None -> [], one set (a source, or a list of example dicts) ->
    [it], a list of sets -> the list."""
    if preserve is None:
        return []
    if isinstance(preserve, (list, tuple)) and preserve and not all(isinstance(r, Mapping) for r in preserve):
        return list(preserve)
    return [preserve]


def _minus_label(i: int, n: int) -> str:
    return "minus" if n == 1 else f"minus_{i}"


def _minus(stats: dict):
    minus = [value for key, value in stats.items() if key.startswith("minus")]  # in the order of the sets
    return None if not minus else minus[0] if len(minus) == 1 else minus


def init_data(model, tokenizer, config: SCLoRAConfig, sets: dict, stats_dir: Path, seq_len: int,
              show_progress: bool):
    """(statistics by label, the init's plus= / minus= arguments) for ``sets`` (label -> examples: "plus",
    "minus" or "minus_0", "minus_1", ...): statistics on the method's side, cached in ``stats_dir``, or for a
    method that reads batches (EVA), the batches."""
    from .statistics_cache import cached_statistics, statistics_batches

    spec = method_spec(config.method)
    if spec.data_form == "batches":
        return {}, {"plus": statistics_batches(tokenizer, sets["plus"], seq_len, 8)}
    stats = {label: cached_statistics(stats_dir, label, model, tokenizer, rows, seq_len=seq_len, batch_size=8,
                                      target_modules=config.target_modules, normalize=config.resolved_normalize,
                                      side=spec.side, show_progress=show_progress)
             for label, rows in sets.items()}
    return stats, {"plus": stats.get("plus"), "minus": _minus(stats)}


def _probe_batch(tokenizer, examples: list[dict], seq_len: int, n: int = 8) -> dict:
    """A batch of the first ``n`` examples, to compare the model at init with the base."""
    from .statistics_cache import statistics_batches

    return statistics_batches(tokenizer, examples[:n], seq_len, n)[0]


@torch.no_grad()
def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    from .layers import without_cpu_repacking

    device = next(model.parameters()).device
    with without_cpu_repacking(model):  # a 4-bit base's storage stays as loaded (sclora.layers)
        return model(input_ids=batch["input_ids"].to(device),
                     attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()


def _quantized_base(model: nn.Module) -> str | None:
    """The bitsandbytes formats of the model's frozen target layers (e.g. "nf4"), or None."""
    from .layers import is_quantized, layer_kind

    kinds = sorted({getattr(m.weight, "quant_type", "4bit") if layer_kind(m) == "4bit" else "int8"
                    for m in model.modules() if is_quantized(m)})
    return ", ".join(kinds) or None


def loss_fell(history: Sequence[tuple[int, float]]) -> bool | None:
    """Whether the training loss fell: the mean of the last fifth of the logged losses is at least 2% below the
    mean of the first fifth (None with fewer than two logged losses)."""
    losses = [loss for _, loss in history if loss is not None and math.isfinite(loss)]
    if len(losses) < 2:
        return None
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return last < 0.98 * first


def check_trainable(tokenizer, examples, config: TrainConfig) -> None:
    """Refuse, before statistics and init, data that leaves nothing to train on at ``config.max_length``."""
    from .train import tokenize_examples

    with warnings.catch_warnings():  # train() tokenizes them all and reports the cut and dropped examples itself
        warnings.simplefilter("ignore")
        if any(tokenize_examples(tokenizer, [example], config.max_length, chat=config.chat) for example in examples):
            return  # usually the first example: no second pass over the data
    raise ValueError(f"data: no example keeps a trained token within max_length={config.max_length} (their "
                     "prompts fill it); raise seq_len / max_length.")


def export_model(model, tokenizer, out: Path, merge: bool) -> tuple[Path | None, Path | None]:
    """adapter/ (a plain PEFT LoRA adapter for the untouched base model) or model/ (full fine-tuning), and with
    ``merge`` also merged/ (a transformers model with the adapter merged in)."""
    from .export import export_lora, merge_and_save

    adapter = merged = None
    with distributed.full_parameters(model):  # FSDP: the whole weights, on rank 0
        if hasattr(model, "peft_config"):
            adapter = out / "adapter"
            merged = out / "merged" if merge else None
            if distributed.is_main_process():  # one writer; the other ranks wait at the barrier
                export_lora(model, adapter)
                if merge:
                    merge_and_save(model, merged, tokenizer)
        else:  # full fine-tuning: the model itself
            merged = out / "model"
            if distributed.is_main_process():
                with atomic_dir(merged) as tmp:
                    model.save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
    distributed.barrier()
    return adapter, merged


def summary_text(s: dict) -> str:
    """The summary of a :func:`finetune` run as ``sclora finetune`` prints it."""
    chosen = f", chosen for a D- budget of {_shares(s['beta_chosen_for_budget'])}" if s.get("beta_chosen_for_budget") \
        else ""
    beta = s["beta"]
    beta_text = "" if beta is None else f" (beta {_numbers(beta)}{chosen})"
    lines = [f"sclora finetune: {s['method']}{beta_text}, rank {s['r']}, {s['examples']['data']} training examples"]
    if s.get("after"):
        replayed = f", {s['replayed_examples']} of them replayed from earlier tasks" if s.get("replayed_examples") \
            else ""
        lines.append(f"  stage {len(s['after']) + 1} of a chain, after {', '.join(s['after'])}{replayed}; "
                     f"D- sets: {', '.join(s['kept_sets']) or 'none'}; statistics {s['statistics_seconds']} s, "
                     f"merging the earlier adapters {s['merge_seconds']} s")
    t = s["train"]
    picked = f"; chosen from the data: {', '.join(sorted(s['chosen']))}" if s.get("chosen") else ""
    lines.append(f"  training: lr {t['learning_rate']:g}, batch {t['batch_size']}, "
                 + (f"max_steps {t['max_steps']}" if t["max_steps"] > 0 else f"{t['num_epochs']:g} epoch(s)")
                 + f", {s['planned_steps']} optimizer steps{picked}")
    energy = s["initial_subspace_energy"]
    if energy:
        parts = [f"{energy['plus']:.1%} of the training data's (D+)"]
        parts += [f"{v:.1%} of the preserved data's ({k.replace('minus', 'D-')})" for k, v in energy.items()
                  if k.startswith("minus")]
        lines.append("  initial subspace holds " + ", ".join(parts) + " output energy (mean over modules)")
    drift = s.get("init_drift")
    if drift:
        exact = "" if s.get("quantization") or s.get("quantized_base") else " (Theorem 2: 0 up to rounding)"
        lines.append(f"  model at init vs the base as given: max |delta logit| {drift['max_abs_logit']:.3g}, "
                     f"KL {drift['kl']:.3g} nats/token{exact}")
    if s.get("quantized_base"):
        lines.append(f"  quantized base ({s['quantized_base']}): the residual is stored back in the layers' own "
                     "format, so the model at init differs from the base by that rounding; the adapter is float32")
    q = s.get("quantization")
    if q:
        lines.append(f"  frozen base stored in 4-bit: {q['layers']} layers, {q['bytes_before'] / 2**20:.1f} MiB -> "
                     f"{q['bytes_after'] / 2**20:.1f} MiB")
    if s["resumed_from_step"] is not None and s["resumed_from_step"] == s["steps"]:
        lines.append(f"  already trained: all {s['steps']} steps were done (checkpoint at step {s['steps']}), "
                     f"final loss {s['final_loss']:.4f}")
    else:
        resumed = f", resumed from step {s['resumed_from_step']}" if s["resumed_from_step"] else ""
        took = "an unknown time" if s["train_seconds"] is None else f"{s['train_seconds']} s"
        lines.append(f"  trained {s['steps']} steps in {took} ({s['tokens_per_second']} tokens/s"
                     f"{resumed}), final loss {s['final_loss']:.4f}")
    if s.get("loss_fell") is False:
        lines.append("  WARNING: the training loss did not fall: the adapter may have learned nothing. Raise the "
                     "learning rate or the number of steps (more epochs, a smaller batch).")
    if s["truncated_examples"] or s["dropped_examples"]:
        lines.append(f"  {s['truncated_examples']} examples cut to max_length, {s['dropped_examples']} dropped")
    lines += ["  wrote " + w for w in s["written"]]
    return "\n".join(lines)


def _numbers(value) -> str:
    return "+".join(f"{v:.4g}" for v in value) if isinstance(value, (list, tuple)) else f"{value:.4g}"


def _shares(value) -> str:
    return "+".join(f"{v:.1%}" for v in value) if isinstance(value, (list, tuple)) else f"{value:.1%}"

