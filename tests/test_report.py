"""`sclora report` on synthetic experiment folders: layout, order, bolding, seeds, answers, figures, errors."""

import json
import math

import pytest
import yaml

from sclora import cli
from sclora.experiments.report import ReportError, answers, group_runs, infer_layout, report_tables, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(run, method, *, beta=None, lr=2e-5, seed=None, decay=0.1, steps=20, **metrics):
    """A results.json row; ``decay`` sets how fast its training loss falls (None: no loss history)."""
    out = {"run": run, "method": method, "beta": beta, "learning_rate": lr, "trainable_params": 4_900_000,
           "init_seconds": 1.0, "train_seconds": 10.0}
    if seed is not None:
        out["seed"] = seed
    if decay is not None:
        out["loss_history"] = [[s, 0.5 + 2.0 * math.exp(-decay * s)] for s in range(1, steps + 1)]
        out["final_loss"] = out["loss_history"][-1][1]
    return {**out, **metrics}


def base(**metrics):
    return {"run": "base", "method": "-", **metrics}


def safety_rows(good=True):
    """Table-2-shaped rows. good=True: numbers shaped like the paper's claims; False: every claim reversed."""
    if good:
        sc = [(0.5, 1.161, 52.54), (0.7, 1.148, 52.07), (0.9, 1.097, 51.67)]
        lora, kpa, sc_decay = (1.176, 50.32), (1.106, 50.89), 0.3
    else:
        sc = [(0.5, 1.10, 50.0), (0.7, 1.20, 50.5), (0.9, 1.30, 51.0)]
        lora, kpa, sc_decay = (1.05, 52.0), (1.10, 53.0), 0.05
    rows = [base(harmfulness_score=1.100, harmfulness_rate=1.212, rouge1=24.13),
            row("lora", "lora", decay=0.1, harmfulness_score=lora[0], harmfulness_rate=2.4, rouge1=lora[1]),
            row("corda_kpa", "corda_kpa", harmfulness_score=kpa[0], harmfulness_rate=0.6, rouge1=kpa[1])]
    rows += [row(f"sc_lora-beta{b}", "sc_lora", beta=b, decay=sc_decay, harmfulness_score=hs, harmfulness_rate=1.8,
                 rouge1=r1) for b, hs, r1 in sc]
    return rows


def table_lines(table):
    """Body rows of the first Markdown table, as lists of cells."""
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]], lines[0]


def verdicts(rows, config=None):
    return [a.verdict for a in answers(rows, config)]


def make_dir(tmp_path, rows, config=None, diagnostics=None):
    folder = tmp_path / "exp"
    folder.mkdir(exist_ok=True)
    (folder / "results.json").write_text(json.dumps(rows))
    (folder / "config.yaml").write_text(yaml.safe_dump(config or {"name": "synthetic", "model": "tiny"}))
    if diagnostics is not None:
        (folder / "diagnostics.json").write_text(json.dumps(diagnostics))
    return folder


# --- layout -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metrics,preservation,utility,header", [
    ({"harmfulness_score": 1.1, "harmfulness_rate": 2.0, "rouge1": 50.0},
     ("harmfulness_score", "harmfulness_rate"), ("rouge1",), "HS ↓ | HR (%) ↓ | ROUGE-1 ↑"),
    ({"harmfulness_score": 1.1, "harmfulness_rate": 2.0, "math_accuracy": 40.0},
     ("harmfulness_score", "harmfulness_rate"), ("math_accuracy",), "HS ↓ | HR (%) ↓ | Math accuracy (%) ↑"),
    ({"knowledge_em": 20.0, "knowledge_logprob": -3.0, "math_accuracy": 30.0, "math_nll": 0.9},
     ("knowledge_em", "knowledge_logprob"), ("math_accuracy", "math_nll"),
     "Knowledge EM (%) ↑ | Knowledge log-prob ↑ | Math accuracy (%) ↑ | Math NLL ↓"),
])
def test_layout_follows_the_paper_table_of_the_metrics_present(metrics, preservation, utility, header):
    rows = [base(**metrics), row("lora", "lora", **metrics)]
    layout = infer_layout(rows, {})
    assert (layout.preservation, layout.utility) == (preservation, utility)
    assert header + " | Final train loss ↓ |" in report_tables(rows, {})


def test_config_report_section_chooses_the_columns():
    metrics = {"knowledge_em": 20.0, "knowledge_logprob": -3.0, "math_accuracy": 30.0, "math_nll": 0.9}
    rows = [base(**metrics), row("lora", "lora", **metrics)]
    config = {"report": {"preservation": ["knowledge_logprob"], "utility": ["math_nll"]}}
    layout = infer_layout(rows, config)
    assert (layout.preservation, layout.utility) == (("knowledge_logprob",), ("math_nll",))
    _, header = table_lines(report_tables(rows, config))
    assert "Knowledge EM" not in header and "Knowledge log-prob ↑ | Math NLL ↓" in header


# --- table ----------------------------------------------------------------------------------------------


def test_rows_in_paper_order_with_sorted_betas_and_lrs():
    m = {"harmfulness_score": 1.2, "harmfulness_rate": 3.0, "rouge1": 50.0}
    rows = [base(**m), row("sc_lora-beta0.9", "sc_lora", beta=0.9, **m), row("lora-lr0.0001", "lora", lr=1e-4, **m),
            row("corda_kpa", "corda_kpa", **m), row("sc_lora-beta0.1", "sc_lora", beta=0.1, **m),
            row("full", "full", **m), row("pissa", "pissa", **m), row("corda_ipa", "corda_ipa", **m),
            row("lora-lr2e-05", "lora", lr=2e-5, **m), row("sc_lora-beta0.5", "sc_lora", beta=0.5, **m)]
    body, header = table_lines(report_tables(rows, {"model": "tiny"}))
    assert header.startswith("| Method | β | lr | #Params |")
    assert [r[0] for r in body] == ["tiny (base)", "Full fine-tuning", "LoRA", "", "PiSSA", "CorDA IPA", "CorDA KPA",
                                    "SC-LoRA", "", ""]
    assert [r[1] for r in body][-3:] == ["0.1", "0.5", "0.9"]
    assert [r[2] for r in body][2:4] == ["2e-5", "1e-4"]
    assert body[2][3] == "4.9M"


def test_lr_column_only_when_learning_rates_differ():
    m = {"rouge1": 50.0, "harmfulness_score": 1.2}
    _, header = table_lines(report_tables([base(**m), row("lora", "lora", **m), row("pissa", "pissa", **m)]))
    assert "| lr |" not in header


def test_bold_marks_the_best_fine_tuned_value_in_the_metric_direction():
    rows = [base(harmfulness_score=1.000, harmfulness_rate=0.5, rouge1=20.0),  # base is best on HS: never bold
            row("lora", "lora", harmfulness_score=1.300, harmfulness_rate=5.0, rouge1=52.0),
            row("sc", "sc_lora", beta=0.5, harmfulness_score=1.050, harmfulness_rate=1.0, rouge1=50.0)]
    body, _ = table_lines(report_tables(rows, {}))
    base_row, lora_row, sc_row = body
    assert "**1.050**" in sc_row and "1.300" in lora_row and "**1.300**" not in lora_row  # lower HS is better
    assert "**52.00**" in lora_row and "**50.00**" not in sc_row  # higher ROUGE-1 is better
    assert not any("**" in cell for cell in base_row)


def test_seeds_are_averaged_with_their_spread_as_standard_error():
    rows = [base(rouge1=20.0, harmfulness_score=1.1),
            row("sc-s0", "sc_lora", beta=0.5, seed=0, rouge1=40.0, harmfulness_score=1.2),
            row("sc-s1", "sc_lora", beta=0.5, seed=1, rouge1=44.0, harmfulness_score=1.2)]
    groups = group_runs(rows)
    assert len(groups) == 2 and groups[1].n == 2 and groups[1].value("rouge1") == pytest.approx(42.0)
    body, header = table_lines(report_tables(rows, {}))
    assert "| Seeds |" in header
    assert "2" in body[1] and "42.00 ± 2.00" in body[1]  # sd of (40, 44) / sqrt(2) = 2


def test_standard_errors_are_shown_and_pooled_over_seeds():
    rows = [base(rouge1=20.0, rouge1_se=0.5, harmfulness_score=1.1),
            row("sc-s0", "sc_lora", beta=0.5, seed=0, rouge1=42.0, rouge1_se=0.3, harmfulness_score=1.2),
            row("sc-s1", "sc_lora", beta=0.5, seed=1, rouge1=42.0, rouge1_se=0.4, harmfulness_score=1.2)]
    body, _ = table_lines(report_tables(rows, {}))
    assert "20.00 ± 0.50" in body[0]
    assert f"42.00 ± {math.sqrt((0.3**2 + 0.4**2) / 2):.2f}" in body[1]  # same items: item noise does not average out


def test_several_knowledge_sets_show_a_beta_list():
    m = {"knowledge_em": 20.0, "math_accuracy": 30.0}
    rows = [base(**m), row("sc-a", "sc_lora", beta=[0.4, 0.4], **m), row("sc-b", "sc_lora", beta=[0.1, 0.2], **m)]
    body, _ = table_lines(report_tables(rows, {}))
    assert [r[1] for r in body] == ["-", "0.1, 0.2", "0.4, 0.4"]


def test_paired_line_and_diagnostics_table():
    rows = [base(knowledge_em=20.0, math_accuracy=10.0),
            row("lora", "lora", knowledge_em=15.0, math_accuracy=30.0, knowledge_lost=12, knowledge_gained=3,
                knowledge_sign_p=0.035)]
    diagnostics = {"lora": [
        {"module": "model.layers.0.self_attn.q_proj", "layer": 0, "kind": "q_proj", "plus": 0.8, "minus": 0.1},
        {"module": "model.layers.1.self_attn.q_proj", "layer": 1, "kind": "q_proj", "plus": 0.6, "minus": 0.3},
        {"module": "model.layers.0.mlp.down_proj", "plus": 0.2, "minus": 0.5}]}  # layer / kind from the name
    text = report_tables(rows, {}, diagnostics)
    assert "LoRA −12 / +3 (p = 0.035)" in text
    diag_rows = [ln for ln in text.split("## Subspace diagnostics")[1].splitlines() if ln.startswith("| lora")]
    assert diag_rows == ["| lora | 0.53 / 0.30 | 0.70 / 0.20 | 0.20 / 0.50 |"]


# --- answers --------------------------------------------------------------------------------------------


def test_answers_say_yes_when_the_numbers_support_the_claims():
    result = answers(safety_rows(good=True), {})
    assert [a.verdict for a in result] == ["yes", "yes", "yes", "yes"]
    assert "1.161 at β=0.5 → 1.097 at β=0.9" in result[0].evidence  # cites the numbers it used
    assert "β=0.9 has HS 1.097, ROUGE-1 51.67 vs HS 1.176, ROUGE-1 50.32" in result[1].evidence


def test_answers_say_no_when_the_numbers_contradict_the_claims():
    result = answers(safety_rows(good=False), {})
    assert [a.verdict for a in result] == ["no", "no", "no", "no"]
    assert "worsens" in result[0].evidence


def test_equal_utility_means_within_one_combined_standard_error():
    def rows(with_se):
        se = {"rouge1_se": 0.5} if with_se else {}
        return [base(harmfulness_score=1.1, rouge1=20.0),
                row("lora", "lora", harmfulness_score=1.18, rouge1=50.3, **se),
                row("sc", "sc_lora", beta=0.9, harmfulness_score=1.10, rouge1=50.0, **se)]

    assert verdicts(rows(with_se=True))[1] == "yes"  # 0.3 below, combined SE 0.71
    assert verdicts(rows(with_se=False))[1] == "no"


def test_answers_report_partial_support_and_missing_rows():
    rows = safety_rows(good=True)
    rows.append(row("lora-strong", "lora", lr=1e-4, harmfulness_score=1.05, harmfulness_rate=1.0, rouge1=53.0))
    rows = [r for r in rows if r["method"] != "corda_kpa"]
    result = answers(rows, {})
    assert result[1].verdict == "partly" and "lr=1e-4" in result[1].evidence
    assert result[2].verdict == "not measured" and "CorDA KPA" in result[2].evidence
    only_one_beta = [r for r in rows if r.get("beta") in (None, 0.5)]
    assert answers(only_one_beta, {})[0].verdict == "not measured"


# --- files, figures, CLI ------------------------------------------------------------------------------------


def diagnostics_for(rows):
    kinds = ("q_proj", "v_proj", "down_proj")
    return {r["run"]: [{"module": f"model.layers.{layer}.x.{kind}", "layer": layer, "kind": kind,
                        "plus": 0.5 + 0.1 * layer, "minus_0": 0.1, "minus_1": 0.2}
                       for layer in range(3) for kind in kinds] for r in rows if r["method"] != "-"}


def test_report_writes_markdown_and_valid_figures(tmp_path):
    rows = safety_rows(good=True)
    for r in rows[1:]:
        r["checkpoints"] = [{"step": 10, "harmfulness_score": 1.1, "rouge1": 40.0},
                            {"step": 20, "harmfulness_score": 1.12, "rouge1": 45.0}]
    folder = make_dir(tmp_path, rows, {"name": "safety", "report": {"title": "Safety check"}}, diagnostics_for(rows))
    path = write_report(folder)
    text = path.read_text()
    assert path == folder / "report.md" and text.startswith("# Safety check\n")
    names = ["beta_vs_preservation.png", "beta_vs_utility.png", "loss_curves.png", "tradeoff.png",
             "subspace_energy.png"]
    for name in names:
        assert (folder / "figures" / name).read_bytes()[:8] == PNG_MAGIC
        assert f"(figures/{name})" in text
    assert "## Answers" in text and "## Subspace diagnostics" in text
    assert not list((folder / "figures").glob("*.tmp"))

    # Less data: the figures it no longer supports are skipped, unlinked and their stale files removed.
    reduced = [r for r in safety_rows(good=True) if r.get("beta") in (None, 0.5)]
    for r in reduced:
        r.pop("loss_history", None)
    (folder / "results.json").write_text(json.dumps(reduced))
    (folder / "diagnostics.json").unlink()
    text = write_report(folder).read_text()
    assert sorted(p.name for p in (folder / "figures").iterdir()) == ["tradeoff.png"]
    assert "(figures/tradeoff.png)" in text and "beta_vs_utility" not in text and "loss_curves" not in text


def test_missing_results_gives_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match=r"results\.json not found.*sclora run CONFIG --output") as err:
        write_report(tmp_path / "nothing")
    assert str(tmp_path / "nothing" / "results.json") in str(err.value)


def test_malformed_results_give_a_clear_error(tmp_path):
    (tmp_path / "results.json").write_text('[{"run": "base", ')
    with pytest.raises(ReportError, match="is not valid JSON"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text('{"run": "base"}')
    with pytest.raises(ReportError, match="non-empty list of run rows"):
        write_report(tmp_path)


def test_cli_report_subcommand(tmp_path, capsys):
    folder = make_dir(tmp_path, [r for r in safety_rows(good=True) if r.get("beta") != 0.7])
    assert cli.main(["report", str(folder)]) == 0
    out = capsys.readouterr().out
    assert (folder / "report.md").is_file() and f"wrote {folder / 'report.md'}" in out and "| Method |" in out
    assert cli.main(["report", str(folder), str(tmp_path / "missing")]) == 1
    assert "sclora run CONFIG --output" in capsys.readouterr().err


def test_paired_line_names_the_specific_knowledge_probe_once():
    paired = {"knowledge_lost": 3, "knowledge_gained": 1, "knowledge_sign_p": 0.6,
              "knowledge_mc_lost": 3, "knowledge_mc_gained": 1, "knowledge_mc_sign_p": 0.6}
    rows = [base(knowledge_mc=50.0, math_nll=1.5), row("lora", "lora", knowledge_mc=49.0, math_nll=1.2, **paired)]
    text = report_tables(rows)
    assert "Paired vs base (knowledge_mc)" in text and "Paired vs base (knowledge)" not in text


def test_a_run_with_its_own_normalize_is_named_and_kept_out_of_the_beta_trend():
    rows = safety_rows(good=True)
    # a variant at the top beta that would reverse the trend if it were taken for the default run
    rows.append(row("sc_lora-beta0.9-none", "sc_lora", beta=0.9, normalize="none", harmfulness_score=1.9,
                    harmfulness_rate=1.8, rouge1=40.0))
    result = answers(rows, {})
    assert result[0].verdict == "yes"
    assert "1.161 at β=0.5 → 1.097 at β=0.9" in result[0].evidence and "over 3 β values" in result[0].evidence
    assert "SC-LoRA β=0.9 (normalize none)" in result[3].evidence  # listed under its own name


def test_steps_to_reach_uses_a_trailing_mean_and_efficiency_divides_by_the_reference_steps():
    from sclora.experiments.evaluate.metrics import metric
    from sclora.experiments.report.claims import efficiency, steps_to_reach
    from sclora.experiments.report.groups import group_runs

    # a single lucky batch does not count: the trailing mean of 5 steps must get there
    spiky = [(1, 2.0), (2, 0.1), (3, 2.0), (4, 2.0), (5, 2.0), (6, 1.0), (7, 1.0), (8, 1.0), (9, 1.0), (10, 1.0)]
    assert steps_to_reach(spiky, 1.0) == 10 and steps_to_reach(spiky, 0.5) is None
    assert steps_to_reach([(1, 3.0), (2, 1.0)], 2.0, window=2) == 2
    lora = [(s, 2.0 - 0.05 * s) for s in range(1, 21)]  # final trailing mean: 2 - 0.05 * 18 = 1.1
    fast = [(s, 2.0 - 0.1 * s) for s in range(1, 21)]  # trailing mean (s - 2 centred) <= 1.1 from s = 11
    rows = [{"run": "lora", "method": "lora", "learning_rate": 1e-3, "loss_history": lora, "math_nll": 1.0},
            {"run": "sc_lora-beta0.5", "method": "sc_lora", "beta": 0.5, "learning_rate": 1e-3, "loss_history": fast,
             "math_nll": 0.9, "checkpoints": [{"step": 10, "math_nll": 0.99}]}]
    groups = {g.method: g for g in group_runs(rows)}
    e = efficiency(groups["sc_lora"], groups["lora"], metric("math_nll"))
    assert e["loss_step"] == 11 and e["loss_ratio"] == pytest.approx(11 / 20)
    assert e["utility_step"] == 10 and e["utility_ratio"] == pytest.approx(0.5)  # 0.99 <= LoRA's final 1.0 at step 10
    slow = efficiency(groups["lora"], groups["sc_lora"], metric("math_nll"))
    assert slow["loss_ratio"] is None and slow["utility_step"] is None  # LoRA never gets to SC-LoRA's final values
    assert slow["utility_steps_evaluated"] == []  # and no evaluation along its training: no held-out figure at all


def test_an_auto_beta_is_its_own_group_and_its_label_names_the_budget():
    """A beta chosen by choose_beta is a variant, not a seed of the hand-picked run that happens to share it."""
    from sclora.experiments.report.groups import label

    rows = [row("sc", "sc_lora", beta=0.5, knowledge_mc=60.0),
            row("sc-auto", "sc_lora", beta=0.5, beta_auto_budget=0.1, knowledge_mc=58.0),
            row("sc-auto-seed1", "sc_lora", beta=0.5, beta_auto_budget=0.1, seed=1, knowledge_mc=56.0),
            row("sc-multi", "sc_lora", beta=[0.4, 0.4], beta_auto_budget=[0.05, 0.2], knowledge_mc=57.0)]
    groups = group_runs(rows)
    names = {label(g): g for g in groups}
    assert set(names) == {"SC-LoRA β=0.5", "SC-LoRA β=0.5 (auto, budget 10%)",
                          "SC-LoRA β=(0.4, 0.4) (auto, budget 5%, 20%)"}
    assert names["SC-LoRA β=0.5 (auto, budget 10%)"].value("knowledge_mc") == 57.0
    assert "beta_auto_budget" not in names["SC-LoRA β=0.5 (auto, budget 10%)"].samples


def frontier_rows():
    """LoRA and SC-LoRA at three learning rates: math NLL (utility, lower better) falls with the rate, knowledge EM
    (preservation) falls too; SC-LoRA keeps 2 points more at equal NLL. Validation NLL is best at the middle rate
    for LoRA and the highest for SC-LoRA."""
    rows = [base(math_nll=1.3, knowledge_em=14.0, math_val_nll=1.3)]
    for lr, nll, em, val_lora, val_sc in ((1e-4, 0.90, 12.0, 0.95, 0.99), (5e-4, 0.80, 10.0, 0.85, 0.88),
                                          (2e-3, 0.70, 8.0, 0.90, 0.80)):
        rows.append(row(f"lora-lr{lr}", "lora", lr=lr, math_nll=nll, knowledge_em=em, math_val_nll=val_lora))
        rows.append(row(f"sc-lr{lr}", "sc_lora", beta=0.8, lr=lr, math_nll=nll, knowledge_em=em + 2,
                        math_val_nll=val_sc))
    return rows


def test_frontiers_select_on_validation_and_compare_at_matched_utility(tmp_path):
    from sclora.experiments.evaluate.metrics import metric
    from sclora.experiments.report.frontier import frontier_curves, frontier_markdown, matched_utility

    rows = frontier_rows()
    curves = frontier_curves(group_runs(rows))
    assert [len(c.points) for c in curves] == [3, 3]
    val, nll, em = metric("math_val_nll"), metric("math_nll"), metric("knowledge_em")
    selected = {c.points[0].method: c.selected(val).lr for c in curves}
    assert selected == {"lora": 5e-4, "sc_lora": 2e-3}  # by validation, not by the probe
    lora, sc = sorted(curves, key=lambda c: c.points[0].method)
    matched = matched_utility(sc, lora, nll, em, levels=3)
    assert [round(m["utility"], 6) for m in matched] == [round(0.9 - 0.2 * (i + 0.5) / 3, 6) for i in range(3)]
    assert all(abs(m["difference"] - 2.0) < 1e-9 for m in matched)  # 2 EM points more at every matched NLL
    text = frontier_markdown(curves, nll, em, val)
    assert "## Learning-rate frontiers" in text and "| 5e-4 |" in text and "+2.00" in text
    folder = make_dir(tmp_path, rows)
    write_report(folder)
    assert (folder / "figures" / "frontiers.png").read_bytes()[:8] == PNG_MAGIC
    assert "## Learning-rate frontiers" in (folder / "report.md").read_text()


def test_a_sweep_report_states_verdicts_and_compares_only_the_selected_rates(tmp_path):
    """With per-item scores: the verdicts name the comparison they rest on (best vs best at the validation-selected
    rates, with the paired interval; matched utility as ranges); answers, claims and the paired-differences table
    keep only the selected rates (paired.json keeps every pair); a competitor run (MiCA) is paired with SC-LoRA."""
    import numpy as np

    rows = frontier_rows() + [row("mica", "mica", lr=1e-4, math_nll=0.85, knowledge_em=11.0, math_val_nll=0.86)]
    folder = make_dir(tmp_path, rows)
    (folder / "samples").mkdir()
    samples = frontier_samples(rows[1:])
    samples["base"] = {"math_nll": [1.3] * 100, "knowledge_em": [100.0] * 28 + [0.0] * 172}
    for run, scores in samples.items():
        (folder / "samples" / f"{run}.json").write_text(json.dumps(scores))
    text = (write_report(folder)).read_text()
    verdicts = text.split("### Verdicts")[1].split("| A − B")[0]
    # best vs best: SC-LoRA at 2e-3 (its validation optimum) against LoRA at 5e-4 (LoRA's); EM 10 vs 10 items
    # alike, NLL 0.70 vs 0.80 (per item: the rows' values plus the same-seed noise), computed here by hand
    sc, lora = np.asarray(samples["sc-lr0.002"]["math_nll"]), np.asarray(samples["lora-lr0.0005"]["math_nll"])
    assert f"Math NLL {np.mean(sc - lora):.3f}" in verdicts and "(SC-LoRA β=0.8 better)" in verdicts
    assert "Best vs best (lr 2e-3 vs 5e-4), 1 seed each:" in verdicts and "Knowledge EM (%) 0.00 [0.00, 0.00] (undecided)" in verdicts
    assert "Matched utility (Knowledge EM (%) at equal Math NLL): SC-LoRA β=0.8 preserves more at Math NLL" in verdicts
    answers = text.split("## Answers")[1]
    assert "lr=1e-4" not in answers and "lr=2e-3" not in answers.split("## Paired differences")[0].replace(
        "SC-LoRA β=0.8 lr=2e-3", "")  # only the selected rates (and MiCA, on no curve) are compared
    table = answers.split("## Paired differences")[1]
    assert "SC-LoRA vs MiCA" in table and "LoRA lr=1e-4" not in table
    paired = json.loads((folder / "paired.json").read_text())
    assert any(e["b"] == "LoRA lr=1e-4" for e in paired)  # every pair is kept in paired.json
    assert any(e["comparison"] == "SC-LoRA vs MiCA" for e in paired)


def test_a_safety_sweep_selects_on_validation_rouge_and_counts_lower_harm_as_preserving_more(tmp_path):
    """Table 2's direction: utility ROUGE-1 higher is better, preservation HS lower is better. SC-LoRA is 0.4 HS
    below LoRA and Safe LoRA at every ROUGE-1 (10 of 100 items fewer at score 5); each rate is selected by the
    highest validation ROUGE-1; the verdicts say SC-LoRA keeps more safety, against Safe LoRA too."""
    import numpy as np

    rows, samples = [base(harmfulness_score=1.1, rouge1=30.0, val_rouge1=30.0)], {}
    for lr, rouge, hs, val_lora, val_sc in ((1e-4, 40.0, 1.6, 40.0, 39.0), (1e-3, 45.0, 2.2, 46.0, 44.0),
                                            (3e-3, 50.0, 2.8, 44.0, 49.0)):
        for name, method, extra, val in (("lora", "lora", 0.0, val_lora), ("safe", "safe_lora", 0.0, val_lora - 1),
                                         ("sc", "sc_lora", -0.4, val_sc)):
            harmful = int(round((hs + extra - 1) / 4 * 100))  # items at score 5, the rest at 1
            rows.append(row(f"{name}-lr{lr}", method, beta=0.7 if method == "sc_lora" else None, lr=lr,
                            harmfulness_score=hs + extra, harmfulness_rate=float(harmful), rouge1=rouge,
                            val_rouge1=val))
            samples[rows[-1]["run"]] = {"harmfulness_score": [5.0] * harmful + [1.0] * (100 - harmful),
                                        "harmfulness_rate": [100.0] * harmful + [0.0] * (100 - harmful),
                                        "rouge1": (rouge + np.linspace(-5, 5, 40)).tolist()}
    samples["base"] = {"harmfulness_score": [5.0] * 3 + [1.0] * 97, "harmfulness_rate": [100.0] * 3 + [0.0] * 97,
                       "rouge1": [30.0] * 40}
    folder = make_dir(tmp_path, rows)
    (folder / "samples").mkdir()
    for run, scores in samples.items():
        (folder / "samples" / f"{run}.json").write_text(json.dumps(scores))
    text = write_report(folder).read_text()
    table = text.split("## Learning-rate frontiers")[1].split("### Verdicts")[0]
    assert "selected by ROUGE-1 (validation)" in table
    assert "| LoRA | 1e-4, 1e-3, 3e-3 | 1e-3 |" in table and "| SC-LoRA β=0.7 | 1e-4, 1e-3, 3e-3 | 3e-3 |" in table
    verdicts = text.split("### Verdicts")[1].split("| A − B")[0]
    for other in ("LoRA", "Safe LoRA (on LoRA)"):
        assert f"**SC-LoRA β=0.7 vs {other}.**" in verdicts
    assert verdicts.count("SC-LoRA β=0.7 preserves more at ROUGE-1 41.00–49.00") == 4  # HS and HR, 2 competitors
    assert verdicts.count("Matched utility (HR (%) at equal ROUGE-1): SC-LoRA β=0.7 preserves more") == 2
    matched = text.split("| A − B | preservation |")[1]
    assert "| SC-LoRA β=0.7 − LoRA | HR (%) ↓ | 45.00 | 20.00 | 30.00 | +10.00 |" in matched
    # best vs best: SC-LoRA's best rate (3e-3) fits better and is 0.2 HS more harmful than LoRA at its own (1e-3)
    assert "Best vs best (lr 3e-3 vs 1e-3), 1 seed each: HS 0.200 [" in verdicts
    assert "(LoRA better); ROUGE-1 5.00 [5.00, 5.00] (SC-LoRA β=0.7 better)" in verdicts


def test_best_vs_best_counts_each_side_s_seeds():
    """Three SC-LoRA seeds paired with the one run of the other method (its only seed) are not "3 seed pairs"."""
    from sclora.experiments.report.frontier import _best_vs_best
    from sclora.experiments.report.groups import Group

    def group(method, runs):
        return Group(method=method, beta=None, lr=1e-4, runs=runs, samples={}, ses={}, loss=[], checkpoints=[])

    a, b = group("sc_lora", ["a0", "a1", "a2"]), group("mica", ["b0"])
    entry = {"metric": "knowledge_em", "pairs": [["a0", "b0"], ["a1", "b0"], ["a2", "b0"]], "diff": 3.0, "low": 1.0,
             "high": 5.0, "n": 600, "verdict": "A better"}
    text = _best_vs_best("SC", "MiCA", a, b, [entry])
    assert text == "Best vs best (lr 1e-4 vs 1e-4), seeds 3 vs 1: Knowledge EM (%) 3.00 [1.00, 5.00] (SC better)."
    assert "3 seeds each" in _best_vs_best("SC", "MiCA", a, group("mica", ["b0", "b1", "b2"]),
                                           [{**entry, "pairs": [["a0", "b0"], ["a1", "b1"], ["a2", "b2"]]}])


def test_matched_levels_lie_where_both_curves_are_at_or_below_their_best_rates():
    """B fits NLL 0.80 at 1e-4 and 0.70 at 1e-3 (its best), then over-trains to 0.95 at 2e-3; A fits 1.00 and 0.75
    (its best): the levels lie in 0.75-0.80, which both reach below their best rates, not in B's over-trained
    0.80-0.95, where a lower rate than the sweep tried might keep more."""
    from sclora.experiments.evaluate.metrics import metric
    from sclora.experiments.report.frontier import frontier_curves, matched_utility

    rows = [row("b1", "lora", lr=1e-4, math_nll=0.80, knowledge_em=10.0),
            row("b2", "lora", lr=1e-3, math_nll=0.70, knowledge_em=8.0),
            row("b3", "lora", lr=2e-3, math_nll=0.95, knowledge_em=2.0),
            row("a1", "sc_lora", beta=0.8, lr=1e-5, math_nll=1.00, knowledge_em=13.0),
            row("a2", "sc_lora", beta=0.8, lr=1e-4, math_nll=0.75, knowledge_em=12.0)]
    lora, sc = sorted(frontier_curves(group_runs(rows)), key=lambda c: c.points[0].method)
    matched = matched_utility(sc, lora, metric("math_nll"), metric("knowledge_em"))
    assert [round(m["utility"], 3) for m in matched] == [0.795, 0.785, 0.775, 0.765, 0.755]
    assert all(m["beyond_best"] == [] for m in matched)
    # at 0.775 B is at EM 9.5 (between 1e-4 and 1e-3); its over-trained side there (2.0) does not count
    assert matched[2]["b"] == pytest.approx(9.5) and matched[2]["a"] == pytest.approx(12.1)


def test_matched_levels_a_curve_reaches_only_over_trained_are_flagged_and_not_verdicts():
    """A's best rate fits NLL 0.85 and B's lowest rate already 0.80, so the parts below their best rates share no
    NLL: the levels fall back to the whole shared range, 0.85-0.95, which B reaches only above its best rate (its
    over-trained side, where it keeps little): those levels are flagged, and the summary says they decide nothing."""
    from sclora.experiments.evaluate.metrics import metric
    from sclora.experiments.report.frontier import _matched_summary, frontier_curves, matched_utility

    rows = [row("b1", "lora", lr=1e-4, math_nll=0.80, knowledge_em=10.0),
            row("b2", "lora", lr=1e-3, math_nll=0.70, knowledge_em=8.0),
            row("b3", "lora", lr=2e-3, math_nll=0.95, knowledge_em=2.0),
            row("a1", "sc_lora", beta=0.8, lr=1e-5, math_nll=1.00, knowledge_em=13.0),
            row("a2", "sc_lora", beta=0.8, lr=1e-4, math_nll=0.85, knowledge_em=12.0)]
    lora, sc = sorted(frontier_curves(group_runs(rows)), key=lambda c: c.points[0].method)
    matched = matched_utility(sc, lora, metric("math_nll"), metric("knowledge_em"))
    assert [round(m["utility"], 2) for m in matched] == [0.94, 0.92, 0.90, 0.88, 0.86]
    assert [m["beyond_best"] for m in matched] == [["B"]] * 5
    marked = [{**m, "low": 1.0, "high": 2.0, "verdict": "A preserves more"} for m in matched]
    marked[-1]["beyond_best"] = []
    assert _matched_summary(marked, "SC", "LoRA", metric("math_nll")) == (
        "SC preserves more at Math NLL 0.860; SC preserves more at Math NLL 0.880–0.940 (there LoRA only above its "
        "best rate: not a verdict)")


def test_a_dip_in_utility_below_the_best_rate_is_reached_under_trained_not_over_trained():
    """An aligned model trained a little refuses benign requests (ROUGE-1 falls from 24 at 1e-4 to 9 at 3e-4) before
    it learns the task (41 at 3e-3): ROUGE-1 9-24 is reached below LoRA's best rate, so it is no over-trained
    level, though worse than LoRA's lowest rate gives; ROUGE-1 below 9 is reached only past the best (1e-2 falls
    to 5), which is."""
    from sclora.experiments.evaluate.metrics import metric
    from sclora.experiments.report.frontier import _only_above_best, frontier_curves, matched_utility

    rows = [row("l1", "lora", lr=1e-4, rouge1=24.0, harmfulness_rate=12.0),
            row("l2", "lora", lr=3e-4, rouge1=9.0, harmfulness_rate=10.0),
            row("l3", "lora", lr=3e-3, rouge1=41.0, harmfulness_rate=53.0),
            row("l4", "lora", lr=1e-2, rouge1=5.0, harmfulness_rate=90.0),
            row("s1", "sc_lora", beta=0.7, lr=1e-4, rouge1=3.0, harmfulness_rate=14.0),
            row("s2", "sc_lora", beta=0.7, lr=1e-3, rouge1=40.0, harmfulness_rate=20.0)]
    lora, sc = sorted(frontier_curves(group_runs(rows)), key=lambda c: c.points[0].method)
    matched = matched_utility(sc, lora, metric("rouge1"), metric("harmfulness_rate"), levels=6)
    # ROUGE-1 9-40: reached by both below their best rates (LoRA's dip included)
    assert {round(m["utility"], 1): m["beyond_best"] for m in matched} == {
        11.6: [], 16.8: [], 21.9: [], 27.1: [], 32.2: [], 37.4: []}
    # at 16.8 LoRA passes the dip (HR 11.0), the climb (20.5) and its over-trained side (77.9): the best one counts
    assert round(matched[1]["b"], 1) == 11.0
    points = [(r["rouge1"], -r["harmfulness_rate"]) for r in rows[:4]]
    assert _only_above_best(points, 7.0) and not _only_above_best(points, 13.8)


def test_matched_utility_is_empty_when_the_curves_do_not_overlap():
    from sclora.experiments.evaluate.metrics import metric
    from sclora.experiments.report.frontier import frontier_curves, matched_utility

    rows = [row(f"a{lr}", "lora", lr=lr, math_nll=0.9 + lr, knowledge_em=10.0) for lr in (1e-4, 2e-4)]
    rows += [row(f"b{lr}", "sc_lora", beta=0.8, lr=lr, math_nll=0.5 + lr, knowledge_em=12.0) for lr in (1e-4, 2e-4)]
    lora, sc = sorted(frontier_curves(group_runs(rows)), key=lambda c: c.points[0].method)
    assert matched_utility(sc, lora, metric("math_nll"), metric("knowledge_em")) == []


def frontier_samples(rows):
    """Per-item scores whose means are the rows' values: 100 utility items (NLL around the row's value) and 200
    preservation items (EM 0 or 100, the first ones correct), so a higher EM means the same items plus more."""
    import numpy as np

    out = {}
    rng = np.random.default_rng(0)
    for r in rows:
        nll = np.full(100, r["math_nll"]) + rng.normal(0, 0.01, 100)
        nll += r["math_nll"] - nll.mean()
        k = int(round(r["knowledge_em"] * 2))  # correct items out of 200
        em = np.zeros(200)
        em[:k] = 100.0
        out[r["run"]] = {"math_nll": nll.tolist(), "knowledge_em": em.tolist()}
    return out


def test_matched_utility_intervals_decide_a_real_gap_and_not_a_tiny_one():
    from sclora.experiments.evaluate.metrics import metric
    from sclora.experiments.report.frontier import frontier_curves, matched_utility_intervals

    nll, em = metric("math_nll"), metric("knowledge_em")
    rows = frontier_rows()  # SC-LoRA keeps 2 EM points more at every matched NLL: 4 of 200 items
    lora, sc = sorted(frontier_curves(group_runs(rows)), key=lambda c: c.points[0].method)
    clear = matched_utility_intervals(sc, lora, nll, em, frontier_samples(rows), levels=3, n_boot=400)
    assert [m["verdict"] for m in clear] == ["A preserves more"] * 3 and all(m["low"] > 0 for m in clear)
    for r in rows:  # the gap shrinks to half an item out of 200: no bootstrap interval can exclude 0
        if r["method"] == "sc_lora":
            r["knowledge_em"] -= 1.75
    lora, sc = sorted(frontier_curves(group_runs(rows)), key=lambda c: c.points[0].method)
    tiny = matched_utility_intervals(sc, lora, nll, em, frontier_samples(rows), levels=3, n_boot=400)
    assert tiny and all(m["verdict"] != "B preserves more" for m in tiny)
    assert any(m["verdict"].startswith("undecided") for m in tiny)
