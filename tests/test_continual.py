"""The continual experiment (``stages:`` YAML, sclora.experiments.continual) on the tiny model: every run's chain of
stages, the accuracy matrix rows after every stage, learning rates selected on validation items, resumable after a
kill, and a config checked before anything loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from conftest import save_tiny_model
from test_faults import KILL_AT

from sclora import cli
from sclora.experiments.continual import ContinualConfig, load_continual, n_kept, stage_init_config, stage_owner
from sclora.experiments.report.continual import load_continual as load_scores, write_continual_report

WORDS = "red green blue cyan black white pink gold gray teal".split()


def rows(kind: str, n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"{kind} {i} is {WORDS[i % 10]} ?", "response": f"{WORDS[(i * 3) % 10]} {kind} ."}
            for i in range(start, start + n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    model = save_tiny_model(root / "model")
    files = {}
    for name in ("colours", "shapes", "facts"):  # each task: 8 train, 4 validation, 4 test rows, disjoint prompts
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows(name, 16)))
        files[name] = str(path)

    def part(name, test, val, metric):
        return {"name": name, "data": {"path": files[name], "n": 8, "shuffle": False},
                "evaluate": {test: {"path": files[name], "n": 4, "offset": 12, "shuffle": False}},
                **({"validate": {val: {"path": files[name], "n": 4, "offset": 8, "shuffle": False}}} if val else {}),
                "metric": metric}

    config = {
        "name": "tiny-continual", "model": str(model), "r": 2, "stats_seq_len": 16, "stats_samples": 8,
        "train": {"learning_rate": 1e-2, "batch_size": 4, "micro_batch_size": 2, "max_length": 32, "save_steps": 1,
                  "num_epochs": 1.0},
        "stages": [part("colours", "pydoc_rouge", "pydoc_val_rouge", "pydoc_rougeL"),
                   part("shapes", "summary_rouge", "summary_val_rouge", "rougeL")],
        "keep": {"facts": {k: v for k, v in part("facts", "benign_refusal", None, "benign_refusal_rate").items()
                           if k != "name"}},
        "runs": [{"name": "lora", "method": "lora", "learning_rate": [1e-2, 1e-3]},
                 {"name": "sc-lora", "method": "sc_lora", "beta": 0.5},
                 {"name": "replay", "method": "lora", "replay": 0.25},
                 {"name": "o-lora", "method": "lora", "orthogonal_penalty": 0.5}],
    }
    path = root / "continual.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path, config


def test_every_run_learns_the_stages_in_order_and_is_measured_on_every_task_after_each(setup):
    root, path, config = setup
    out = root / "out"
    assert cli.main(["run", str(path), "--output", str(out), "--quiet"]) == 0
    result = json.loads((out / "continual.json").read_text())
    assert set(result["runs"]) == {"lora", "sc-lora", "replay", "o-lora"}
    for name, by_seed in result["runs"].items():
        stages = by_seed["0"]
        assert [s["stage"] for s in stages] == ["colours", "shapes"]
        for s in stages:  # every task's and kept set's metric after every stage (a(i, j) for all j)
            assert {"pydoc_rougeL", "rougeL", "benign_refusal_rate"} <= set(s["metrics"])
            assert s["statistics_seconds"] >= 0 and s["train_seconds"] > 0
    # SC-LoRA keeps the facts set at stage 0, the facts and the colours task at stage 1
    assert [s["kept_sets"] for s in result["runs"]["sc-lora"]["0"]] == [["preserve"], ["preserve", "task of 0-colours-lr0.01"]]
    assert result["runs"]["replay"]["0"][1]["replayed_examples"] == 2  # a quarter of the 8 colours examples
    assert all(s["kept_sets"] == [] for name in ("lora", "replay", "o-lora") for s in result["runs"][name]["0"])
    # at the first stage replay and O-LoRA train what LoRA trains at 1e-2: they continue from LoRA's folder (trained
    # once) with its measurements, and their second stages are their own
    first = result["runs"]["lora"]["0"][0]
    assert first["folder"] == "runs/lora/seed0/0-colours-lr0.01" and first["learning_rate"] == 1e-2
    for name in ("replay", "o-lora"):
        mine = result["runs"][name]["0"]
        assert mine[0]["folder"] == first["folder"] and mine[0]["metrics"] == first["metrics"]
        assert mine[1]["folder"] == f"runs/{name}/seed0/1-shapes-lr0.01"
        assert json.loads((out / "samples" / name / "seed0" / "0.json").read_text()) == \
            json.loads((out / "samples" / "lora" / "seed0" / "0.json").read_text())
    assert not (out / "runs" / "replay" / "seed0" / "0-colours-lr0.01").exists()
    assert len(json.loads((out / first["folder"] / "checkpoints" / "train_log.json").read_text())["calls"]) == 1
    assert result["runs"]["sc-lora"]["0"][0]["folder"] == "runs/sc-lora/seed0/0-colours-lr0.01"
    # learning rates chosen on the validation items: the better validation score continues the chain
    for s in result["runs"]["lora"]["0"]:
        assert set(s["validation"]) == {"0.01", "0.001"}
        key = "pydoc_val_rougeL" if s["stage"] == "colours" else "val_rouge1"
        scores = {lr: v[key] for lr, v in s["validation"].items()}
        best = max(scores, key=scores.get)  # the first of equal scores, as max() takes it
        assert f"{s['learning_rate']:g}" == best
    # the second stage started from the model the selected first stage left
    chain = json.loads((out / result["runs"]["lora"]["0"][1]["folder"] / "stage.json").read_text())["chain"]
    assert chain[0]["output_dir"].endswith(result["runs"]["lora"]["0"][0]["folder"])
    # the report: ACC / BWT / FWT per run, figures, and each stage's selected rate
    assert cli.main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert all(name in report for name in ("lora", "sc-lora", "replay", "o-lora", "BWT", "FWT"))
    assert (out / "figures" / "continual_matrix.png").read_bytes()[:4] == b"\x89PNG"
    # the stage table lists D- sets only for the methods that keep them, also from rows that recorded a LoRA
    # stage's inherited sets
    stored = json.loads((out / "continual.json").read_text())
    stored["runs"]["lora"]["0"][1]["kept_sets"] = ["task of 0-colours-lr0.01"]
    (out / "continual.json").write_text(json.dumps(stored))
    assert cli.main(["report", str(out)]) == 0
    table = [line.split(" | ") for line in (out / "report.md").read_text().splitlines() if line.startswith("| lora | 0 |")]
    assert len(table) == 2 and all(cells[4] == "-" for cells in table)
    assert any("task of 0-colours" in line for line in (out / "report.md").read_text().splitlines()
               if line.startswith("| sc-lora | 0 | shapes"))
    (out / "continual.json").write_text(json.dumps(result))
    from sclora.experiments.report.continual import load_continual as load_scores

    data = load_scores(out)
    saved = json.loads((out / "samples" / "lora" / "seed0" / "1.json").read_text())["items"]
    assert data["scores"]["lora"]["0"][1]["shapes"] == saved["rougeL"] and data["higher_is_better"]["colours"] is True
    # a rerun finds everything done: the same numbers
    assert cli.main(["run", str(path), "--output", str(out), "--quiet"]) == 0
    again = json.loads((out / "continual.json").read_text())
    assert {n: [s["metrics"] for s in r["0"]] for n, r in again["runs"].items()} == \
        {n: [s["metrics"] for s in r["0"]] for n, r in result["runs"].items()}


def test_two_workers_share_the_chains_and_merge_them_into_one_file(setup, tmp_path):
    """--workers 2: each chain (run x seed) and the base evaluation are run by one process, once; continual.json
    holds every chain, in the config's order, with the numbers one process gets (up to float reductions: the
    workers compute at one thread each)."""
    root, path, config = setup
    small = {**config, "runs": [config["runs"][1], config["runs"][3]]}  # sc-lora, o-lora
    small_path = tmp_path / "small.yaml"
    small_path.write_text(yaml.safe_dump(small))
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["run", str(small_path), "--output", str(one), "--quiet"]) == 0
    try:
        assert cli.main(["run", str(small_path), "--output", str(two), "--quiet", "--workers", "2"]) == 0
    finally:
        torch.set_num_threads(os.cpu_count() or 1)  # --workers set this process's threads to its share
    got, want = (json.loads((d / "continual.json").read_text()) for d in (two, one))
    assert list(got["runs"]) == ["sc-lora", "o-lora"] and set(got["base"]) == {"0"}
    for name in ("sc-lora", "o-lora"):
        for a, b in zip(got["runs"][name]["0"], want["runs"][name]["0"]):
            assert a["learning_rate"] == b["learning_rate"]
            assert a["metrics"]["benign_refusal_rate"] == pytest.approx(b["metrics"]["benign_refusal_rate"], abs=1e-6)
            assert a["metrics"]["pydoc_rougeL"] == pytest.approx(b["metrics"]["pydoc_rougeL"], abs=1e-6)
            calls = json.loads((two / a["folder"] / "checkpoints" / "train_log.json").read_text())["calls"]
            assert len(calls) == 1  # trained once, by one process


def test_a_run_killed_mid_chain_resumes_to_the_same_result(setup, tmp_path):
    root, path, config = setup
    small = {**config, "runs": [config["runs"][1]]}
    small_path = tmp_path / "small.yaml"
    small_path.write_text(yaml.safe_dump(small))
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert cli.main(["run", str(small_path), "--output", str(reference), "--quiet"]) == 0
    child = "import json, os, signal\nfrom sclora import cli\n" + textwrap.dedent(KILL_AT) + textwrap.dedent(f"""
        from transformers.trainer_callback import TrainerState
        kill_at(TrainerState, "save_to_json", 3)  # the second stage's first checkpoint
        raise SystemExit(cli.main(["run", {str(small_path)!r}, "--output", {str(out)!r}, "--quiet"]))
    """)
    # the child computes with another thread count than this process: a recomputed init could differ in its last
    # bits, so the rerun must reuse the finished stage, not recompute it
    threads = "2" if torch.get_num_threads() == 1 else "1"
    died = subprocess.run([sys.executable, "-c", child], env={**os.environ, "OMP_NUM_THREADS": threads},
                          capture_output=True, text=True, timeout=600)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    # the finished first stage is recorded, and reported on its own; the unfinished chain is not reported whole
    (first,) = json.loads((out / "continual.json").read_text())["runs"]["sc-lora"]["0"]
    want = json.loads((reference / "continual.json").read_text())["runs"]["sc-lora"]["0"]
    def scores(metrics):  # not the timings
        return {k: v for k, v in metrics.items() if not k.endswith(("_seconds", "_tokens_per_second"))}
    assert first["stage"] == want[0]["stage"]
    assert scores(first["metrics"]) == pytest.approx(scores(want[0]["metrics"]), abs=1e-5)
    with pytest.raises(ValueError, match=r"finished 1 of 2: `sclora report .* --stages 1`"):
        write_continual_report(out)
    assert "Over the first 1 of the config's 2 stages" in write_continual_report(out, stages=1).read_text()
    assert load_scores(out, stages=1)["tasks"] == [config["stages"][0]["name"]]
    for bad in (0, 3, True, "1"):
        with pytest.raises(ValueError, match="stages must be a whole number from 1 to 2"):
            load_scores(out, stages=bad)
    assert cli.main(["report", str(out)]) == 1 and cli.main(["report", str(out), "--stages", "1"]) == 0
    assert cli.main(["run", str(small_path), "--output", str(out), "--quiet"]) == 0
    got, want = (json.loads((d / "continual.json").read_text())["runs"]["sc-lora"]["0"] for d in (out, reference))
    assert load_scores(out)["scores"].keys() == {"sc-lora"}
    assert [s["metrics"]["pydoc_rougeL"] for s in got] == pytest.approx([s["metrics"]["pydoc_rougeL"] for s in want], abs=1e-5)
    assert [s["metrics"]["benign_refusal_rate"] for s in got] == \
        pytest.approx([s["metrics"]["benign_refusal_rate"] for s in want], abs=1e-5)


def test_a_folder_of_another_config_is_refused(setup, tmp_path):
    root, path, config = setup
    out = tmp_path / "out"
    small = {**config, "runs": [config["runs"][2]]}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(small))
    assert cli.main(["run", str(tmp_path / "a.yaml"), "--output", str(out), "--quiet"]) == 0
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({**small, "r": 4}))
    with pytest.raises(ValueError, match=r"other settings \(r\)"):
        cli.main(["run", str(tmp_path / "b.yaml"), "--output", str(out), "--quiet"])


def test_beta_is_split_over_the_sets_a_stage_keeps_and_a_budget_repeated(setup):
    _, path, config = setup
    c = load_continual(path)
    run = {"name": "x", "method": "sc_lora", "beta": 0.7}
    assert [n_kept(c, run, i) for i in range(2)] == [1, 2]
    assert stage_init_config(c, run, 1).beta == [0.35, 0.35]
    budget = {"name": "y", "method": "sc_lora", "beta": "auto", "preserve_budget": 0.05}
    assert stage_init_config(c, budget, 1).preserve_budget == [0.05, 0.05]
    assert n_kept(c, {**run, "keep_earlier": False}, 1) == 1


@pytest.mark.parametrize("change, message", [
    ({"stages": None}, "at least two stages"),
    ({"runs": [{"name": "x", "method": "full"}]}, "an adapter method"),
    ({"runs": [{"name": "x", "method": "lora", "bogus": 1}]}, r"unknown key\(s\) \['bogus'\]"),
    ({"runs": [{"name": "x", "method": "sc_lora", "beta": [0.5, 0.5]}]}, "beta is one number for every stage"),
    ({"runs": [{"name": "x", "method": "lora"}, {"name": "x", "method": "lora"}]}, "two runs are named 'x'"),
    ({"runs": [{"name": "x", "method": "lora", "learning_rate": [1e-3, -1]}]}, "learning_rate must be a positive"),
])
def test_bad_configs_are_refused_naming_the_problem(setup, change, message):
    _, path, config = setup
    with pytest.raises(ValueError, match=message):
        ContinualConfig(**{**config, **change})


def test_a_metric_that_is_not_the_evaluations_own_and_a_reused_evaluation_are_refused(setup):
    _, _, config = setup
    stages = [dict(config["stages"][0], metric="rougeL"), config["stages"][1]]
    with pytest.raises(ValueError, match="metric 'rougeL' is not a metric of pydoc_rouge"):
        ContinualConfig(**{**config, "stages": stages})
    stages = [config["stages"][0], dict(config["stages"][1], evaluate=config["stages"][0]["evaluate"],
                                        metric="pydoc_rougeL")]
    with pytest.raises(ValueError, match="evaluation 'pydoc_rouge' is used twice"):
        ContinualConfig(**{**config, "stages": stages})


def test_the_first_stage_is_shared_only_by_runs_that_train_the_same_there(setup):
    _, path, config = setup
    c = load_continual(path)
    lora, sc, replay, olora = c.runs
    assert stage_owner(c, replay, 0, 1e-2, 0) is lora and stage_owner(c, olora, 0, 1e-2, 0) is lora
    assert stage_owner(c, replay, 1, 1e-2, 0) is replay  # later stages are each run's own
    assert stage_owner(c, sc, 0, 1e-2, 0) is sc  # another method
    other = {"name": "x", "method": "lora", "replay": 0.25, "learning_rate": [1e-3], "seeds": [1]}
    c2 = ContinualConfig(**{**config, "runs": [*config["runs"], other]})
    assert stage_owner(c2, c2.runs[-1], 0, 1e-3, 1)["name"] == "x"  # no earlier run trains seed 1
    assert stage_owner(c2, c2.runs[-1], 0, 1e-3, 0)["name"] == "lora"
    c3 = ContinualConfig(**{**config, "runs": [*config["runs"], {**other, "seeds": [0], "r": 4}]})
    assert stage_owner(c3, c3.runs[-1], 0, 1e-3, 0)["name"] == "x"  # another rank
    kept = {"name": "k", "method": "sc_lora", "beta": 0.5, "keep_earlier": False}
    c4 = ContinualConfig(**{**config, "runs": [*config["runs"], kept]})
    assert stage_owner(c4, c4.runs[-1], 0, 1e-2, 0)["name"] == "sc-lora"


def test_statistics_are_collected_once_per_model_and_set_across_candidates_and_runs(setup, tmp_path, monkeypatch):
    """Every statistics file lives in the folder's stats/ under a name that fingerprints model and data: a stage's
    learning-rate candidates (same merged model, same sets) and a run that shares the first stage collect nothing
    again. SC-LoRA at two rates over two stages: D+ and facts at stage 0, D+, facts and the colours task at stage
    1 = 5 collections (10 without sharing); the knowledge-only run shares stage 0 and D+ at stage 1 and collects
    only its one kept set, the facts, under its own label (a file's name starts with the set's label)."""
    from sclora import statistics_cache

    root, _, config = setup
    calls = []
    collect = statistics_cache.collect_covariances
    monkeypatch.setattr(statistics_cache, "collect_covariances",  # a collection takes >= 0.3 s, a cache read not
                        lambda *a, **k: calls.append(k["desc"]) or time.sleep(0.3) or collect(*a, **k))
    runs = [{"name": "sc-lora", "method": "sc_lora", "beta": 0.5, "learning_rate": [1e-2, 1e-3]},
            {"name": "knowledge-only", "method": "sc_lora", "beta": 0.5, "keep_earlier": False,
             "learning_rate": [1e-2, 1e-3]}]
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({**config, "runs": runs}))
    out = tmp_path / "out"
    assert cli.main(["run", str(small), "--output", str(out), "--quiet"]) == 0
    assert sorted(calls) == sorted(["plus statistics", "minus statistics"] * 2 + ["minus_0 statistics",
                                                                                 "minus_1 statistics"]), calls
    assert len(list((out / "stats").glob("*.safetensors"))) == 6
    assert not list((out / "runs").glob("*/seed0/*/stats"))
    result = json.loads((out / "continual.json").read_text())["runs"]
    assert result["knowledge-only"]["0"][0]["folder"] == result["sc-lora"]["0"][0]["folder"]
    assert [s["kept_sets"] for s in result["knowledge-only"]["0"]] == [["preserve"], ["preserve"]]
    assert len(result["sc-lora"]["0"][1]["kept_sets"]) == 2
    for i, row in enumerate(result["sc-lora"]["0"]):  # a stage's statistics time: the candidate that collected them
        folders = sorted((out / "runs" / "sc-lora" / "seed0").glob(f"{i}-*"))
        seconds = [json.loads((f / "summary.json").read_text())["statistics_seconds"] for f in folders]
        assert len(seconds) == 2 and row["statistics_seconds"] == max(seconds) >= 0.3 * (2 + i) > min(seconds)
