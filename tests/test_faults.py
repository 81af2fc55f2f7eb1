"""Fault injection on the tiny model: `sclora run` killed with SIGKILL at chosen points, then rerun.

Each fault runs the experiment in a child process that kills itself (kill -9: no cleanup, no finally) at a
chosen point: while collecting statistics, while Trainer saves a checkpoint (mid-file), while evaluating, and
between writing results.json's temp file and renaming it. The rerun, in this process, must finish and give
exactly the rows, per-item scores and statistics files of an uninterrupted run (timings aside).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from conftest import TRIVIA, save_tiny_model, tiny_experiment

from sclora import cli
from sclora.experiments import data

#: per-call timings and throughputs differ between any two runs; everything else must be equal
TIMINGS = ("init_seconds", "train_seconds", "train_tokens_per_second")

#: the fault points: code run in the child before `sclora run`; each kills the child at some moment with
#: kill_at(owner, attribute, n, counts=...): SIGKILL on the n-th call of owner.attribute that ``counts``
FAULTS = {
    # the 5th Gram update: the D+ statistics are half collected
    "statistics": """
        import sclora.statistics as st
        kill_at(st, "add_gram_upper", 5)
    """,
    # the 2nd checkpoint of the first trained run: weights, optimizer and scheduler written, trainer_state.json
    # half written (Trainer writes it last, directly, not atomically)
    "checkpoint": """
        from transformers.trainer_callback import TrainerState
        def half_written(self, path):
            text = json.dumps(self.__dict__, default=str)
            with open(path, "w") as f:
                f.write(text[: len(text) // 2])
        kill_at(TrainerState, "save_to_json", 2, before=half_written)
    """,
    # the 3rd evaluation (base, first run, then the second run's): mid-way through the experiment
    "evaluation": """
        from sclora.experiments.evaluate import scores
        kill_at(scores, "knowledge_logprob", 3)
    """,
    # the 2nd write of results.json: its temp file is complete and fsync'd, the rename has not happened
    "results_write": """
        kill_at(os, "replace", 2, counts=lambda src, dst, *a, **k: str(dst).endswith("results.json"))
    """,
}

KILL_AT = """
    def kill_at(owner, attribute, n, counts=lambda *a, **k: True, before=None):
        real, calls = getattr(owner, attribute), [0]
        def wrapper(*a, **k):
            calls[0] += counts(*a, **k)
            if calls[0] == n and counts(*a, **k):
                if before is not None:
                    before(*a, **k)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        setattr(owner, attribute, wrapper)
"""


def child_script(config_path, out, fault: str) -> str:
    """The child's code: ``fault`` (code calling kill_at) installed, then `sclora run`."""
    return textwrap.dedent(f"""
        import json, os, signal
        from sclora import cli
        from sclora.experiments import data
        rows = json.loads({json.dumps(json.dumps(TRIVIA))})
        data.trivia = lambda *a, **k: rows
    """) + textwrap.dedent(KILL_AT) + textwrap.dedent(fault) + textwrap.dedent(f"""
        raise SystemExit(cli.main(["run", {str(config_path)!r}, "--output", {str(out)!r}, "--quiet"]))
    """)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The children run at one thread (``OMP_NUM_THREADS=1``); the reference and the reruns in this process must
    too, or a rerun resumed from a child's checkpoint mixes two thread counts' rounding and differs from the
    reference in the last bits, whatever thread count the test process was started with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, one_thread):
    """A small config and its uninterrupted result (computed once for every fault)."""
    root = tmp_path_factory.mktemp("faults")
    config = tiny_experiment(save_tiny_model(root / "model"),
                             runs=[{"method": "sc_lora", "beta": 0.5}, {"method": "lora"}])
    path = root / "faults.yaml"
    path.write_text(yaml.safe_dump(config))
    reference = root / "reference"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "trivia", lambda *a, **k: TRIVIA)
        assert cli.main(["run", str(path), "--output", str(reference), "--quiet"]) == 0
    return path, reference


def snapshot(out):
    """Everything a run produces that must not depend on being interrupted."""
    rows = json.loads((out / "results.json").read_text())
    rows = sorted(({k: v for k, v in r.items() if k not in TIMINGS and not k.endswith("_seconds")} for r in rows),
                  key=lambda r: r["run"])
    samples = {p.name: p.read_bytes() for p in sorted((out / "samples").iterdir())}
    stats = {p.name: p.read_bytes() for p in sorted((out / "stats").glob("*.safetensors"))}
    return rows, samples, stats


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_run_killed_at_any_point_reruns_to_the_uninterrupted_result(experiment, fault, tmp_path, monkeypatch):
    config_path, reference = experiment
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", child_script(config_path, out, FAULTS[fault])],
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]  # it really died at the fault point
    if fault == "checkpoint":  # the half-written checkpoint is there, as a killed Trainer leaves it
        assert any(not (p / "trainer_state.json").exists() or len((p / "trainer_state.json").read_text()) < 2000
                   for p in (out / "runs").glob("*/checkpoint-2"))
    monkeypatch.setattr(data, "trivia", lambda *a, **k: TRIVIA)
    with pytest.warns(UserWarning, match="incomplete checkpoint") if fault == "checkpoint" else _no_check():
        assert cli.main(["run", str(config_path), "--output", str(out), "--quiet"]) == 0
    assert snapshot(out) == snapshot(reference)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name and fault != "results_write"]


class _no_check:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False



def test_a_run_killed_in_its_second_evaluation_keeps_the_first(tmp_path, monkeypatch):
    """Killed (SIGKILL) during a trained run's second evaluation: the rerun loads the first evaluation that run
    finished (runs/<run>/evaluations/) instead of running it again, and ends with the uninterrupted result."""
    from sclora.experiments.evaluate import scores

    config = tiny_experiment(save_tiny_model(tmp_path / "model"), runs=[{"method": "lora"}],
                             evaluate={"knowledge_logprob": {"kind": "trivia", "n": 6, "offset": 24},
                                       "knowledge_mc": {"kind": "trivia", "n": 6, "offset": 30, "n_choices": 2}})
    path = tmp_path / "two-evals.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(data, "trivia", lambda *a, **k: TRIVIA)
    reference = tmp_path / "reference"
    assert cli.main(["run", str(path), "--output", str(reference), "--quiet"]) == 0

    out = tmp_path / "out"
    fault = """
        from sclora.experiments.evaluate import scores
        kill_at(scores, "knowledge_mc", 2)  # the base's is the 1st: the trained run's logprob is done by then
    """
    child = subprocess.run([sys.executable, "-c", child_script(path, out, fault)],
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert (out / "runs" / "lora" / "evaluations" / "knowledge_logprob.json").exists()
    assert not (out / "runs" / "lora" / "evaluations" / "knowledge_mc.json").exists()
    calls = {"knowledge_logprob": 0, "knowledge_mc": 0}
    for name in calls:
        real = getattr(scores, name)
        monkeypatch.setattr(scores, name, lambda *a, _real=real, _name=name, **k: (
            calls.__setitem__(_name, calls[_name] + 1), _real(*a, **k))[1])
    assert cli.main(["run", str(path), "--output", str(out), "--quiet"]) == 0
    assert calls == {"knowledge_logprob": 0, "knowledge_mc": 1}
    assert snapshot(out) == snapshot(reference)
