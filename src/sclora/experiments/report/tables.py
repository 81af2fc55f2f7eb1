"""The report's Markdown tables: the paper-style main table, the item-paired comparisons with the base model,
and the subspace diagnostics."""

from __future__ import annotations

import re

from ..evaluate.metrics import METRICS, Metric, metric
from .groups import (
    Group,
    Layout,
    _fmt_beta,
    _fmt_lr,
    _fmt_params,
    _is_number,
    _lrs_differ,
    _several_lrs,
    _variant,
    _with_se,
    group_runs,
    infer_layout,
    label,
    method_name,
)

__all__ = ["diagnostics_table", "main_table", "paired_lines", "report_tables"]


def report_tables(rows: list[dict], config: dict | None = None, diagnostics: dict | None = None) -> str:
    """The paper-style results table, the paired-vs-base line and (given diagnostics) the subspace table."""
    config = config or {}
    groups = group_runs(rows)
    layout = infer_layout(rows, config)
    parts = [_layout_line(layout, groups), main_table(groups, layout, config.get("model"))]
    parts += paired_lines(groups)
    if diagnostics:
        parts += ["## Subspace diagnostics", diagnostics_table(diagnostics, [r.get("run") for r in rows])]
    return "\n\n".join(parts)


def _layout_line(layout: Layout, groups: list[Group]) -> str:
    def names(keys):
        return ", ".join(metric(k).label for k in keys) or "none"

    line = (f"Layout: {layout.name}. Preservation: {names(layout.preservation)}; utility: {names(layout.utility)}. "
            "Best fine-tuned value per column in bold.")
    if any(g.n > 1 for g in groups):
        line += " Rows with several seeds show the mean; ± is the standard error (seed spread plus evaluation noise)."
    elif any(g.ses for g in groups):
        line += " ± is the standard error over evaluation items."
    return line


def main_table(groups: list[Group], layout: Layout, model: str | None = None) -> str:
    tuned = [g for g in groups if not g.is_base]
    show_lr, show_seeds = _lrs_differ(groups), any(g.n > 1 for g in groups)
    metrics = [metric(k) for k in (*layout.preservation, *layout.utility)] + [METRICS["final_loss"]]
    best = {m.key: _best_shown(tuned, m) for m in metrics}
    header = ["Method", "β", *(["lr"] * show_lr), *(["Seeds"] * show_seeds), "#Params", *(m.header for m in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    previous = None
    for g in groups:
        name = "" if g.method == previous else method_name(g, model)  # the paper names a method once
        previous = g.method
        cells = [name, _fmt_beta(g.beta) + _variant(g), *([_fmt_lr(g.lr)] * show_lr), *([str(g.n)] * show_seeds),
                 _fmt_params(g.value("trainable_params"))]
        for m in metrics:
            text = _with_se(g, m)
            shown = g.value(m.key)
            bold = not g.is_base and shown is not None and m.fmt(shown) == best[m.key]
            cells.append(f"**{text}**" if bold else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _best_shown(groups: list[Group], m: Metric) -> str | None:
    """The best value as printed (so equal printed values are all bolded, as in the paper); None below 2 rows."""
    values = [g.value(m.key) for g in groups if g.value(m.key) is not None]
    if len(values) < 2:
        return None
    return m.fmt(max(values, key=m.goodness))


def paired_lines(groups: list[Group]) -> list[str]:
    """One line per item-paired comparison with the base model (``<prefix>_lost`` / ``_gained`` / ``_sign_p``)."""
    lr_methods = _several_lrs(groups)
    prefixes = sorted({k[: -len("_lost")] for g in groups for k in g.samples if k.endswith("_lost")})
    if any(p.startswith("knowledge_") for p in prefixes):  # "knowledge_*" repeats the first specific knowledge probe
        prefixes = [p for p in prefixes if p != "knowledge"]
    lines = []
    for prefix in prefixes:
        parts = []
        for g in groups:
            if g.is_base or g.value(f"{prefix}_lost") is None:
                continue
            lost, gained = g.value(f"{prefix}_lost"), g.value(f"{prefix}_gained") or 0
            text = f"{label(g, lr_methods)} −{lost:.3g} / +{gained:.3g}"
            p_values = g.samples.get(f"{prefix}_sign_p")
            if p_values:
                spread = f"{min(p_values):.3g}–{max(p_values):.3g} over {len(p_values)} seeds"
                text += f" (p = {p_values[0]:.3g})" if len(p_values) == 1 else f" (p = {spread})"
            parts.append(text)
        if parts:
            lines.append(f"**Paired vs base ({prefix})** — items lost / gained against the base model, two-sided "
                         "sign-test p: " + "; ".join(parts) + ".")
    return lines


def _diagnostic_entries(entries: list[dict]) -> list[dict]:
    """Entries with ``layer`` and ``kind`` filled in from the module name where missing."""
    out = []
    for entry in entries:
        module = str(entry.get("module", ""))
        layer = entry.get("layer")
        if layer is None:
            found = re.search(r"layers\.(\d+)\.", module)
            layer = int(found.group(1)) if found else None
        out.append({**entry, "layer": layer, "kind": entry.get("kind") or module.rsplit(".", 1)[-1]})
    return out


def _sides(diagnostics: dict) -> list[str]:
    minus = sorted({k for entries in diagnostics.values() for e in entries for k in e if k.startswith("minus")})
    return ["plus", *minus]


def _side_label(side: str) -> str:
    return "D+" if side == "plus" else "D−" if side == "minus" else f"D−{side.split('_', 1)[-1]}"


def _ordered_runs(diagnostics: dict, order: list) -> list[str]:
    known = [run for run in order if run in diagnostics]
    return [run for run in known + [r for r in diagnostics if r not in known] if diagnostics[run]]


def diagnostics_table(diagnostics: dict, order: list | None = None) -> str:
    """Mean captured energy per run, over all modules and per module kind (averaged over layers)."""
    sides = _sides(diagnostics)
    runs = _ordered_runs(diagnostics, order or [])
    kinds = list(dict.fromkeys(e["kind"] for run in runs for e in _diagnostic_entries(diagnostics[run])))
    header = ["Run", "all modules", *kinds]
    intro = ("Fraction of each set's output energy captured by the initial adapter subspace (0-1), averaged over "
             f"modules; cells are {' / '.join(_side_label(s) for s in sides)}. SC-LoRA aims at high D+ and low D−.")
    lines = [intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        entries = _diagnostic_entries(diagnostics[run])
        cells = [run, _energy_cell(entries, sides)]
        cells += [_energy_cell([e for e in entries if e["kind"] == kind], sides) for kind in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _energy_cell(entries: list[dict], sides: list[str]) -> str:
    means = []
    for side in sides:
        values = [float(e[side]) for e in entries if _is_number(e.get(side))]
        means.append(f"{sum(values) / len(values):.2f}" if values else "-")
    return " / ".join(means) if entries else "-"
