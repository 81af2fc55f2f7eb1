"""Continual-learning metrics over per-item scores: ACC / BWT / FWT against hand-computed matrices, the two-level
paired bootstrap (coverage, width, exact zeros, determinism, the seed level), kept sets against the base, refusals
of ragged input, the Markdown table and the figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sclora.experiments.report.continual import (continual_differences, continual_rows, continual_table,
                                                 transfer_metrics, write_continual_figures)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = ["a", "b", "c"]

# a(i, j): task j after stage i, and the untrained model; every number a multiple of 1/8 (exact in float64)
MATRIX = [[0.750, 0.125, 0.250],
          [0.500, 0.875, 0.375],
          [0.625, 0.625, 1.000]]
BASE = [0.125, 0.250, 0.125]
ACC = (0.625 + 0.625 + 1.000) / 3
BWT = ((0.625 - 0.750) + (0.625 - 0.875)) / 2  # -0.1875: both earlier tasks dropped
FWT = ((0.125 - 0.250) + (0.375 - 0.125)) / 2  # +0.0625


def items_with_mean(mean: float, n: int = 4, spread: float = 0.125) -> list[float]:
    """``n`` (even) per-item scores whose mean is exactly ``mean``."""
    return [mean + spread * (1 if i % 2 else -1) for i in range(n)]


def scores_from(matrix, kept: dict[str, list[float]] | None = None, n: int = 4) -> list[dict]:
    """Stages of per-item scores whose means are ``matrix`` (and ``kept[name][i]`` after stage i)."""
    kept = kept or {}
    return [{**{t: items_with_mean(matrix[i][j], n) for j, t in enumerate(TASKS)},
             **{k: items_with_mean(v[i], n) for k, v in kept.items()}} for i in range(len(matrix))]


def base_from(values, kept: dict[str, float] | None = None, n: int = 4) -> dict:
    return {**{t: items_with_mean(v, n) for t, v in zip(TASKS, values)},
            **{k: items_with_mean(v, n) for k, v in (kept or {}).items()}}


# --- the definitions -----------------------------------------------------------------------------------------------


def test_transfer_metrics_on_a_hand_computed_matrix():
    got = transfer_metrics(MATRIX, BASE)
    assert got["acc"] == pytest.approx(ACC, rel=1e-15, abs=0)
    assert got["bwt"] == pytest.approx(-0.1875, rel=1e-15, abs=0) and got["bwt"] == pytest.approx(BWT, abs=1e-15)
    assert got["fwt"] == pytest.approx(0.0625, rel=1e-15, abs=0) and got["fwt"] == pytest.approx(FWT, abs=1e-15)
    # a lower-is-better score: the same differences negated, so negative BWT still means "got worse"
    flipped = transfer_metrics(MATRIX, BASE, higher_is_better=False)
    assert flipped == {"acc": pytest.approx(ACC), "bwt": pytest.approx(0.1875), "fwt": pytest.approx(-0.0625)}


def test_one_task_has_no_transfer_and_bad_shapes_are_refused():
    assert transfer_metrics([[0.5]], [0.25]) == {"acc": 0.5, "bwt": None, "fwt": None}
    with pytest.raises(ValueError, match="T x T"):
        transfer_metrics([[1.0, 2.0]], [0.0])
    with pytest.raises(ValueError, match="one score per task"):
        transfer_metrics(MATRIX, [0.0, 0.0])


def test_rows_recover_the_matrix_and_measures_from_per_item_scores_averaged_over_seeds():
    shifted = [[v + 0.25 for v in row] for row in MATRIX]  # seed 1 scores 0.25 higher everywhere
    scores = {"m": {0: scores_from(MATRIX), 1: scores_from(shifted)}}
    base = {0: base_from(BASE), 1: base_from([v + 0.25 for v in BASE])}
    (row,) = continual_rows(scores, base, TASKS, n_boot=200)
    expected = [[v + 0.125 for v in r] for r in MATRIX]
    assert row["method"] == "m" and row["seeds"] == [0, 1] and row["items"] == {"a": 4, "b": 4, "c": 4}
    assert np.array_equal(np.asarray(row["matrix"]), np.asarray(expected))
    assert row["base"] == {t: v + 0.125 for t, v in zip(TASKS, BASE)}
    assert row["acc"]["value"] == pytest.approx(ACC + 0.125, abs=1e-15)
    assert row["bwt"]["value"] == pytest.approx(BWT, abs=1e-15)  # a constant seed shift cancels in differences
    assert row["fwt"]["value"] == pytest.approx(FWT, abs=1e-15)
    for key in ("acc", "bwt", "fwt"):
        e = row[key]
        assert e["low"] <= e["value"] <= e["high"]
    assert row["acc"]["se"] > 0
    # every stage has the same item-to-item pattern, so it cancels in BWT: no item-level uncertainty left
    assert row["bwt"]["se"] == pytest.approx(0.0, abs=1e-12)


def test_bwt_is_zero_when_nothing_is_forgotten_and_negative_when_scores_drop():
    rng = np.random.default_rng(3)
    learned = {t: rng.random(30).tolist() for t in TASKS}
    before = {t: (rng.random(30) * 0.5).tolist() for t in TASKS}
    # task j keeps exactly the scores it had after its own stage: no item changes afterwards
    kept_all = [{t: (learned[t] if j <= i else before[t]) for j, t in enumerate(TASKS)} for i in range(3)]
    base = {0: dict(before)}
    (row,) = continual_rows({"m": {0: kept_all}}, base, TASKS, n_boot=300)
    for key in ("value", "low", "high", "se"):  # 0 up to the rounding of sums taken in different orders
        assert row["bwt"][key] == pytest.approx(0.0, abs=1e-12)
    # FWT: a(j-1, j) is the untouched "before" scores, the base's too
    assert row["fwt"]["value"] == pytest.approx(0.0, abs=1e-12)
    dropped = [dict(stage) for stage in kept_all]
    dropped[2]["a"] = [x - 0.3 for x in learned["a"]]  # the last stage loses 0.3 on every item of task a
    (row,) = continual_rows({"m": {0: dropped}}, base, TASKS, n_boot=300)
    assert row["bwt"]["value"] == pytest.approx(-0.15, abs=1e-12)  # (-0.3 + 0) / 2
    assert row["bwt"]["high"] < 0


def test_lower_is_better_tasks_report_a_rise_as_forgetting():
    # NLL rises on earlier tasks (forgetting) and falls on later ones before their stage (positive transfer)
    nll = [[1.0, 2.5, 3.0], [1.5, 1.0, 2.0], [2.0, 1.25, 1.0]]
    scores = {"m": {0: scores_from(nll)}}
    (row,) = continual_rows(scores, {0: base_from([3.0, 3.0, 3.0])}, TASKS,
                            higher_is_better=dict.fromkeys(TASKS, False), n_boot=100)
    assert row["bwt"]["value"] == pytest.approx(-((2.0 - 1.0) + (1.25 - 1.0)) / 2, abs=1e-15)
    assert row["bwt"]["value"] == pytest.approx(-0.625, abs=1e-15)
    assert row["fwt"]["value"] == pytest.approx(-((2.5 - 3.0) + (2.0 - 3.0)) / 2, abs=1e-15)
    assert row["fwt"]["value"] == pytest.approx(0.75, abs=1e-15)
    with pytest.raises(ValueError, match="mix higher- and lower-is-better"):
        continual_rows(scores, {0: base_from([3.0, 3.0, 3.0])}, TASKS, higher_is_better={"a": False})


# --- kept sets -----------------------------------------------------------------------------------------------------


def test_kept_sets_after_every_stage_and_their_change_against_the_base():
    kept = {"knowledge": [0.5, 0.375, 0.25], "safety": [2.0, 2.5, 3.0]}
    scores = {"m": {0: scores_from(MATRIX, kept)}}
    base = {0: base_from(BASE, {"knowledge": 0.625, "safety": 1.5})}
    (row,) = continual_rows(scores, base, TASKS, ["knowledge", "safety"], {"safety": False}, n_boot=200)
    know, safe = row["kept_sets"]["knowledge"], row["kept_sets"]["safety"]
    assert [e["stage"] for e in know] == [0, 1, 2]
    assert [e["value"] for e in know] == [0.5, 0.375, 0.25]
    assert [e["change"] for e in know] == [-0.125, -0.25, -0.375]
    assert [e["change"] for e in safe] == [0.5, 1.0, 1.5]
    assert know[-1]["low"] <= -0.375 <= know[-1]["high"]
    assert row["higher_is_better"]["safety"] is False and row["higher_is_better"]["knowledge"] is True
    # the kept sets leave the trained-task measures alone
    assert row["acc"]["value"] == pytest.approx(ACC, abs=1e-15)


# --- the bootstrap -------------------------------------------------------------------------------------------------


def synthetic(n: int, gap: float, seed: int, seeds=(0,)) -> tuple[dict, dict]:
    """Two methods on the same ``n`` items per task: items differ in difficulty, "good" forgets nothing, "bad"
    loses ``gap`` on every earlier task in expectation. The true differences: BWT ``gap`` (each of the two earlier
    tasks loses ``gap``), ACC ``2 * gap / 3`` (two of the three tasks lose ``gap`` after the last stage)."""
    rng = np.random.default_rng(seed)
    difficulty = {t: rng.normal(0.0, 1.0, n) for t in TASKS}
    scores = {"good": {}, "bad": {}}
    for s in seeds:
        for name, loss in (("good", 0.0), ("bad", gap)):
            stages = []
            for i in range(3):
                stage = {}
                for j, t in enumerate(TASKS):
                    level = 1.0 if j <= i else 0.0
                    drop = loss if j < i else 0.0
                    stage[t] = (difficulty[t] + level - drop + rng.normal(0.0, 0.5, n)).tolist()
                stages.append(stage)
            scores[name][s] = stages
    base = {s: {t: (difficulty[t] + rng.normal(0.0, 0.5, n)).tolist() for t in TASKS} for s in seeds}
    return scores, base


def test_the_paired_interval_contains_the_true_difference_and_shrinks_with_more_items():
    widths = {}
    for n in (100, 1600):
        scores, base = synthetic(n, gap=0.4, seed=n)
        diffs = {d["measure"]: d for d in continual_differences(scores, base, TASKS, n_boot=1000)}
        bwt, acc = diffs["BWT"], diffs["ACC"]
        assert bwt["a"] == "good" and bwt["b"] == "bad" and bwt["seeds"] == [0]
        assert bwt["low"] < 0.4 < bwt["high"]  # the true BWT difference: every earlier task loses 0.4 under "bad"
        assert acc["low"] < 0.4 * 2 / 3 < acc["high"]
        assert bwt["verdict"] == "good higher, CI excludes 0" and bwt["better"] == "good"
        widths[n] = bwt["high"] - bwt["low"]
    # 16x the items: about a quarter of the width (sqrt(n) scaling)
    assert 0.15 < widths[1600] / widths[100] < 0.4


def test_the_interval_covers_the_true_difference_in_most_replications():
    covered = 0
    for rep in range(40):
        scores, base = synthetic(60, gap=0.2, seed=1000 + rep)
        bwt = next(d for d in continual_differences(scores, base, TASKS, n_boot=400) if d["measure"] == "BWT")
        covered += bwt["low"] <= 0.2 <= bwt["high"]
    assert covered >= 34  # nominal 95%: 38 of 40 expected; a broken interval (too narrow, off-centre) falls short


def test_identical_methods_differ_by_exactly_zero():
    scores, base = synthetic(50, gap=0.3, seed=7, seeds=(0, 1, 2))
    scores = {"x": scores["bad"], "y": {s: [dict(stage) for stage in v] for s, v in scores["bad"].items()}}
    diffs = continual_differences(scores, base, TASKS, n_boot=300)
    assert [d["measure"] for d in diffs] == ["ACC", "BWT", "FWT"]
    for d in diffs:
        assert (d["diff"], d["low"], d["high"], d["se"]) == (0.0, 0.0, 0.0, 0.0)
        assert d["verdict"] == "no difference resolved" and d["better"] is None


def test_the_bootstrap_is_deterministic_under_its_seed_and_independent_of_the_other_methods():
    scores, base = synthetic(80, gap=0.3, seed=11, seeds=(0, 1))
    one = continual_rows(scores, base, TASKS, n_boot=300, seed=5)
    assert continual_rows(scores, base, TASKS, n_boot=300, seed=5) == one
    other = continual_rows(scores, base, TASKS, n_boot=300, seed=6)
    assert other[0]["acc"]["value"] == one[0]["acc"]["value"] and other[0]["acc"]["low"] != one[0]["acc"]["low"]
    alone = continual_rows({"bad": scores["bad"]}, base, TASKS, n_boot=300, seed=5)
    assert alone[0] == one[1]


def test_seeds_are_a_second_level_of_the_bootstrap():
    scores, base = synthetic(200, gap=0.3, seed=13, seeds=(0, 1, 2))
    agreeing = continual_rows({"m": scores["good"]}, base, TASKS, n_boot=1000)[0]["acc"]
    # the same items, but whole seeds shifted apart (one training run much better than another)
    spread = {s: [{t: [x + 0.5 * (k - 1) for x in v] for t, v in stage.items()} for stage in stages]
              for k, (s, stages) in enumerate(scores["good"].items())}
    disagreeing = continual_rows({"m": spread}, base, TASKS, n_boot=1000)[0]["acc"]
    assert disagreeing["value"] == pytest.approx(agreeing["value"], abs=1e-12)
    assert disagreeing["high"] - disagreeing["low"] > 2 * (agreeing["high"] - agreeing["low"])


def test_differences_pair_matching_seeds_and_name_the_better_method_on_lower_is_better_sets():
    harm_low, harm_high = [1.0, 1.0, 1.0], [3.0, 3.0, 3.0]
    a = {0: scores_from(MATRIX, {"harm": harm_low}, n=20), 1: scores_from(MATRIX, {"harm": harm_low}, n=20)}
    b = {1: scores_from(MATRIX, {"harm": harm_high}, n=20), 2: scores_from(MATRIX, {"harm": harm_high}, n=20)}
    base = {s: base_from(BASE, {"harm": 2.0}, n=20) for s in (0, 1, 2)}
    diffs = continual_differences({"a": a, "b": b}, base, TASKS, ["harm"], {"harm": False}, pairs=[("a", "b")],
                                  n_boot=200)
    harm = next(d for d in diffs if d["measure"] == "harm (after stage 3)")
    assert harm["seeds"] == [1] and harm["diff"] == -2.0
    assert harm["verdict"] == "b higher, CI excludes 0" and harm["better"] == "a"
    with pytest.raises(ValueError, match="share no seed"):
        continual_differences({"a": {0: a[0]}, "b": {2: b[2]}}, base, TASKS, ["harm"], n_boot=50)
    with pytest.raises(ValueError, match="method 'c'"):
        continual_differences({"a": a, "b": b}, base, TASKS, ["harm"], pairs=[("a", "c")], n_boot=50)


def test_non_finite_items_are_left_out_of_their_means():
    stages = scores_from(MATRIX)
    stages[2] = {**stages[2], "a": stages[2]["a"] + [math.nan]}
    padded = [{t: v + [0.625] if t == "a" and i < 2 else v for t, v in s.items()} for i, s in enumerate(stages)]
    base = {0: {**base_from(BASE), "a": base_from(BASE)["a"] + [0.125]}}
    (row,) = continual_rows({"m": {0: padded}}, base, TASKS, n_boot=100)
    assert row["matrix"][2][0] == 0.625 and row["items"]["a"] == 5


# --- refusals ------------------------------------------------------------------------------------------------------


def good_input():
    return {"lora": {0: scores_from(MATRIX, {"knowledge": [0.5, 0.5, 0.5]})}}, \
        {0: base_from(BASE, {"knowledge": 0.5})}


@pytest.mark.parametrize("break_it, message", [
    (lambda s, b: s["lora"][0][1].update(b=[0.5, 0.5]),
     r"method 'lora', seed 0, stage 1, task 'b': 2 items, but method 'lora', seed 0, stage 0, task 'b' has 4"),
    (lambda s, b: s["lora"][0][2].pop("c"), r"method 'lora', seed 0, stage 2: task 'c' missing"),
    (lambda s, b: s["lora"][0][0].pop("knowledge"), r"method 'lora', seed 0, stage 0: kept set 'knowledge' missing"),
    (lambda s, b: s["lora"][0].pop(), r"method 'lora', seed 0: 2 stages, expected 3"),
    (lambda s, b: s["lora"].update({1: [dict(x) for x in s["lora"][0]]}), r"base: no scores for seed 1 \(method 'lora'"),
    (lambda s, b: b[0].pop("a"), r"base, seed 0: task 'a' missing"),
    (lambda s, b: b[0].update(knowledge=[1.0]), r"base, seed 0, kept set 'knowledge': 1 items"),
    (lambda s, b: s["lora"][0][1].update(a=[]), r"method 'lora', seed 0, stage 1, task 'a': expected a non-empty"),
    (lambda s, b: s["lora"][0][1].update(a=["x"] * 4), r"method 'lora', seed 0, stage 1, task 'a': the scores must"),
    (lambda s, b: s["lora"][0][1].update(a=[math.nan] * 4), r"method 'lora', stage 1, task 'a': no finite score"),
])
def test_ragged_or_missing_input_is_refused_naming_where(break_it, message):
    scores, base = good_input()
    continual_rows(scores, base, TASKS, ["knowledge"], n_boot=20)  # the unbroken input is accepted
    break_it(scores, base)
    for function in (continual_rows, continual_differences):
        with pytest.raises(ValueError, match=message):
            function(scores, base, TASKS, ["knowledge"], n_boot=20)


def test_other_bad_arguments_are_refused():
    scores, base = good_input()
    with pytest.raises(ValueError, match="both trained tasks and kept sets"):
        continual_rows(scores, base, TASKS, ["a"])
    with pytest.raises(ValueError, match="neither tasks nor kept sets"):
        continual_rows(scores, base, TASKS, ["knowledge"], {"typo": False})
    with pytest.raises(ValueError, match="name a set twice"):
        continual_rows(scores, base, ["a", "a", "b"])
    with pytest.raises(ValueError, match="n_boot"):
        continual_rows(scores, base, TASKS, ["knowledge"], n_boot=1)
    with pytest.raises(ValueError, match="stages"):
        continual_rows({"lora": {0: {0: {}, 1: {}}}}, base, TASKS)


# --- output --------------------------------------------------------------------------------------------------------


def report_rows():
    scores, base = synthetic(40, gap=0.3, seed=21, seeds=(0, 1))
    rng = np.random.default_rng(0)
    for method in scores.values():
        for stages in method.values():
            for stage in stages:
                stage["knowledge"] = rng.random(40).tolist()
                stage["safety"] = (rng.random(40) * 4 + 1).tolist()
    for s in base:
        base[s]["knowledge"], base[s]["safety"] = rng.random(40).tolist(), (rng.random(40) * 4 + 1).tolist()
    args = (scores, base, TASKS, ["knowledge", "safety"], {"safety": False})
    return continual_rows(*args, n_boot=200), continual_differences(*args, n_boot=200)


def test_the_table_lists_every_method_with_intervals_and_the_differences():
    rows, diffs = report_rows()
    text = continual_table(rows, diffs)
    lines = text.splitlines()
    assert "| method | seeds | ACC ↑ | BWT ↑ | FWT ↑ | knowledge ↑ after stage 3 (Δ) | safety ↓ after stage 3 (Δ) |" in lines
    good = next(line for line in lines if line.startswith("| good |"))
    acc = rows[0]["acc"]
    assert f"{acc['value']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}]" in good
    k = rows[0]["kept_sets"]["knowledge"][-1]
    assert f"{k['value']:.3f} ± {k['se']:.3f} (Δ {k['change']:+.3f} [{k['low']:+.3f}, {k['high']:+.3f}])" in good
    assert any(line.startswith("| good − bad | BWT | 2 |") and "good higher, CI excludes 0" in line for line in lines)
    one_task = continual_rows({"m": {0: [{"a": [1.0, 2.0]}]}}, {0: {"a": [0.0, 1.0]}}, ["a"], n_boot=20)
    assert "| m | 1 | 1.500 [1.000, 2.000] | – | – |" in continual_table(one_task)


def test_the_figures_are_written_as_valid_pngs(tmp_path):
    from matplotlib.image import imread

    rows, _ = report_rows()
    written = write_continual_figures(rows, tmp_path / "figures")
    assert [name for name, _ in written] == ["continual_matrix.png", "continual_stages.png"]
    for name, caption in written:
        path = tmp_path / "figures" / name
        assert path.read_bytes()[:8] == PNG_MAGIC and caption
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["continual_matrix.png",
                                                                       "continual_stages.png"]
    with pytest.raises(ValueError, match="No rows"):
        write_continual_figures([], tmp_path / "none")
