"""The report's figures (matplotlib, on a bare Agg canvas): beta against preservation / utility (paper Figs.
2-3), loss curves, the utility-preservation trade-off and the subspace energy of each initial adapter."""

from __future__ import annotations

import math
from pathlib import Path

from ...fileio import atomic_path
from ..evaluate.metrics import Metric, metric
from .groups import Group, _beta_x, _is_number, _several_lrs, group_runs, infer_layout, label
from .tables import _diagnostic_entries, _ordered_runs, _side_label, _sides

__all__ = ["write_figures"]


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
        "frontiers.png": ("Learning-rate frontiers: each method over its learning rates",
                          lambda: _plot_frontiers(groups, rows, utility, preservation, model)),
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
    fig, ax = _new_axes((8.2, 5.0))
    markers = "osD^vPX<>p"
    for i, g in enumerate(points):
        color = "0.35" if g.is_base else f"C{i % 10}"
        x, y = g.value(utility.key), g.value(preservation.key)
        path = [(c[utility.key], c[preservation.key]) for c in g.checkpoints
                if utility.key in c and preservation.key in c]
        if path:  # where the run went during training, ending at its final evaluation
            ax.plot([p[0] for p in path] + [x], [p[1] for p in path] + [y], color=color, alpha=0.5, marker=".")
        # standard errors as error bars; names in the legend, never as text on top of each other
        ax.errorbar([x], [y], xerr=g.se(utility.key), yerr=g.se(preservation.key), color=color, capsize=3,
                    marker="*" if g.is_base else markers[(i // 10) % len(markers)], markersize=9 if g.is_base else 6,
                    linestyle="none", zorder=3, label=label(g, lr_methods, model))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_xlabel(_axis_label(utility, "→"))
    ax.set_ylabel(_axis_label(preservation, "↑"))
    _orient(ax, utility, "x")
    _orient(ax, preservation, "y")
    ax.set_title("Trade-off: better is up and to the right (bars: ±1 SE)")
    ax.grid(alpha=0.3)
    return fig


def _plot_frontiers(groups: list[Group], rows: list[dict], utility: Metric | None, preservation: Metric | None,
                    model: str | None):
    from .frontier import frontier_curves, plot_frontiers, selection_metric

    if utility is None or preservation is None:
        return None
    key = selection_metric(rows)
    base = next((g for g in groups if g.is_base), None)
    return plot_frontiers(frontier_curves(groups, model=model), base, utility, preservation,
                          metric(key) if key else None, _new_axes, _axis_label, _orient)


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
