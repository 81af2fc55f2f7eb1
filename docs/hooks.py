"""MkDocs hooks: pages generated from the code, so they cannot drift from it.

``<!-- cli-reference -->`` becomes the ``--help`` of every ``sclora`` command (the argparse parsers themselves);
``<!-- methods-table -->`` becomes :func:`sclora.registry.methods_table`."""

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


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- cli-reference -->", _cli_reference())
    if "<!-- methods-table -->" in markdown:
        from sclora.registry import methods_table

        markdown = markdown.replace("<!-- methods-table -->", methods_table())
    return markdown
