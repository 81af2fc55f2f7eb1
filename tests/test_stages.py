"""Continual fine-tuning (sclora.stages, finetune(after=...), sclora finetune --after): a stage starts from the model
the earlier ones left, keeps what they learned and kept, resumes after a kill, and refuses a chain that changed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import save_tiny_model, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file
from test_faults import KILL_AT
from test_workflow import CAPITALS, FAST, REFUSALS, TASK

import sclora
from sclora import cli, stages
from sclora.train import orthogonal_loss


def stage(tmp_path, name, data, preserve=None, *, after=None, model=None, **kwargs):
    kwargs.setdefault("config", sclora.SCLoRAConfig(r=2, beta=0.8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few steps for a real run: expected here
        return sclora.finetune(model if model is not None else tiny_llama(seed=2), tiny_tokenizer(), data, preserve,
                               after=after, output_dir=tmp_path / name, seq_len=32, show_progress=False,
                               train_config=kwargs.pop("train_config", FAST), **kwargs)


@torch.no_grad()
def logits(model, rows=TASK[:4]):
    tok = tiny_tokenizer()
    batch = tok([r["prompt"] + " " + r["response"] for r in rows], return_tensors="pt", padding=True)
    model.eval()
    return model(**batch).logits.double()


def test_a_stage_starts_from_the_model_the_earlier_one_left_and_keeps_its_task_and_knowledge(tmp_path):
    a = stage(tmp_path, "a", TASK, CAPITALS)
    trained_a = logits(a.model)
    assert json.loads((tmp_path / "a" / "stage.json").read_text())["status"] == "done"
    # the base with a's exported adapter merged in is the model a trained (the adapter is for the untouched base)
    rebuilt = stages.apply_chain(tiny_llama(seed=2), stages.read_chain(a))
    assert torch.allclose(logits(rebuilt), trained_a, atol=1e-4)
    b = stage(tmp_path, "b", REFUSALS, after=a, config=sclora.SCLoRAConfig(r=2, beta=[0.5, 0.5]))
    # D-: a's knowledge set, then a's task; statistics on the model a left; its init keeps that model (Theorem 2)
    assert b.summary["kept_sets"] == ["preserve", "task of a"]
    assert b.summary["examples"]["minus_0"] == len(CAPITALS) and b.summary["examples"]["minus_1"] == len(TASK)
    assert b.init_drift["max_abs_logit"] < 1e-4
    assert b.summary["after"] == [str((tmp_path / "a").resolve())] and "stage 2 of a chain" in b.text
    record = json.loads((tmp_path / "b" / "stage.json").read_text())
    assert [c["output_dir"] for c in record["chain"]] == [str((tmp_path / "a").resolve())]
    assert record["base"] == json.loads((tmp_path / "a" / "stage.json").read_text())["base"]
    # a third stage keeps all three sets; without keep_earlier only the knowledge set
    c = stage(tmp_path, "c", CAPITALS[:8], after=b, config=sclora.SCLoRAConfig(r=2, beta=[0.3, 0.3, 0.3]))
    assert c.summary["kept_sets"] == ["preserve", "task of a", "task of b"]
    assert torch.allclose(logits(stages.apply_chain(tiny_llama(seed=2), stages.read_chain(c))), logits(c.model),
                          atol=1e-4)
    only = stage(tmp_path, "c-knowledge-only", CAPITALS[:8], after=b, keep_earlier=False)
    assert only.summary["kept_sets"] == ["preserve"]


def test_a_finished_stage_given_the_same_inputs_again_is_read_from_disk_not_recomputed(tmp_path):
    a = stage(tmp_path, "a", TASK, CAPITALS, config=sclora.SCLoRAConfig(r=2, beta="auto", preserve_budget=0.05))
    b = stage(tmp_path, "b", REFUSALS, after=a, config=sclora.SCLoRAConfig(r=2, beta=[0.5, 0.5]))
    adapter = tmp_path / "a" / "adapter" / "adapter_model.safetensors"
    written = adapter.read_bytes(), adapter.stat().st_mtime_ns
    torch.set_num_threads(1)  # another thread count: a recomputed init would differ in its last bits
    try:
        again = stage(tmp_path, "a", TASK, CAPITALS, config=sclora.SCLoRAConfig(r=2, beta="auto", preserve_budget=0.05))
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert (adapter.read_bytes(), adapter.stat().st_mtime_ns) == written  # nothing rewritten
    assert torch.allclose(logits(again.model), logits(a.model), atol=1e-5)
    assert again.training.train_seconds == 0 and again.training.resumed_from == a.training.steps
    assert again.training.loss_history == a.training.loss_history and "already trained" in again.text
    # the summary is the stage's, training time included; only resumed_from_step says nothing was trained now
    assert {**again.summary, "resumed_from_step": None} == {**a.summary, "resumed_from_step": None}
    assert again.training.total_train_seconds == a.summary["train_seconds"] > 0
    assert again.beta_choice == a.beta_choice and again.config.beta == a.config.beta
    stage(tmp_path, "c", CAPITALS[:8], after=b, config=sclora.SCLoRAConfig(r=2, beta=[0.3, 0.3, 0.3]))  # not stale
    # other inputs (here the learning rate) into a finished stage's folder: refused before anything is written
    with pytest.raises(ValueError, match="finished stage made from other inputs.*another output folder"):
        stage(tmp_path, "a", TASK, CAPITALS, config=sclora.SCLoRAConfig(r=2, beta="auto", preserve_budget=0.05),
              train_config={**FAST, "learning_rate": FAST["learning_rate"] * 2})
    assert json.loads((tmp_path / "a" / "stage.json").read_text())["status"] == "done"
    assert adapter.stat().st_mtime_ns == written[1]


def test_one_beta_per_kept_set_and_the_error_lists_them_in_order(tmp_path):
    a = stage(tmp_path, "a", TASK, CAPITALS)
    with pytest.raises(ValueError, match=r"beta=0.8 has 1 value.*in this order: 1\. preserve; 2\. task of a; "
                                         r"3\. preserve\[0\]; 4\. preserve\[1\]\.$"):
        stage(tmp_path, "b", REFUSALS, [REFUSALS, TASK[:5]], after=a)
    assert not (tmp_path / "b").exists()  # refused before any work
    # the knowledge set given again counts once
    b = stage(tmp_path, "b", REFUSALS, CAPITALS, after=a, config=sclora.SCLoRAConfig(r=2, beta=[0.5, 0.5]))
    assert b.summary["kept_sets"] == ["preserve", "task of a"]


def test_replay_mixes_a_share_of_each_earlier_task_into_the_training_data(tmp_path):
    a = stage(tmp_path, "a", TASK, CAPITALS, config=sclora.SCLoRAConfig(method="lora", r=2))
    b = stage(tmp_path, "b", REFUSALS, after=a, replay=0.25, config=sclora.SCLoRAConfig(method="lora", r=2))
    assert b.summary["replayed_examples"] == round(0.25 * len(TASK)) == 6
    assert b.summary["examples"]["data"] == len(REFUSALS) + 6
    # LoRA keeps no D-: its summary lists none, while the chain still records the sets for a later stage that keeps
    assert a.summary["kept_sets"] == b.summary["kept_sets"] == [] and "D- sets: none" in b.text
    assert [e["name"] for e in json.loads((tmp_path / "b" / "stage.json").read_text())["preserved"]] == \
        ["preserve", "task of a"]
    # 18 examples in micro-batches of 4, 2 per step: Trainer counts the last, shorter accumulation as a step
    assert b.summary["planned_steps"] == b.training.steps == 3
    assert stages.replay_examples(stages.read_chain(a), 0.25, 0) == stages.replay_examples(stages.read_chain(a), 0.25, 0)
    assert all(row in TASK for row in stages.replay_examples(stages.read_chain(a), 0.25, 3))
    # only the stage's own task is recorded as its task: a later replay never replays a replay
    assert json.loads((tmp_path / "b" / "stage.json").read_text())["task"]["n"] == len(REFUSALS)
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(ValueError, match="replay must be a share"):
            stage(tmp_path, "bad", REFUSALS, after=a, replay=bad)
    with pytest.raises(ValueError, match="replay mixes in earlier stages' examples; none were given"):
        stage(tmp_path, "bad", REFUSALS, replay=0.1)


def test_orthogonal_loss_is_o_loras_penalty_in_float64():
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(2, 7, generator=g, dtype=torch.float64))
             for _ in range(3)]
    reference = sum(abs(sum(o[i, k] * n[j, k] for k in range(7))) for o, n in pairs for i in range(4) for j in range(2))
    assert abs(float(orthogonal_loss(pairs)) - float(reference)) < 1e-10
    old = torch.eye(7, dtype=torch.float64)[:3]
    assert float(orthogonal_loss([(old, torch.eye(7, dtype=torch.float64)[3:5])])) == 0.0  # orthogonal rows: 0


def test_o_lora_penalty_keeps_the_new_adapter_orthogonal_to_the_earlier_one(tmp_path):
    lora = sclora.SCLoRAConfig(method="lora", r=2)
    a = stage(tmp_path, "a", TASK, config=lora)
    earlier = stages.earlier_lora_A(stages.read_chain(a))
    overlap = {}
    for weight in (0.0, 5.0):
        b = stage(tmp_path, f"b{weight}", REFUSALS, after=a, config=lora,
                  train_config={**FAST, "num_epochs": 4.0, "orthogonal_penalty": weight})
        new = load_file(str(b.adapter_dir / "adapter_model.safetensors"))
        overlap[weight] = float(orthogonal_loss([(earlier[k[len("base_model.model."):-len(".lora_A.weight")]], v)
                                                 for k, v in new.items() if k.endswith(".lora_A.weight")]))
    assert overlap[5.0] < 0.5 * overlap[0.0]
    with pytest.raises(ValueError, match="orthogonal_penalty > 0 .O-LoRA. .*none were given"):
        stage(tmp_path, "alone", TASK, config=lora, train_config={**FAST, "orthogonal_penalty": 0.5})
    assert not (tmp_path / "alone").exists()


def test_a_changed_earlier_stage_makes_the_later_ones_stale(tmp_path):
    a = stage(tmp_path, "a", TASK, CAPITALS)
    b = stage(tmp_path, "b", REFUSALS, after=a, config=sclora.SCLoRAConfig(r=2, beta=[0.5, 0.5]))
    stage(tmp_path, "b", REFUSALS, after=a, config=sclora.SCLoRAConfig(r=2, beta=[0.5, 0.5]))  # same chain: reruns
    import shutil

    shutil.rmtree(tmp_path / "a")
    stage(tmp_path, "a", TASK, CAPITALS, train_config={**FAST, "learning_rate": 5e-3})  # a retrained otherwise
    with pytest.raises(stages.StaleStageError, match=r"was trained after .*a, which has changed since"):
        stage(tmp_path, "c", TASK[:8], after=b, config=sclora.SCLoRAConfig(r=2, beta=[0.3, 0.3, 0.3]))
    with pytest.raises(stages.StaleStageError, match="its checkpoints are stale"):
        stage(tmp_path, "b", REFUSALS, after=tmp_path / "a", config=sclora.SCLoRAConfig(r=2, beta=[0.5, 0.5]))
    # an unfinished stage, a folder that is no stage, another base model: refused before any work
    record = json.loads((tmp_path / "a" / "stage.json").read_text())
    (tmp_path / "a" / "stage.json").write_text(json.dumps({**record, "status": "running"}))
    with pytest.raises(ValueError, match="has not finished; rerun its command"):
        stage(tmp_path, "d", TASK, after=tmp_path / "a")
    with pytest.raises(ValueError, match="no stage.json there"):
        stage(tmp_path, "d", TASK, after=tmp_path)
    (tmp_path / "a" / "stage.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="is not the base .* started from"):
        stage(tmp_path, "d", TASK, after=tmp_path / "a", model=tiny_llama(seed=5),
              config=sclora.SCLoRAConfig(r=2, beta=[.3] * 2))
    assert not (tmp_path / "d").exists()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


STEPS = ["--set", "max_steps=4", "--set", "save_steps=1", "--set", "batch_size=4", "--set", "micro_batch_size=2",
         "--set", "learning_rate=1e-2", "--seq-len", "32", "--r", "2", "--quiet"]


def test_the_command_continues_a_chain_resumes_after_kill_9_and_takes_the_base_from_it(tmp_path):
    model = str(save_tiny_model(tmp_path / "model"))
    task, keep, new = (write_jsonl(tmp_path / f"{n}.jsonl", rows) for n, rows in
                       (("task", TASK), ("keep", CAPITALS), ("new", REFUSALS)))
    assert cli.main(["finetune", "--model", model, "--data", task, "--preserve", keep, "--output",
                     str(tmp_path / "a"), "--beta", "0.8", *STEPS]) == 0
    b_args = ["finetune", "--after", str(tmp_path / "a"), "--data", new, "--beta", "0.5", "--beta", "0.5",
              "--replay", "0.1", *STEPS]
    # the uninterrupted reference, at the thread count the killed run starts at (the init depends on it: on the
    # tiny model's near-equal eigenvalues another thread count gives another subspace)
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", f"from sclora import cli; raise SystemExit(cli.main("
                           f"{[*b_args, '--output', str(tmp_path / 'reference')]!r}))"],
                          env=one_thread, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "stage 2 of a chain" in done.stdout, done.stderr[-2000:]
    # kill -9 while the 2nd checkpoint's trainer_state.json is half written, then the same command again, here at
    # another thread count: it resumes from the init the killed run wrote, not from a recomputed one
    child = textwrap.dedent("""
        import json, os, signal
        from sclora import cli
        from transformers.trainer_callback import TrainerState
    """) + textwrap.dedent(KILL_AT) + textwrap.dedent(f"""
        def half_written(self, path):
            text = json.dumps(self.__dict__, default=str)
            with open(path, "w") as f:
                f.write(text[: len(text) // 2])
        kill_at(TrainerState, "save_to_json", 2, before=half_written)
        raise SystemExit(cli.main({[*b_args, "--output", str(tmp_path / "b")]!r}))
    """)
    died = subprocess.run([sys.executable, "-c", child], env=one_thread, capture_output=True, text=True, timeout=600)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert json.loads((tmp_path / "b" / "stage.json").read_text())["status"] == "running"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.warns(UserWarning, match="incomplete checkpoint"):
            assert cli.main([*b_args, "--output", str(tmp_path / "b")]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 4 and summary["init_restored"]
    got, want = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("b", "reference"))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-5) for k in got)
    # the chain names its base: another --model with --after is refused before anything is loaded
    with pytest.raises(SystemExit, match="--model .* differs from the chain's base"):
        cli.main([*b_args, "--model", str(tmp_path), "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match=r"--after brings 2 more"):
        cli.main(["finetune", "--after", str(tmp_path / "a"), "--data", new, "--output", str(tmp_path / "x"),
                  "--beta", "0.5", *STEPS])
    with pytest.raises(SystemExit, match="--replay mixes in earlier stages' examples; give --after"):
        cli.main(["finetune", "--model", model, "--data", new, "--replay", "0.1", "--output", str(tmp_path / "x"),
                  "--method", "lora", *STEPS])
    assert not (tmp_path / "x").exists()
