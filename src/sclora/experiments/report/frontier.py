"""Learning-rate frontiers: each method's runs over learning rates as one curve in the utility-preservation plane,
the rate each method is selected at by a validation metric (never by the evaluation items), and each curve's
preservation at utility levels two curves share (interpolated along the curves: point estimates).

A method "wins" on a frontier only if its curve lies above the other's where their utilities overlap; a lower
learning rate also forgets less, so one point per method cannot decide it."""

from __future__ import annotations

from dataclasses import dataclass

from ..evaluate.metrics import Metric, metric
from .claims import interval_text
from .groups import Group, _fmt_lr, group_runs, label

__all__ = ["Curve", "frontier_curves", "frontier_markdown", "matched_utility", "matched_utility_intervals",
           "plot_frontiers", "selected_rows", "selection_metric"]

#: validation metrics a learning rate may be selected on, in order of preference
VALIDATION = ("math_val_nll", "val_rouge1")


@dataclass
class Curve:
    """One method (variant) over learning rates: its groups sorted by learning rate."""

    name: str
    points: list[Group]

    def selected(self, validation: Metric) -> Group | None:
        """The point with the best validation value (None if no point has one)."""
        scored = [g for g in self.points if g.value(validation.key) is not None]
        return max(scored, key=lambda g: validation.goodness(g.value(validation.key))) if scored else None


def selection_metric(rows: list[dict]) -> str | None:
    """The validation metric the rows carry, if any."""
    return next((key for key in VALIDATION if any(key in r for r in rows)), None)


def selected_rows(rows: list[dict]) -> list[dict]:
    """The rows a learning-rate sweep's claims compare: the base, each curve's selected learning rate (all its seeds)
    and the runs on no curve. ``rows`` as they are when they carry no validation metric to select by."""
    key = selection_metric(rows)
    if key is None:
        return rows
    validation = metric(key)
    dropped = set()
    for curve in frontier_curves(group_runs(rows)):
        chosen = curve.selected(validation)
        if chosen is not None:
            dropped |= {run for g in curve.points if g is not chosen for run in g.runs}
    return [r for r in rows if r["run"] not in dropped]


def frontier_curves(groups: list[Group], lr_methods: frozenset[str] = frozenset(), model: str | None = None
                    ) -> list[Curve]:
    """Groups of the same method and variant at two or more learning rates, as curves."""
    curves: dict[tuple, list[Group]] = {}
    for g in groups:
        if g.is_base or g.lr is None:
            continue
        curves.setdefault((g.method, g.beta, g.normalize, g.locked, g.auto_budget), []).append(g)
    out = []
    for members in curves.values():
        if len({g.lr for g in members}) >= 2:
            members = sorted(members, key=lambda g: g.lr)
            out.append(Curve(label(members[0], frozenset(), model).split(" (lr")[0], members))
    return out


def _interpolate(points: list[tuple[float, float]], u: float) -> float | None:
    """Preservation at utility ``u`` along a curve (points in learning-rate order, linear between neighbours);
    the best such value where the curve passes ``u`` more than once; None outside its utility range."""
    found = []
    for (u0, p0), (u1, p1) in zip(points, points[1:]):
        if min(u0, u1) <= u <= max(u0, u1):
            found.append(p0 if u1 == u0 else p0 + (p1 - p0) * (u - u0) / (u1 - u0))
    return max(found) if found else None


def _only_above_best(points: list[tuple[float, float]], u: float) -> bool:
    """Whether every segment of a curve (points in learning-rate order, utility signed so higher is better) that
    passes utility ``u`` starts at or after the point of its best utility."""
    best = max(range(len(points)), key=lambda i: points[i][0])
    crossing = [i for i, ((u0, _), (u1, _)) in enumerate(zip(points, points[1:])) if min(u0, u1) <= u <= max(u0, u1)]
    return bool(crossing) and min(crossing) >= best


def _shared_range(pa: list[tuple[float, float]], pb: list[tuple[float, float]]) -> tuple[float, float]:
    return max(min(u for u, _ in pa), min(u for u, _ in pb)), min(max(u for u, _ in pa), max(u for u, _ in pb))


def _up_to_best(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """A curve's points up to and including its best utility: the part not over-trained."""
    return points[:max(range(len(points)), key=lambda i: points[i][0]) + 1]


def matched_utility(a: Curve, b: Curve, utility: Metric, preservation: Metric, levels: int = 5) -> list[dict]:
    """Preservation of ``a`` and ``b`` at ``levels`` utility values (the midpoints of ``levels`` equal slices) spread
    inside the utility range both curves reach at or below the rate of their best utility; where those parts share
    no range, inside both curves' whole shared range. Empty when the whole ranges do not overlap.

    Each entry's ``beyond_best`` names the curves ("A", "B") that reach its utility only at learning rates above
    their best (every segment of the curve that passes it lies at or above the rate of the curve's best utility):
    that is the curve's over-trained side, and a lower rate than the sweep tried might reach it while keeping more.
    A curve that passes the level also below its best rate (a dip in utility on the way up, such as an aligned model
    refusing benign requests early in training) reaches it under-trained, which is no artefact of the range."""
    def signed(curve):
        return [(utility.goodness(g.value(utility.key)), preservation.goodness(g.value(preservation.key)))
                for g in curve.points if g.value(utility.key) is not None and g.value(preservation.key) is not None]

    pa, pb = signed(a), signed(b)
    if len(pa) < 2 or len(pb) < 2:
        return []
    low, high = _shared_range(_up_to_best(pa), _up_to_best(pb))
    if not low < high:  # the parts below the best rates share no range: compare where the whole curves overlap
        low, high = _shared_range(pa, pb)
    if low > high:
        return []
    rows = []
    for i in range(levels):  # inside the shared range, not on its ends, which resampled curves often miss
        u = low + (high - low) * (i + 0.5) / levels
        ya, yb = _interpolate(pa, u), _interpolate(pb, u)
        if ya is not None and yb is not None:
            beyond = [side for side, points in (("A", pa), ("B", pb)) if _only_above_best(points, u)]
            rows.append({"utility": utility.goodness(u), "a": preservation.goodness(ya),
                         "b": preservation.goodness(yb), "difference": ya - yb, "beyond_best": beyond})
    return rows


def _item_means(group: Group, samples: dict[str, dict], key: str):
    """The group's per-item scores for ``key``, averaged over its runs (seeds), or None where a run kept none."""
    import numpy as np

    rows = [samples.get(run, {}).get(key) for run in group.runs]
    if not rows or any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
        return None
    return np.mean(np.asarray(rows, dtype=np.float64), axis=0)


def matched_utility_intervals(a: Curve, b: Curve, utility: Metric, preservation: Metric, samples: dict[str, dict],
                              levels: int = 5, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> list[dict]:
    """:func:`matched_utility` with a paired bootstrap over items: the utility items and the preservation items are
    resampled (the same draw for every run, as all runs score the same items; a run's seeds averaged item by item),
    both curves rebuilt from the resampled means, and the difference taken at the same utility levels. Each entry
    adds ``low`` / ``high`` (the central ``level`` of the bootstrap differences, over the draws where both curves
    reach the level) and a ``verdict``. Empty when a point lacks per-item scores."""
    import numpy as np

    points = [g for g in a.points + b.points]
    u_items = [_item_means(g, samples, utility.key) for g in points]
    p_items = [_item_means(g, samples, preservation.key) for g in points]
    if any(x is None for x in u_items + p_items):
        return []
    estimate = matched_utility(a, b, utility, preservation, levels)
    if not estimate:
        return []
    rng = np.random.default_rng(seed)
    n_u, n_p = len(u_items[0]), len(p_items[0])
    u, p = np.stack(u_items), np.stack(p_items)
    draws = {i: [] for i in range(len(estimate))}
    n_a = len(a.points)
    for _ in range(n_boot):
        iu, ip = rng.integers(0, n_u, n_u), rng.integers(0, n_p, n_p)
        mu, mp = u[:, iu].mean(axis=1), p[:, ip].mean(axis=1)
        ca = [(utility.goodness(x), preservation.goodness(y)) for x, y in zip(mu[:n_a], mp[:n_a])]
        cb = [(utility.goodness(x), preservation.goodness(y)) for x, y in zip(mu[n_a:], mp[n_a:])]
        for i, e in enumerate(estimate):
            target = utility.goodness(e["utility"])
            ya, yb = _interpolate(ca, target), _interpolate(cb, target)
            if ya is not None and yb is not None:
                draws[i].append(ya - yb)
    tail = (1 - level) / 2
    out = []
    for i, e in enumerate(estimate):
        values = np.asarray(draws[i])
        if values.size < n_boot // 2:  # the level lies outside one curve in most draws: no interval
            out.append({**e, "low": None, "high": None, "verdict": "undecided (the curves rarely both reach it)"})
            continue
        low, high = (float(q) for q in np.quantile(values, [tail, 1 - tail]))
        verdict = "A preserves more" if low > 0 else "B preserves more" if high < 0 else "undecided"
        out.append({**e, "low": low, "high": high, "verdict": verdict})
    return out


def frontier_markdown(curves: list[Curve], utility: Metric, preservation: Metric, validation: Metric | None,
                      samples: dict[str, dict] | None = None, paired: list[dict] | None = None,
                      also: tuple[Metric, ...] = ()) -> str:
    """The verdicts (SC-LoRA against each other method: best vs best from the ``paired`` differences of the selected
    rates, and the matched-utility ranges), the selected-rate table and, for each pair with SC-LoRA, preservation at
    matched utility (with paired bootstrap intervals over items when the per-item ``samples`` are given). ``also``:
    further preservation metrics compared at matched utility the same way (those the ``samples`` hold)."""
    if not curves:
        return ""
    kept = [preservation, *(m for m in also if samples and any(m.key in s for s in samples.values()))]
    parts = ["## Learning-rate frontiers"]
    chosen = {c.name: c.selected(validation) for c in curves} if validation is not None else {}
    if validation is not None:
        head = (f"| method | learning rates | selected by {validation.label} | {validation.header} | "
                f"{utility.header} | {preservation.header} | seeds |")
        lines = [head, "|---|---|---|---|---|---|---|"]
        for c in curves:
            s = chosen[c.name]
            if s is not None:
                lines.append(f"| {c.name} | {', '.join(_fmt_lr(g.lr) for g in c.points)} | {_fmt_lr(s.lr)} | "
                             f"{_fmt(s, validation)} | {_fmt(s, utility)} | {_fmt(s, preservation)} | {s.n} |")
        parts += [f"Each method at the learning rate its {validation.label} selects (a split kept apart from the "
                  "evaluation items); ± = standard error.", "\n".join(lines)]
    sc = [c for c in curves if c.points[0].method == "sc_lora"]
    others = [c for c in curves if c.points[0].method != "sc_lora"]
    rows, verdicts = [], []
    for a in sc:
        for b in others:
            summaries = []
            for kept_metric in kept:
                matched = (matched_utility_intervals(a, b, utility, kept_metric, samples) if samples else []) or \
                    matched_utility(a, b, utility, kept_metric)
                rows += [_matched_row(a.name, b.name, m, utility, kept_metric) for m in matched]
                summaries.append(f"Matched utility ({kept_metric.label} at equal {utility.label}): "
                                 f"{_matched_summary(matched, a.name, b.name, utility)}.")
            if validation is None:
                continue  # no rate selected: nothing to compare best vs best
            best = _best_vs_best(a.name, b.name, chosen.get(a.name), chosen.get(b.name), paired)
            verdicts.append(f"- **{a.name} vs {b.name}.** {best} " + " ".join(summaries))
    if verdicts:
        parts += ["### Verdicts", "Each names the comparison it rests on. *Best vs best*: each method at its selected "
                  "learning rate, paired over the same items (and seeds), 95% bootstrap intervals. *Matched "
                  "utility*: preservation where both curves reach the same task utility (the table below).",
                  "\n".join(verdicts)]
    if rows:
        parts += [f"Preservation at matched utility, interpolated along each curve over its learning rates (where a "
                  f"curve passes a utility twice, its better value): positive = A preserves more at that "
                  f"{utility.label}. The levels lie where both curves reach that {utility.label} at or below the "
                  f"rate of their best one; where no such range is shared, anywhere both reach. Intervals: 95% "
                  f"paired bootstrap over the evaluation items (utility and preservation items resampled, each "
                  f"run's seeds averaged item by item). *Only above its best rate*: a curve that reaches this level "
                  f"only past its best rate reaches it over-trained; a lower rate might reach it keeping more, so "
                  f"such a comparison is not a verdict on that method.",
                  "| A − B | preservation | " + utility.header + " | A | B | A − B | 95% interval, verdict | "
                  "only above its best rate |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)]
    return "\n\n".join(parts) if len(parts) > 1 else ""


def _matched_row(name_a: str, name_b: str, m: dict, utility: Metric, preservation: Metric) -> str:
    """One matched-utility level as a table row."""
    d = preservation.digits
    interval = (f"[{m['low']:+.{d}f}, {m['high']:+.{d}f}] {m['verdict']}" if m.get("low") is not None
                else m.get("verdict", "point estimate"))
    beyond = ", ".join({"A": name_a, "B": name_b}[x] for x in m.get("beyond_best", [])) or "–"
    return (f"| {name_a} − {name_b} | {preservation.header} | {m['utility']:.{utility.digits}f} | {m['a']:.{d}f} | "
            f"{m['b']:.{d}f} | {m['difference']:+.{d}f} | {interval} | {beyond} |")


def _best_vs_best(name_a: str, name_b: str, a: Group | None, b: Group | None, paired: list[dict] | None) -> str:
    """The paired differences between two selected groups, as one sentence."""
    if a is None or b is None:
        return "Best vs best: no learning rate selected (no validation scores)."
    where = f"Best vs best (lr {_fmt_lr(a.lr)} vs {_fmt_lr(b.lr)})"
    entries = [e for e in paired or [] if e["metric"] != "train_loss" and e.get("pairs")
               and all(x in a.runs and y in b.runs for x, y in e["pairs"])]
    if not entries:
        return f"{where}: no paired scores."
    runs_a = max(len({x for x, _ in e["pairs"]}) for e in entries)
    runs_b = max(len({y for _, y in e["pairs"]}) for e in entries)
    seeds = (f"{runs_a} seed{'s' if runs_a > 1 else ''} each" if runs_a == runs_b else
             f"seeds {runs_a} vs {runs_b}")
    said = {"A better": f"{name_a} better", "B better": f"{name_b} better"}
    texts = [f"{metric(e['metric']).label} {interval_text(e)} ({said.get(e['verdict'], e['verdict'])})"
             for e in entries]
    return f"{where}, {seeds}: " + "; ".join(texts) + "."


def _matched_summary(matched: list[dict], a: str, b: str, utility: Metric) -> str:
    """Consecutive utility levels with the same verdict as ranges: "SC-LoRA preserves more at NLL 0.78-0.91; ..."."""
    if not matched:
        return "the curves share no utility range"
    if all(m.get("verdict") is None for m in matched):
        return "point estimates only (no per-item scores)"
    spans: list[list] = []
    for m in sorted(matched, key=lambda m: m["utility"]):
        verdict = m["verdict"] if m.get("low") is not None else "undecided"
        verdict = ("undecided" if verdict.startswith("undecided") else verdict, tuple(m.get("beyond_best", ())))
        if spans and spans[-1][0] == verdict:
            spans[-1][2] = m["utility"]
        else:
            spans.append([verdict, m["utility"], m["utility"]])
    said = {"A preserves more": f"{a} preserves more", "B preserves more": f"{b} preserves more"}
    names = {"A": a, "B": b}
    d = utility.digits
    return "; ".join(f"{said.get(v, v)} at {utility.label} {lo:.{d}f}" + (f"–{hi:.{d}f}" if hi != lo else "")
                     + (f" (there {' and '.join(names[x] for x in beyond)} only above its best rate: not a verdict)"
                        if beyond else "")
                     for (v, beyond), lo, hi in spans)


def _fmt(g: Group, m: Metric) -> str:
    value, se = g.value(m.key), g.se(m.key)
    if value is None:
        return "–"
    return f"{value:.{m.digits}f}" + (f" ± {se:.{m.digits}f}" if se is not None else "")


def plot_frontiers(curves: list[Curve], base: Group | None, utility: Metric, preservation: Metric,
                   validation: Metric | None, new_axes, axis_label, orient):
    """One line per method through its learning rates (marker size grows with the rate; the selected rate
    circled), error bars ±1 SE; the base model as a star."""
    if not curves:
        return None
    fig, ax = new_axes((8.2, 5.0))
    for i, c in enumerate(curves):
        points = [g for g in c.points if g.value(utility.key) is not None and g.value(preservation.key) is not None]
        if not points:
            continue
        color = f"C{i % 10}"
        xs, ys = [g.value(utility.key) for g in points], [g.value(preservation.key) for g in points]
        ax.plot(xs, ys, color=color, alpha=0.6, label=f"{c.name} ({points[0].lr:g} … {points[-1].lr:g})")
        for rank, g in enumerate(points):
            ax.errorbar([g.value(utility.key)], [g.value(preservation.key)], xerr=g.se(utility.key),
                        yerr=g.se(preservation.key), color=color, marker="o", markersize=3 + 1.5 * rank,
                        linestyle="none", capsize=2, alpha=0.9)
        if validation is not None:
            s = c.selected(validation)
            if s.value(utility.key) is not None and s.value(preservation.key) is not None:
                ax.plot([s.value(utility.key)], [s.value(preservation.key)], marker="o", markersize=14,
                        markerfacecolor="none", markeredgecolor=color, linestyle="none")
    if base is not None and base.value(utility.key) is not None and base.value(preservation.key) is not None:
        ax.plot([base.value(utility.key)], [base.value(preservation.key)], marker="*", markersize=11, color="0.35",
                linestyle="none", label="base model")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              title="method (learning rates)", title_fontsize=7)
    ax.set_xlabel(axis_label(utility, "→"))
    ax.set_ylabel(axis_label(preservation, "↑"))
    orient(ax, utility, "x")
    orient(ax, preservation, "y")
    ax.set_title("Learning-rate frontiers (marker size: rate; ring: selected on validation; bars ±1 SE)", fontsize=9)
    ax.grid(alpha=0.3)
    return fig
