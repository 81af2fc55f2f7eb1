"""Paired differences between methods on the same items: the bootstrap interval against exact cases and the
normal approximation, verdict directions, and the report section regenerating without the per-item scores."""

from __future__ import annotations

import json
import math
import random

import pytest
import yaml

from sclora.experiments.evaluate.scores import paired_difference
from sclora.experiments.report import paired_comparisons, write_report


def test_a_constant_difference_has_a_zero_width_interval():
    d = paired_difference([3.0, 5.0, 7.5], [1.0, 3.0, 5.5])
    assert (d["diff"], d["low"], d["high"], d["n"]) == (2.0, 2.0, 2.0, 3)


def test_the_interval_matches_the_normal_approximation_for_many_items():
    rng = random.Random(1)
    a = [100.0 * (rng.random() < 0.6) for _ in range(2000)]
    b = [100.0 * (rng.random() < 0.5) for _ in range(2000)]
    d = paired_difference(a, b, n_boot=4000)
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1))
    half = 1.96 * sd / math.sqrt(len(diffs))
    assert d["diff"] == pytest.approx(mean)
    assert d["low"] == pytest.approx(mean - half, abs=0.1 * half) and d["high"] == pytest.approx(mean + half, abs=0.1 * half)
    assert paired_difference(a, b, n_boot=4000) == d  # deterministic under its seed


def test_unpaired_or_empty_scores_are_refused_and_nan_items_dropped():
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="nothing to compare"):
        paired_difference([math.nan], [1.0])
    assert paired_difference([1.0, math.nan, 3.0], [0.0, 5.0, 1.0])["n"] == 2


def rows_and_samples(sc_better: bool):
    rng = random.Random(0)
    n = 300
    base = [100.0 * (rng.random() < 0.6) for _ in range(n)]
    lora = [x if rng.random() < 0.7 else 0.0 for x in base]  # LoRA forgets ~30% of what the base knew
    sc = [x if rng.random() < (0.95 if sc_better else 0.7) else 0.0 for x in base]
    nll = {"lora": [1.0 + rng.random() for _ in range(50)]}
    nll["sc"] = [x - 0.2 for x in nll["lora"]]  # SC-LoRA's NLL lower (better) on every item
    nll["base"] = [x + 0.5 for x in nll["lora"]]
    rows = [{"run": "base", "method": "-", "knowledge_mc": sum(base) / n, "math_nll": 1.9},
            {"run": "lora", "method": "lora", "beta": None, "learning_rate": 1e-3, "knowledge_mc": sum(lora) / n,
             "math_nll": 1.5},
            {"run": "sc_lora-beta0.8", "method": "sc_lora", "beta": 0.8, "learning_rate": 1e-3,
             "knowledge_mc": sum(sc) / n, "math_nll": 1.3}]
    samples = {"base": {"knowledge_mc": base, "math_nll": nll["base"]}, "lora": {"knowledge_mc": lora,
               "math_nll": nll["lora"]}, "sc_lora-beta0.8": {"knowledge_mc": sc, "math_nll": nll["sc"]}}
    config = {"report": {"preservation": ["knowledge_mc"], "utility": ["math_nll"]}}
    return rows, config, samples


@pytest.mark.parametrize("sc_better", [True, False])
def test_verdicts_follow_the_interval_and_the_metric_direction(sc_better):
    rows, config, samples = rows_and_samples(sc_better)
    entries = {(e["comparison"], e["a"], e["metric"]): e for e in paired_comparisons(rows, config, samples)}
    keep = entries[("SC-LoRA vs LoRA", "SC-LoRA β=0.8", "knowledge_mc")]
    assert keep["verdict"] == ("A better" if sc_better else "undecided")
    assert keep["low"] <= keep["diff"] <= keep["high"]
    nll = entries[("SC-LoRA vs LoRA", "SC-LoRA β=0.8", "math_nll")]
    assert nll["diff"] == pytest.approx(-0.2) and nll["verdict"] == "A better"  # lower NLL is better
    forgetting = entries[("forgetting (calibration)", "LoRA", "knowledge_mc")]
    assert forgetting["verdict"] == "B better" and forgetting["high"] < 0  # the base knows more: forgetting shows


def test_the_report_keeps_its_paired_section_without_the_samples(tmp_path):
    rows, config, samples = rows_and_samples(True)
    (tmp_path / "results.json").write_text(json.dumps(rows))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "samples").mkdir()
    for run, items in samples.items():
        (tmp_path / "samples" / f"{run}.json").write_text(json.dumps(items))
    report = write_report(tmp_path).read_text()
    assert "## Paired differences" in report and "A better" in report
    for path in (tmp_path / "samples").iterdir():
        path.unlink()
    assert write_report(tmp_path).read_text() == report  # regenerated from paired.json


def test_runs_without_kept_scores_are_left_out_and_unequal_items_refused():
    rows, config, samples = rows_and_samples(True)
    rows.append({"run": "sc_lora-beta0.8-seed1", "method": "sc_lora", "beta": 0.8, "learning_rate": 1e-3, "seed": 1,
                 "knowledge_mc": 50.0, "math_nll": 1.3})  # an older row: no samples
    entries = paired_comparisons(rows, config, samples)
    sc_vs_lora = [e for e in entries if e["comparison"] == "SC-LoRA vs LoRA" and e["metric"] == "knowledge_mc"]
    assert [tuple(p) for p in sc_vs_lora[0]["pairs"]] == [("sc_lora-beta0.8", "lora")] and sc_vs_lora[0]["n"] == 300
    samples["lora"]["knowledge_mc"] = samples["lora"]["knowledge_mc"][:10]
    with pytest.raises(ValueError, match="not the same items"):
        paired_comparisons(rows, config, samples)


def test_a_locked_run_is_its_own_row_and_is_paired_with_the_plain_one():
    from sclora.experiments.report import group_runs

    rows, config, samples = rows_and_samples(True)
    rows.append({"run": "sc_lora-beta0.8-locked", "method": "sc_lora", "beta": 0.8, "learning_rate": 1e-3,
                 "lock_subspace": True, "knowledge_mc": 60.0, "math_nll": 1.4})
    samples["sc_lora-beta0.8-locked"] = {"knowledge_mc": samples["base"]["knowledge_mc"],
                                         "math_nll": [x + 0.1 for x in samples["sc_lora-beta0.8"]["math_nll"]]}
    groups = {g.runs[0]: g for g in group_runs(rows)}
    assert groups["sc_lora-beta0.8-locked"].locked and not groups["sc_lora-beta0.8"].locked  # not merged as seeds
    entries = [e for e in paired_comparisons(rows, config, samples) if e["comparison"] == "locked vs plain SC-LoRA"]
    nll = next(e for e in entries if e["metric"] == "math_nll")
    assert nll["a"] == "SC-LoRA β=0.8 (locked)" and nll["diff"] == pytest.approx(0.1) and nll["verdict"] == "B better"


def test_an_auto_beta_is_paired_with_the_hand_picked_betas_and_stays_out_of_the_trend():
    rows, config, samples = rows_and_samples(True)
    rows.append({"run": "sc_lora-betaauto", "method": "sc_lora", "beta": 0.3, "beta_auto_budget": 0.1,
                 "learning_rate": 1e-3, "knowledge_mc": 45.0, "math_nll": 1.3})
    samples["sc_lora-betaauto"] = {"knowledge_mc": samples["lora"]["knowledge_mc"],
                                   "math_nll": [x - 0.05 for x in samples["sc_lora-beta0.8"]["math_nll"]]}
    entries = paired_comparisons(rows, config, samples)
    auto = [e for e in entries if e["comparison"] == "auto vs hand-picked β"]
    assert {(e["a"], e["b"]) for e in auto} == {("SC-LoRA β=0.3 (auto, budget 10%)", "SC-LoRA β=0.8")}
    nll = next(e for e in auto if e["metric"] == "math_nll")
    assert nll["diff"] == pytest.approx(-0.05) and nll["verdict"] == "A better"
    # the only hand-picked beta is 0.8: an auto beta below it is no end of the sweep
    assert not [e for e in entries if e["comparison"].startswith("β trend")]


def test_salora_rows_are_paired_with_every_sc_lora_beta():
    rows, config, samples = rows_and_samples(True)
    rows.append({"run": "salora", "method": "salora", "beta": None, "learning_rate": 1e-3, "knowledge_mc": 40.0,
                 "math_nll": 1.6})
    samples["salora"] = {"knowledge_mc": samples["lora"]["knowledge_mc"],
                         "math_nll": [x + 0.3 for x in samples["sc_lora-beta0.8"]["math_nll"]]}
    entries = [e for e in paired_comparisons(rows, config, samples) if e["comparison"] == "SC-LoRA vs SaLoRA"]
    assert {(e["a"], e["b"], e["metric"]) for e in entries} == {("SC-LoRA β=0.8", "SaLoRA", "knowledge_mc"),
                                                                ("SC-LoRA β=0.8", "SaLoRA", "math_nll")}
    nll = next(e for e in entries if e["metric"] == "math_nll")
    assert nll["diff"] == pytest.approx(-0.3) and nll["verdict"] == "A better"


def test_seeds_of_the_same_items_are_averaged_per_item_not_counted_as_more_items():
    # a second seed that repeats the first item by item adds no evidence: the interval must not shrink (pooling the
    # pairs as if they were 2n independent items would narrow it by about 1/sqrt(2))
    rows, config, samples = rows_and_samples(False)
    one = next(e for e in paired_comparisons(rows, config, samples)
               if e["comparison"] == "SC-LoRA vs LoRA" and e["metric"] == "knowledge_mc")
    rows += [{**r, "run": r["run"] + "-seed1", "seed": 1} for r in rows if r["run"] != "base"]
    for run in ("lora", "sc_lora-beta0.8"):
        samples[run + "-seed1"] = dict(samples[run])
    two = next(e for e in paired_comparisons(rows, config, samples)
               if e["comparison"] == "SC-LoRA vs LoRA" and e["metric"] == "knowledge_mc")
    assert len(two["pairs"]) == 2 and two["n"] == one["n"] == 300
    assert (two["diff"], two["low"], two["high"]) == pytest.approx((one["diff"], one["low"], one["high"]))
    # a seed that differs moves the item means: NaN in one seed leaves the item its other seed
    samples["sc_lora-beta0.8-seed1"]["knowledge_mc"] = [math.nan] + [100.0] * 299
    three = next(e for e in paired_comparisons(rows, config, samples)
                 if e["comparison"] == "SC-LoRA vs LoRA" and e["metric"] == "knowledge_mc")
    lora, sc = samples["lora"]["knowledge_mc"], samples["sc_lora-beta0.8"]["knowledge_mc"]
    expected = (sc[0] - lora[0] + sum((x + 100.0) / 2 - y for x, y in zip(sc[1:], lora[1:]))) / 300
    assert three["n"] == 300 and three["diff"] == pytest.approx(expected)


def test_the_block_bootstrap_widens_the_interval_of_a_correlated_series_and_checks_its_block():
    rng = random.Random(3)
    walk, level = [], 0.0
    for _ in range(60):  # neighbouring differences strongly correlated, as successive training losses are
        level = 0.95 * level + rng.gauss(0, 1)
        walk.append(level)
    zeros = [0.0] * 60
    iid, blocked = paired_difference(walk, zeros), paired_difference(walk, zeros, block=5)
    assert iid == paired_difference(walk, zeros, block=1) and blocked["diff"] == pytest.approx(iid["diff"])
    assert blocked["high"] - blocked["low"] > 1.3 * (iid["high"] - iid["low"])
    assert paired_difference([2.0] * 7, [1.0] * 7, block=5)["low"] == 1.0  # constant: zero width, any block
    with pytest.raises(ValueError, match="block"):
        paired_difference([1.0], [0.0], block=0)


def test_the_beta_trend_and_the_training_loss_are_paired_too():
    rows, config, samples = rows_and_samples(True)
    rows.append({"run": "sc_lora-beta0.2", "method": "sc_lora", "beta": 0.2, "learning_rate": 1e-3,
                 "knowledge_mc": 50.0, "math_nll": 1.2})
    samples["sc_lora-beta0.2"] = {"knowledge_mc": samples["lora"]["knowledge_mc"], "math_nll": samples["sc_lora-beta0.8"]["math_nll"]}
    loss = [(step, 2.0 - 0.02 * step + 0.05 * math.sin(step)) for step in range(1, 31)]
    for row in rows:
        if row["run"] == "lora":
            row["loss_history"] = [[st, v] for st, v in loss] + [[31, 0.1]]  # a step the other side never logged
        elif row["run"] == "sc_lora-beta0.8":
            row["loss_history"] = [[st, v - 0.1] for st, v in loss]
    entries = paired_comparisons(rows, config, samples)
    trend = {e["metric"]: e for e in entries if e["comparison"].startswith("β trend")}
    assert trend["knowledge_mc"]["a"] == "SC-LoRA β=0.8" and trend["knowledge_mc"]["b"] == "SC-LoRA β=0.2"
    assert trend["knowledge_mc"]["verdict"] == "A better" and trend["math_nll"]["diff"] == pytest.approx(0.0)
    loss_entry = next(e for e in entries if e["metric"] == "train_loss")
    assert loss_entry["a"] == "SC-LoRA β=0.8" and loss_entry["n"] == 30  # only the steps both logged
    assert loss_entry["diff"] == pytest.approx(-0.1) and loss_entry["verdict"] == "A better"


def _entry(comparison, a, b, key, low, high):
    return {"comparison": comparison, "a": a, "b": b, "metric": key, "diff": (low + high) / 2, "low": low,
            "high": high, "n": 100, "pairs": [[a, b]],
            "verdict": "undecided" if low <= 0 <= high else "A better" if (low > 0) == (key != "math_nll") else "B better"}


def test_claims_are_decided_from_the_paired_intervals():
    from sclora.experiments.report.claims import decided

    vs = "SC-LoRA vs LoRA"
    # beta 0.8 keeps more knowledge than both LoRA rows with NLL no worse: the claim holds
    entries = [_entry(vs, "β0.8", lora, "knowledge_mc", 1.0, 5.0) for lora in ("lora1", "lora2")]
    entries += [_entry(vs, "β0.8", "lora1", "math_nll", -0.1, 0.1), _entry(vs, "β0.8", "lora2", "math_nll", -0.3, -0.1)]
    entries += [_entry(vs, "β0.2", lora, "knowledge_mc", -5.0, -1.0) for lora in ("lora1", "lora2")]
    verdicts = [a.verdict for a in decided(entries, "knowledge_mc", "math_nll")]
    assert verdicts == ["not measured", "holds", "not measured", "not measured"]
    # significantly worse utility against one LoRA row breaks beta 0.8's case; beta 0.2 fails too: does not hold
    entries[3] = _entry(vs, "β0.8", "lora2", "math_nll", 0.1, 0.3)
    assert decided(entries, "knowledge_mc", "math_nll")[1].verdict == "does not hold"
    # an interval containing 0 for beta 0.8 leaves it undecided
    entries[3] = _entry(vs, "β0.8", "lora2", "math_nll", -0.1, 0.1)
    entries[1] = _entry(vs, "β0.8", "lora2", "knowledge_mc", -1.0, 5.0)
    answer = decided(entries, "knowledge_mc", "math_nll")[1]
    assert answer.verdict == "undecided" and "β0.8 − lora2" in answer.evidence
    # the trend: preservation up, utility cost reported
    trend = [_entry("β trend (highest vs lowest β)", "β0.8", "β0.2", "knowledge_mc", 2.0, 6.0),
             _entry("β trend (highest vs lowest β)", "β0.8", "β0.2", "math_nll", 0.05, 0.1)]
    first = decided(trend, "knowledge_mc", "math_nll")[0]
    assert first.verdict == "holds" and "a cost" in first.evidence
