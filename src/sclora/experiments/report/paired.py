"""Paired differences: two methods compared on the same evaluation items, with a 95% paired-bootstrap confidence
interval and a verdict, for the comparisons the paper's claims rest on. Needs the per-item scores ``sclora run``
keeps in ``samples/<run>.json``; the numbers are stored in ``paired.json`` so a report regenerates without them.

Verdicts: "A better" when the whole interval of how much better A is lies above 0, "B better" when below,
"undecided" when it contains 0 (the data cannot tell them apart at this size).
"""

from __future__ import annotations

from ..evaluate.metrics import metric
from ..evaluate.scores import paired_difference
from .claims import SMOOTHING, TREND, interval_text
from .groups import METHOD_NAMES, Group, _several_lrs, group_runs, infer_layout, label

__all__ = ["AUTO", "paired_comparisons", "paired_markdown"]

AUTO = "auto vs hand-picked β"

#: the other methods SC-LoRA is compared with where a config runs them (the newer inits and the safety baselines)
COMPETITORS = ("mica", "pissa", "safe_lora", "guardspace")


def _pairs(groups: list[Group]) -> list[tuple[Group, Group, str]]:
    """(A, B, why): SC-LoRA (each β) against LoRA and CorDA KPA (claims 2 and 3), SaLoRA (the closest published
    competitor for safety) and the :data:`COMPETITORS`; a β chosen from a preservation budget against each hand-picked β of the sweep at its
    learning rate; locked against plain SC-LoRA at the same β; SC-LoRA's highest hand-picked β against its lowest at the same learning rate (claim 1); full
    fine-tuning against the base model (is there forgetting to prevent at all: the calibration)."""
    by = {m: [g for g in groups if g.method == m] for m in ("sc_lora", "lora", "corda_kpa", "salora", "full", "base")}
    sc = [g for g in by["sc_lora"] if g.beta is not None and not g.normalize]
    out = [(a, b, "SC-LoRA vs LoRA") for a in sc for b in by["lora"]]
    out += [(a, b, "locked vs plain SC-LoRA") for a in sc if a.locked for b in sc
            if not b.locked and b.beta == a.beta and b.lr == a.lr]
    out += [(a, b, AUTO) for a in sc if a.auto_budget is not None for b in sc
            if b.auto_budget is None and not b.locked and b.lr == a.lr]
    out += [(a, b, "SC-LoRA vs CorDA KPA") for a in sc for b in by["corda_kpa"]]
    out += [(a, b, "SC-LoRA vs SaLoRA") for a in sc for b in by["salora"]]
    out += [(a, b, f"SC-LoRA vs {METHOD_NAMES[m]}") for m in COMPETITORS for a in sc for b in groups if b.method == m]
    for lr in dict.fromkeys(g.lr for g in sc):
        plain = sorted((g for g in sc if g.lr == lr and not g.locked and g.auto_budget is None
                        and isinstance(g.beta, (int, float))),
                       key=lambda g: g.beta)
        if len(plain) >= 2 and plain[-1].beta > plain[0].beta:
            out.append((plain[-1], plain[0], TREND))
    out += [(a, b, "forgetting (calibration)") for a in by["full"] + by["lora"] for b in by["base"]]
    return out


def paired_comparisons(rows: list[dict], config: dict | None, samples: dict[str, dict]) -> list[dict]:
    """Paired differences for every comparison of :func:`_pairs` and every preservation / utility metric of the
    report's layout whose per-item scores both sides kept; and for SC-LoRA vs LoRA the training loss step by step
    (both see the same batches in the same order under the same seed; a block bootstrap over steps, as neighbouring
    steps are correlated). Runs are matched by seed (a side without that seed contributes its first run). All
    seeds score the same evaluation items, so several matched pairs are averaged item by item (a run's seeds are
    not independent items: the bootstrap resamples items, each carrying its mean over the seeds). Runs without kept
    scores (rows from before the scores were kept) are left out; the entry lists the runs it used."""
    groups = group_runs(rows)
    layout = infer_layout(rows, config)
    seeds = {r["run"]: r.get("seed") for r in rows}
    losses = {r["run"]: {int(st): float(v) for st, v in r.get("loss_history") or []} for r in rows}
    lr_methods = _several_lrs(groups)
    scores = {key: {run: s[key] for run, s in samples.items() if key in s}
              for key in (*layout.preservation, *layout.utility)}
    out = []
    for a, b, why in _pairs(groups):
        keys = layout.preservation if why.startswith("forgetting") else [*layout.preservation, *layout.utility]
        for key in keys:
            entry = _compare(a, b, key, scores[key], seeds)
            if entry is not None:
                out.append({"comparison": why, "a": label(a, lr_methods), "b": label(b, lr_methods), **entry})
        if why == "SC-LoRA vs LoRA":
            entry = _compare(a, b, "train_loss", _loss_series(a.runs + b.runs, losses), seeds, block=SMOOTHING)
            if entry is not None:
                out.append({"comparison": why, "a": label(a, lr_methods), "b": label(b, lr_methods), **entry})
    return out


def _loss_series(runs: list[str], losses: dict[str, dict[int, float]]) -> dict[str, list[float]]:
    """Each run's training loss at the steps every one of ``runs`` logged (the same steps on both sides)."""
    logged = [losses.get(run) or {} for run in runs]
    steps = sorted(set.intersection(*(set(h) for h in logged))) if all(logged) else []
    return {run: [losses[run][st] for st in steps] for run in runs} if steps else {}


def _compare(a: Group, b: Group, key: str, scores: dict[str, list[float]], seeds: dict, block: int = 1) -> dict | None:
    """A − B on ``key`` over the runs of both that have scores, matched by seed, averaged item by item."""
    kept_b = [r for r in b.runs if r in scores]
    firsts, seconds, used = [], [], []
    for run in (r for r in a.runs if r in scores):
        if not kept_b:
            break
        match = next((r for r in kept_b if seeds.get(r) == seeds.get(run)), kept_b[0])
        x, y = scores[run], scores[match]
        if len(x) != len(y) or (firsts and len(x) != len(firsts[0])):
            raise ValueError(f"Runs {run!r} and {match!r} scored {key} on {len(x)} and {len(y)} items"
                             + (f" (earlier pairs: {len(firsts[0])})" if firsts else "")
                             + ": not the same items, so they cannot be compared pairwise.")
        firsts, seconds, used = [*firsts, x], [*seconds, y], [*used, (run, match)]
    if not firsts:
        return None
    d = paired_difference(*_item_means(firsts, seconds), block=block)
    m = metric(key)
    sign = 1 if m.higher_is_better else -1
    gain = sorted((sign * d["low"], sign * d["high"]))
    verdict = "A better" if gain[0] > 0 else "B better" if gain[1] < 0 else "undecided"
    return {"metric": key, "pairs": used, **d, "verdict": verdict}


def _item_means(firsts: list[list[float]], seconds: list[list[float]]) -> tuple[list[float], list[float]]:
    """Per item, the mean of A's and of B's scores over the matched pairs where both are finite (NaN where none)."""
    import numpy as np

    x, y = np.asarray(firsts, dtype=np.float64), np.asarray(seconds, dtype=np.float64)
    both = np.isfinite(x) & np.isfinite(y)
    count = both.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = np.where(both, x, 0.0).sum(axis=0) / count
        my = np.where(both, y, 0.0).sum(axis=0) / count
    return mx.tolist(), my.tolist()


def _count(entry: dict) -> str:
    pairs = len(entry.get("pairs") or [])
    return f"{entry['n']} × {pairs}" if pairs > 1 else str(entry["n"])


def paired_markdown(entries: list[dict] | None) -> str:
    """The "Paired differences" section of report.md."""
    head = ("## Paired differences\n\nEach line compares two methods on the same items (runs matched by seed; "
            "with several seeds, each item's mean over them: n = items × seed pairs; for the training loss the items are "
            "the steps, resampled in blocks of 5): the mean of A − B with a 95% "
            "paired-bootstrap interval (10,000 resamples of the items); a verdict only when the interval excludes 0.")
    if not entries:
        return head + "\n\nNot measured: the per-item scores (samples/) of these runs were not kept."
    lines = ["| comparison | A | B | metric | n | A − B [95% CI] | verdict |", "|---|---|---|---|---|---|---|"]
    for e in entries:
        m = metric(e["metric"])
        lines.append(f"| {e['comparison']} | {e['a']} | {e['b']} | {m.header} | {_count(e)} | {interval_text(e)} | "
                     f"{e['verdict']} |")
    return head + "\n\n" + "\n".join(lines)
