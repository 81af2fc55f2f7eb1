"""The report's view of the rows: which metrics are preservation and utility (``infer_layout``), runs merged
over seeds into groups in the paper's order with pooled standard errors (``group_runs``), and how a group is
named and formatted."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..evaluate.metrics import Metric

__all__ = [
    "HARM",
    "KNOWLEDGE",
    "MATH",
    "METHOD_NAMES",
    "NOT_METRICS",
    "PAPER_ORDER",
    "Group",
    "Layout",
    "group_runs",
    "infer_layout",
    "label",
    "method_name",
]


KNOWLEDGE = ("knowledge_em", "knowledge_mc", "knowledge_kept", "knowledge_logprob")


HARM = ("harmfulness_score", "harmfulness_rate")


MATH = ("math_accuracy", "math_nll", "math_likelihood")


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


PAPER_ORDER = ("base", "full", "lora", "safe_lora", "mica", "pissa", "olora", "eva", "corda_ipa", "corda_kpa", "salora",
               "guardspace", "sc_lora")


METHOD_NAMES = {"base": "Base model", "full": "Full fine-tuning", "lora": "LoRA", "pissa": "PiSSA", "olora": "OLoRA", "eva": "EVA",
                "corda_ipa": "CorDA IPA", "corda_kpa": "CorDA KPA", "salora": "SaLoRA", "sc_lora": "SC-LoRA",
                "mica": "MiCA", "safe_lora": "Safe LoRA (on LoRA)", "guardspace": "GuardSpace"}


NOT_METRICS = {"seed", "beta", "learning_rate", "beta_auto_budget"}


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
    locked: bool = False  # SC-LoRA with lock_subspace (B frozen at Q)
    auto_budget: float | None = None  # SC-LoRA whose beta choose_beta picked for this preservation budget

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
        key = ("base", None, None, None, False, None) if _is_base(row) else (
            row.get("method"), tuple(beta) if isinstance(beta, list) else beta, row.get("learning_rate"),
            row.get("normalize"), bool(row.get("lock_subspace")),  # own normalize / locked: a variant, not a seed
            _auto_budget(row))
        buckets.setdefault(key, []).append(row)
    return sorted((_merge(key, members) for key, members in buckets.items()), key=_paper_position)


def _auto_budget(row: dict):
    """The budget a row's beta was chosen for (a list with several knowledge sets), None for a hand-picked beta."""
    budget = row.get("beta_auto_budget")
    return tuple(budget) if isinstance(budget, list) else budget


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
    return Group(method=key[0], beta=key[1], lr=key[2], normalize=key[3], locked=key[4], auto_budget=key[5],
                 runs=[str(m.get("run")) for m in members],
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
    """' (normalize none)' for a run that overrode the experiment's normalize, ' (locked)' for lock_subspace,
    ' (auto, budget 10%)' for a beta chosen by choose_beta."""
    budget = group.auto_budget
    auto = "" if budget is None else " (auto, budget " + ", ".join(
        f"{100 * b:g}%" for b in (budget if isinstance(budget, tuple) else (budget,))) + ")"
    return (f" (normalize {group.normalize})" if group.normalize else "") + (" (locked)" if group.locked else "") + auto


def _with_se(group: Group, m: Metric) -> str:
    value = group.value(m.key)
    if value is None:
        return "-"
    se = group.se(m.key)
    return m.fmt(value) + (f" ± {m.fmt(se)}" if se is not None else "")
