"""The commands of the paper-reproduction kit, added to the ``sclora`` command line through the entry point
group ``sclora.commands`` (pyproject.toml): ``init``, ``train`` (on the catalogue's data specs), ``run``,
``diagnose``, ``report``, ``eval`` and ``align``. Thin wrappers over the kit and the library.

    sclora eval --model smollm2-135m-instruct --suite knowledge [--limit 200] [--out results.json]
    sclora run configs/demo.yaml --output runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..cli import yaml_overrides
from ..fileio import atomic_dir, atomic_write_json, digest, locked, safe_name

__all__ = ["add_commands", "install_aligned"]


def _eval(args) -> int:
    import torch

    from ..models import load_model
    from .suites import run_suite, suite_sets

    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size), ("--num-fewshot", args.num_fewshot)):
        if value is not None and value < (0 if flag == "--num-fewshot" else 1):
            raise SystemExit(f"sclora eval: {flag} must be >= {0 if flag == '--num-fewshot' else 1}, got {value}")
    if args.num_fewshot is not None and args.suite != "knowledge":
        raise SystemExit("--num-fewshot applies to --suite knowledge only")
    num_fewshot = 5 if args.num_fewshot is None else args.num_fewshot
    judge = None
    if args.suite == "safety":
        from .evaluate.judges import make_judge

        judge_kwargs = {"llm": {"base_url": args.judge_url, "model": args.judge_model, "api_key_env": args.judge_key_env,
                                "allow_insecure_http": args.judge_allow_http},
                        "local": {"path": args.judge_model}, "refusal": {}}[args.judge]
        if args.judge != "refusal" and not args.judge_model:
            raise SystemExit(f"--judge {args.judge} needs --judge-model" + (" and --judge-url" if args.judge == "llm" else ""))
        try:
            judge = make_judge(args.judge, **judge_kwargs)
        except ValueError as err:
            raise SystemExit(f"sclora eval: {err}") from None
    try:
        suite_sets(args.suite, limit=args.limit, num_fewshot=num_fewshot)  # the data checked before the model loads
    except ValueError as err:
        raise SystemExit(f"sclora eval: {err}") from None
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    record = {"model": args.model, **run_suite(args.suite, model, tokenizer, limit=args.limit, num_fewshot=num_fewshot,
                                               batch_size=args.batch_size, judge=judge, show_progress=not args.quiet)}
    print(format_table(record))
    out = Path(args.out or f"eval-{args.suite}.json")
    atomic_write_json(out, record, default=str)
    print(f"wrote {out}")
    return 0


def _run(args) -> int:
    from .folder import check_folder, read_results, results_table, running_elsewhere
    from .runner import run_experiment
    from .spec import load_config, run_name

    overrides = yaml_overrides(args.set)
    config = load_config(args.config, overrides)
    if args.dry_run:
        from .spec import plan

        print(plan(config))
        return 0
    if not args.output:
        raise SystemExit("sclora run: --output DIR is required (or use --dry-run to only check the config).")
    if args.workers < 1:
        raise SystemExit(f"sclora run: --workers must be >= 1, got {args.workers}.")
    check_folder(config, Path(args.output), archive=args.archive)  # before any worker looks at the folder
    helpers = _spawn_workers(args) if args.workers > 1 else []
    rows = run_experiment(config, args.output, show_progress=not args.quiet, archive=args.archive)
    failed = [p.args for p in helpers if p.wait() != 0]
    if failed:
        raise SystemExit(f"sclora run: {len(failed)} worker process(es) failed; rerun the same command to resume.")
    rows = read_results(args.output)  # with the rows the other workers finished after this process
    print(results_table(rows))
    print(f"wrote {Path(args.output) / 'results.json'} and results.md")
    missing = [n for n in ["base", *(run_name(r) for r in config.runs)] if n not in {r["run"] for r in rows}]
    if missing:  # run by other processes on this folder right now, or left by one that died meanwhile
        busy = running_elsewhere(Path(args.output), missing)
        free = [n for n in missing if n not in busy]
        if busy:
            print(f"still running in another process: {', '.join(busy)} (they add their rows when done)")
        if free:
            print(f"not finished: {', '.join(free)} (their process stopped); rerun this command to finish them")
            return 3
    return 0


def _spawn_workers(args) -> list:
    """N-1 more ``sclora run`` processes on the same config and folder; each claims the runs nobody else has.
    Threads are split between them: on a small CPU, one single-thread process per core trains faster in total
    than one process using every core."""
    import subprocess

    import torch

    threads = max(1, (os.cpu_count() or 1) // args.workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    torch.set_num_threads(threads)
    command = [sys.executable, "-m", "sclora", "run", args.config, "--output", args.output, "--quiet",
               "--workers", "1", *[f"--set={kv}" for kv in args.set or []]]  # after this process's folder check
    return [subprocess.Popen(command, env=env) for _ in range(args.workers - 1)]


def _diagnose(args) -> int:
    from .runner import diagnose_experiment
    from .spec import load_config

    config = load_config(args.config, yaml_overrides(args.set))
    safe_name(args.file, "--file")  # a file name inside the output folder, not a path out of it
    diagnostics = diagnose_experiment(config, args.output, show_progress=not args.quiet, diagnostics_file=args.file)
    from ..diagnostics import summarize_energy

    print(f"captured output energy, mean over modules (normalize={config.normalize}):")
    for run, entries in diagnostics.items():
        overall = summarize_energy(entries)["overall"]
        print(f"  {run:<28} " + "  ".join(f"{k} {v:.3f}" for k, v in overall.items()))
    print(f"subspace diagnostics of {len(diagnostics)} run(s) in {Path(args.output) / args.file}")
    return 0


def _report(args) -> int:
    from .report import ReportError, load_experiment, report_tables, write_report

    status = 0
    for directory in args.dirs:
        try:
            path = write_report(directory)
        except ReportError as err:
            print(f"sclora report: {err}", file=sys.stderr)
            status = 1  # keep going: one broken folder should not hide the others' reports
            continue
        rows, config, _ = load_experiment(directory)
        print(report_tables(rows, config))
        print(f"wrote {path}")
    return status


def _align(args) -> int:
    import torch

    from ..models import load_model
    from .align import AlignConfig, align

    model, tokenizer = load_model(args.model, dtype=torch.float32)
    report = align(model, tokenizer, AlignConfig(seed=args.seed), args.output, show_progress=not args.quiet)
    for stage in ("before", "after"):
        print(f"{stage:>6}: refuses {report[stage]['heldout_refusal_rate']:.1f}% of held-out harmful prompts, "
              f"{report[stage]['benign_refusal_rate']:.1f}% of benign ones")
    print(f"aligned model in {Path(args.output) / 'model'}; report in {Path(args.output) / 'align_report.json'}")
    if args.install:
        install_aligned(Path(args.output) / "model")
    return 0


def install_aligned(model_dir: Path) -> Path:
    """Copy an aligned model to the cache under the name `smollm2-135m-instruct-aligned`."""
    import shutil

    from ..models import ALIGNED_MODEL, aligned_model_path

    target = aligned_model_path()
    with locked(target), atomic_dir(target) as tmp:  # one installer at a time; readers see old or new
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
    print(f"installed as {ALIGNED_MODEL!r} ({target})")
    return target


def _data_spec(text: str):
    """'kind:n[:offset[:split]]', e.g. 'math:256' or 'trivia:256:512' or 'math:64:0:heldout'."""
    from .spec import DataSpec

    parts = text.split(":")
    numbers = parts[1:3]
    if not 2 <= len(parts) <= 4 or not all(p.isdigit() for p in numbers):
        raise SystemExit(f"data spec {text!r}: expected kind:n[:offset[:split]] with whole numbers n and offset, "
                         "e.g. math:256, trivia:256:512 or math:64:0:heldout")
    try:
        return DataSpec(parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else 0,
                        parts[3] if len(parts) > 3 else "train")
    except ValueError as err:
        raise SystemExit(f"data spec {text!r}: {err}") from None


def _init_inputs(args):
    """The init's config and data from ``args``, all checked before any model is loaded."""
    from .. import SCLoRAConfig
    from ..models import check_model
    from ..statistics_cache import NEEDS_DATA
    from .examples import build_examples
    from .spec import check_int

    try:
        config = SCLoRAConfig(method=args.method, r=args.r, beta=args.beta, normalize=args.normalize)
        check_int(args.seq_len, "--seq-len", 2)
        check_int(args.seed, "--seed", 0)
    except ValueError as err:
        raise SystemExit(f"sclora init: {err}") from None
    examples = {}
    for label in NEEDS_DATA.get(args.method, ()):
        spec = getattr(args, label)
        if spec is None:
            raise SystemExit(f"--method {args.method} needs --{label} DATA (e.g. --{label} math:256)")
        examples[label] = build_examples(_data_spec(spec), args.seed)
    check_model(args.model)
    return config, examples


def _build_init(args, inputs, model, tokenizer, out: Path):
    """Statistics (cached in out/stats) and the initialized model, deterministically from args."""
    from .. import distributed, init_model
    from ..statistics_cache import cached_statistics, statistics_side

    config, examples = inputs
    stats = {label: cached_statistics(out / "stats", label, model, tokenizer, rows, seq_len=args.seq_len,
                                      batch_size=8, target_modules=config.target_modules, normalize=args.normalize,
                                      side=statistics_side(args.method), show_progress=not args.quiet)
             for label, rows in examples.items()}
    if distributed.is_main_process():
        config.save_pretrained(out)
    return init_model(model, config, plus=stats.get("plus"), minus=stats.get("minus"), show_progress=not args.quiet)


def _init(args) -> int:
    import time

    from .. import distributed
    from ..export import save_initial_adapter

    out = Path(args.output)
    inputs = _init_inputs(args)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_model(args.model)
    start = time.perf_counter()
    model = _build_init(args, inputs, model, tokenizer, out)
    if distributed.is_main_process():  # every rank holds the same adapter; one writes it
        if hasattr(model, "peft_config"):
            save_initial_adapter(model, out / "initial_adapter")
        atomic_write_json(out / "init_args.json", vars(args), default=str)
        print(f"initialized {args.method} in {time.perf_counter() - start:.1f} s; statistics and config in {out}")
    distributed.barrier()
    return 0


def _load_model(name: str):
    """load_model, on this process's GPU when several processes share a node's GPUs."""
    from .. import distributed
    from ..models import load_model

    if not distributed.is_main_process():  # one set of progress bars
        from transformers.utils import logging

        logging.disable_progress_bar()
    model, tokenizer = load_model(name)
    if distributed.is_distributed() and distributed.device().type == "cuda":
        model.to(distributed.device())
    return model, tokenizer


def _train(args) -> int:
    from .. import distributed
    from ..export import export_lora
    from ..models import model_identity
    from ..train import TrainConfig, train
    from .examples import build_examples

    init_dir = Path(args.init)
    try:
        saved = json.loads((init_dir / "init_args.json").read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"sclora train: {init_dir / 'init_args.json'} cannot be read ({err}); run `sclora init "
                         f"--output {init_dir} ...` first.") from None
    init_args = argparse.Namespace(**{**saved, "quiet": args.quiet})
    try:
        config = TrainConfig.from_dict(yaml_overrides(args.set))
    except ValueError as err:
        raise SystemExit(f"sclora train: --set: {err}") from None
    examples = build_examples(_data_spec(args.data), init_args.seed)
    inputs = _init_inputs(init_args)
    model, tokenizer = _load_model(init_args.model)
    model = _build_init(init_args, inputs, model, tokenizer, init_dir)  # same stats, same init: resumable
    # Under torchrun / accelerate launch Trainer trains with DDP or FSDP; every process holds the whole data
    # and Trainer gives each its share of every global batch (config batch_size).
    # The checkpoints belong to this init and data: a resume from another init's checkpoints is refused.
    context = digest({"init": {k: v for k, v in saved.items() if k not in ("quiet", "output", "func")},
                      "data": args.data, "model_files": model_identity(init_args.model)})
    result = train(model, tokenizer, examples, config, Path(args.output) / "checkpoints", show_progress=not args.quiet,
                   context=context)
    with distributed.full_parameters(model):  # FSDP: the whole weights, on rank 0
        if distributed.is_main_process():  # one writer; the other ranks wait at the barrier
            if hasattr(model, "peft_config"):
                export_lora(model, Path(args.output) / "adapter")
                where = "plain LoRA adapter for the untouched base in " + str(Path(args.output) / "adapter")
            else:  # full fine-tuning: the model itself
                with atomic_dir(Path(args.output) / "model") as tmp:
                    model.save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
                where = "model in " + str(Path(args.output) / "model")
            print(f"{result.steps} steps, {result.train_seconds:.1f} s, {result.tokens_per_second:.1f} tokens/s, "
                  f"final loss {result.final_loss:.4f}; {where}")
    distributed.barrier()
    return 0


def format_table(record: dict) -> str:
    """A ``sclora eval`` record as a table: each metric's mean ± standard error and n, then each evaluation's time."""
    from .evaluate.metrics import EVALUATIONS, METRICS

    m = record["metrics"]
    rows = [("suite", record["suite"]), ("model", record["model"])]
    if record.get("judge"):
        label = record["judge"] + (" (PROXY: refusal markers, not an LLM judge)" if record["judge"] == "refusal-proxy" else "")
        rows.append(("judge", label))
    if record.get("num_fewshot") is not None:
        rows.append(("few-shot examples", str(record["num_fewshot"])))
    for name, n in record["n"].items():
        for key in EVALUATIONS[name].metrics:
            metric = METRICS[key]
            rows.append((f"{metric.header} [{key}]", f"{metric.fmt(m[key])} ± {metric.fmt(m[key + '_se'])}  (n={n})"))
    for name in record["n"]:
        speed = f", {m[name + '_tokens_per_second']} generated tokens/s" if name + "_tokens_per_second" in m else ""
        rows.append((f"time: {name}", f"{m[name + '_seconds']} s{speed}"))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])


def add_commands(sub) -> None:
    """Add the kit's subcommands to the ``sclora`` parser's subparsers (entry point ``sclora.commands``)."""
    ev = sub.add_parser("eval", help="evaluate a model on one suite; prints a table and writes JSON")
    ev.add_argument("--model", default="smollm2-135m-instruct", help="local path, hub id, or the embedded default")
    ev.add_argument("--suite", required=True, choices=["knowledge", "math", "safety", "summarize"])
    ev.add_argument("--limit", type=int, help="number of items (default: the suite's)")
    ev.add_argument("--batch-size", type=int)
    ev.add_argument("--num-fewshot", type=int, help="knowledge: solved examples before each question (default 5)")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--judge", default="refusal", choices=["refusal", "llm", "local"], help="safety judge")
    ev.add_argument("--judge-model", help="llm: model name at the endpoint; local: path of a causal LM")
    ev.add_argument("--judge-url", help="llm: base URL of an OpenAI-compatible API, e.g. https://api.deepseek.com/v1")
    ev.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="llm: environment variable holding the key")
    ev.add_argument("--judge-allow-http", action="store_true",
                    help="llm: allow a plain http:// URL to a remote host (the API key then travels unencrypted)")
    ev.add_argument("--out", help="JSON path (default eval-SUITE.json)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=_eval)
    run = sub.add_parser("run", help="run a whole experiment from a YAML config; resumable")
    run.add_argument("config", help="YAML file, e.g. configs/demo.yaml")
    run.add_argument("--output", help="output folder (results.json, results.md, config.yaml); required unless --dry-run")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a top-level config key")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--dry-run", action="store_true", help="validate the config and print the plan; load nothing")
    run.add_argument("--archive", action="store_true",
                     help="if OUTPUT holds results of other settings, move them to OUTPUT/archive/<time>/ first")
    run.add_argument("--workers", type=int, default=1,
                     help="processes sharing the runs (and the CPU threads); resumable, results merged in one table")
    run.set_defaults(func=_run)
    dia = sub.add_parser("diagnose", help="subspace diagnostics (captured D+/D- energy) of a config's inits, no training")
    dia.add_argument("config")
    dia.add_argument("--output", required=True, help="the experiment's output folder (statistics are cached there)")
    dia.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a top-level config key")
    dia.add_argument("--quiet", action="store_true", help="no progress bars")
    dia.add_argument("--file", default="diagnostics.json", help="file name inside the output folder")
    dia.set_defaults(func=_diagnose)
    rep = sub.add_parser("report", help="paper-style tables, figures and answers from `sclora run` output folders")
    rep.add_argument("dirs", nargs="+", metavar="DIR", help="folder(s) with results.json; report.md is written there")
    rep.set_defaults(func=_report)
    ini = sub.add_parser("init", help="collect statistics and initialize an adapter (saved for sclora train)")
    ini.add_argument("--model", default="smollm2-135m-instruct")
    ini.add_argument("--method", default="sc_lora", choices=["sc_lora", "lora", "pissa", "corda_ipa", "corda_kpa",
                                                              "full"])
    ini.add_argument("--plus", help="D+ data spec kind:n[:offset[:split]], e.g. math:256")
    ini.add_argument("--minus", help="D- data spec, e.g. trivia:256")
    # --lora-r: torchrun's own parser rejects "--r" anywhere on its command line (an ambiguous prefix of its options)
    ini.add_argument("--r", "--lora-r", dest="r", type=int, default=16, help="LoRA rank (--lora-r under torchrun)")
    ini.add_argument("--beta", type=float, default=0.5)
    ini.add_argument("--normalize", default="none", choices=["none", "max_abs", "trace"])
    ini.add_argument("--seq-len", type=int, default=256)
    ini.add_argument("--seed", type=int, default=0)
    ini.add_argument("--output", required=True)
    ini.add_argument("--quiet", action="store_true")
    ini.set_defaults(func=_init)
    tr = sub.add_parser("train", help="fine-tune from an `sclora init` folder; exports a plain LoRA adapter")
    tr.add_argument("--init", required=True, help="folder written by sclora init")
    tr.add_argument("--data", required=True, help="training data spec, e.g. math:1024:256")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="TrainConfig values, e.g. learning_rate=2e-4")
    tr.add_argument("--output", required=True)
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=_train)
    al = sub.add_parser("align", help="safety-align a model (refusals on one harmful source), measured on others")
    al.add_argument("--model", default="smollm2-135m-instruct")
    al.add_argument("--output", required=True)
    al.add_argument("--seed", type=int, default=0)
    al.add_argument("--install", action="store_true", help="also cache it as the model 'smollm2-135m-instruct-aligned'")
    al.add_argument("--quiet", action="store_true")
    al.set_defaults(func=_align)
