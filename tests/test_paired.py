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
