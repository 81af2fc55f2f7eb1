"""A paper-style report of an experiment folder written by ``sclora run``.

    sclora report runs/demo        # writes runs/demo/report.md and runs/demo/figures/*.png

The table follows the paper's Tables 1-3 (base model, full fine-tuning, LoRA, PiSSA, CorDA IPA / KPA, then
SC-LoRA per beta); the figures redraw Figures 2-3 (beta against preservation / utility) plus loss curves, the
utility-preservation trade-off and, when ``diagnostics.json`` exists, the subspace energy of each initial adapter.
An "Answers" section checks the paper's claims against the numbers, citing the values it used.

Everything that builds text is pure (rows and config in, Markdown out); only :func:`load_experiment`,
:func:`write_figures` and :func:`write_report` touch the disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from ...fileio import atomic_write
from ..evaluate.metrics import Metric, metric
from .claims import Answer, answers, decided
from .continual import (continual_differences, continual_rows, continual_table, transfer_metrics,
                        write_continual_figures)
from .figures import write_figures
from .frontier import frontier_curves, frontier_markdown, selected_rows, selection_metric
from .groups import Group, Layout, group_runs, infer_layout
from .paired import paired_comparisons, paired_markdown
from .tables import report_tables

__all__ = ["Answer", "Group", "Layout", "Metric", "ReportError", "answers", "build_report", "continual_differences",
           "continual_rows", "continual_table", "group_runs", "infer_layout", "load_experiment", "paired_comparisons",
           "report_tables", "transfer_metrics", "write_continual_figures", "write_figures", "write_report"]


class ReportError(Exception):
    """An experiment folder that cannot be reported on (missing or malformed files)."""


def build_report(rows: list[dict], config: dict | None = None, diagnostics: dict | None = None,
                 figures: list[tuple[str, str]] = (), paired: list[dict] | None = None,
                 samples: dict[str, dict] | None = None) -> str:
    """report.md's text; ``figures`` are (file name under figures/, caption) pairs already written; ``paired`` the
    paired differences (:func:`paired_comparisons`), None when the per-item scores were not kept."""
    config = config or {}
    title = (config.get("report") or {}).get("title") or f"SC-LoRA experiment: {config.get('name', 'results')}"
    parts = [f"# {title}", report_tables(rows, config, diagnostics)]
    if figures:
        parts += ["## Figures", "\n\n".join(f"![{caption}](figures/{name})" for name, caption in figures)]
    layout = infer_layout(rows, config)
    focus = selected_rows(rows)  # a learning-rate sweep: the claims compare each method at its selected rate
    if layout.utility and layout.preservation:
        key = selection_metric(rows)
        text = frontier_markdown(frontier_curves(group_runs(rows), model=config.get("model")),
                                 metric(layout.utility[0]), metric(layout.preservation[0]), metric(key) if key else None,
                                 samples, paired, also=tuple(metric(k) for k in layout.preservation[1:]))
        if text:
            parts.append(text)
    mains = [f"{side} metric: {metric(keys[0]).label}" for side, keys in (("main preservation", layout.preservation),
                                                                         ("main utility", layout.utility)) if keys]
    scope = ("" if focus is rows else " Each method at its selected learning rate only (the other rates are compared "
             "at matched utility above; paired.json holds their paired differences).")
    parts += ["## Answers", f"Computed from the numbers above (means over seeds); {'; '.join(mains) or 'no metrics'}."
              + scope, "\n".join(a.markdown(i) for i, a in enumerate(answers(focus, config), 1))]
    if paired is not None:
        main = [keys[0] if keys else None for keys in (layout.preservation, layout.utility)]
        parts += ["## Claims decided by paired differences",
                  ("The same claims, each decided by paired differences on the same items (95% intervals, next "
                   "section): holds / does not hold / undecided."),
                  "\n".join(a.markdown(i) for i, a in enumerate(decided(_among(paired, focus), *main), 1)),
                  paired_markdown(_among(paired, focus))]
    return "\n\n".join(parts) + "\n"


def _among(paired: list[dict], rows: list[dict]) -> list[dict]:
    """The paired differences whose runs are all among ``rows``."""
    runs = {r["run"] for r in rows}
    return [e for e in paired if all(x in runs and y in runs for x, y in e.get("pairs") or [])]


def load_experiment(directory: str | os.PathLike) -> tuple[list[dict], dict, dict | None]:
    """(rows of results.json, config.yaml or {}, diagnostics.json or None), with clear errors."""
    folder = Path(directory)
    results = folder / "results.json"
    if not results.is_file():
        raise ReportError(f"{results} not found: run `sclora run CONFIG --output {folder}` first.")
    rows = _read_json(results)
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "run" in r for r in rows):
        raise ReportError(f"{results} should be a non-empty list of run rows, each with a 'run' name, "
                          "as written by `sclora run`.")
    config = {}
    if (folder / "config.yaml").is_file():
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        except yaml.YAMLError as err:
            raise ReportError(f"{folder / 'config.yaml'} is not valid YAML: {err}") from err
    diagnostics = _read_json(folder / "diagnostics.json") if (folder / "diagnostics.json").is_file() else None
    if diagnostics is not None and not isinstance(diagnostics, dict):
        raise ReportError(f"{folder / 'diagnostics.json'} should map run names to lists of module entries.")
    return rows, config, diagnostics


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}).") from err


def write_report(directory: str | os.PathLike) -> Path:
    """Write DIR/report.md and DIR/figures/*.png from DIR/results.json; returns the report's path."""
    folder = Path(directory)
    rows, config, diagnostics = load_experiment(folder)
    figures = write_figures(rows, config, diagnostics, folder / "figures")
    samples = _samples(folder, rows)
    paired = _paired(folder, rows, config, samples)
    path = folder / "report.md"
    atomic_write(path, build_report(rows, config, diagnostics, figures, paired, samples))
    return path


def _samples(folder: Path, rows: list[dict]) -> dict[str, dict]:
    """The per-item scores runs kept in samples/<run>.json, by run."""
    samples = {}
    for row in rows:
        path = folder / "samples" / f"{row['run']}.json"
        if path.is_file():
            samples[row["run"]] = _read_json(path)
    return samples


def _paired(folder: Path, rows: list[dict], config: dict, samples: dict[str, dict]) -> list[dict] | None:
    """Paired differences from the per-item ``samples``, stored in paired.json; read back from paired.json when the
    samples are gone (a committed results folder); None when neither exists (older folders)."""
    if samples:
        paired = paired_comparisons(rows, config, samples)
        atomic_write(folder / "paired.json", json.dumps(paired, indent=1) + "\n")
        return paired
    return _read_json(folder / "paired.json") if (folder / "paired.json").is_file() else None
