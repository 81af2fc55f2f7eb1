"""MkDocs hooks: pages generated from the code, so they cannot drift from it.

``<!-- cli-reference -->`` becomes the ``--help`` of every ``sclora`` command (the argparse parsers themselves);
``<!-- methods-table -->`` becomes :func:`sclora.registry.methods_table`; ``<!-- experiment-schema -->`` the keys of
an experiment config and of its runs, from the dataclasses the runner validates with."""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("COLUMNS", "110")  # argparse wraps help to the terminal width


def _cli_reference() -> str:
    from sclora.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    parts = []
    for name, command in sorted(sub.choices.items()):
        parts.append(f"## sclora {name}\n\n```text\n{command.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


def _experiment_schema() -> str:
    from dataclasses import MISSING, fields

    from sclora import SCLoRAConfig, TrainConfig
    from sclora.experiments.spec import RUN_INIT_KEYS, RUN_TRAIN_KEYS, ExperimentConfig

    def default(f):
        if f.default is not MISSING:
            return f"`{f.default!r}`"
        return f"`{f.default_factory()!r}`" if f.default_factory is not MISSING else "required"

    rows = ["| key | default |", "|---|---|"]
    rows += [f"| `{f.name}` | {default(f)} |" for f in fields(ExperimentConfig)]
    helps = {f.name: f.metadata.get("help", "") for cls in (SCLoRAConfig, TrainConfig) for f in fields(cls)}
    runs = ["| run key | meaning |", "|---|---|", "| `name` | the run's name (default: from its method and values) |"]
    runs += [f"| `{k}` | {helps[k]} |" for k in (*RUN_INIT_KEYS, *RUN_TRAIN_KEYS)]
    return "\n".join(rows) + "\n\nEach entry of `runs:` takes:\n\n" + "\n".join(runs) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- cli-reference -->", _cli_reference())
    if "<!-- methods-table -->" in markdown:
        from sclora.registry import methods_table

        markdown = markdown.replace("<!-- methods-table -->", methods_table())
    if "<!-- experiment-schema -->" in markdown:
        markdown = markdown.replace("<!-- experiment-schema -->", _experiment_schema())
    return markdown
