"""The ``sclora`` command line. Commands come from the entry point group ``sclora.commands``: each entry is a
function that adds subparsers: the library registers ``sclora.commands:add_commands`` (finetune, init, train), the
paper-reproduction kit ``sclora.experiments.commands:add_commands`` (run, eval, report, ...), so the library never
imports the kit by name.

    sclora finetune --model DIR --data task.jsonl --preserve keep.jsonl --output out/
    sclora run configs/demo.yaml --output runs/demo
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser", "entry", "main", "yaml_overrides"]

#: top-level packages of the `experiments` extra (pyproject.toml)
KIT_EXTRAS = ("rouge_score", "math_verify", "matplotlib")
#: where packages register their subcommands: ``name = "module:function(subparsers)"``
COMMANDS_GROUP = "sclora.commands"


def yaml_overrides(pairs: list[str] | None) -> dict:
    """--set key=value pairs, values parsed as YAML (numbers as people write them, 2e-4 too; lists, mappings)."""
    import yaml

    from .fileio import parse_yaml

    overrides = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set takes key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            overrides[key] = parse_yaml(value)
        except yaml.YAMLError as err:
            raise SystemExit(f"--set {pair!r}: the value is not valid YAML ({err})") from None
    return overrides


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import entry_points

    parser = argparse.ArgumentParser(prog="sclora", description="SC-LoRA: initialize, fine-tune and evaluate LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    found = sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name)
    if not found:
        raise SystemExit(f"sclora: no commands are registered (entry point group {COMMANDS_GROUP!r}); reinstall the "
                         "package: pip install -e . (or pip install sclora)")
    for point in found:
        try:
            add = point.load()
        except ImportError as err:  # a package whose own dependencies are missing: its commands are left out
            print(f"sclora: the commands of {point.value} are unavailable ({err})", file=sys.stderr)
            continue
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # Deprecation notices of dependencies (transformers, peft) are for their callers' developers, not for people
    # running a command; sclora issues no FutureWarning of its own.
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    # torchrun / accelerate launch: init and train spread over the processes (docs/distributed.md)
    started = False
    if args.command in ("init", "train", "finetune"):
        from . import distributed

        started = distributed.init_from_env()
    try:
        return args.func(args)
    finally:
        if started:
            import torch.distributed

            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def entry(argv: list[str] | None = None) -> int:
    """The ``sclora`` command: :func:`main`, with a bad config, bad data or a stale folder reported as one clear
    line and exit status 2 instead of a traceback (the library raises; people read messages)."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"sclora: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name not in KIT_EXTRAS:
            raise
        print(f"sclora: this command needs {err.name!r}, part of the paper-reproduction kit's extras: "
              'pip install "sclora[experiments]"', file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(entry())
