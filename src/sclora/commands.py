"""The practitioner's commands, registered in the entry point group ``sclora.commands`` like any other package's:

    sclora finetune --model DIR --data task.jsonl --preserve keep.jsonl --beta 0.8 --output out/ [--merge]
    sclora init --model DIR --plus task.jsonl --minus keep.jsonl --output runs/init
    sclora train --init runs/init --data task.jsonl --output runs/ft

Data is a local file or saved dataset (:mod:`sclora.data`), or a name an installed package registers (the
paper-reproduction kit: ``math:256``, ``trivia:256:512``, the presets ``safety`` and ``knowledge``). Everything
is checked before a model is loaded; statistics are cached under names that fingerprint them, training resumes
from its last complete checkpoint, and every output is written atomically.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .cli import yaml_overrides
from .config import METHODS
from .fileio import atomic_dir, atomic_write_json, digest

__all__ = ["add_commands"]



def _data(value, seed: int, what: str) -> list[dict]:
    from .data import resolve_data

    try:
        return resolve_data(value, seed)
    except ValueError as err:
        raise SystemExit(f"{what}: {err}") from None


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SystemExit(f"{name} must be a whole number >= {minimum}, got {value!r}")


def _init_inputs(args, command: str = "sclora init", loaded: dict | None = None):
    """The init's config and data from ``args``, all checked before any model is loaded; ``loaded`` maps data
    values already read to their examples (finetune's --data, which is also D+ by default)."""
    from . import SCLoRAConfig
    from .models import check_model
    from .statistics_cache import NEEDS_DATA

    try:
        config = SCLoRAConfig(method=args.method, r=args.r, beta=args.beta, normalize=args.normalize,
                              preserve_budget=getattr(args, "budget", None),
                              quantize_residual=getattr(args, "quantize", None))
    except ValueError as err:
        raise SystemExit(f"{command}: {err}") from None
    _check_int(args.seq_len, "--seq-len", 2)
    _check_int(args.seed, "--seed", 0)
    examples = {}
    for label in {**NEEDS_DATA, "eva": ("plus",)}.get(args.method, ()):  # EVA: D+ batches, not statistics
        value = getattr(args, label)
        flag = {"plus": "--plus", "minus": "--minus"}[label] if command == "sclora init" else \
            {"plus": "--data", "minus": "--preserve"}[label]
        if value is None:
            raise SystemExit(f"--method {args.method} needs {flag} DATA (a .jsonl/.csv/.parquet file, a saved "
                             "dataset, or with the kit a name such as safety or trivia:256)")
        examples[label] = (loaded or {}).get(value) or _data(value, args.seed, f"{command} {flag}")
        limit = getattr(args, "stats_samples", None)
        if limit is not None:
            _check_int(limit, "--stats-samples", 1)
            examples[label] = examples[label][:limit]
    check_model(args.model)
    return config, examples


def _load_model(name: str):
    """load_model, on this process's GPU when several processes share a node's GPUs."""
    from . import distributed
    from .models import load_model

    if not distributed.is_main_process():  # one set of progress bars
        from transformers.utils import logging

        logging.disable_progress_bar()
    model, tokenizer = load_model(name)
    if distributed.is_distributed() and distributed.device().type == "cuda":
        model.to(distributed.device())
    return model, tokenizer


def _build_init(args, inputs, model, tokenizer, out: Path):
    """Statistics (cached in out/stats) and the initialized model, deterministically from args: (model, stats)."""
    from . import distributed, init_model
    from .statistics_cache import cached_statistics, statistics_side

    config, examples = inputs
    if args.method == "eva":  # EVA runs PEFT's incremental SVD over D+ batches itself
        from .statistics_cache import statistics_batches

        stats = {}
        data = {"plus": statistics_batches(tokenizer, examples["plus"], args.seq_len, 8)}
    else:
        stats = {label: cached_statistics(out / "stats", label, model, tokenizer, rows, seq_len=args.seq_len,
                                          batch_size=8, target_modules=config.target_modules,
                                          normalize=config.normalize, side=statistics_side(args.method),
                                          show_progress=not args.quiet)
                 for label, rows in examples.items()}
        data = stats
    if distributed.is_main_process():
        config.save_pretrained(out)
    model = init_model(model, config, plus=data.get("plus"), minus=data.get("minus"), show_progress=not args.quiet)
    return model, stats


def _init(args) -> int:
    from . import distributed
    from .export import save_initial_adapter

    out = Path(args.output)
    inputs = _init_inputs(args)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_model(args.model)
    start = time.perf_counter()
    model, _ = _build_init(args, inputs, model, tokenizer, out)
    if distributed.is_main_process():  # every rank holds the same adapter; one writes it
        if hasattr(model, "peft_config"):
            save_initial_adapter(model, out / "initial_adapter")
        atomic_write_json(out / "init_args.json", vars(args), default=str)
        print(f"initialized {args.method} in {time.perf_counter() - start:.1f} s; statistics and config in {out}")
    distributed.barrier()
    return 0


def _train_config(overrides: dict, command: str):
    from .train import TrainConfig

    try:
        return TrainConfig.from_dict(overrides)
    except ValueError as err:
        raise SystemExit(f"{command}: --set: {err}") from None


def _check_trainable(tokenizer, examples, config, what: str) -> None:
    """Refuse, before statistics and init, data that leaves nothing to train on at ``config.max_length``."""
    import warnings

    from .train import tokenize_examples

    with warnings.catch_warnings():  # train() tokenizes them all and reports the cut and dropped examples itself
        warnings.simplefilter("ignore")
        if any(tokenize_examples(tokenizer, [example], config.max_length, chat=config.chat) for example in examples):
            return  # usually the first example: no second pass over the data
    raise SystemExit(f"{what}: no example keeps a trained token within max_length={config.max_length} (their "
                     "prompts fill it); raise --seq-len / --set max_length=N.")


def _export(model, tokenizer, out: Path, merge: bool) -> list[str]:
    """adapter/ (a plain PEFT LoRA adapter for the untouched base model) or model/ (full fine-tuning), and with
    ``merge`` also merged/ (a transformers model with the adapter merged in). Returns what was written."""
    from . import distributed
    from .export import export_lora, merge_and_save

    written = []
    with distributed.full_parameters(model):  # FSDP: the whole weights, on rank 0
        if distributed.is_main_process():  # one writer; the other ranks wait at the barrier
            if hasattr(model, "peft_config"):
                export_lora(model, out / "adapter")
                written.append(f"{out / 'adapter'}  (PEFT LoRA adapter for the untouched base model)")
                if merge:
                    merge_and_save(model, out / "merged", tokenizer)
                    written.append(f"{out / 'merged'}  (the base model with the adapter merged in)")
            else:  # full fine-tuning: the model itself
                with atomic_dir(out / "model") as tmp:
                    model.save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
                written.append(f"{out / 'model'}  (the fine-tuned model)")
    distributed.barrier()
    return written


def _train(args) -> int:
    from . import distributed
    from .models import model_identity
    from .train import train

    init_dir = Path(args.init)
    try:
        saved = json.loads((init_dir / "init_args.json").read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"sclora train: {init_dir / 'init_args.json'} cannot be read ({err}); run `sclora init "
                         f"--output {init_dir} ...` first.") from None
    init_args = argparse.Namespace(**{**saved, "quiet": args.quiet})
    config = _train_config(yaml_overrides(args.set), "sclora train")
    examples = _data(args.data, init_args.seed, "sclora train --data")
    inputs = _init_inputs(init_args)
    model, tokenizer = _load_model(init_args.model)
    _check_trainable(tokenizer, examples, config, "sclora train --data")
    model, _ = _build_init(init_args, inputs, model, tokenizer, init_dir)  # same stats, same init: resumable
    # Under torchrun / accelerate launch Trainer trains with DDP or FSDP; every process holds the whole data
    # and Trainer gives each its share of every global batch (config batch_size).
    # The checkpoints belong to this init and data: a resume from another init's checkpoints is refused.
    context = digest({"init": {k: v for k, v in saved.items() if k not in ("quiet", "output", "func")},
                      "data": str(args.data), "model_files": model_identity(init_args.model)})
    out = Path(args.output)
    result = train(model, tokenizer, examples, config, out / "checkpoints", show_progress=not args.quiet,
                   context=context)
    written = _export(model, tokenizer, out, args.merge)
    if distributed.is_main_process():
        print(f"{result.steps} steps, {result.train_seconds:.1f} s, {result.tokens_per_second:.1f} tokens/s, "
              f"final loss {result.final_loss:.4f}; wrote " + "; ".join(written))
    return 0


def _finetune(args) -> int:
    """statistics (cached) -> init -> train -> export, resumable, with a summary of what was done and written."""
    from . import distributed
    from .diagnostics import subspace_energy, summarize_energy
    from .export import save_initial_adapter
    from .models import model_identity
    from .train import train

    out = Path(args.output)
    args.plus, args.minus = args.plus or args.data, args.preserve
    config = _train_config({"max_length": args.seq_len, **yaml_overrides(args.set)}, "sclora finetune")
    examples = _data(args.data, args.seed, "sclora finetune --data")
    inputs = _init_inputs(args, "sclora finetune", loaded={args.data: examples})
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_model(args.model)
    _check_trainable(tokenizer, examples, config, "sclora finetune --data")  # before minutes of statistics
    start = time.perf_counter()
    model, stats = _build_init(args, inputs, model, tokenizer, out)
    init_seconds = time.perf_counter() - start
    choice = getattr(model, "sclora_beta_choice", None)
    energy = {}
    if hasattr(model, "peft_config") and "plus" in stats:
        energy = summarize_energy(subspace_energy(model, stats["plus"], stats.get("minus")))["overall"]
    if distributed.is_main_process() and hasattr(model, "peft_config"):
        save_initial_adapter(model, out / "initial_adapter")
    settings = {k: v for k, v in vars(args).items() if k not in ("quiet", "output", "func", "merge")}
    context = digest({"settings": settings, "model_files": model_identity(args.model)})
    result = train(model, tokenizer, examples, config, out / "checkpoints", show_progress=not args.quiet,
                   context=context)
    written = _export(model, tokenizer, out, args.merge)
    if not distributed.is_main_process():
        return 0
    summary = {
        "method": args.method, "r": args.r,
        "beta": (choice.beta if choice else args.beta) if args.method == "sc_lora" else None,
        "beta_chosen_for_budget": choice.budget if choice else None,
        "examples": {"data": len(examples), **{k: len(v) for k, v in inputs[1].items()}},
        "initial_subspace_energy": energy, "init_seconds": round(init_seconds, 1),
        "steps": result.steps, "final_loss": result.final_loss, "train_seconds": round(result.train_seconds, 1),
        "tokens_per_second": round(result.tokens_per_second, 1), "resumed_from_step": result.resumed_from,
        "truncated_examples": result.truncated_examples, "dropped_examples": result.dropped_examples,
        "written": written,
    }
    atomic_write_json(out / "summary.json", summary)
    print(_summary_text(summary))
    return 0


def _summary_text(s: dict) -> str:
    chosen = f", chosen for a D- budget of {s['beta_chosen_for_budget']:.1%}" if s.get("beta_chosen_for_budget") else ""
    lines = [f"sclora finetune: {s['method']}" + (f" (beta {s['beta']:.4g}{chosen})" if s["beta"] is not None else "")
             + f", rank {s['r']}, {s['examples']['data']} training examples"]
    energy = s["initial_subspace_energy"]
    if energy:
        parts = [f"{energy['plus']:.1%} of the training data's (D+)"]
        parts += [f"{v:.1%} of the preserved data's ({k.replace('minus', 'D-')})" for k, v in energy.items()
                  if k.startswith("minus")]
        lines.append("  initial subspace holds " + ", ".join(parts) + " output energy (mean over modules)")
    if s["resumed_from_step"] is not None and s["resumed_from_step"] == s["steps"]:
        lines.append(f"  already trained: all {s['steps']} steps were done (checkpoint at step {s['steps']}), "
                     f"final loss {s['final_loss']:.4f}")
    else:
        resumed = f", resumed from step {s['resumed_from_step']}" if s["resumed_from_step"] else ""
        lines.append(f"  trained {s['steps']} steps in {s['train_seconds']} s ({s['tokens_per_second']} tokens/s"
                     f"{resumed}), final loss {s['final_loss']:.4f}")
    if s["truncated_examples"] or s["dropped_examples"]:
        lines.append(f"  {s['truncated_examples']} examples cut to max_length, {s['dropped_examples']} dropped")
    lines += ["  wrote " + w for w in s["written"]]
    return "\n".join(lines)


def _beta(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"beta must be a number in [0, 1] or auto, got {text!r}") from None


def _init_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="local model folder, hub id, or the embedded "
                   "default")
    p.add_argument("--method", default="sc_lora", choices=list(METHODS))
    # --lora-r: torchrun's own parser rejects "--r" anywhere on its command line (an ambiguous prefix of its options)
    p.add_argument("--r", "--lora-r", dest="r", type=int, default=16, help="LoRA rank (--lora-r under torchrun)")
    p.add_argument("--beta", type=_beta, default=0.5, help="SC-LoRA: weight of preserving D- against fitting D+ "
                   "(0: only fit, 1: only preserve), or auto: the smallest beta meeting --budget")
    p.add_argument("--quantize", choices=["nf4", "fp4"], help="after the init, store the frozen base (W_res) in "
                   "4-bit, QLoRA-style (needs bitsandbytes); the adapter trains in full precision")
    p.add_argument("--budget", type=float, help="with --beta auto: the share of D-'s output energy the initial "
                   "subspace may keep, e.g. 0.05")
    p.add_argument("--normalize", choices=["none", "max_abs", "abs_of_max", "trace"],
                   help="statistics normalization (default: the method's own: none for SC-LoRA, abs_of_max for CorDA)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example for the statistics (and training)")
    p.add_argument("--seed", type=int, default=0, help="shuffling of the data")
    p.add_argument("--output", required=True)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


DATA_HELP = ("a .jsonl/.json/.csv/.parquet file or a saved dataset folder (rows prompt/response, messages, or "
             "text); PATH:N[:OFFSET]; or '{path: F, prompt: FIELD, response: FIELD, n: N}'")


def add_commands(sub) -> None:
    """Add the library's subcommands to the ``sclora`` parser (entry point ``sclora.commands``)."""
    ft = sub.add_parser("finetune", help="your data, one command: statistics -> init -> train -> adapter, resumable")
    _init_arguments(ft)
    ft.add_argument("--stats-samples", type=int, default=256,
                    help="examples of --data / --preserve the statistics use (the paper: 256 each)")
    ft.add_argument("--data", required=True, help="what to learn (D+ and the training set): " + DATA_HELP)
    ft.add_argument("--preserve", help="what to keep (D-), same forms; with the kit also the presets safety, knowledge")
    ft.add_argument("--plus", help="D+ for the statistics, if not --data")
    ft.add_argument("--set", action="append", metavar="KEY=VALUE", help="TrainConfig values, e.g. learning_rate=2e-4")
    ft.add_argument("--merge", action="store_true", help="also write merged/: the base model with the adapter merged")
    ft.set_defaults(func=_finetune)
    ini = sub.add_parser("init", help="collect statistics and initialize an adapter (saved for sclora train)")
    _init_arguments(ini)
    ini.add_argument("--plus", help="D+ data: " + DATA_HELP + "; with the kit e.g. math:256")
    ini.add_argument("--minus", help="D- data, same forms; with the kit e.g. trivia:256 or the presets safety, knowledge")
    ini.set_defaults(func=_init)
    tr = sub.add_parser("train", help="fine-tune from an `sclora init` folder; exports a plain LoRA adapter")
    tr.add_argument("--init", required=True, help="folder written by sclora init")
    tr.add_argument("--data", required=True, help="training data: " + DATA_HELP + "; with the kit e.g. math:1024:256")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="TrainConfig values, e.g. learning_rate=2e-4")
    tr.add_argument("--merge", action="store_true", help="also write merged/: the base model with the adapter merged")
    tr.add_argument("--output", required=True)
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=_train)
