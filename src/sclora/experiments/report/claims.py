"""Answers to the paper's claims, checked against the numbers (each answer cites the values it used)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..evaluate.metrics import Metric, metric
from .groups import Group, _beta_text, _beta_x, _several_lrs, _variant, _with_se, group_runs, infer_layout, label

__all__ = ["PAIRED_QUESTIONS", "QUESTIONS", "SIMILAR_FRACTION", "SMOOTHING", "TREND", "Answer", "answers", "decided", "efficiency", "interval_text", "spearman", "steps_to_reach"]


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
    # The β trend compares like with like: runs that override the experiment's normalize (or lock B) are left out.
    return [
        _answer_trend([g for g in sc if not g.normalize and not g.locked], preservation, utility),
        _answer_versus(QUESTIONS[1], sc, [g for g in groups if g.method == "lora"], "LoRA", preservation, utility,
                       lambda a, b: _combined_se(a, b, utility) or 0.0,
                       "Equal utility: within 1 combined standard error, or exactly equal without standard errors",
                       lr_methods),
        _answer_versus(QUESTIONS[2], sc, [g for g in groups if g.method == "corda_kpa"], "CorDA KPA", utility,
                       preservation, lambda a, b: _similar_tolerance(groups, a, b, preservation),
                       "Similar preservation: within 1 combined standard error, or without standard errors within "
                       f"{SIMILAR_FRACTION:.0%} of the metric's range over all rows", lr_methods),
        _answer_loss(sc, [g for g in groups if g.method == "lora"], lr_methods, utility),
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


SMOOTHING = 5  # training losses are per batch: compared as trailing means over this many steps


def steps_to_reach(loss: list[tuple[int, float]], target: float, window: int = SMOOTHING) -> int | None:
    """The first step at which the trailing mean of ``window`` step losses is at or below ``target``."""
    for i, (step, _) in enumerate(loss):
        recent = [v for _, v in loss[max(0, i - window + 1): i + 1]]
        if sum(recent) / len(recent) <= target:
            return step
    return None


def efficiency(a: Group, ref: Group, utility: Metric | None = None) -> dict:
    """The paper's "efficient fine-tuning" as figures: the steps ``a`` needs to reach ``ref``'s final training loss
    (trailing mean of :data:`SMOOTHING` steps), divided by ``ref``'s steps; and the same for the held-out utility
    metric, from the evaluations along training (``evaluate_steps``) and at the end (the row's value). None where
    ``a`` never gets there (or nothing was measured)."""
    out = {"loss_ratio": None, "utility_ratio": None, "utility_step": None, "steps": None}
    if a.loss and ref.loss:
        total = ref.loss[-1][0]
        final = sum(v for _, v in ref.loss[-SMOOTHING:]) / len(ref.loss[-SMOOTHING:])
        reached = steps_to_reach(a.loss, final)
        out.update(steps=total, loss_target=final, loss_step=reached,
                   loss_ratio=None if reached is None else reached / total)
    points = [(p["step"], p[utility.key]) for p in a.checkpoints if utility is not None and utility.key in p]
    out["utility_steps_evaluated"] = [st for st, _ in points]
    if points and a.loss and ref.value(utility.key) is not None:  # only with evaluations along training
        sign = 1 if utility.higher_is_better else -1
        goal = ref.value(utility.key)
        points.append((a.loss[-1][0], a.value(utility.key)))
        step = next((st for st, v in points if v is not None and sign * (v - goal) >= 0), None)
        total = ref.loss[-1][0]
        out.update(utility_step=step, utility_ratio=None if step is None else step / total)
    return out


def _answer_loss(sc: list[Group], loras: list[Group], lr_methods: frozenset[str], utility: Metric | None = None) -> Answer:
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
        e = efficiency(g, ref, utility)
        reach = ("never reaches its final training loss" if e["loss_ratio"] is None else
                 f"reaches its final training loss ({e['loss_target']:.4f}, mean of the last {SMOOTHING} steps) at "
                 f"step {e['loss_step']} of {e['steps']} (ratio {e['loss_ratio']:.2f})")
        if utility is not None and not e["utility_steps_evaluated"]:
            pass  # held-out utility only measured at the end (no evaluate_steps): nothing to say about speed
        elif e["utility_step"] is not None:
            reach += (f"; its final {utility.label} at step {e['utility_step']} (ratio {e['utility_ratio']:.2f}; "
                      f"evaluated at steps {', '.join(map(str, e['utility_steps_evaluated']))} and the end)")
        else:
            reach += f"; never matches its final {utility.label}"
        findings.append(f"{label(g, lr_methods)}: {'yes' if mine < theirs else 'no'} — mean training loss over steps "
                        f"≤ {horizon:g} (first half) is {mine:.4f} vs {theirs:.4f} for {label(ref, lr_methods)}; "
                        f"{reach}.")
    verdict = "yes" if faster == len(sc) else "no" if faster == 0 else "partly"
    return Answer(QUESTIONS[3], verdict, " ".join(findings))


# --- the same claims decided by paired differences (paired.py's entries): holds / does not hold / undecided ------

TREND = "β trend (highest vs lowest β)"  # the comparison name paired.py gives highest-vs-lowest-β pairs

PAIRED_QUESTIONS = (
    "Does preservation improve from the lowest to the highest SC-LoRA β (and what does utility do)?",
    "Does some SC-LoRA β beat every LoRA row on preservation, with utility not worse?",
    "Does some SC-LoRA β beat every CorDA KPA row on utility, with preservation not worse?",
    "Is some SC-LoRA β's training loss lower than every LoRA row's on the same batches (faster convergence)?",
)


def decided(entries: list[dict] | None, preservation: str | None, utility: str | None) -> list[Answer]:
    """The claims decided from paired differences on the same items (95% intervals): a pair "holds" when the claim's
    metric is better with an interval that excludes 0 and the other metric is not significantly worse, "does not
    hold" when the claim's metric or the other one is significantly worse, "undecided" otherwise; a claim holds when
    some SC-LoRA row holds against every reference row, does not hold when every SC-LoRA row fails against some
    reference row, and is undecided otherwise."""
    entries = entries or []
    find = {(e["comparison"], e["a"], e["b"], e["metric"]): e for e in entries}

    def pair(comparison: str, a: str, b: str, win: str | None, hold: str | None) -> tuple[str, str]:
        w = find.get((comparison, a, b, win)) if win else None
        h = find.get((comparison, a, b, hold)) if hold else None
        if w is None:
            return "not measured", ""
        verdict = ("does not hold" if w["verdict"] == "B better" or (h and h["verdict"] == "B better") else
                   "holds" if w["verdict"] == "A better" else "undecided")
        return verdict, f"{a} − {b}: {_ci(w)}" + (f", {_ci(h)}" if h else "") + f" → {verdict}"

    def claim(number: int, comparison: str, win: str | None, hold: str | None) -> Answer:
        question = PAIRED_QUESTIONS[number]
        pairs = list(dict.fromkeys((e["a"], e["b"]) for e in entries if e["comparison"] == comparison))
        results = {ab: pair(comparison, *ab, win, hold) for ab in pairs}
        results = {ab: r for ab, r in results.items() if r[0] != "not measured"}
        if not results:
            return Answer(question, "not measured", "No paired scores for this comparison.")
        by_a: dict[str, list[str]] = {}
        for (a, _), (verdict, _) in results.items():
            by_a.setdefault(a, []).append(verdict)
        if any(all(v == "holds" for v in vs) for vs in by_a.values()):
            verdict = "holds"
        elif all(any(v == "does not hold" for v in vs) for vs in by_a.values()):
            verdict = "does not hold"
        else:
            verdict = "undecided"
        return Answer(question, verdict, "; ".join(text for _, text in results.values()) + ".")

    if preservation is None:
        return [Answer(q, "not measured", "No preservation metric.") for q in PAIRED_QUESTIONS]
    trend = claim(0, TREND, preservation, None)
    if trend.verdict != "not measured" and utility:
        costs = [e for e in entries if e["comparison"] == TREND and e["metric"] == utility]
        trend = Answer(trend.question, trend.verdict, trend.evidence.rstrip(".") + "; utility " +
                       "; ".join(f"{_ci(e)} ({'no cost' if e['verdict'] != 'B better' else 'a cost'})"
                                 for e in costs) + ".")
    return [trend, claim(1, "SC-LoRA vs LoRA", preservation, utility),
            claim(2, "SC-LoRA vs CorDA KPA", utility, preservation),
            claim(3, "SC-LoRA vs LoRA", "train_loss", None)]


def interval_text(e: dict) -> str:
    """A paired difference as "diff [low, high]" in its metric's format."""
    m = metric(e["metric"])
    return f"{m.fmt(e['diff'])} [{m.fmt(e['low'])}, {m.fmt(e['high'])}]"


def _ci(e: dict) -> str:
    return f"{metric(e['metric']).label} {interval_text(e)}"
