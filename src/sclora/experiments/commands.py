"""The commands of the paper-reproduction kit, added to the ``sclora`` command line through the entry point
group ``sclora.commands`` (pyproject.toml): ``run``, ``diagnose``, ``report``, ``eval`` and ``align``. Thin
wrappers over the kit and the library. (``init``, ``train`` and ``finetune`` are the library's own,
``sclora/commands.py``; the kit's catalogue names such as ``math:256`` reach them through the entry point group
``sclora.data``, see ``examples.resolve_named``.)

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
from ..fileio import atomic_dir, atomic_write_json, locked, safe_name

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
    from .continual import (check_continual_folder, chain_claim, is_continual, load_continual, plan_continual,
                            run_continual)
    from .folder import check_folder, read_failures, read_results, results_table, sweep_status
    from .runner import run_experiment
    from .spec import load_config, plan, run_name

    continual = is_continual(args.config)  # a config with ``stages:``: chains of stages, one process
    config = (load_continual if continual else load_config)(args.config, yaml_overrides(args.set))
    if args.dry_run:
        print((plan_continual if continual else plan)(config))
        if args.output and not continual and Path(args.output).is_dir():
            print(sweep_status(Path(args.output), ["base", *(run_name(r) for r in config.runs)], args.workers))
        return 0
    if not args.output:
        raise SystemExit("sclora run: --output DIR is required (or use --dry-run to only check the config).")
    if args.workers < 1:
        raise SystemExit(f"sclora run: --workers must be >= 1, got {args.workers}.")
    if continual:
        if args.keep_going:
            raise SystemExit("sclora run: --keep-going is for one-shot experiments; a continual chain's stages each "
                             "need the one before.")
        check_continual_folder(config, Path(args.output), archive=args.archive)  # before any worker looks at it
        helpers = _spawn_workers(args) if args.workers > 1 else []
        run_continual(config, args.output, show_progress=not args.quiet, archive=args.archive)
        if [p.args for p in helpers if p.wait() != 0]:
            raise SystemExit("sclora run: a worker process failed; rerun the same command to resume.")
        data = json.loads((Path(args.output) / "continual.json").read_text())  # with the other workers' chains
        missing = [chain_claim(run["name"], seed) for run in config.runs for seed in run.get("seeds", [config.seed])
                   if str(seed) not in data["runs"].get(run["name"], {})]
        print(f"wrote {Path(args.output) / 'continual.json'}; `sclora report {args.output}` for the metrics and figures")
        return 3 if _unfinished(Path(args.output), missing) else 0
    check_folder(config, Path(args.output), archive=args.archive)  # before any worker looks at the folder
    helpers = _spawn_workers(args) if args.workers > 1 else []
    rows = run_experiment(config, args.output, show_progress=not args.quiet, archive=args.archive,
                          keep_going=args.keep_going)
    failed = [p.args for p in helpers if p.wait() not in (0, RUNS_FAILED)]  # RUNS_FAILED: reported below
    if failed:
        raise SystemExit(f"sclora run: {len(failed)} worker process(es) failed; rerun the same command to resume.")
    rows = read_results(args.output)  # with the rows the other workers finished after this process
    print(results_table(rows))
    print(f"wrote {Path(args.output) / 'results.json'} and results.md")
    missing = [n for n in ["base", *(run_name(r) for r in config.runs)] if n not in {r["run"] for r in rows}]
    failures = {n: f for n, f in read_failures(Path(args.output)).items() if n in missing}
    if failures:
        for name, failure in failures.items():
            print(f"failed: {name}: {failure['error']}", file=sys.stderr)
        print(f"{len(failures)} run(s) failed (tracebacks in {Path(args.output) / 'failures.json'}); the other runs "
              "are kept: fix the cause and rerun this command to retry them", file=sys.stderr)
    if _unfinished(Path(args.output), [n for n in missing if n not in failures]):
        return 3
    return RUNS_FAILED if failures else 0


def _unfinished(out: Path, missing: list[str]) -> list[str]:
    """Of the claims ``missing`` from the results, say which another process sharing ``out`` still runs (they add
    their results when done) and which were left by a process that stopped; returns the latter."""
    from .folder import running_elsewhere

    busy = running_elsewhere(out, missing) if missing else []
    if busy:
        print(f"still running in another process: {', '.join(busy)} (they add their results when done)")
    free = [n for n in missing if n not in busy]
    if free:
        print(f"not finished: {', '.join(free)} (their process stopped); rerun this command to finish them")
    return free


RUNS_FAILED = 4  # `sclora run --keep-going`'s exit status when runs failed (failures.json)


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
               "--workers", "1", *[f"--set={kv}" for kv in args.set or []],  # after this process's folder check
               *(["--keep-going"] if args.keep_going else [])]
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
        if (Path(directory) / "continual.json").exists():  # a continual experiment (stages:)
            from .report.continual import write_continual_report

            try:
                print(f"wrote {write_continual_report(directory, args.stages)}")
            except ValueError as err:
                print(f"sclora report: {err}", file=sys.stderr)
                status = 1
            continue
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
    config = AlignConfig(seed=args.seed)
    config.train["bf16"] = args.bf16
    report = align(model, tokenizer, config, args.output, show_progress=not args.quiet)
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
    run.add_argument("--dry-run", action="store_true",
                     help="validate the config and print the plan; load nothing. With --output: also the runs done, "
                          "failed, started and left there, and the time left at the finished runs' mean cost")
    run.add_argument("--archive", action="store_true",
                     help="if OUTPUT holds results of other settings, move them to OUTPUT/archive/<time>/ first")
    run.add_argument("--workers", type=int, default=1,
                     help="processes sharing the runs (and the CPU threads); resumable, results merged in one table")
    run.add_argument("--keep-going", action="store_true",
                     help="a run that fails is recorded in OUTPUT/failures.json and the sweep goes on (exit status "
                          f"{RUNS_FAILED} if any failed); without it the first failure stops the sweep")
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
    rep.add_argument("--stages", type=int, metavar="K",
                     help="continual folders: report the first K stages of the chains that finished them")
    rep.set_defaults(func=_report)
    al = sub.add_parser("align", help="safety-align a model (refusals on one harmful source), measured on others")
    al.add_argument("--model", default="smollm2-135m-instruct")
    al.add_argument("--output", required=True)
    al.add_argument("--seed", type=int, default=0)
    al.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="train under bf16 autocast (default); --no-bf16 trains in fp32, the fast choice on a CPU "
                         "without AVX512-BF16 or AMX")
    al.add_argument("--install", action="store_true", help="also cache it as the model 'smollm2-135m-instruct-aligned'")
    al.add_argument("--quiet", action="store_true")
    al.set_defaults(func=_align)
