"""Reliability of experiment folders: stale results refused, names kept inside, bad values caught before any work
(also under property-based fuzzing), concurrent workers that lose and duplicate nothing even when one is killed."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import TRIVIA, save_tiny_model, tiny_experiment, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sclora import cli, fileio
from sclora.data import resolve_data
from sclora.experiments import data
from sclora.experiments.folder import StaleResultsError
from sclora.experiments.spec import load_config
from sclora.fileio import parse_yaml

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny_model(tmp_path / "model")


def base_config(model_dir, **changes) -> dict:
    """The tiny experiment with one named SC-LoRA run and a short training (each run takes seconds)."""
    return tiny_experiment(model_dir, **{
        "name": "rel", "train_data": {"kind": "trivia", "n": 4, "offset": 16},
        "train": {"learning_rate": 1e-2, "batch_size": 4, "micro_batch_size": 2, "max_length": 32},
        "evaluate": {"knowledge_logprob": {"kind": "trivia", "n": 4, "offset": 24}},
        "runs": [{"method": "sc_lora", "beta": 0.5, "name": "sc"}], **changes})


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# --- 1. stale results and statistics -------------------------------------------------------------------------


def test_a_changed_config_never_mixes_with_old_rows_and_archive_starts_afresh(model_dir, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setattr(data, "trivia", lambda *a, **k: TRIVIA)
    out = tmp_path / "out"
    config = write(tmp_path / "c.yaml", base_config(model_dir))
    assert cli.main(["run", str(config), "--output", str(out), "--quiet"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert all(len(r["fingerprint"]) == 16 for r in first)

    from sclora import models

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the folder was checked")

    with monkeypatch.context() as mp:
        mp.setattr(models, "load_model", no_loading)
        for changes, shown in [({"r": 4}, "r: 2 -> 4"), ({"stats_seq_len": 12}, "stats_seq_len: 16 -> 12"),
                               ({"plus": {"kind": "trivia", "n": 6}}, "plus.n: 8 -> 6"),
                               ({"runs": [{"method": "sc_lora", "beta": 0.9, "name": "sc"}]}, "run 'sc'")]:
            write(tmp_path / "c2.yaml", base_config(model_dir, **changes))
            with pytest.raises(StaleResultsError, match="other settings") as err:
                cli.main(["run", str(tmp_path / "c2.yaml"), "--output", str(out), "--quiet"])
            assert shown in str(err.value) and "--archive" in str(err.value)
        assert json.loads((out / "results.json").read_text()) == first  # nothing touched
        # the command prints it as one message, no traceback
        capsys.readouterr()
        assert cli.entry(["run", str(tmp_path / "c2.yaml"), "--output", str(out), "--quiet"]) == 2
        assert capsys.readouterr().err.startswith(f"sclora: {out} holds results made with other settings")
        assert yaml.safe_load((out / "config.yaml").read_text())["r"] == 2

    # Adding a run, or renaming the experiment, is not a change of settings: the old rows stay valid.
    more = base_config(model_dir, name="renamed", runs=[{"method": "sc_lora", "beta": 0.5, "name": "sc"},
                                                        {"method": "lora"}])
    assert cli.main(["run", str(write(tmp_path / "c3.yaml", more)), "--output", str(out), "--quiet"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in rows] == ["base", "sc", "lora"] and rows[:2] == first

    # --archive moves the old rows aside and runs the new settings from scratch; statistics stay cached
    stats_before = sorted(p.name for p in (out / "stats").iterdir())
    changed = base_config(model_dir, r=4)
    assert cli.main(["run", str(write(tmp_path / "c4.yaml", changed)), "--output", str(out), "--quiet",
                     "--archive"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in rows] == ["base", "sc"] and rows[1]["trainable_params"] != first[1]["trainable_params"]
    archived = list((out / "archive").iterdir())
    assert len(archived) == 1 and len(json.loads((archived[0] / "results.json").read_text())) == 3
    assert sorted(p.name for p in (out / "stats").iterdir()) == stats_before  # same data, model, targets: reused


def test_replaced_model_weights_at_the_same_path_are_a_change(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "trivia", lambda *a, **k: TRIVIA)
    out, config = tmp_path / "out", write(tmp_path / "c.yaml", base_config(model_dir))
    assert cli.main(["run", str(config), "--output", str(out), "--quiet"]) == 0
    assert cli.main(["run", str(config), "--output", str(out), "--quiet"]) == 0  # unchanged: nothing to do
    tiny_llama(seed=5).save_pretrained(model_dir)  # the user retrained the model in place
    with pytest.raises(StaleResultsError, match="the files of model .* changed"):
        cli.main(["run", str(config), "--output", str(out), "--quiet"])


def test_statistics_cache_is_keyed_by_what_made_it(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "trivia", lambda *a, **k: TRIVIA)
    from sclora.statistics import CovarianceStats

    init = tmp_path / "init"

    def init_with(plus="trivia:4", seq_len="16"):
        return cli.main(["init", "--model", str(model_dir), "--plus", plus, "--minus", "trivia:4:8", "--r", "2",
                         "--seq-len", seq_len, "--output", str(init), "--quiet"])

    assert init_with() == 0
    assert init_with(plus="trivia:6") == 0  # 6 samples instead of 4: a new file
    assert init_with(seq_len="20") == 0  # a longer seq_len that cuts nothing: the same tokens, the same file
    assert init_with(seq_len="5") == 0  # one that truncates: a new file (D+ and D-)
    plus = sorted((init / "stats").glob("plus-*.safetensors"))
    assert len(plus) == 3 and len(list((init / "stats").glob("minus-*.safetensors"))) == 2
    assert sorted(CovarianceStats.load(p).n_samples for p in plus) == [4, 4, 6]
    assert not list(tmp_path.rglob("*.tmp-*"))
    assert json.loads((init / "init_args.json").read_text())["seq_len"] == 5


# --- 2/3. checkpoints, exports, names -----------------------------------------------------------------------------


def test_a_leftover_of_a_killed_export_does_not_block_the_next(tmp_path):
    from peft import LoraConfig, get_peft_model

    from sclora.export import export_lora

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.sclora_initial_adapter = {f"{n}.lora_{x}": getattr(m, f"lora_{x}")["default"].weight.detach().clone()
                                    for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")
                                    for x in "AB"}
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter.old").mkdir()  # what the old export left when killed between its two renames
    (tmp_path / "adapter.old" / "adapter_model.safetensors").write_bytes(b"partial")
    export_lora(model, tmp_path / "adapter")
    export_lora(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 100
    assert not [p for p in tmp_path.iterdir() if fileio.TMP_MARKER in p.name]


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs", "a/b", "..", "", ".hidden", "x" * 200, 7])
def test_run_names_that_would_leave_the_folder_are_refused(model_dir, tmp_path, name):
    config = write(tmp_path / "c.yaml", base_config(model_dir, runs=[{"method": "lora", "name": name}]))
    with pytest.raises(ValueError, match="run name .* cannot be used as a file name"):
        cli.main(["run", str(config), "--dry-run"])
    assert not (tmp_path.parent / "escaped").exists()


def test_diagnostics_file_name_stays_in_the_folder(model_dir, tmp_path):
    config = write(tmp_path / "c.yaml", base_config(model_dir))
    with pytest.raises(ValueError, match="--file '../x.json' cannot be used as a file name"):
        cli.main(["diagnose", str(config), "--output", str(tmp_path / "out"), "--file", "../x.json", "--quiet"])


def test_duplicate_run_names_are_refused(model_dir, tmp_path):
    runs = [{"method": "lora", "seed": 1}, {"method": "pissa", "name": "lora-seed1"}]
    with pytest.raises(ValueError, match="Two runs are named 'lora-seed1'"):
        cli.main(["run", str(write(tmp_path / "c.yaml", base_config(model_dir, runs=runs))), "--dry-run"])


# --- 4. errors before any work ---------------------------------------------------------------------------------------

BAD = [  # (changes, the key the message must name)
    ({"r": 0}, "r must be a positive integer"), ({"normalize": "tracee"}, "normalize"), ({"dtype": "float33"}, "dtype"),
    ({"runs": [{"method": "sc_lora", "beta": 1.5}]}, "beta"), ({"seed": "x"}, "seed"), ({"seed": 1.5}, "seed"),
    ({"model": "/nowhere/model"}, "/nowhere/model"), ({"plus": {"kind": "math", "n": 4, "split": "hedlout"}}, "split"),
    ({"plus": {"kind": "trivia", "n": True}}, "n of data spec"), ({"stats_seq_len": 1}, "stats_seq_len"),
    ({"lora_alpha": float("nan")}, "lora_alpha"), ({"runs": [{"method": "lora", "learning_rate": "fast"}]},
                                                    "learning_rate"),
    ({"runs": [{"method": "lora", "seed": -1}]}, "seed"), ({"judge": {"kind": "llm"}}, "base_url"),
    ({"judge": {"kind": "llm", "base_url": "http://example.com/v1", "model": "m"}}, "http"),
    ({"evaluate": {"knowledge_mc": {"kind": "trivia", "n": 4, "offset": 24, "n_choices": 1}}}, "n_choices"),
    ({"evaluate_steps": [0]}, "evaluate_steps"), ({"diagnostics": "yes"}, "diagnostics"),
    ({"plus": {"kind": "harmful", "n": 4, "source": "harmbenc"}}, "source"), ({"plus": 5}, "plus"),
    ({"plus": {"kind": "trivia"}}, "lacks the key(s) ['n']"), ({"train": {"learning_rate": float("inf")}}, "finite"),
]


@pytest.mark.parametrize("changes,named", BAD)
def test_every_bad_value_fails_the_dry_run_naming_it(model_dir, tmp_path, changes, named):
    config = write(tmp_path / "c.yaml", base_config(model_dir, **changes))
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        cli.main(["run", str(config), "--dry-run"])
    assert named in str(err.value)


def test_cli_values_are_parsed_as_people_write_them(model_dir, tmp_path, capsys):
    assert cli.yaml_overrides(["learning_rate=2e-4", "n=1e3", "name=x"]) == {"learning_rate": 2e-4, "n": 1000.0,
                                                                             "name": "x"}
    config = write(tmp_path / "c.yaml", {**base_config(model_dir), "train": {"learning_rate": "2e-4"}})
    config.write_text(config.read_text().replace("'2e-4'", "2e-4"))  # as a person types it in YAML
    assert load_config(config).train["learning_rate"] == 2e-4
    assert cli.main(["run", str(config), "--dry-run", "--set", "r=4"]) == 0
    for spec, said in [("math:4:x", "whole numbers"), ("math", "kind:n"), ("math:4:0:hedlout", "split"),
                       ("math:4:0:train:extra", "kind:n"), ("poems:4", "no installed package knows this name"),
                       ("safety:x", "safety:N")]:
        with pytest.raises(ValueError, match=said):
            resolve_data(spec)


@pytest.mark.parametrize("flags,said", [(["--r", "0"], "r must be a positive integer"), (["--beta", "1.5"], "beta"),
                                        (["--plus", "trivia:4:x"], "whole numbers"), (["--seq-len", "1"], "--seq-len"),
                                        (["--model", "/nowhere/m"], "/nowhere/m"), (["--plus", "trivia:500"], "only")])
def test_init_rejects_bad_arguments_before_loading_the_model(model_dir, tmp_path, monkeypatch, flags, said):
    from sclora import models

    monkeypatch.setattr(data, "trivia", lambda *a, **k: TRIVIA)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = {"--model": str(model_dir), "--plus": "trivia:4", "--minus": "trivia:4:8", "--r": "2", "--seq-len": "16",
            **dict(zip(flags[::2], flags[1::2]))}
    with pytest.raises((SystemExit, ValueError, FileNotFoundError), match=said):
        cli.main(["init", *[x for kv in args.items() for x in kv], "--output", str(tmp_path / "i"), "--quiet"])
    assert not (tmp_path / "i").exists()  # nothing written either


NUMBERS = st.one_of(st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans())
JUNK = st.one_of(NUMBERS, st.none(), st.text(max_size=6).filter(lambda t: parse_yaml(yaml.safe_dump(t)) == t),
                 st.lists(st.integers(0, 3), max_size=2), st.sampled_from(["float32", "trace", "none", "train"]))


def _number(v, low, *, open_low=False, high=None):
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and (v > low if open_low else v >= low) and (high is None or v <= high))


def _integer(v, low):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


#: key -> (where it goes in the config, the test of a valid value)
FUZZED = {
    "r": (lambda c, v: c.update(r=v), lambda v: _integer(v, 1)),
    "seed": (lambda c, v: c.update(seed=v), lambda v: _integer(v, 0)),
    "stats_batch_size": (lambda c, v: c.update(stats_batch_size=v), lambda v: _integer(v, 1)),
    "stats_seq_len": (lambda c, v: c.update(stats_seq_len=v), lambda v: _integer(v, 2)),
    "lora_alpha": (lambda c, v: c.update(lora_alpha=v), lambda v: v is None or _number(v, 0, open_low=True)),
    "dtype": (lambda c, v: c.update(dtype=v), lambda v: v in ("float32", "bfloat16", "float16")),
    "normalize": (lambda c, v: c.update(normalize=v), lambda v: v in ("none", "max_abs", "trace")),
    "diagnostics": (lambda c, v: c.update(diagnostics=v), lambda v: isinstance(v, bool)),
    "beta": (lambda c, v: c["runs"][0].update(beta=v), 
             lambda v: v is None or _number(v, 0, high=1) or (isinstance(v, list) and len(v) == 1 and
                                                              _number(v[0], 0, high=1))),  # None: default
    "learning_rate": (lambda c, v: c["runs"][0].update(learning_rate=v),
                      lambda v: v is None or _number(v, 0, open_low=True)),
    "n of data spec": (lambda c, v: c["plus"].update(n=v), lambda v: _integer(v, 1)),
    "offset of data spec": (lambda c, v: c["minus"].update(offset=v), lambda v: _integer(v, 0)),
    "batch_size": (lambda c, v: c["train"].update(batch_size=v, micro_batch_size=1), lambda v: _integer(v, 1)),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(FUZZED)), value=JUNK)
def test_fuzzed_config_values_pass_the_dry_run_only_when_valid(model_dir, key, value):
    config = base_config(model_dir)
    place, valid = FUZZED[key]
    place(config, value)
    path = model_dir.parent / "fuzz.yaml"
    write(path, config)
    if valid(value):
        assert cli.main(["run", str(path), "--dry-run"]) == 0
    else:
        with pytest.raises(ValueError) as err:  # never a TypeError or a traceback from deep inside
            cli.main(["run", str(path), "--dry-run"])
        assert key.split(" of ")[0] in str(err.value), (key, value, str(err.value))


# --- 6. concurrency --------------------------------------------------------------------------------------------------


def _spawn(code: str):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_concurrent_updates_of_one_json_file_lose_nothing(tmp_path):
    path = tmp_path / "diagnostics.json"
    procs = [_spawn(f"""
        from sclora.fileio import update_json
        for i in range(100):
            update_json({str(path)!r}, "w{w}-" + str(i), i)
    """) for w in range(4)]
    assert all(p.wait(timeout=300) == 0 for p in procs), [p.stderr.read() for p in procs]
    assert len(json.loads(path.read_text())) == 400  # 4 writers x 100 entries, none lost
    assert not [p for p in tmp_path.iterdir() if fileio.TMP_MARKER in p.name]


WORKER = """
    import json, os, random, sys, time
    from pathlib import Path
    from sclora import cli
    from sclora.experiments import runner as experiment

    log = {log!r}
    def note(event, name):
        with open(log, "a") as f:  # O_APPEND: whole lines, never interleaved
            f.write(json.dumps([event, name, os.getpid()]) + "\\n")

    class Stub:  # no model: the claims, the checks and the shared table are what is under test
        def __init__(self, *a, **k):
            self.tokenizer, self.eval_sets, self.sets, self.options, self.base = None, {{}}, {{}}, {{}}, None

    def evaluate_model(*a, **k):
        note("start", "base"); time.sleep(random.uniform(0, 0.05)); note("end", "base")
        return {{"m": 1.0, "pid": os.getpid()}}, {{}}

    def run_one(config, exp, run, name, out, evaluate, fingerprint, twin=None):
        note("start", name)
        time.sleep(random.uniform(0, 0.08))
        note("end", name)
        return {{"run": name, "method": run["method"], "m": float(run["seed"]), "pid": os.getpid()}}

    experiment._Experiment, experiment.evaluate_model, experiment._run_one = Stub, evaluate_model, run_one
    experiment.scorer_extras = lambda *a: {{}}
    code = cli.main(["run", {config!r}, "--output", {out!r}, "--quiet"])
    sys.exit(code)
"""


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_concurrent_workers_run_every_run_once_even_when_one_is_killed(model_dir, tmp_path, workers):
    runs = [{"method": "lora", "seed": i} for i in range(12)]
    config = write(tmp_path / "c.yaml", base_config(model_dir, runs=runs))
    out, log = tmp_path / "out", tmp_path / "events.jsonl"
    rng = random.Random(workers)
    for repeat in range(2):
        if out.exists():
            import shutil

            shutil.rmtree(out)
        log.write_text("")
        script = WORKER.format(log=str(log), config=str(config), out=str(out))
        procs = [_spawn(script) for _ in range(workers)]
        nth, deadline = rng.randint(1, 6), time.monotonic() + 120
        while len(started := [json.loads(line) for line in log.read_text().splitlines() if '"start"' in line]) < nth:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        victim = next(p for p in procs if p.pid == started[nth - 1][2])  # kill -9 inside the n-th run, claim held
        victim.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(timeout=300)
            # 3: "not finished" - a survivor that passed a run while the victim held it, before it died
            assert p is victim or p.returncode in (0, 3), p.stderr.read()
        final = _spawn(script)  # a rerun finishes whatever the killed worker held
        assert final.wait(timeout=300) == 0, final.stderr.read()

        rows = json.loads((out / "results.json").read_text())
        names = [r["run"] for r in rows]
        expected = ["base", *(f"lora-seed{i}" for i in range(12))]
        assert sorted(names) == sorted(expected)  # every run once: none lost, none duplicated
        events = [json.loads(line) for line in log.read_text().splitlines()]
        by_row = {r["run"]: r.get("pid") for r in rows}
        for name in expected:
            mine = [e for e in events if e[1] == name]
            survivor_ends = [e for e in mine if e[0] == "end" and e[2] != victim.pid]
            # Finished exactly once: by a survivor, or by the victim before it died (then nobody ran it again). A
            # victim killed after its run's last line but before its row was written leaves the run to another.
            if by_row[name] == victim.pid:
                assert not survivor_ends, (repeat, name, mine)
            else:
                assert len(survivor_ends) == 1, (repeat, name, mine)
            for first, second in zip(mine, mine[1:]):  # never two processes inside one run at once
                own_end = second == ["end", name, first[2]]
                assert first[0] == "end" or own_end or first[2] == victim.pid, (repeat, name, mine)


def test_concurrent_first_use_of_the_embedded_model_converts_once(tmp_path):
    code = f"""
        import time
        import transformers
        from sclora import models
        from conftest import tiny_llama, tiny_tokenizer
        models._gguf_source = lambda: {str(tmp_path)!r}
        def slow_model(*a, **k):
            time.sleep(1.0)  # a conversion takes long: make the processes overlap
            return tiny_llama()
        transformers.AutoModelForCausalLM.from_pretrained = slow_model
        transformers.AutoTokenizer.from_pretrained = lambda *a, **k: tiny_tokenizer()
        print(models.embedded_model_path())
    """
    env = {**ENV, "SCLORA_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(Path(__file__).parent)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-1500:] for _, e in outputs]
    folder = tmp_path / "cache" / "models"
    assert len({o.strip() for o, _ in outputs}) == 1 and (folder / "SmolLM2-135M-Instruct" / "config.json").exists()
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == ["SmolLM2-135M-Instruct"]
