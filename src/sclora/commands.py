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
from .config import SCLoRAConfig
from .fileio import atomic_write_json, digest
from .models import LOAD_IN
from .options import add_flags, flag_values
from .registry import method_spec
from .train import TrainConfig

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


def _config(args, command: str) -> SCLoRAConfig:
    """The SCLoRAConfig of the flags given (the rest its defaults), checked before anything is loaded."""
    try:
        return SCLoRAConfig(**flag_values(args, SCLoRAConfig))
    except ValueError as err:
        raise SystemExit(f"{command}: {err}") from None


def _init_inputs(args, command: str = "sclora init", loaded: dict | None = None, inherited: int = 0):
    """The init's config and data from ``args``, all checked before any model is loaded; ``loaded`` maps data
    values already read to their examples (finetune's --data, which is also D+ by default); ``inherited`` counts
    the knowledge sets earlier stages bring (finetune --after)."""
    from .models import check_model

    config = _config(args, command)
    spec = method_spec(config.method)
    _check_int(args.seq_len, "--seq-len", 2)
    _check_int(args.seed, "--seed", 0)
    flags = {"plus": "--plus", "minus": "--minus"} if command == "sclora init" else \
        {"plus": "--data", "minus": "--preserve"}
    minus = getattr(args, "minus", None) or []
    minus = [minus] if isinstance(minus, str) else list(minus)  # init_args.json of a single --minus
    if "minus" in spec.needs:
        try:
            config.check_sets(max(1, len(minus) + inherited))  # one --beta (or --budget) per knowledge set
        except ValueError as err:
            brought = f", --after brings {inherited} more" if inherited else ""
            raise SystemExit(f"{command}: {err} ({flags['minus']} was given {len(minus)} time(s){brought})") from None
    wanted = {"plus": [args.plus]} if "plus" in spec.needs else {}
    if "minus" in spec.needs:
        wanted.update({("minus" if len(minus) == 1 else f"minus_{i}"): [v] for i, v in enumerate(minus)} or
                      ({} if inherited else {"minus": [None]}))
    examples = {}
    for label, (value,) in wanted.items():
        flag = flags[label.split("_")[0]]
        if value is None:
            raise SystemExit(f"--method {config.method} needs {flag} DATA (a .jsonl/.csv/.parquet file, a saved "
                             "dataset, or with the kit a name such as safety or trivia:256)")
        examples[label] = (loaded or {}).get(value) or _data(value, args.seed, f"{command} {flag}")
        limit = getattr(args, "stats_samples", None)
        if limit is not None:
            _check_int(limit, "--stats-samples", 1)
            examples[label] = examples[label][:limit]
    check_model(args.model)
    return config, examples


def _load_model(name: str, load_in: str | None = None):
    """load_model, on this process's GPU when several processes share a node's GPUs."""
    from . import distributed
    from .models import load_model

    if not distributed.is_main_process():  # one set of progress bars
        from transformers.utils import logging

        logging.disable_progress_bar()
    model, tokenizer = load_model(name, load_in=load_in)
    if load_in is None and distributed.is_distributed() and distributed.device().type == "cuda":
        model.to(distributed.device())
    return model, tokenizer


def _build_init(args, inputs, model, tokenizer, out: Path):
    """Statistics (cached in out/stats) and the initialized model, deterministically from args."""
    from . import distributed
    from .workflow import init_data
    from .methods import init_model

    config, examples = inputs
    _, data = init_data(model, tokenizer, config, examples, out / "stats", args.seq_len, not args.quiet)
    if distributed.is_main_process():
        config.save_pretrained(out)
    return init_model(model, config, plus=data.get("plus"), minus=data.get("minus"), show_progress=not args.quiet)


def _init(args) -> int:
    from . import distributed
    from .export import save_initial_adapter

    out = Path(args.output)
    inputs = _init_inputs(args)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_model(args.model, args.load_in)
    start = time.perf_counter()
    model = _build_init(args, inputs, model, tokenizer, out)
    if distributed.is_main_process():  # every rank holds the same adapter; one writes it
        if hasattr(model, "peft_config"):
            save_initial_adapter(model, out / "initial_adapter")
        atomic_write_json(out / "init_args.json", vars(args), default=str)
        print(f"initialized {inputs[0].method} in {time.perf_counter() - start:.1f} s; statistics and config in {out}")
    distributed.barrier()
    return 0


def _train_values(args, command: str) -> dict:
    """The TrainConfig values given as flags or --set KEY=VALUE (checked); the rest stay to be chosen."""
    values = {**flag_values(args, TrainConfig), **yaml_overrides(getattr(args, "set", None))}
    try:
        TrainConfig.from_dict(values)
    except ValueError as err:
        raise SystemExit(f"{command}: {err}") from None
    return values


def _train(args) -> int:
    from . import distributed
    from .workflow import check_trainable, export_model
    from .models import model_identity
    from .train import train

    init_dir = Path(args.init)
    try:
        saved = json.loads((init_dir / "init_args.json").read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"sclora train: {init_dir / 'init_args.json'} cannot be read ({err}); run `sclora init "
                         f"--output {init_dir} ...` first.") from None
    init_args = argparse.Namespace(**{**saved, "quiet": args.quiet})
    config = TrainConfig.from_dict(_train_values(args, "sclora train"))
    examples = _data(args.data, init_args.seed, "sclora train --data")
    inputs = _init_inputs(init_args)
    model, tokenizer = _load_model(init_args.model, getattr(init_args, "load_in", None))
    _refuse(check_trainable, tokenizer, examples, config, command="sclora train --data")
    model = _build_init(init_args, inputs, model, tokenizer, init_dir)  # same stats, same init: resumable
    # Under torchrun / accelerate launch Trainer trains with DDP or FSDP; every process holds the whole data
    # and Trainer gives each its share of every global batch (config batch_size).
    # The checkpoints belong to this init and data: a resume from another init's checkpoints is refused.
    context = digest({"init": {k: v for k, v in saved.items() if k not in ("quiet", "output", "func")},
                      "data": str(args.data), "model_files": model_identity(init_args.model)})
    out = Path(args.output)
    result = train(model, tokenizer, examples, config, out / "checkpoints", show_progress=not args.quiet,
                   context=context)
    written = [p for p in export_model(model, tokenizer, out, args.merge) if p is not None]
    if distributed.is_main_process():
        took = "time unknown" if result.total_train_seconds is None else f"{result.total_train_seconds:.1f} s"
        print(f"{result.steps} steps, {took}, {result.total_tokens_per_second:.1f} tokens/s, "
              f"final loss {result.final_loss:.4f}; wrote " + "; ".join(map(str, written)))
    return 0


def _refuse(check, *args, command: str, **kwargs):
    """``check(*args, **kwargs)``, its ValueError turned into a one-line exit naming the command."""
    try:
        return check(*args, **kwargs)
    except ValueError as err:
        raise SystemExit(f"{command}: {err}") from None


def _finetune(args) -> int:
    """sclora.finetune on the command's data: statistics (cached) -> init -> train -> export, resumable."""
    from . import distributed
    from .workflow import finetune
    from .models import model_identity

    config = _config(args, "sclora finetune")  # bad values before any data is read
    given = {"max_length": args.seq_len, "seed": args.seed, **_train_values(args, "sclora finetune")}
    inherited = _after(args, config)
    examples = _data(args.data, args.seed, "sclora finetune --data")
    args.plus, args.minus = args.plus or args.data, args.preserve
    config, sets = _init_inputs(args, "sclora finetune", loaded={args.data: examples}, inherited=inherited)
    model, tokenizer = _load_model(args.model, args.load_in)
    if distributed.is_main_process() and not args.quiet:
        print(f"sclora finetune: {config.method}, {len(examples)} training examples", flush=True)
    preserve = [rows for label, rows in sets.items() if label.startswith("minus")]
    result = _refuse(finetune, model, tokenizer, examples, preserve[0] if len(preserve) == 1 else preserve or None,
                     after=args.after, keep_earlier=args.keep_earlier, replay=args.replay,
                     config=config, train_config=given, output_dir=args.output, plus=sets.get("plus"),
                     stats_samples=None, seq_len=args.seq_len, seed=args.seed, merge=args.merge,
                     show_progress=not args.quiet, context={"model": args.model, "load_in": args.load_in,
                                                             "model_files": model_identity(args.model)},
                     command="sclora finetune")
    if distributed.is_main_process():
        print(result.text)
    return 0


def _after(args, config) -> int:
    """With --after: the base model and its loading taken from the chain (a different --model / --load-in is
    refused), the chain checked; the number of knowledge sets the earlier stages bring. Without: the defaults."""
    from .stages import inherited_sets, read_chain

    if args.after is None:
        args.model = args.model or DEFAULT_MODEL
        if args.replay:
            raise SystemExit("sclora finetune: --replay mixes in earlier stages' examples; give --after DIR.")
        return 0
    try:
        chain = read_chain(args.after)
        n = len(inherited_sets(chain, args.keep_earlier)) if "minus" in method_spec(config.method).needs else 0
    except ValueError as err:
        raise SystemExit(f"sclora finetune --after: {err}") from None
    base = chain[0]["record"]["base"].get("context") or {}
    if "model" not in base:
        raise SystemExit(f"sclora finetune --after: {chain[0]['output_dir']} was not made by `sclora finetune` (it "
                         "does not name its model); continue that chain in Python: sclora.finetune(..., after=...).")
    for flag, key in (("--model", "model"), ("--load-in", "load_in")):
        value = getattr(args, key)
        if value is not None and value != base[key]:
            raise SystemExit(f"sclora finetune: {flag} {value} differs from the chain's base ({base[key]}, from "
                             f"{chain[0]['output_dir']}); leave {flag} out with --after.")
    args.model, args.load_in = base["model"], base["load_in"]
    return n


DEFAULT_MODEL = "smollm2-135m-instruct"


def _common_arguments(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="local model folder, hub id, or the embedded default")
    p.add_argument("--load-in", choices=LOAD_IN, help="load the model's linear layers quantized by bitsandbytes "
                   "(nf4 / fp4: 4-bit, int8), as for QLoRA; the adapter trains in full precision")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example for the statistics (and training)")
    p.add_argument("--seed", type=int, default=0, help="shuffling of the data, and the training seed")
    p.add_argument("--output", required=True)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


DATA_HELP = ("a .jsonl/.json/.csv/.parquet file or a saved dataset folder (rows prompt/response, messages, or "
             "text); PATH:N[:OFFSET]; or '{path: F, prompt: FIELD, response: FIELD, n: N}'")
SET_HELP = "TrainConfig values as KEY=VALUE, e.g. learning_rate=2e-4 (the same as the flags below)"


def add_commands(sub) -> None:
    """Add the library's subcommands to the ``sclora`` parser (entry point ``sclora.commands``)."""
    ft = sub.add_parser("finetune", help="your data, one command: statistics -> init -> train -> adapter, resumable")
    _common_arguments(ft)
    ft.set_defaults(model=None)  # --model and --after: the chain's base; a different one is refused
    ft.add_argument("--stats-samples", type=int, default=256,
                    help="examples of --data / --preserve the statistics use (the paper: 256 each)")
    ft.add_argument("--data", required=True, help="what to learn (D+ and the training set): " + DATA_HELP)
    ft.add_argument("--preserve", action="append", help="what to keep (D-), same forms; with the kit also the "
                    "presets safety, knowledge. Repeat it for several knowledge sets, with one --beta (or "
                    "--budget) each")
    ft.add_argument("--plus", help="D+ for the statistics, if not --data")
    ft.add_argument("--after", metavar="DIR", help="continue a chain: start from the model an earlier `sclora "
                    "finetune --output DIR` left (its base and adapters; --model is taken from it) and keep what it "
                    "learned and kept (its task and knowledge sets join D-, before --preserve's)")
    ft.add_argument("--keep-earlier", action=argparse.BooleanOptionalAction, default=True,
                    help="with --after: the earlier stages' tasks join D- (--no-keep-earlier: only their knowledge "
                    "sets)")
    ft.add_argument("--replay", type=float, default=0.0, metavar="SHARE",
                    help="with --after: also train on this share (e.g. 0.1) of each earlier task's examples")
    ft.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    ft.add_argument("--merge", action="store_true", help="also write merged/: the base model with the adapter merged")
    add_flags(ft, SCLoRAConfig, title="initialization (SCLoRAConfig)")
    add_flags(ft, TrainConfig, skip=("seed",), title="training (TrainConfig; unset: chosen from the data)")
    ft.set_defaults(func=_finetune)
    ini = sub.add_parser("init", help="collect statistics and initialize an adapter (saved for sclora train)")
    _common_arguments(ini)
    ini.add_argument("--plus", help="D+ data: " + DATA_HELP + "; with the kit e.g. math:256")
    ini.add_argument("--minus", action="append", help="D- data, same forms; with the kit e.g. trivia:256 or the "
                     "presets safety, knowledge. Repeat it for several knowledge sets, one --beta each")
    add_flags(ini, SCLoRAConfig, title="initialization (SCLoRAConfig)")
    ini.set_defaults(func=_init)
    tr = sub.add_parser("train", help="fine-tune from an `sclora init` folder; exports a plain LoRA adapter")
    tr.add_argument("--init", required=True, help="folder written by sclora init")
    tr.add_argument("--data", required=True, help="training data: " + DATA_HELP + "; with the kit e.g. math:1024:256")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    tr.add_argument("--merge", action="store_true", help="also write merged/: the base model with the adapter merged")
    tr.add_argument("--output", required=True)
    tr.add_argument("--quiet", action="store_true")
    add_flags(tr, TrainConfig, title="training (TrainConfig; unset: the paper's recipe)")
    tr.set_defaults(func=_train)
