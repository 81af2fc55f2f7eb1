"""Continual-learning metrics over per-item scores: the accuracy matrix a(i, j) (task j's score after training stage
i), final average accuracy, backward and forward transfer (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018), and
the always-kept sets (knowledge, safety: never trained, measured after every stage) against the untrained model.

    rows = continual_rows(scores, base, tasks=["math", "code"], kept=["knowledge", "safety"],
                          higher_is_better={"safety": False})
    diffs = continual_differences(scores, base, tasks=["math", "code"], kept=["knowledge", "safety"],
                                  higher_is_better={"safety": False}, pairs=[("sc_lora", "lora_replay")])
    text = continual_table(rows, diffs)
    figures = write_continual_figures(rows, "runs/continual/figures")

Inputs: ``scores[method][seed][stage][set]`` is a list of per-item scores, ``stage`` 0..T-1 meaning "after
training stage i" (a list of T stages, or a mapping with the keys 0..T-1), ``set`` each of the T ``tasks`` (in
stage order: stage i trains ``tasks[i]``) and each ``kept`` set; ``base[seed][set]`` the untrained model's scores,
for every seed a method has. A set's items are aligned by position across methods, seeds, stages and the base.
Non-finite scores (an unparsed judge verdict) are left out of the means they fall in.

Definitions (T tasks; a(i, j) the mean over items and seeds of task j's scores after stage i; b(j) the base's):
ACC = mean_j a(T-1, j); BWT = mean_{j < T-1} a(T-1, j) - a(j, j); FWT = mean_{j >= 1} a(j-1, j) - b(j). BWT and
FWT are signed so that positive is better: for lower-is-better tasks (``higher_is_better[task] = False``) the
differences are negated, and a negative BWT always means forgetting. The trained tasks must share one direction
(ACC averages them).

Uncertainty: a two-level paired bootstrap. Each draw resamples every set's item indices with replacement (one draw
per set, shared by all stages, seeds, methods and the base, as they score the same items) and the seeds with
replacement (the second level: seed-to-seed variation of training), and recomputes every mean from the resampled
scores. Intervals are the central ``level`` of the draws, ± the draws' standard deviation; differences between two
methods use the same draws on both sides (their common seeds), so identical methods differ by exactly 0.
Deterministic under ``seed``: a set's item draws depend only on ``seed``, the set's position and its item count,
the seed draws only on ``seed`` and the number of seeds, so a method's interval does not depend on which other
methods are reported with it.

Everything but :func:`write_continual_figures` is pure (scores in, rows / Markdown out).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..evaluate.metrics import Metric
from .figures import _axis_label, _orient, _save

__all__ = ["continual_differences", "continual_rows", "continual_table", "load_continual", "transfer_metrics",
           "write_continual_report",
           "write_continual_figures"]

LEVEL = 0.95
N_BOOT = 2000
_CHUNK = 250  # bootstrap draws computed at once (memory: draws x items per set)
NO_DIFFERENCE = "no difference resolved"


# --- the definitions -----------------------------------------------------------------------------------------------


def _transfer(stage, base, n_tasks: int, sign: float) -> dict:
    """ACC / BWT / FWT from ``stage[..., i, k]`` (set k's mean after stage i; the first ``n_tasks`` sets are the
    trained tasks) and ``base[..., k]``; leading axes are bootstrap draws. BWT and FWT are None for one task."""
    a = stage[..., :n_tasks]
    last = n_tasks - 1
    out = {"acc": a[..., last, :].mean(axis=-1), "bwt": None, "fwt": None}
    if n_tasks > 1:
        out["bwt"] = sign * sum(a[..., last, j] - a[..., j, j] for j in range(last)) / last
        out["fwt"] = sign * sum(a[..., j - 1, j] - base[..., j] for j in range(1, n_tasks)) / last
    return out


def transfer_metrics(matrix: Sequence[Sequence[float]], base: Sequence[float],
                     higher_is_better: bool = True) -> dict[str, float | None]:
    """ACC, BWT and FWT of one accuracy matrix: ``matrix[i][j]`` task j's score after stage i (T x T), ``base[j]``
    the untrained model's score on task j. Returns ``{"acc", "bwt", "fwt"}``; BWT and FWT are None for T = 1 and
    negated for lower-is-better scores (so that negative BWT means forgetting either way)."""
    import numpy as np

    a = np.asarray(matrix, dtype=np.float64)
    b = np.asarray(base, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"The accuracy matrix must be T x T with T >= 1 (stages x tasks), got shape {a.shape}.")
    if b.shape != (a.shape[0],):
        raise ValueError(f"base needs one score per task ({a.shape[0]}), got shape {b.shape}.")
    out = _transfer(a, b, a.shape[0], 1.0 if higher_is_better else -1.0)
    return {k: None if v is None else float(v) for k, v in out.items()}


# --- input ---------------------------------------------------------------------------------------------------------


@dataclass
class _Data:
    tasks: tuple[str, ...]
    kept: tuple[str, ...]
    higher: dict[str, bool]
    methods: dict[str, tuple[list, list]]  # method -> (seeds, per set an array seeds x stages x items)
    base: dict  # seed -> per set an array of items
    sizes: list[int]

    @property
    def sets(self) -> tuple[str, ...]:
        return self.tasks + self.kept

    @property
    def sign(self) -> float:
        return 1.0 if self.higher[self.tasks[0]] else -1.0


def _names(names, what: str) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"{what} must be a list of names, got {names!r}.")
    out = tuple(names)
    if not all(isinstance(n, str) and n for n in out):
        raise ValueError(f"{what} must be non-empty strings, got {list(out)!r}.")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} name a set twice: {list(out)!r}.")
    return out


def _scores(values, where: str):
    import numpy as np

    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: the scores must be a list of numbers ({err}).") from err
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{where}: expected a non-empty list of per-item scores, got shape {x.shape}.")
    return x


def _stages(value, n: int, where: str) -> list:
    if isinstance(value, Mapping):
        if set(value) != set(range(n)):
            raise ValueError(f"{where}: stages {sorted(value, key=str)!r}, expected 0..{n - 1} (one per task).")
        return [value[i] for i in range(n)]
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"{where}: {len(value)} stages, expected {n} (one per task, in stage order).")
        return list(value)
    raise ValueError(f"{where}: expected a list of stages (one mapping of set -> scores each), got {value!r}.")


def _check(scores, base, tasks, kept, higher_is_better) -> _Data:
    """The scores as arrays, or a ValueError naming the method / seed / stage / set that does not fit."""
    import numpy as np

    tasks, kept = _names(tasks, "tasks"), _names(kept, "kept")
    if not tasks:
        raise ValueError("tasks must name at least one trained task.")
    if set(tasks) & set(kept):
        raise ValueError(f"{sorted(set(tasks) & set(kept))} are both trained tasks and kept sets.")
    sets = tasks + kept
    higher = dict.fromkeys(sets, True)
    if higher_is_better is not None:
        unknown = set(higher_is_better) - set(sets)
        if unknown:
            raise ValueError(f"higher_is_better names {sorted(unknown)}, which are neither tasks nor kept sets "
                             f"({list(sets)}).")
        higher.update({k: bool(v) for k, v in higher_is_better.items()})
    if len({higher[t] for t in tasks}) > 1:
        raise ValueError(f"The trained tasks mix higher- and lower-is-better scores "
                         f"({ {t: higher[t] for t in tasks} }): ACC would average opposite directions.")
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must map each method to its seeds' scores: {method: {seed: [stage ...]}}.")
    if not isinstance(base, Mapping) or not base:
        raise ValueError("base must map each seed to the untrained model's scores: {seed: {set: [...]}}.")
    sizes: list[int | None] = [None] * len(sets)
    first: list[str] = [""] * len(sets)

    def fits(k: int, x, where: str):
        if sizes[k] is None:
            sizes[k], first[k] = x.size, where
        elif x.size != sizes[k]:
            raise ValueError(f"{where}: {x.size} items, but {first[k]} has {sizes[k]}: a set's items must be "
                             "the same, aligned by position, across methods, seeds, stages and the base.")
        return x

    def kind(k: int) -> str:
        return "task" if k < len(tasks) else "kept set"

    methods = {}
    for method, by_seed in scores.items():
        if not isinstance(by_seed, Mapping) or not by_seed:
            raise ValueError(f"method {method!r}: expected a non-empty mapping seed -> stages.")
        seeds, cells = list(by_seed), [[] for _ in sets]
        for seed in seeds:
            stages = _stages(by_seed[seed], len(tasks), f"method {method!r}, seed {seed!r}")
            for i, stage in enumerate(stages):
                where = f"method {method!r}, seed {seed!r}, stage {i}"
                if not isinstance(stage, Mapping):
                    raise ValueError(f"{where}: expected a mapping set -> scores, got {type(stage).__name__}.")
                for k, name in enumerate(sets):
                    if name not in stage:
                        raise ValueError(f"{where}: {kind(k)} {name!r} missing (it has {sorted(stage, key=str)}).")
                    cells[k].append(fits(k, _scores(stage[name], f"{where}, {kind(k)} {name!r}"),
                                         f"{where}, {kind(k)} {name!r}"))
        arrays = [np.stack(c).reshape(len(seeds), len(tasks), -1) for c in cells]
        for k, x in enumerate(arrays):
            for i in range(len(tasks)):
                if not np.isfinite(x[:, i]).any():
                    raise ValueError(f"method {method!r}, stage {i}, {kind(k)} {sets[k]!r}: no finite score in "
                                     "any seed.")
        methods[method] = (seeds, arrays)
    needed = list(dict.fromkeys(s for seeds, _ in methods.values() for s in seeds))
    base_arrays = {}
    for seed in needed:
        if seed not in base:
            owner = next(m for m, (seeds, _) in methods.items() if seed in seeds)
            raise ValueError(f"base: no scores for seed {seed!r} (method {owner!r} has it; base has "
                             f"{sorted(base, key=str)}).")
        entry = base[seed]
        if not isinstance(entry, Mapping):
            raise ValueError(f"base, seed {seed!r}: expected a mapping set -> scores.")
        row = []
        for k, name in enumerate(sets):
            if name not in entry:
                raise ValueError(f"base, seed {seed!r}: {kind(k)} {name!r} missing (it has {sorted(entry, key=str)}).")
            where = f"base, seed {seed!r}, {kind(k)} {name!r}"
            row.append(fits(k, _scores(entry[name], where), where))
        base_arrays[seed] = row
    return _Data(tasks, kept, higher, methods, base_arrays, [int(s) for s in sizes])


# --- the bootstrap -------------------------------------------------------------------------------------------------


def _means(x, seed_w, item_w):
    """Weighted means of ``x`` (seeds x stages x items; NaN left out) under per-draw seed weights (draws x seeds)
    and item weights (draws x items): draws x stages."""
    import numpy as np

    n_seeds, n_stages, n_items = x.shape
    finite = np.isfinite(x)
    values = np.where(finite, x, 0.0).reshape(-1, n_items)
    num = (item_w @ values.T).reshape(-1, n_seeds, n_stages)
    den = (item_w @ finite.reshape(-1, n_items).T.astype(np.float64)).reshape(-1, n_seeds, n_stages)
    num, den = np.einsum("bs,bst->bt", seed_w, num), np.einsum("bs,bst->bt", seed_w, den)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _estimates(data: _Data, method: str, seeds: list, n_boot: int, seed: int):
    """(point, draws) for ``method`` restricted to ``seeds``: point = (stage means: stages x sets, base means:
    sets), draws = the same with a leading axis of ``n_boot`` bootstrap draws."""
    import numpy as np

    own, arrays = data.methods[method]
    index = [own.index(s) for s in seeds]
    xs = [x[index] for x in arrays]
    bs = [np.stack([data.base[s][k] for s in seeds])[:, None, :] for k in range(len(data.sets))]
    n_seeds = len(seeds)

    def evaluate(seed_w, item_ws):
        stage = np.stack([_means(x, seed_w, w) for x, w in zip(xs, item_ws)], axis=-1)
        base = np.stack([_means(b, seed_w, w)[:, 0] for b, w in zip(bs, item_ws)], axis=-1)
        return stage, base

    ones = np.ones((1, n_seeds))
    stage, base = evaluate(ones, [np.ones((1, n)) for n in data.sizes])
    item_rngs = [np.random.default_rng([seed, 0, k, n]) for k, n in enumerate(data.sizes)]
    seed_rng = np.random.default_rng([seed, 1, n_seeds])
    parts = []
    for start in range(0, n_boot, _CHUNK):
        count = min(_CHUNK, n_boot - start)
        item_ws = [r.multinomial(n, np.full(n, 1.0 / n), size=count).astype(np.float64)
                   for r, n in zip(item_rngs, data.sizes)]
        seed_w = seed_rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=count).astype(np.float64)
        parts.append(evaluate(seed_w, item_ws))
    draws = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return (stage[0], base[0]), draws


def _measures(data: _Data, stage, base) -> dict:
    """ACC / BWT / FWT and each kept set's score after the last stage."""
    out = _transfer(stage, base, len(data.tasks), data.sign)
    for k, name in enumerate(data.kept, len(data.tasks)):
        out[f"kept:{name}"] = stage[..., -1, k]
    return out


def _interval(point: float, draws, level: float) -> dict:
    import numpy as np

    tail = (1 - level) / 2
    finite = draws[np.isfinite(draws)]
    if finite.size == 0:
        return {"value": float(point), "low": math.nan, "high": math.nan, "se": math.nan}
    low, high = (float(q) for q in np.quantile(finite, [tail, 1 - tail]))
    se = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return {"value": float(point), "low": low, "high": high, "se": se}


def _settings(n_boot: int, level: float, seed: int) -> None:
    if not isinstance(n_boot, int) or n_boot < 2:
        raise ValueError(f"n_boot must be an integer >= 2, got {n_boot!r}.")
    if not 0 < level < 1:
        raise ValueError(f"level must lie between 0 and 1, got {level!r}.")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")


# --- rows ----------------------------------------------------------------------------------------------------------


def continual_rows(scores: Mapping, base: Mapping, tasks: Sequence[str], kept: Sequence[str] = (),
                   higher_is_better: Mapping[str, bool] | None = None, *, n_boot: int = N_BOOT,
                   level: float = LEVEL, seed: int = 0) -> list[dict]:
    """One row per method (in ``scores``' order) with its accuracy matrix and transfer measures; see the module
    docstring for the input. Each row (JSON-serialisable) holds:

    * ``method``, ``seeds``, ``tasks``, ``kept``, ``items`` (set -> item count), ``higher_is_better`` (set ->
      bool), ``level``, ``n_boot``;
    * ``matrix`` / ``matrix_se``: a(i, j) and its bootstrap standard error, T x T lists (row i = after stage i);
    * ``base`` / ``base_se``: set -> the untrained model's mean (over the method's seeds) and its standard error;
    * ``acc``, ``bwt``, ``fwt``: ``{"value", "low", "high", "se"}`` (BWT / FWT None for a single task);
    * ``kept_sets``: kept set -> one entry per stage ``{"stage", "value", "se", "change", "low", "high", "change_se"}``
      (``change`` = value - base, with its interval).
    """
    _settings(n_boot, level, seed)
    data = _check(scores, base, tasks, kept, higher_is_better)
    rows = []
    n = len(data.tasks)
    for method, (seeds, _) in data.methods.items():
        (stage, base_point), (stage_d, base_d) = _estimates(data, method, seeds, n_boot, seed)
        point, draws = _measures(data, stage, base_point), _measures(data, stage_d, base_d)
        stage_se, base_se = stage_d.std(axis=0, ddof=1), base_d.std(axis=0, ddof=1)
        row = {"method": method, "seeds": seeds, "tasks": list(data.tasks), "kept": list(data.kept),
               "items": dict(zip(data.sets, data.sizes)), "higher_is_better": dict(data.higher), "level": level,
               "n_boot": n_boot, "matrix": stage[:, :n].tolist(), "matrix_se": stage_se[:, :n].tolist(),
               "base": dict(zip(data.sets, base_point.tolist())), "base_se": dict(zip(data.sets, base_se.tolist()))}
        for key in ("acc", "bwt", "fwt"):
            row[key] = None if point[key] is None else _interval(point[key], draws[key], level)
        row["kept_sets"] = {}
        for k, name in enumerate(data.kept, n):
            entries = []
            for i in range(n):
                change = _interval(stage[i, k] - base_point[k], stage_d[:, i, k] - base_d[:, k], level)
                entries.append({"stage": i, "value": float(stage[i, k]), "se": float(stage_se[i, k]),
                                "change": change["value"], "low": change["low"], "high": change["high"],
                                "change_se": change["se"]})
            row["kept_sets"][name] = entries
        rows.append(row)
    return rows


def continual_differences(scores: Mapping, base: Mapping, tasks: Sequence[str], kept: Sequence[str] = (),
                          higher_is_better: Mapping[str, bool] | None = None,
                          pairs: Sequence[tuple[str, str]] | None = None, *, n_boot: int = N_BOOT,
                          level: float = LEVEL, seed: int = 0) -> list[dict]:
    """Paired differences A - B for each (A, B) in ``pairs`` (default: every method against each later one in
    ``scores``' order) on ACC, BWT, FWT and each kept set after the last stage, over the seeds both have (matched
    by seed; a ValueError when they share none) with the same bootstrap draws on both sides. Each entry:
    ``{"a", "b", "measure", "diff", "low", "high", "se", "seeds", "level", "verdict", "better"}``; ``measure`` is
    "ACC", "BWT", "FWT" or "<kept set> (after stage T)"; ``verdict`` is "<A> higher, CI excludes 0",
    "<B> higher, CI excludes 0" or "no difference resolved"; ``better`` the method the resolved difference favours
    (a lower score is better on lower-is-better kept sets; BWT / FWT are signed so higher is better), else None."""
    _settings(n_boot, level, seed)
    data = _check(scores, base, tasks, kept, higher_is_better)
    names = list(data.methods)
    if pairs is None:
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    out = []
    for a, b in pairs:
        for m in (a, b):
            if m not in data.methods:
                raise ValueError(f"pairs name method {m!r}, which has no scores (methods: {names}).")
        common = [s for s in data.methods[a][0] if s in data.methods[b][0]]
        if not common:
            raise ValueError(f"methods {a!r} and {b!r} share no seed ({data.methods[a][0]} vs "
                             f"{data.methods[b][0]}): a paired difference needs runs matched by seed.")
        (sa, ba), (sad, bad) = _estimates(data, a, common, n_boot, seed)
        (sb, bb), (sbd, bbd) = _estimates(data, b, common, n_boot, seed)
        pa, pb = _measures(data, sa, ba), _measures(data, sb, bb)
        da, db = _measures(data, sad, bad), _measures(data, sbd, bbd)
        for key, label, higher in _measure_names(data):
            if pa[key] is None:
                continue
            e = _interval(pa[key] - pb[key], da[key] - db[key], level)
            resolved = e["low"] > 0 or e["high"] < 0
            winner = (a if e["low"] > 0 else b) if resolved else None
            better = None if winner is None else winner if higher else (b if winner == a else a)
            out.append({"a": a, "b": b, "measure": label, "diff": e["value"], "low": e["low"], "high": e["high"],
                        "se": e["se"], "seeds": common, "level": level,
                        "verdict": f"{winner} higher, CI excludes 0" if resolved else NO_DIFFERENCE,
                        "better": better})
    return out


def _measure_names(data: _Data) -> list[tuple[str, str, bool]]:
    """(key in :func:`_measures`, label, higher is better) of every measure a difference is reported on."""
    last = len(data.tasks)
    return ([("acc", "ACC", data.higher[data.tasks[0]]), ("bwt", "BWT", True), ("fwt", "FWT", True)]
            + [(f"kept:{k}", f"{k} (after stage {last})", data.higher[k]) for k in data.kept])


# --- Markdown ------------------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:{'+' if signed else ''}.{digits}f}"


def _ci(e: dict | None, digits: int, signed: bool = False) -> str:
    if e is None:
        return "–"
    return (f"{_num(e['value'], digits, signed)} [{_num(e['low'], digits, signed)}, "
            f"{_num(e['high'], digits, signed)}]")


def _arrow(higher: bool) -> str:
    return "↑" if higher else "↓"


def continual_table(rows: list[dict], differences: list[dict] | None = None, digits: int = 3) -> str:
    """Markdown: one line per method (rows of :func:`continual_rows`) with ACC, BWT, FWT and their intervals and
    each kept set after the last stage (mean ± standard error, change against the base with its interval); then,
    when given, the paired differences of :func:`continual_differences`."""
    if not rows:
        return "## Continual learning\n\nNo methods to report."
    first = rows[0]
    tasks, kept, higher = first["tasks"], first["kept"], first["higher_is_better"]
    pct = f"{100 * first['level']:g}%"
    head = (f"## Continual learning\n\n{len(tasks)} tasks trained in order ({', '.join(tasks)})"
            + (f"; kept sets never trained: {', '.join(kept)}" if kept else "") + ". "
            "ACC = mean score on all tasks after the last stage; BWT = mean change of each earlier task between "
            "the stage that trained it and the last stage (negative = forgetting); FWT = mean score of each task "
            "just before its stage minus the untrained model's (BWT / FWT signed so that positive is better). "
            f"Brackets: {pct} two-level paired bootstrap (items, then seeds; {first['n_boot']} draws); "
            "± = bootstrap standard error; Δ = change against the untrained model.")
    header = [f"| method | seeds | ACC {_arrow(higher[tasks[0]])} | BWT ↑ | FWT ↑ |"]
    header += [f" {k} {_arrow(higher[k])} after stage {len(tasks)} (Δ) |" for k in kept]
    lines = ["".join(header), "|---" * (5 + len(kept)) + "|"]
    for r in rows:
        cells = [r["method"], str(len(r["seeds"])), _ci(r["acc"], digits), _ci(r["bwt"], digits, True),
                 _ci(r["fwt"], digits, True)]
        for k in kept:
            e = r["kept_sets"][k][-1]
            cells.append(f"{_num(e['value'], digits)} ± {_num(e['se'], digits)} (Δ "
                         f"{_ci({'value': e['change'], 'low': e['low'], 'high': e['high']}, digits, True)})")
        lines.append("| " + " | ".join(cells) + " |")
    parts = [head, "\n".join(lines)]
    if differences:
        diff = ["| A − B | measure | seeds | A − B [CI] | verdict |", "|---|---|---|---|---|"]
        for d in differences:
            better = f" ({d['better']} better)" if d.get("better") else ""
            diff.append(f"| {d['a']} − {d['b']} | {d['measure']} | {len(d['seeds'])} | "
                        f"{_ci({'value': d['diff'], 'low': d['low'], 'high': d['high']}, digits, True)} | "
                        f"{d['verdict']}{better} |")
        parts += [(f"Paired differences on the same items (matched seeds, the same bootstrap draws on both sides; "
                   f"{pct} intervals): a verdict only where the interval excludes 0."), "\n".join(diff)]
    return "\n\n".join(parts)


# --- figures -------------------------------------------------------------------------------------------------------


def write_continual_figures(rows: list[dict], out_dir: str | Path) -> list[tuple[str, str]]:
    """Draw ``continual_matrix.png`` (a(i, j) per method, shared colour scale, values written in the cells) and
    ``continual_stages.png`` (each task's and kept set's score across stages, one line per method, ±1 SE bars)
    into ``out_dir``, each written atomically; returns (file name, caption) pairs."""
    if not rows:
        raise ValueError("No rows to draw: continual_rows returned nothing.")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"continual_matrix.png": ("Accuracy matrix a(i, j): task j after training stage i", _plot_matrix),
               "continual_stages.png": ("Each task and kept set across the training stages (bars ±1 SE)",
                                        _plot_stages)}
    written = []
    for name, (caption, draw) in figures.items():
        _save(draw(rows), folder / name)
        written.append((name, caption))
    return written


def _plot_matrix(rows: list[dict]):
    import numpy as np
    from matplotlib.figure import Figure

    tasks = rows[0]["tasks"]
    higher = rows[0]["higher_is_better"][tasks[0]]
    n, m = len(tasks), len(rows)
    matrices = [np.asarray(r["matrix"], dtype=np.float64) for r in rows]
    low, high = min(float(a.min()) for a in matrices), max(float(a.max()) for a in matrices)
    if low == high:
        low, high = low - 0.5, high + 0.5
    side = 0.75 * n + 1.3
    fig = Figure(figsize=(side * m + 1.2, side + 0.4), layout="constrained")
    axes = fig.subplots(1, m, squeeze=False)[0]
    cmap = "viridis" if higher else "viridis_r"
    size = max(5, min(9, 40 / n))
    image = None
    for ax, r, a in zip(axes, rows, matrices):
        image = ax.imshow(a, vmin=low, vmax=high, cmap=cmap)
        for i in range(n):
            for j in range(n):
                red, green, blue, _ = image.cmap(image.norm(a[i, j]))
                shade = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
                ax.text(j, i, f"{a[i, j]:.3g}", ha="center", va="center", fontsize=size, color=shade)
        ax.set_xticks(range(n), tasks, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center", fontsize=8)
        ax.set_yticks(range(n), [f"{i + 1}: {t}" for i, t in enumerate(tasks)], fontsize=8)
        ax.set_xlabel("evaluated on task j", fontsize=8)
        ax.set_ylabel("after training stage i", fontsize=8)
        ax.set_title(r["method"], fontsize=9)
    fig.colorbar(image, ax=list(axes), label=f"score ({'higher' if higher else 'lower'} is better)", shrink=0.85)
    return fig


def _plot_stages(rows: list[dict]):
    from matplotlib.figure import Figure

    tasks, kept, higher = rows[0]["tasks"], rows[0]["kept"], rows[0]["higher_is_better"]
    panels = [*tasks, *kept]
    n = len(tasks)
    cols = min(3, len(panels))
    grid = -(-len(panels) // cols)
    fig = Figure(figsize=(3.4 * cols + 1.8, 2.8 * grid + 0.4), layout="constrained")
    axes = fig.subplots(grid, cols, squeeze=False).ravel()
    xs = list(range(n + 1))
    ticks = ["base"] + [f"{i + 1}: {t}" for i, t in enumerate(tasks)]
    spread = 0.25 / max(1, len(rows) - 1) if len(rows) > 1 else 0.0
    handles = []
    for p, name in enumerate(panels):
        ax = axes[p]
        for r_index, r in enumerate(rows):
            if p < n:
                ys = [r["base"][name]] + [r["matrix"][i][p] for i in range(n)]
                es = [r["base_se"][name]] + [r["matrix_se"][i][p] for i in range(n)]
            else:
                ys = [r["base"][name]] + [e["value"] for e in r["kept_sets"][name]]
                es = [r["base_se"][name]] + [e["se"] for e in r["kept_sets"][name]]
            offset = (r_index - (len(rows) - 1) / 2) * spread  # side by side, so error bars do not hide each other
            line = ax.errorbar([x + offset for x in xs], ys, yerr=es, marker="o", markersize=4, capsize=2,
                               color=f"C{r_index % 10}", label=r["method"])
            if p == 0:
                handles.append(line)
        if p < n:
            ax.axvline(p + 1, color="0.6", linestyle="--", linewidth=0.8)
        m = Metric(name, name, higher[name])
        ax.set_title(f"{name} ({'trained at stage ' + str(p + 1) if p < n else 'kept, never trained'})", fontsize=9)
        ax.set_ylabel(_axis_label(m, "↑"), fontsize=7)
        _orient(ax, m, "y")
        ax.set_xticks(xs, ticks, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="method", title_fontsize=8)
    return fig


def load_continual(directory: str | Path, stages: int | None = None) -> dict:
    """The per-item scores of a continual experiment folder (``sclora run`` on a config with ``stages:``), in the
    form :func:`continual_rows` reads: ``scores``, ``base``, ``tasks``, ``kept``, ``higher_is_better``; each task and
    kept set is scored by its config ``metric``. Chains that finished every stage, or with ``stages=K`` the first
    K tasks of the chains that finished at least K stages (a run stopped partway)."""
    import json

    import yaml

    from ..evaluate.metrics import METRICS

    out = Path(directory)
    config = yaml.safe_load((out / "config.yaml").read_text())
    results = json.loads((out / "continual.json").read_text())
    metric = {s["name"]: s["metric"] for s in config["stages"]}
    metric.update({name: part["metric"] for name, part in config.get("keep", {}).items()})
    tasks, kept = [s["name"] for s in config["stages"]], list(config.get("keep", {}))
    if stages is not None:
        if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= len(tasks):
            raise ValueError(f"stages must be a whole number from 1 to {len(tasks)} (the config's stages), "
                             f"got {stages!r}.")
        tasks = tasks[:stages]
        metric = {name: metric[name] for name in [*tasks, *kept]}

    def items(path: Path) -> dict:
        scored = json.loads(path.read_text())["items"]
        return {name: scored[key] for name, key in metric.items()}

    base = {seed: items(out / "samples" / "base" / f"seed{seed}.json") for seed in results["base"]}
    n = len(tasks)
    scores = {run: {seed: [items(out / "samples" / run / f"seed{seed}" / f"{i}.json") for i in range(n)]
                    for seed, rows in by_seed.items() if len(rows) >= n}
              for run, by_seed in results["runs"].items()}
    scores = {run: by_seed for run, by_seed in scores.items() if by_seed}
    return {"scores": scores, "base": base, "tasks": tasks, "kept": kept,
            "higher_is_better": {name: METRICS[key].higher_is_better for name, key in metric.items()},
            "metric": metric, "results": results, "config": config}


def write_continual_report(directory: str | Path, stages: int | None = None) -> Path:
    """``report.md`` (per method ACC / BWT / FWT and the kept sets with CIs, the pairwise differences, each stage's
    selected learning rate, statistics and training time) and the figures of a continual experiment folder;
    ``stages=K``: over the first K stages, for the chains that finished them."""
    from ...fileio import atomic_write

    out = Path(directory)
    data = load_continual(out, stages)
    if not data["scores"]:
        done = [len(rows) for by_seed in data["results"]["runs"].values() for rows in by_seed.values()]
        hint = (f"; the furthest chain finished {max(done)} of {len(data['config']['stages'])}: "
                f"`sclora report {out} --stages {max(done)}` reports those") if done and max(done) else ""
        what = f"its first {stages} stages" if stages else "all its stages"
        raise ValueError(f"{out}: no run has finished {what} yet; rerun `sclora run` to finish them{hint}.")
    args = (data["scores"], data["base"], data["tasks"], data["kept"], data["higher_is_better"])
    rows, differences = continual_rows(*args), continual_differences(*args)
    figures = write_continual_figures(rows, out / "figures")
    total = len(data["config"]["stages"])
    partial = ([f"Over the first {len(data['tasks'])} of the config's {total} stages, for the chains that finished "
                f"them (`sclora report --stages {len(data['tasks'])}`): a stopped run's partial result.", ""]
               if len(data["tasks"]) < total else [])
    lines = [f"# {data['config'].get('report', {}).get('title') or data['config']['name']}", "", *partial,
             "Tasks in stage order, scored by: " + ", ".join(f"{t} ({data['metric'][t]})" for t in data["tasks"])
             + (("; kept sets: " + ", ".join(f"{k} ({data['metric'][k]})" for k in data["kept"])) if data["kept"]
                else "") + ". ACC: mean final score; BWT: mean change of each earlier task from right after it was "
             "learned to the end (negative: forgetting); FWT: score on a task before training on it minus the base "
             "model's. 95% CIs: paired bootstrap over items and seeds.", "",
             continual_table(rows, differences), "", "## Stages", "",
             "Statistics s: collecting the stage's D+ and D- statistics on the model the stage starts from, once per "
             "stage (its learning-rate candidates share them); training s: the selected candidate's training.", "",
             "| run | seed | stage | learning rate (validation-selected) | kept sets (D-) | replayed | statistics s | "
             "training s |", "|---|---|---|---|---|---|---|---|"]
    from ...registry import method_spec

    keeps = {r["name"]: "minus" in method_spec(r["method"]).needs for r in data["config"]["runs"]}
    for run, by_seed in data["results"]["runs"].items():
        for seed, stages in by_seed.items():
            for s in stages:  # a method without D- (LoRA) keeps none of the sets its chain records
                kept = ", ".join(s["kept_sets"]) if keeps.get(run, True) else ""
                lines.append(f"| {run} | {seed} | {s['stage']} | {s['learning_rate']:g} | {kept or '-'} | "
                             f"{s['replayed_examples']} | "
                             f"{s['statistics_seconds']} | {s['train_seconds']} |")
    lines += ["", *[f"![{caption}](figures/{name})" for name, caption in figures], ""]
    path = out / "report.md"
    atomic_write(path, "\n".join(lines))
    return path
