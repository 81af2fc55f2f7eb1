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
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..fileio import atomic_path, atomic_write
from .evaluate.metrics import METRICS, Metric, metric

__all__ = [
    "Answer",
    "Group",
    "Layout",
    "Metric",
    "ReportError",
    "answers",
    "build_report",
    "group_runs",
    "infer_layout",
    "load_experiment",
    "report_tables",
    "write_figures",
    "write_report",
]


class ReportError(Exception):
    """An experiment folder that cannot be reported on (missing or malformed files)."""


# --- metrics ------------------------------------------------------------------------------------------


KNOWLEDGE = ("knowledge_em", "knowledge_mc", "knowledge_kept", "knowledge_logprob")
HARM = ("harmfulness_score", "harmfulness_rate")
MATH = ("math_accuracy", "math_nll")


@dataclass(frozen=True)
class Layout:
    """Which metrics are preservation and which are utility columns; the first of each is the main one."""

    name: str
    preservation: tuple[str, ...]
    utility: tuple[str, ...]


def infer_layout(rows: list[dict], config: dict | None = None) -> Layout:
    """Columns from ``config['report']`` when given, else the paper table whose metrics the rows carry."""
    present = {key for row in rows for key in row}

    def pick(keys):
        return tuple(k for k in keys if k in present)

    harm, knowledge, math_ = pick(HARM), pick(KNOWLEDGE), pick(MATH)
    extra = pick(("benign_refusal_rate",))  # over-refusal is a utility cost of safety, not preservation
    if harm and "rouge1" in present:
        layout = Layout("paper Table 2: safety preservation, summarization utility", harm, ("rouge1", *extra))
    elif harm and math_:
        layout = Layout("paper Table 3: safety preservation, math utility", harm, (*math_, *extra))
    elif knowledge and math_:
        layout = Layout("paper Table 1: world-knowledge preservation, math utility", knowledge, (*math_, *extra))
    else:
        layout = Layout("inferred from the metrics present", (*harm, *knowledge), (*math_, *pick(("rouge1",)), *extra))
    chosen = (config or {}).get("report") or {}
    if chosen.get("preservation") or chosen.get("utility"):
        sides = " and ".join(side for side in ("preservation", "utility") if chosen.get(side))
        layout = Layout(f"{sides} columns chosen in config.yaml (report:), otherwise {layout.name}",
                        tuple(chosen.get("preservation") or layout.preservation),
                        tuple(chosen.get("utility") or layout.utility))
    return layout


# --- runs merged over seeds ---------------------------------------------------------------------------

PAPER_ORDER = ("base", "full", "lora", "pissa", "corda_ipa", "corda_kpa", "sc_lora")
METHOD_NAMES = {"base": "Base model", "full": "Full fine-tuning", "lora": "LoRA", "pissa": "PiSSA",
                "corda_ipa": "CorDA IPA", "corda_kpa": "CorDA KPA", "sc_lora": "SC-LoRA"}
NOT_METRICS = {"seed", "beta", "learning_rate"}


@dataclass
class Group:
    """Runs that differ only in seed; the table and the plots show their mean."""

    method: str
    beta: float | tuple[float, ...] | None
    lr: float | None
    runs: list[str]
    samples: dict[str, list[float]]  # every numeric field, one value per seed
    ses: dict[str, float]
    loss: list[tuple[int, float]]  # mean over seeds at each logged step
    checkpoints: list[dict]
    normalize: str | None = None  # set when the run overrode the experiment's normalize

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def is_base(self) -> bool:
        return self.method == "base"

    def value(self, key: str) -> float | None:
        values = self.samples.get(key)
        return sum(values) / len(values) if values else None

    def se(self, key: str) -> float | None:
        return self.ses.get(key)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_base(row: dict) -> bool:
    return row.get("run") == "base" or row.get("method") in ("-", "base", None)


def group_runs(rows: list[dict]) -> list[Group]:
    """Rows merged over seeds, in the paper's order: base, full, LoRA (by lr), ..., SC-LoRA (by beta)."""
    buckets: dict[tuple, list[dict]] = {}
    for row in rows:
        beta = row.get("beta")
        key = ("base", None, None, None) if _is_base(row) else (
            row.get("method"), tuple(beta) if isinstance(beta, list) else beta, row.get("learning_rate"),
            row.get("normalize"))  # a run with its own normalize is another method variant, not another seed
        buckets.setdefault(key, []).append(row)
    return sorted((_merge(key, members) for key, members in buckets.items()), key=_paper_position)


def _paper_position(group: Group) -> tuple:
    method_rank = PAPER_ORDER.index(group.method) if group.method in PAPER_ORDER else len(PAPER_ORDER)
    beta = () if group.beta is None else group.beta if isinstance(group.beta, tuple) else (group.beta,)
    return method_rank, str(group.method), beta, group.lr or 0.0


def _merge(key: tuple, members: list[dict]) -> Group:
    samples: dict[str, list[float]] = {}
    for member in members:
        for name, value in member.items():
            if name not in NOT_METRICS and not name.endswith("_se") and _is_number(value):
                samples.setdefault(name, []).append(float(value))
    ses = {}
    for name, values in samples.items():
        se = _pooled_se(values, [m[f"{name}_se"] for m in members if _is_number(m.get(f"{name}_se"))])
        if se is not None:
            ses[name] = se
    return Group(method=key[0], beta=key[1], lr=key[2], normalize=key[3], runs=[str(m.get("run")) for m in members],
                 samples=samples, ses=ses, loss=_mean_by_step([m.get("loss_history") or [] for m in members]),
                 checkpoints=_mean_checkpoints([m.get("checkpoints") or [] for m in members]))


def _pooled_se(values: list[float], ses: list[float]) -> float | None:
    if len(values) < 2:
        return ses[0] if ses else None
    mean = sum(values) / len(values)
    seed_var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)
    # Seeds share one evaluation set, so its sampling noise does not average out over seeds: keep it whole.
    item_var = sum(s * s for s in ses) / len(ses) if ses else 0.0
    return math.sqrt(seed_var + item_var)


def _mean_by_step(histories: list[list]) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = {}
    for history in histories:
        for step, value in history:
            if _is_number(value):
                by_step.setdefault(int(step), []).append(float(value))
    return [(step, sum(v) / len(v)) for step, v in sorted(by_step.items())]


def _mean_checkpoints(lists: list[list[dict]]) -> list[dict]:
    by_step: dict[int, dict[str, list[float]]] = {}
    for checkpoints in lists:
        for point in checkpoints:
            if "step" not in point:
                continue
            slot = by_step.setdefault(int(point["step"]), {})
            for name, value in point.items():
                if name != "step" and _is_number(value):
                    slot.setdefault(name, []).append(float(value))
    return [{"step": step, **{k: sum(v) / len(v) for k, v in slot.items()}} for step, slot in sorted(by_step.items())]


# --- formatting -----------------------------------------------------------------------------------------


def _fmt_beta(beta) -> str:
    if beta is None:
        return "-"
    return ", ".join(f"{b:g}" for b in beta) if isinstance(beta, tuple) else f"{beta:g}"


def _beta_text(beta) -> str:
    """Beta in prose: a list of weights in parentheses so that the commas read as one value."""
    return f"({_fmt_beta(beta)})" if isinstance(beta, tuple) else _fmt_beta(beta)


def _beta_x(beta) -> float:
    """One number per beta; several knowledge sets' weights are summed, the total pull away from D-."""
    return float(sum(beta)) if isinstance(beta, tuple) else float(beta)


def _fmt_lr(lr: float | None) -> str:
    if lr is None:
        return "-"
    if lr >= 1e-2:
        return f"{lr:g}"
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"  # 2e-5, as the paper writes it


def _fmt_params(n: float | None) -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(int(n))


def _lrs_differ(groups: list[Group]) -> bool:
    return len({g.lr for g in groups if not g.is_base and g.lr is not None}) > 1


def _several_lrs(groups: list[Group]) -> frozenset[str]:
    """Methods run at more than one learning rate: only their labels need the lr to be told apart."""
    lrs: dict[str, set] = {}
    for g in groups:
        lrs.setdefault(g.method, set()).add(g.lr)
    return frozenset(method for method, values in lrs.items() if len(values) > 1)


def method_name(group: Group, model: str | None = None) -> str:
    if group.is_base:
        return f"{model} (base)" if model else "Base model"
    return METHOD_NAMES.get(group.method, str(group.method))


def label(group: Group, lr_methods: frozenset[str] = frozenset(), model: str | None = None) -> str:
    """A group's name in answers and legends, e.g. 'SC-LoRA β=0.5' or 'LoRA lr=1e-4'."""
    text = method_name(group, model)
    if group.beta is not None:
        text += f" β={_beta_text(group.beta)}"
    if group.method in lr_methods and group.lr is not None:
        text += f" lr={_fmt_lr(group.lr)}"
    return text + _variant(group)


def _variant(group: Group) -> str:
    """' (normalize none)' for a run that overrode the experiment's normalize, else ''."""
    return f" (normalize {group.normalize})" if group.normalize else ""


def _with_se(group: Group, m: Metric) -> str:
    value = group.value(m.key)
    if value is None:
        return "-"
    se = group.se(m.key)
    return m.fmt(value) + (f" ± {m.fmt(se)}" if se is not None else "")


# --- tables ---------------------------------------------------------------------------------------------


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


# --- answers to the paper's claims --------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    question: str
    verdict: str  # "yes", "no", "partly" or "not measured"
    evidence: str

    def markdown(self, number: int) -> str:
        return f"{number}. **{self.question}** {self.verdict.capitalize()}. {self.evidence}"


QUESTIONS = (
    "Does preservation improve and utility drop as β grows (SC-LoRA rows)?",
    "Does some SC-LoRA β beat LoRA on preservation at equal-or-better utility?",
    "Does some SC-LoRA β beat CorDA KPA on utility at similar preservation?",
    "Does SC-LoRA's training loss fall faster than LoRA's?",
)
SIMILAR_FRACTION = 0.05  # "similar preservation" without standard errors: within 5% of the metric's observed range


def answers(rows: list[dict], config: dict | None = None) -> list[Answer]:
    """The four claims checked against the (seed-averaged) numbers, each citing the values it used."""
    groups = group_runs(rows)
    layout = infer_layout(rows, config)
    preservation = metric(layout.preservation[0]) if layout.preservation else None
    utility = metric(layout.utility[0]) if layout.utility else None
    lr_methods = _several_lrs(groups)
    sc = [g for g in groups if g.method == "sc_lora" and g.beta is not None]
    # The β trend compares like with like: runs that override the experiment's normalize are left out of it.
    return [
        _answer_trend([g for g in sc if not g.normalize], preservation, utility),
        _answer_versus(QUESTIONS[1], sc, [g for g in groups if g.method == "lora"], "LoRA", preservation, utility,
                       lambda a, b: _combined_se(a, b, utility) or 0.0,
                       "Equal utility: within 1 combined standard error, or exactly equal without standard errors",
                       lr_methods),
        _answer_versus(QUESTIONS[2], sc, [g for g in groups if g.method == "corda_kpa"], "CorDA KPA", utility,
                       preservation, lambda a, b: _similar_tolerance(groups, a, b, preservation),
                       "Similar preservation: within 1 combined standard error, or without standard errors within "
                       f"{SIMILAR_FRACTION:.0%} of the metric's range over all rows", lr_methods),
        _answer_loss(sc, [g for g in groups if g.method == "lora"], lr_methods),
    ]


def _combined_se(a: Group, b: Group, m: Metric) -> float | None:
    ses = [g.se(m.key) for g in (a, b) if g.se(m.key) is not None]
    return math.sqrt(sum(s * s for s in ses)) if ses else None


def _similar_tolerance(groups: list[Group], a: Group, b: Group, m: Metric) -> float:
    se = _combined_se(a, b, m)
    if se:
        return se
    values = [g.value(m.key) for g in groups if g.value(m.key) is not None]
    return SIMILAR_FRACTION * (max(values) - min(values)) if values else 0.0


def spearman(xs: list[float], ys: list[float]) -> float:
    """Rank correlation (ties get average ranks); 0 when either side is constant."""
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else 0.0


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _trend(sc: list[Group], m: Metric) -> tuple[float | None, str]:
    points = [g for g in sc if g.value(m.key) is not None]
    if len({_beta_x(g.beta) for g in points}) < 2:
        return None, f"{m.label}: not measured at two or more β values"
    rho = spearman([_beta_x(g.beta) for g in points], [m.goodness(g.value(m.key)) for g in points])
    low, high = points[0], points[-1]
    direction = "improves" if rho > 0 else "worsens" if rho < 0 else "shows no trend"
    text = (f"{m.label} {direction} with β: {_with_se(low, m)} at β={_beta_text(low.beta)} → {_with_se(high, m)} at "
            f"β={_beta_text(high.beta)} (rank correlation of β with how good it is, ρ = {rho:+.2f}, over {len(points)} "
            "β values)")
    se = _combined_se(low, high, m)
    if se is not None and abs(m.gain(high, low)) <= se:
        text += "; the change is within 1 combined standard error"
    return rho, text


def _answer_trend(sc: list[Group], preservation: Metric | None, utility: Metric | None) -> Answer:
    if preservation is None or utility is None or len({_beta_x(g.beta) for g in sc}) < 2:
        return Answer(QUESTIONS[0], "not measured", "Needs SC-LoRA rows at two or more β values with a "
                      "preservation and a utility metric.")
    rho_p, text_p = _trend(sc, preservation)
    rho_u, text_u = _trend(sc, utility)
    if rho_p is None or rho_u is None:
        verdict = "not measured"
    else:
        holds = (rho_p > 0, rho_u < 0)
        verdict = "yes" if all(holds) else "no" if not any(holds) else "partly"
    return Answer(QUESTIONS[0], verdict, f"Preservation — {text_p}. Utility — {text_u}.")


def _answer_versus(question: str, sc: list[Group], refs: list[Group], ref_name: str, win: Metric | None,
                   hold: Metric | None, tolerance: Callable[[Group, Group], float], rule: str,
                   lr_methods: frozenset[str]) -> Answer:
    """Does some SC-LoRA row beat each reference row on ``win`` while ``hold`` is no worse than ``tolerance``?"""
    if not sc or not refs or win is None or hold is None:
        missing = [what for what, ok in (("SC-LoRA row", sc), (f"{ref_name} row", refs),
                                         ("preservation or utility metric", win and hold)) if not ok]
        return Answer(question, "not measured", f"No {' and no '.join(missing)} in the results.")
    findings, wins = [], 0
    for ref in refs:
        name = label(ref, lr_methods)
        if ref.value(win.key) is None or ref.value(hold.key) is None:
            findings.append(f"Against {name}: not measured.")
            continue
        rivals = [g for g in sc if g.value(win.key) is not None and g.value(hold.key) is not None]
        beaters = [g for g in rivals if win.gain(g, ref) > 0 and hold.gain(g, ref) >= -tolerance(g, ref)]
        if not beaters:
            others = "; ".join(f"β={_beta_text(g.beta)}{_variant(g)}: {_two(g, win, hold)}"
                               for g in rivals) or "none measured"
            findings.append(f"Against {name}: no — {name} has {_two(ref, win, hold)}; SC-LoRA has {others}.")
            continue
        wins += 1
        # The most convincing witness: one that needs no tolerance, then the largest margin where it wins.
        best = max(beaters, key=lambda g: (hold.gain(g, ref) >= 0, win.gain(g, ref), hold.gain(g, ref)))
        text = f"Against {name}: yes — {label(best, lr_methods)} has {_two(best, win, hold)} vs {_two(ref, win, hold)}"
        if hold.gain(best, ref) < 0:
            worse = abs(hold.gain(best, ref))
            text += f"; its {hold.label} is worse by {worse:.3g}, within the tolerance {tolerance(best, ref):.3g}"
        se = _combined_se(best, ref, win)
        if se is not None and win.gain(best, ref) <= se:
            text += f"; the {win.label} gain is within 1 combined standard error"
        findings.append(text + ".")
    verdict = "yes" if wins == len(refs) else "no" if wins == 0 else "partly"
    return Answer(question, verdict, " ".join(findings) + f" ({rule}.)")


def _two(g: Group, first: Metric, second: Metric) -> str:
    return f"{first.label} {_with_se(g, first)}, {second.label} {_with_se(g, second)}"


def _early_mean(loss: list[tuple[int, float]], horizon: float) -> float:
    early = [value for step, value in loss if step <= horizon]
    return sum(early) / len(early) if early else loss[0][1]


def _answer_loss(sc: list[Group], loras: list[Group], lr_methods: frozenset[str]) -> Answer:
    sc, loras = [g for g in sc if g.loss], [g for g in loras if g.loss]
    if not sc or not loras:
        return Answer(QUESTIONS[3], "not measured", "Needs loss histories of SC-LoRA and LoRA runs.")
    findings, faster = [], 0
    for g in sc:
        # Same learning rate where possible: a larger lr alone would make LoRA's loss fall faster.
        ref = next((r for r in loras if r.lr == g.lr), loras[0])
        horizon = min(g.loss[-1][0], ref.loss[-1][0]) / 2
        mine, theirs = _early_mean(g.loss, horizon), _early_mean(ref.loss, horizon)
        faster += mine < theirs
        findings.append(f"{label(g, lr_methods)}: {'yes' if mine < theirs else 'no'} — mean training loss over steps "
                        f"≤ {horizon:g} (first half) is {mine:.4f} vs {theirs:.4f} for {label(ref, lr_methods)}.")
    verdict = "yes" if faster == len(sc) else "no" if faster == 0 else "partly"
    return Answer(QUESTIONS[3], verdict, " ".join(findings))


# --- the whole report ---------------------------------------------------------------------------------


def build_report(rows: list[dict], config: dict | None = None, diagnostics: dict | None = None,
                 figures: list[tuple[str, str]] = ()) -> str:
    """report.md's text; ``figures`` are (file name under figures/, caption) pairs already written."""
    config = config or {}
    title = (config.get("report") or {}).get("title") or f"SC-LoRA experiment: {config.get('name', 'results')}"
    parts = [f"# {title}", report_tables(rows, config, diagnostics)]
    if figures:
        parts += ["## Figures", "\n\n".join(f"![{caption}](figures/{name})" for name, caption in figures)]
    layout = infer_layout(rows, config)
    mains = [f"{side} metric: {metric(keys[0]).label}" for side, keys in (("main preservation", layout.preservation),
                                                                         ("main utility", layout.utility)) if keys]
    parts += ["## Answers", f"Computed from the numbers above (means over seeds); {'; '.join(mains) or 'no metrics'}.",
              "\n".join(a.markdown(i) for i, a in enumerate(answers(rows, config), 1))]
    return "\n\n".join(parts) + "\n"


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
    path = folder / "report.md"
    atomic_write(path, build_report(rows, config, diagnostics, figures))
    return path


# --- figures --------------------------------------------------------------------------------------------


def write_figures(rows: list[dict], config: dict | None, diagnostics: dict | None,
                  folder: Path) -> list[tuple[str, str]]:
    """Draw every figure the data allows into ``folder``; returns (file name, caption) of those written.
    A figure the data no longer supports is removed, so report.md never links a stale picture."""
    config = config or {}
    groups, layout = group_runs(rows), infer_layout(rows, config)
    preservation = metric(layout.preservation[0]) if layout.preservation else None
    utility = metric(layout.utility[0]) if layout.utility else None
    lr_methods, model = _several_lrs(groups), config.get("model")
    plots = {
        "beta_vs_preservation.png": ("β vs preservation (paper Fig. 2)",
                                     lambda: _plot_beta(groups, preservation, lr_methods, model)),
        "beta_vs_utility.png": ("β vs utility (paper Fig. 3)",
                                lambda: _plot_beta(groups, utility, lr_methods, model)),
        "loss_curves.png": ("Training loss", lambda: _plot_loss(groups, lr_methods)),
        "tradeoff.png": ("Utility vs preservation trade-off",
                         lambda: _plot_tradeoff(groups, utility, preservation, lr_methods, model)),
        "subspace_energy.png": ("Energy of D+ / D− captured by each initial adapter",
                                lambda: _plot_subspace(diagnostics, [r.get("run") for r in rows])),
    }
    written = []
    for name, (caption, draw) in plots.items():
        fig = draw()
        if fig is None:
            (folder / name).unlink(missing_ok=True)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        _save(fig, folder / name)
        written.append((name, caption))
    return written


def _new_axes(size=(6.4, 4.2)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots()


def _save(fig, path: Path) -> None:
    # A bare Figure on an Agg canvas: no pyplot, so no global backend switch inside a host program or test run.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _axis_label(m: Metric, arrow: str) -> str:
    if m.higher_is_better:
        return f"{m.label} (higher is better {arrow})"
    return f"{m.label} (lower is better; axis flipped so {arrow} is better)"


def _orient(ax, m: Metric, axis: str) -> None:
    """Flip lower-is-better axes so that up / right always means better."""
    if not m.higher_is_better:
        (ax.invert_yaxis if axis == "y" else ax.invert_xaxis)()


def _plot_beta(groups: list[Group], m: Metric | None, lr_methods: frozenset[str], model: str | None):
    if m is None:
        return None
    sc = [g for g in groups if g.method == "sc_lora" and g.beta is not None and g.value(m.key) is not None]
    if len({_beta_x(g.beta) for g in sc}) < 2:
        return None
    fig, ax = _new_axes()
    errors = [g.se(m.key) or 0.0 for g in sc]
    ax.errorbar([_beta_x(g.beta) for g in sc], [g.value(m.key) for g in sc], yerr=errors if any(errors) else None,
                marker="o", capsize=4, color="C0", label="SC-LoRA")
    references = [g for g in groups if (g.is_base or g.method == "lora") and g.value(m.key) is not None]
    for i, g in enumerate(references):
        ax.axhline(g.value(m.key), linestyle="--", color="0.35" if g.is_base else f"C{i + 1}",
                   label=label(g, lr_methods, model))
    several = any(isinstance(g.beta, tuple) for g in sc)
    ax.set_xlabel("β (sum of the weights over preserved sets)" if several else "β")
    ax.set_ylabel(_axis_label(m, "↑"))
    _orient(ax, m, "y")
    ax.set_title(f"SC-LoRA: β vs {m.label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _plot_loss(groups: list[Group], lr_methods: frozenset[str]):
    runs = [g for g in groups if not g.is_base and g.loss]
    if not runs:
        return None
    fig, ax = _new_axes()
    for i, g in enumerate(runs):
        ax.plot([s for s, _ in g.loss], [v for _, v in g.loss], color=f"C{i % 10}",
                linestyle=("-", "--", ":")[(i // 10) % 3], label=label(g, lr_methods))
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (lower is better)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _plot_tradeoff(groups: list[Group], utility: Metric | None, preservation: Metric | None,
                   lr_methods: frozenset[str], model: str | None):
    if utility is None or preservation is None:
        return None
    points = [g for g in groups if g.value(utility.key) is not None and g.value(preservation.key) is not None]
    if len(points) < 2:
        return None
    fig, ax = _new_axes((7.0, 5.0))
    for i, g in enumerate(points):
        color = "0.35" if g.is_base else f"C{i % 10}"
        x, y = g.value(utility.key), g.value(preservation.key)
        path = [(c[utility.key], c[preservation.key]) for c in g.checkpoints
                if utility.key in c and preservation.key in c]
        if path:  # where the run went during training, ending at its final evaluation
            ax.plot([p[0] for p in path] + [x], [p[1] for p in path] + [y], color=color, alpha=0.5, marker=".")
        ax.scatter([x], [y], color=color, marker="*" if g.is_base else "o", s=70, zorder=3)
        ax.annotate(label(g, lr_methods, model), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(_axis_label(utility, "→"))
    ax.set_ylabel(_axis_label(preservation, "↑"))
    _orient(ax, utility, "x")
    _orient(ax, preservation, "y")
    ax.set_title("Trade-off: better is up and to the right")
    ax.grid(alpha=0.3)
    return fig


def _plot_subspace(diagnostics: dict | None, order: list):
    if not diagnostics:
        return None
    runs = _ordered_runs(diagnostics, order)
    if not runs:
        return None
    sides = _sides(diagnostics)
    entries = {run: [e for e in _diagnostic_entries(diagnostics[run]) if e["layer"] is not None] for run in runs}
    kinds = list(dict.fromkeys(e["kind"] for run in runs for e in entries[run]))
    layers = sorted({e["layer"] for run in runs for e in entries[run]})
    if not kinds or not layers:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.5 + 2.8 * len(sides), 0.8 + max(1.8, 0.22 * len(layers)) * len(runs)),
                 layout="constrained")
    axes = fig.subplots(len(runs), len(sides), squeeze=False)
    image = None
    for r, run in enumerate(runs):
        for c, side in enumerate(sides):
            grid = _layer_kind_grid(entries[run], side, layers, kinds)
            ax = axes[r][c]
            image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            ax.set_title(f"{run}: {_side_label(side)}", fontsize=8)
            ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
            ax.set_ylabel("layer", fontsize=7)
    fig.colorbar(image, ax=axes, label="fraction of output energy captured (higher D+, lower D− is the aim)")
    return fig


def _layer_kind_grid(entries: list[dict], side: str, layers: list[int], kinds: list[str]) -> list[list[float]]:
    cells: dict[tuple[int, str], list[float]] = {}
    for e in entries:
        if _is_number(e.get(side)):
            cells.setdefault((e["layer"], e["kind"]), []).append(float(e[side]))
    return [[sum(v) / len(v) if (v := cells.get((layer, kind))) else math.nan for kind in kinds] for layer in layers]
