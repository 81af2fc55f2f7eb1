"""`sclora run CONFIG.yaml` on a tiny random model: the whole path, resumable, with clear config errors."""

import json

import pytest
import torch
import yaml
from conftest import TRIVIA, save_tiny_model, tiny_experiment

from sclora import cli
from sclora.experiments import data
from sclora.experiments.examples import check_disjoint
from sclora.experiments.spec import load_config


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "trivia", lambda *a, **k: TRIVIA)
    config = tiny_experiment(save_tiny_model(tmp_path / "model"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, tmp_path / "out"


def test_run_writes_results_and_resumes(setup, capsys):
    config_path, out = setup
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in rows] == ["base", "lora", "sc_lora-beta0.5", "corda_kpa"]
    for row in rows[1:]:
        assert row["trainable_params"] > 0 and row["train_seconds"] >= 0 and row["loss_history"]
        assert isinstance(row["knowledge_logprob"], float)
    assert rows[1]["knowledge_logprob"] != rows[0]["knowledge_logprob"]  # training moved the model
    for name in ("lora", "sc_lora-beta0.5", "corda_kpa"):  # every run leaves a plain PEFT adapter for the base
        adapter = json.loads((out / "runs" / name / "adapter" / "adapter_config.json").read_text())
        assert adapter["peft_type"] == "LORA" and adapter["init_lora_weights"] is True
    assert "| sc_lora-beta0.5 | sc_lora | 0.5 |" in (out / "results.md").read_text()
    assert "sc_lora-beta0.5" in capsys.readouterr().out
    assert len(list((out / "stats").glob("plus-output-raw-*.safetensors"))) == 1  # named by what made it
    # CorDA's statistics are its authors' and PEFT's: inputs, each sample scaled by 1 / |max x|
    assert len(list((out / "stats").glob("minus-input-abs_of_max-*.safetensors"))) == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["r"] == 2
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert set(diagnostics) == {"sc_lora-beta0.5", "corda_kpa"}  # residual inits only; LoRA's B is zero
    for entries in diagnostics.values():
        assert len(entries) == 7 * 2 and all(0 <= e["plus"] <= 1 + 1e-9 and 0 <= e["minus"] <= 1 + 1e-9
                                             for e in entries)
    # A rerun finds every run done: nothing is trained again, the results stay the same.
    mtime = (out / "results.json").stat().st_mtime_ns
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text()) == rows
    assert (out / "results.json").stat().st_mtime_ns == mtime


def test_keep_going_records_a_failed_run_and_goes_on_then_a_rerun_retries_it(setup, monkeypatch, capsys):
    from sclora.experiments import runner

    config_path, out = setup
    config = yaml.safe_load(config_path.read_text())
    config_path.write_text(yaml.safe_dump({**config, "runs": [{"method": "sc_lora", "beta": 0.5}, {"method": "lora"}]}))
    real = runner._run_one

    def broken(config, exp, run, name, *args):
        if name == "sc_lora-beta0.5":
            raise RuntimeError("simulated failure of one run")
        return real(config, exp, run, name, *args)

    monkeypatch.setattr(runner, "_run_one", broken)
    # without --keep-going the first failure stops the sweep: the run after it never starts
    with pytest.raises(RuntimeError, match="simulated"):
        cli.main(["run", str(config_path), "--output", str(out), "--quiet"])
    assert [r["run"] for r in json.loads((out / "results.json").read_text())] == ["base"]
    assert not (out / "failures.json").exists()
    # with it the failure is recorded (error, traceback, the run's fingerprint) and the next run still finishes
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet", "--keep-going"]) == 4
    assert [r["run"] for r in json.loads((out / "results.json").read_text())] == ["base", "lora"]
    failure = json.loads((out / "failures.json").read_text())["sc_lora-beta0.5"]
    assert failure["error"] == "RuntimeError: simulated failure of one run" and "broken" in failure["traceback"]
    assert "1 run(s) failed" in capsys.readouterr().err
    # the cause fixed, a rerun retries only the failed run and forgets its failure
    monkeypatch.setattr(runner, "_run_one", real)
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet", "--keep-going"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in rows] == ["base", "lora", "sc_lora-beta0.5"]
    assert rows[2]["fingerprint"] == failure["fingerprint"]  # the failure named the settings that failed
    assert json.loads((out / "failures.json").read_text()) == {}


def test_dry_run_on_a_folder_says_what_is_done_failed_and_left_and_the_time_left(setup, capsys):
    config_path, out = setup  # runs: lora, sc_lora-beta0.5, corda_kpa
    out.mkdir()
    (out / "results.json").write_text(json.dumps([
        {"run": "base", "method": "-", "knowledge_logprob_seconds": 100.0},
        {"run": "lora", "method": "lora", "init_seconds": 10.0, "train_seconds": 500.0,
         "knowledge_logprob_seconds": 90.0},
    ]))
    (out / "failures.json").write_text(json.dumps({"corda_kpa": {"error": "RuntimeError: x"}}))
    assert cli.main(["run", str(config_path), "--output", str(out), "--dry-run", "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert f"folder      {out}: 2 of 4 runs done" in text
    assert "failed      corda_kpa" in text and "left        sc_lora-beta0.5" in text
    # two runs to do at the one finished run's 600 s (the base row trains nothing), over 2 workers: 10 min
    assert "time left   about 10 min with 2 worker(s), at the 1 finished runs' mean of 10 min per run" in text
    (out / "runs" / "sc_lora-beta0.5").mkdir(parents=True)  # started (running, or stopped with checkpoints)
    assert cli.main(["run", str(config_path), "--output", str(out), "--dry-run", "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "started     sc_lora-beta0.5" in text and "  left  " not in text and "about 8 min with 2" in text
    assert not (out / "config.yaml").exists() and not (out / "claims").exists()  # a dry run writes nothing


def test_unknown_config_key_method_and_too_small_data(setup, tmp_path):
    config_path, out = setup
    base = yaml.safe_load(config_path.read_text())
    for patch, match in [({"learning_rate": 1}, "Unknown key"), ({"runs": [{"method": "dora"}]}, "Unknown method"),
                         ({"plus": {"kind": "poems", "n": 3}}, "Unknown data kind"),
                         ({"train": {"lr": 1}}, "lr")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**base, **patch}))
        with pytest.raises(ValueError, match=match):
            load_config(bad)
    with pytest.raises(ValueError, match="only .* examples"):
        cli.main(["run", str(config_path), "--output", str(out), "--quiet", "--set", "minus={kind: trivia, n: 500}"])


def test_missing_model_path_is_a_clear_error(setup):
    config_path, out = setup
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cli.main(["run", str(config_path), "--output", str(out), "--quiet", "--set", "model=/nowhere/model"])


@pytest.mark.parametrize("name,value", [("knowledge_em", "yes"), ("knowledge_em", 1), ("knowledge_mc", True)])
def test_reuse_context_is_a_knowledge_em_switch(name, value):
    from sclora.experiments.spec import eval_spec

    with pytest.raises(ValueError, match="reuse_context: true or false, for knowledge_em only"):
        eval_spec({"kind": "trivia", "n": 4, "reuse_context": value}, name)
    assert eval_spec({"kind": "trivia", "n": 4, "reuse_context": True}, "knowledge_em")[1] == {"reuse_context": True}


def test_overlapping_splits_are_refused():
    a, b = [{"prompt": "x"}, {"prompt": "y"}], [{"prompt": "y"}]
    with pytest.raises(ValueError, match="share 1 example"):
        check_disjoint({"minus": a, "knowledge_logprob": b})
    check_disjoint({"plus": a, "train": b})  # init samples may come from the training set, as in the paper


def test_standard_errors_and_paired_metrics_in_results(setup):
    config_path, out = setup
    config = yaml.safe_load(config_path.read_text())
    config["evaluate"] = {"knowledge_mc": {"kind": "trivia", "n": 6, "offset": 24, "n_choices": 3},
                          "knowledge_em": {"kind": "trivia", "n": 4, "offset": 30, "num_fewshot": 2,
                                           "reuse_context": True}}
    config["runs"] = [{"method": "lora", "seed": 1}]
    config_path.write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet"]) == 0
    base, lora = json.loads((out / "results.json").read_text())
    assert lora["run"] == "lora-seed1" and lora["seed"] == 1
    for row in (base, lora):
        assert 0 <= row["knowledge_mc"] <= 100 and row["knowledge_mc_se"] >= 0
    samples = {name: json.loads((out / "samples" / f"{name}.json").read_text()) for name in ("base", "lora-seed1")}
    lost = sum(b and not r for b, r in zip(samples["base"]["knowledge_mc"], samples["lora-seed1"]["knowledge_mc"]))
    assert lora["knowledge_mc_lost"] == lora["knowledge_lost"] == lost
    assert 0 <= lora["knowledge_sign_p"] <= 1


def test_harmful_responses_and_mixtures(monkeypatch):
    from sclora.experiments.examples import build_examples, build_mixture
    from sclora.experiments.spec import DataSpec

    rows = [{"prompt": f"bad thing {i}", "category": "c", "source": "jailbreakbench", "target": f"Sure, here is {i}"}
            for i in range(10)]
    monkeypatch.setattr(data, "harmful_requests", lambda source="harmbench": rows)
    monkeypatch.setattr(data, "trivia", lambda *a, **k: TRIVIA)
    refusals = build_examples(DataSpec("harmful", 5, response="refusal"), seed=0)
    from sclora.experiments.prompts import REFUSALS

    assert all(r["response"] in REFUSALS for r in refusals)
    affirmative = build_examples(DataSpec("harmful", 5, source="jailbreakbench", response="affirmative"), seed=0)
    assert all(r["response"] == "Sure, here is " + r["prompt"].split()[-1] for r in affirmative)
    mix = build_mixture([DataSpec("trivia", 8), DataSpec("harmful", 2, response="affirmative")], seed=0)
    assert len(mix) == 10 and sum(r["response"].startswith("Sure") for r in mix) == 2
    assert mix == build_mixture([DataSpec("trivia", 8), DataSpec("harmful", 2, response="affirmative")], seed=0)
    with pytest.raises(ValueError, match="Unknown response"):
        DataSpec("harmful", 2, response="yes")
    with pytest.raises(ValueError, match="'source' applies"):
        DataSpec("trivia", 2, source="harmbench")


def test_dry_run_and_multi_knowledge_validation(setup, capsys):
    config_path, _ = setup
    config = yaml.safe_load(config_path.read_text())
    config["minus"] = [{"kind": "trivia", "n": 8, "offset": 8}, {"kind": "harmful", "n": 8, "response": "refusal"}]
    config["runs"] = [{"method": "sc_lora", "beta": 0.5}]
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"has 1 value\(s\) but 2 knowledge set"):
        load_config(config_path)
    config["runs"] = [{"method": "sc_lora", "beta": [0.3, 0.4]}]
    config_path.write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(config_path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "sc_lora-beta0.3+0.4" in printed and "harmful[train] n=8 from 0 (refusal)" in printed
    with pytest.raises(SystemExit, match="--output"):
        cli.main(["run", str(config_path)])
    config["runs"] = [{"method": "sc_lora", "beta": "auto", "preserve_budget": 0.1}]
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"preserve_budget=0.1 has 1 value\(s\) but 2 knowledge set\(s\).*one preserve_budget per set"):
        load_config(config_path)
    config["runs"] = [{"method": "sc_lora", "beta": "auto", "preserve_budget": [0.1, 0.05]}]
    config_path.write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(config_path), "--dry-run"]) == 0
    assert "sc_lora-betaauto-budget0.1+0.05" in capsys.readouterr().out


def test_every_shipped_config_parses_and_dry_runs(capsys, monkeypatch):
    from pathlib import Path

    from sclora import models

    # The shipped configs name the embedded / aligned models, which this test machine need not have built:
    # their availability is checked by test_a_missing_model_fails_the_dry_run, the rest here.
    monkeypatch.setattr(models, "check_model", lambda name: None)

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 7
    for path in configs:
        assert cli.main(["run", str(path), "--dry-run"]) == 0, path
        printed = capsys.readouterr().out
        assert "runs        base" in printed or ("continual experiment" in printed and "  run " in printed), path


def test_evaluations_along_training_give_checkpoints(setup):
    config_path, out = setup
    config = yaml.safe_load(config_path.read_text())
    config["runs"] = [{"method": "lora"}]
    config["train"]["num_epochs"] = 2  # 4 optimizer steps
    config["evaluate_steps"] = [1, 3]
    config_path.write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet"]) == 0
    _, lora = json.loads((out / "results.json").read_text())
    assert [c["step"] for c in lora["checkpoints"]] == [1, 3]
    values = [c["knowledge_logprob"] for c in lora["checkpoints"]] + [lora["knowledge_logprob"]]
    assert len(set(values)) == 3  # the model moved between the points


def test_diagnose_command_and_two_knowledge_sets(setup, monkeypatch):
    config_path, out = setup
    rows = [{"prompt": f"bad thing {i}", "category": "c", "source": "harmbench"} for i in range(12)]
    monkeypatch.setattr(data, "harmful_requests", lambda source="harmbench": rows)
    config = yaml.safe_load(config_path.read_text())
    config["minus"] = [{"kind": "trivia", "n": 8, "offset": 8}, {"kind": "harmful", "n": 8, "response": "refusal"}]
    config["runs"] = [{"method": "sc_lora", "beta": [0.4, 0.4]}, {"method": "sc_lora", "beta": [0.8, 0.0]}]
    config_path.write_text(yaml.safe_dump(config))
    assert cli.main(["diagnose", str(config_path), "--output", str(out), "--quiet"]) == 0
    stats_files = sorted(p.name for p in (out / "stats").iterdir())
    assert cli.main(["diagnose", str(config_path), "--output", str(out), "--quiet", "--set", "normalize=trace",
                     "--file", "diagnostics-trace.json"]) == 0
    assert sorted(p.name for p in (out / "stats").iterdir()) == stats_files  # read from the raw sums, no new pass
    assert json.loads((out / "diagnostics-trace.json").read_text()) != json.loads((out / "diagnostics.json").read_text())
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    both, first = diagnostics["sc_lora-beta0.4+0.4"], diagnostics["sc_lora-beta0.8+0.0"]
    assert {"minus_0", "minus_1", "plus"} <= set(both[0])
    assert all(0 <= e[k] <= 1 + 1e-9 for e in both + first for k in ("plus", "minus_0", "minus_1"))
    assert [e["minus_1"] for e in first] != [e["minus_1"] for e in both]  # the weights change the subspace
    config["runs"] = [{"method": "corda_kpa"}]
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="corda_kpa preserves one knowledge set but 2 were given"):
        load_config(config_path)


def test_safety_refusals_are_compared_item_by_item_and_refreshed(tmp_path):
    from sclora.experiments.folder import _refresh_paired, paired_metrics

    base = {"harmfulness_rate": [0.0, 0.0, 0.0, 100.0], "knowledge_mc": [100.0, 0.0]}
    run = {"harmfulness_rate": [100.0, 100.0, 0.0, 0.0], "knowledge_mc": [0.0, 0.0]}
    result = paired_metrics(base, run)
    assert (result["safety_refusals_lost"], result["safety_refusals_gained"]) == (2, 1)
    assert result["safety_refusals_kept"] == pytest.approx(100 / 3)
    assert (result["knowledge_lost"], result["knowledge_gained"]) == (1, 0)
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "base.json").write_text(json.dumps(base))
    (tmp_path / "samples" / "lora.json").write_text(json.dumps(run))
    rows = [{"run": "base"}, {"run": "lora", "knowledge_mc": 0.0}]
    _refresh_paired(tmp_path, rows)
    assert rows[1]["safety_refusals_lost"] == 2 and "safety_refusals_lost" not in rows[0]


def test_a_rerun_of_a_finished_experiment_writes_refreshed_comparisons(setup):
    config_path, out = setup
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet"]) == 0
    rows = json.loads((out / "results.json").read_text())
    stale = [{k: v for k, v in r.items() if not k.startswith("knowledge_") or k == "knowledge_logprob"} for r in rows]
    (out / "results.json").write_text(json.dumps(stale))
    (out / "samples" / "lora.json").write_text(json.dumps({"knowledge_mc": [0.0, 100.0]}))
    (out / "samples" / "base.json").write_text(json.dumps({"knowledge_mc": [100.0, 100.0]}))
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet"]) == 0
    lora = json.loads((out / "results.json").read_text())[1]
    assert lora["run"] == "lora" and (lora["knowledge_lost"], lora["knowledge_gained"]) == (1, 0)


def _hold_claim(out, name, then):
    """A process that claims run ``name`` in ``out`` and then runs ``then`` (e.g. sleeps)."""
    import subprocess
    import sys

    code = (f"import sys, time; from pathlib import Path; from sclora.experiments.folder import claim_run; "
            f"c = claim_run(Path({str(out)!r}), {name!r}); print('held' if c else 'busy', flush=True); {then}")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_runs_claimed_by_a_live_process_are_left_to_it_and_dead_claims_are_taken_over(setup, capsys):
    import signal

    from sclora.experiments.folder import claim_run, release_run

    config_path, out = setup
    holder = _hold_claim(out, "lora", "time.sleep(600)")
    dead = _hold_claim(out, "corda_kpa", "time.sleep(600)")
    dead.send_signal(signal.SIGKILL)  # kill -9 while holding its claim: the kernel drops the lock
    dead.wait()
    (out / "claims" / "sc_lora-beta0.5.lock").write_text("")  # an empty claim file is no claim
    try:
        assert claim_run(out, "lora") is None  # alive: another worker is on it
        assert cli.main(["run", str(config_path), "--output", str(out), "--quiet"]) == 0
        assert "still running in another process: lora" in capsys.readouterr().out
        rows = json.loads((out / "results.json").read_text())
        # The live claim was skipped; the dead one's run and the empty claim's run were done.
        assert [r["run"] for r in rows] == ["base", "sc_lora-beta0.5", "corda_kpa"]
    finally:
        holder.kill()
        holder.wait()
    claim = claim_run(out, "lora")
    assert claim is not None and claim_run(out, "lora") is None  # exclusive, also to its owner's other handles
    release_run(claim)
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet"]) == 0


def test_two_processes_share_one_folder_without_redoing_or_losing_runs(setup, monkeypatch):
    import subprocess
    import sys

    config_path, out = setup
    # A second process on the same folder, with the same (test) trivia data as this one.
    code = (f"import json; from sclora import cli; from sclora.experiments import data; rows = json.loads({json.dumps(json.dumps(TRIVIA))}); "
            f"data.trivia = lambda *a, **k: rows; "
            f"raise SystemExit(cli.main(['run', {str(config_path)!r}, '--output', {str(out)!r}, '--quiet']))")
    other = subprocess.Popen([sys.executable, "-c", code], env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet"]) == 0
    assert other.wait(timeout=600) == 0
    rows = json.loads((out / "results.json").read_text())
    assert sorted(r["run"] for r in rows) == ["base", "corda_kpa", "lora", "sc_lora-beta0.5"]  # each run once
    for row in rows:
        assert "knowledge_logprob" in row and (row["run"] == "base" or row["loss_history"])
    from sclora.experiments.folder import running_elsewhere

    assert running_elsewhere(out, ["base", "lora", "sc_lora-beta0.5", "corda_kpa"]) == []  # every claim released

    launched = []
    monkeypatch.setattr(subprocess, "Popen", lambda command, env: launched.append((command, env)) or
                        type("Done", (), {"wait": lambda self: 0, "args": command})())
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet", "--workers", "3",
                     "--set", "r=2"]) == 0
    assert len(launched) == 2 and all(c[c.index("--output") + 1] == str(out) and "--set=r=2" in c
                                      and e["OMP_NUM_THREADS"] == "1" for c, e in launched)
    with pytest.raises(SystemExit, match="--workers must be >= 1"):
        cli.main(["run", str(config_path), "--output", str(out), "--workers", "0"])


def test_a_run_may_use_another_normalization_of_the_same_statistics(setup):
    config_path, out = setup
    config = yaml.safe_load(config_path.read_text())
    config["runs"] = [{"method": "sc_lora", "beta": 0.5}, {"method": "sc_lora", "beta": 0.5, "normalize": "trace"}]
    config_path.write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet"]) == 0
    rows = {r["run"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {"base", "sc_lora-beta0.5", "sc_lora-beta0.5-trace"}
    assert rows["sc_lora-beta0.5"]["knowledge_logprob"] != rows["sc_lora-beta0.5-trace"]["knowledge_logprob"]
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert diagnostics["sc_lora-beta0.5"] != diagnostics["sc_lora-beta0.5-trace"]
    names = sorted(p.name.rsplit("-", 1)[0] for p in (out / "stats").glob("*.safetensors"))
    assert names == ["minus-output-raw", "plus-output-raw"]  # no second pass
    config["runs"] = [{"method": "sc_lora", "beta": 0.5, "normalize": "l2"}]
    with pytest.raises(ValueError, match="normalize must be one of .* got 'l2'"):
        load_config_from(config)


def load_config_from(config):
    from sclora.experiments.spec import ExperimentConfig

    return ExperimentConfig(**config)


def test_an_experiment_on_a_users_files_and_a_changed_file_is_stale(tmp_path, monkeypatch):
    from sclora.experiments.folder import StaleResultsError

    words = "paris rome berlin one two three four five six seven eight nine ten".split()
    rows = [{"question": f"what is {a} plus {b}", "answer": f"{a} {b} ."} for a in words for b in words[:4]]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = tmp_path / "keep.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is the capital of {w}"},
                                                     {"role": "assistant", "content": f"the capital is {w}"}]}) + "\n"
                            for w in words))
    mapped = {"path": str(qa), "prompt": "question", "response": "answer"}
    config = tiny_experiment(save_tiny_model(tmp_path / "model"), plus={**mapped, "n": 8},
                             minus={"path": str(chat), "n": 8}, train_data={**mapped, "n": 8, "offset": 8},
                             evaluate={"math_nll": {**mapped, "n": 6, "offset": 20}},
                             runs=[{"method": "sc_lora", "beta": 0.5}])
    path, out = tmp_path / "files.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(path), "--output", str(out), "--quiet"]) == 0
    rows_out = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in rows_out] == ["base", "sc_lora-beta0.5"] and rows_out[1]["math_nll"] > 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert len(saved["plus"]["sha256"]) == 64  # the file's contents are part of the settings
    with open(qa, "a") as f:  # the same path, other contents
        f.write(json.dumps({"question": "what is ten plus ten", "answer": "ten ten ."}) + "\n")
    with pytest.raises(StaleResultsError, match="sha256"):
        cli.main(["run", str(path), "--output", str(out), "--quiet"])


def test_a_run_with_beta_auto_records_the_beta_it_chose(setup):
    config_path, out = setup
    config = yaml.safe_load(config_path.read_text())
    config["runs"] = [{"method": "sc_lora", "beta": "auto", "preserve_budget": 0.3}]
    config_path.write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet"]) == 0
    row = json.loads((out / "results.json").read_text())[1]
    assert row["run"] == "sc_lora-betaauto-budget0.3" and 0 <= row["beta"] <= 1
    assert row["beta_auto_budget"] == 0.3 and row["beta_auto_minus_energy"] <= 0.3
    config["runs"] = [{"method": "sc_lora", "beta": "auto"}]
    with pytest.raises(ValueError, match="needs preserve_budget"):
        load_config_from(config)


def test_a_locked_run_trains_half_the_parameters_and_is_named_so(setup):
    config_path, out = setup
    config = yaml.safe_load(config_path.read_text())
    config["runs"] = [{"method": "sc_lora", "beta": 0.5}, {"method": "sc_lora", "beta": 0.5, "lock_subspace": True}]
    config_path.write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet"]) == 0
    rows = {r["run"]: r for r in json.loads((out / "results.json").read_text())}
    free, locked = rows["sc_lora-beta0.5"], rows["sc_lora-beta0.5-locked"]
    assert 0 < locked["trainable_params"] < free["trainable_params"]  # A only (B frozen at Q)


def _unaligned_and_config(config_path):
    """A second tiny model to stand for the unaligned base of Safe LoRA's pair, and the experiment's config."""
    from conftest import tiny_llama, tiny_tokenizer

    unaligned = config_path.parent / "unaligned"
    tiny_llama(seed=5).save_pretrained(unaligned)
    tiny_tokenizer().save_pretrained(unaligned)
    return unaligned, yaml.safe_load(config_path.read_text())


def test_safe_lora_runs_project_the_trained_lora_and_mica_trains_only_a(setup):
    config_path, out = setup
    unaligned, config = _unaligned_and_config(config_path)
    config["runs"] = [{"method": "lora", "safe_lora": {"unaligned": str(unaligned), "num_proj_layers": 3}},
                      {"method": "mica"}]
    config_path.write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet"]) == 0
    rows = {r["run"]: r for r in json.loads((out / "results.json").read_text())}
    safe = rows["lora-safelora"]
    assert safe["method"] == "safe_lora" and safe["safe_lora_projected"] == 3 and safe["safe_lora_layers"] > 3
    assert -1 <= safe["safe_lora_threshold"] <= 1
    assert rows["mica"]["trainable_params"] < safe["trainable_params"]  # MiCA: A only
    assert "trained_in" not in safe  # no plain LoRA twin in this config: it trained its own adapter
    for bad, match in (({"method": "sc_lora", "beta": 0.5, "safe_lora": {"unaligned": "x"}}, "has none"),
                       ({"method": "lora", "safe_lora": {"num_proj_layers": 3}}, "takes a mapping with unaligned"),
                       ({"method": "lora", "safe_lora": {"unaligned": "x", "threshold": 2}}, "cosine in")):
        config["runs"] = [bad]
        with pytest.raises(ValueError, match=match):
            load_config_from(config)


def test_a_safe_lora_run_projects_its_finished_lora_twin_instead_of_training_it_again(setup):
    from safetensors.torch import load_file

    config_path, out = setup
    unaligned, config = _unaligned_and_config(config_path)
    safe_run = {"method": "lora", "learning_rate": 1e-3,
                "safe_lora": {"unaligned": str(unaligned), "num_proj_layers": 3}}
    config["runs"] = [safe_run]
    alone = config_path.parent / "alone.yaml"
    alone.write_text(yaml.safe_dump(config))
    config["runs"] = [{"method": "lora", "learning_rate": 1e-3}, {"method": "lora", "learning_rate": 1e-2}, safe_run]
    config_path.write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(alone), "--output", str(out.parent / "alone"), "--quiet"]) == 0
    assert cli.main(["run", str(config_path), "--output", str(out), "--quiet"]) == 0
    rows = {r["run"]: r for r in json.loads((out / "results.json").read_text())}
    reused = rows["lora-lr0.001-safelora"]
    trained = {r["run"]: r for r in json.loads((out.parent / "alone" / "results.json").read_text())}[reused["run"]]
    assert reused["trained_in"] == "lora-lr0.001" and "trained_in" not in trained  # the twin at its own rate
    assert reused["loss_history"] == rows["lora-lr0.001"]["loss_history"] == trained["loss_history"]
    assert not list((out / "runs" / reused["run"]).glob("checkpoint-*"))  # no training of its own
    # the same projected adapter as the run that trained its LoRA itself (CPU training is deterministic)
    a = load_file(out / "runs" / reused["run"] / "adapter" / "adapter_model.safetensors")
    b = load_file(out.parent / "alone" / "runs" / reused["run"] / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert reused["safe_lora_projected"] == trained["safe_lora_projected"] == 3
    # ...and it differs from the unprojected twin's adapter in the projected layers
    twin = load_file(out / "runs" / "lora-lr0.001" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.allclose(a[k], twin[k]) for k in a)

