"""sclora.finetune, the practitioner's one call: several knowledge sets, results returned (not attached to the
model), training settings chosen from the data, and honest warnings when the settings cannot teach anything."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

import sclora
from sclora.workflow import MIN_STEPS, TARGET_STEPS, loss_fell, planned_steps, suggest_train_config

NUMBERS = "one two three four five six seven eight nine ten".split()
TASK = [{"prompt": f"what is {NUMBERS[i % 10]} plus {NUMBERS[(i * 3) % 10]}", "response": f"{NUMBERS[(i * 7) % 10]} ."}
        for i in range(24)]
CAPITALS = [{"prompt": f"what is the capital of {c}", "response": f"the capital is {c} ."}
            for c in ("paris", "rome", "berlin") * 4]
REFUSALS = [{"prompt": f"how make {w}", "response": "sorry , cannot help ."} for w in ("bread", "paper", "method") * 4]
FAST = {"batch_size": 8, "micro_batch_size": 4, "num_epochs": 1.0, "learning_rate": 1e-2, "max_length": 32}


def run(tmp_path, preserve, **kwargs):
    kwargs.setdefault("config", sclora.SCLoRAConfig(r=2, beta=0.8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few steps for a real run: expected here
        return sclora.finetune(tiny_llama(seed=2), tiny_tokenizer(), TASK, preserve, output_dir=tmp_path / "out",
                               train_config=kwargs.pop("train_config", FAST), seq_len=32, show_progress=False,
                               **kwargs)


def test_two_knowledge_sets_each_with_its_beta_are_both_kept_out_of_the_subspace(tmp_path):
    result = run(tmp_path, [CAPITALS, REFUSALS], config=sclora.SCLoRAConfig(r=2, beta=[0.4, 0.4]))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary == result.summary and summary["beta"] == [0.4, 0.4]
    assert summary["examples"] == {"data": 24, "plus": 24, "minus_0": 12, "minus_1": 12}
    energy = result.energy  # both sets: less of their output energy in the subspace than D+'s
    assert 0 <= energy["minus_0"] < energy["plus"] and 0 <= energy["minus_1"] < energy["plus"]
    assert result.adapter_dir == tmp_path / "out" / "adapter" and (result.adapter_dir / "adapter_config.json").exists()
    assert result.training.steps == 3 and "D-_0" in result.text and "D-_1" in result.text
    # Theorem 2: the residual init leaves the model's function unchanged (full precision)
    assert result.init_drift["max_abs_logit"] < 1e-4 and abs(result.init_drift["kl"]) < 1e-8
    assert not [a for a in vars(result.model) if a.startswith("sclora_") and a != "sclora_initial_adapter"]


def test_one_beta_for_two_knowledge_sets_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"beta=0.4 has 1 value\(s\) but 2 knowledge set\(s\)"):
        run(tmp_path, [CAPITALS, REFUSALS], config=sclora.SCLoRAConfig(r=2, beta=0.4))
    assert not (tmp_path / "out").exists()


def test_a_method_that_keeps_one_set_refuses_two(tmp_path):
    with pytest.raises(ValueError, match="corda_kpa preserves one knowledge set but 2 were given"):
        run(tmp_path, [CAPITALS, REFUSALS], config=sclora.SCLoRAConfig(method="corda_kpa", r=2))


def test_beta_auto_returns_its_choice_and_meets_the_budget(tmp_path):
    result = run(tmp_path, CAPITALS, config=sclora.SCLoRAConfig(r=2, beta="auto", preserve_budget=0.2))
    choice = result.beta_choice
    assert choice is not None and choice.minus_energy <= 0.2 + 1e-9
    assert result.config.beta == choice.beta and result.summary["beta_chosen_for_budget"] == 0.2
    assert math.isclose(result.energy["minus"], choice.minus_energy, rel_tol=1e-6, abs_tol=1e-9)


def test_settings_chosen_from_the_data_are_reported_and_given_ones_kept(tmp_path):
    result = run(tmp_path, CAPITALS, train_config={"micro_batch_size": 4, "max_length": 32, "learning_rate": 1e-3})
    assert result.chosen == {"batch_size": 4, "num_epochs": 7.0}  # 24 rows: 6 steps an epoch, 7 epochs -> 42
    assert result.train_config.learning_rate == 1e-3 and result.training.steps == 42 >= MIN_STEPS
    assert "chosen from the data: batch_size, num_epochs" in result.text


def test_too_few_steps_are_warned_about_before_training(tmp_path):
    with pytest.warns(UserWarning, match="give 3 optimizer step"):
        sclora.finetune(tiny_llama(seed=2), tiny_tokenizer(), TASK, CAPITALS, config=sclora.SCLoRAConfig(r=2),
                        train_config=sclora.TrainConfig(**FAST), output_dir=tmp_path / "out", seq_len=32,
                        show_progress=False)


def test_the_summary_says_when_the_loss_did_not_fall(tmp_path):
    result = run(tmp_path, CAPITALS, train_config={**FAST, "learning_rate": 1e-12, "num_epochs": 2.0})
    assert result.summary["loss_fell"] is False and "the training loss did not fall" in result.text
    result = run(tmp_path / "b", CAPITALS, train_config={**FAST, "learning_rate": 3e-2, "num_epochs": 4.0})
    assert result.summary["loss_fell"] is True and "did not fall" not in result.text


def test_a_method_without_preserved_data_needs_none_and_lora_starts_at_the_base(tmp_path):
    result = run(tmp_path, None, config=sclora.SCLoRAConfig(method="lora", r=2))
    assert result.init_drift is None and result.energy == {} and result.summary["examples"] == {"data": 24}
    with pytest.raises(ValueError, match="needs the knowledge to keep: pass preserve="):
        run(tmp_path, None)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 200_000), micro=st.sampled_from([1, 2, 4, 8]))
def test_suggested_settings_give_enough_steps_and_the_papers_batch_on_large_data(n, micro):
    config, chosen = suggest_train_config(n, given={"micro_batch_size": micro})
    steps = planned_steps(n, config)
    assert config.batch_size % micro == 0 and micro <= config.batch_size <= 128
    assert config.learning_rate == 2e-4 and chosen["learning_rate"] == 2e-4
    # enough steps, unless even ten epochs of single micro-batches cannot give them
    assert steps >= TARGET_STEPS or config.num_epochs == 10 or config.batch_size == micro
    if n >= 128 * TARGET_STEPS * 2:
        assert config.batch_size == 128 and config.num_epochs == 1
    assert planned_steps(n, config) == math.ceil(max(1, math.ceil(math.ceil(n / micro) / (config.batch_size // micro)))
                                                 * config.num_epochs)


def test_given_settings_are_never_replaced():
    config, chosen = suggest_train_config(50, adapter=False, given={"batch_size": 16, "max_steps": 7})
    assert (config.batch_size, config.max_steps, config.learning_rate) == (16, 7, 2e-5) and "num_epochs" not in chosen


@pytest.mark.parametrize("history,fell", [
    ([], None), ([(1, 3.0)], None), ([(1, 3.0), (2, 2.0)], True), ([(1, 3.0), (2, 3.0)], False),
    ([(i, 3.0 - 0.001 * i) for i in range(10)], False), ([(i, 3.0 - 0.1 * i) for i in range(10)], True),
    ([(1, float("nan")), (2, 3.0), (3, 1.0)], True),
])
def test_loss_fell_compares_the_first_and_last_fifth(history, fell):
    assert loss_fell(history) is fell


def test_a_second_call_finds_the_run_done_and_writes_the_same_adapter(tmp_path):
    from safetensors.torch import load_file

    first = run(tmp_path, CAPITALS)
    x = load_file(first.adapter_dir / "adapter_model.safetensors")
    again = run(tmp_path, CAPITALS)
    assert again.training.resumed_from == first.training.steps and "already trained" in again.text
    y = load_file(again.adapter_dir / "adapter_model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_checkpoints_of_another_knowledge_set_are_never_resumed(tmp_path):
    run(tmp_path, CAPITALS)
    with pytest.raises(ValueError, match="finished stage made from other inputs"):
        run(tmp_path, REFUSALS)  # same data, same config: only D- differs
    record = tmp_path / "out" / "stage.json"  # as if killed after its last checkpoint: its checkpoints refuse
    record.write_text(json.dumps({**json.loads(record.read_text()), "status": "running"}))
    with pytest.raises(ValueError, match="Cannot resume from .*used different settings"):
        run(tmp_path, REFUSALS)


def test_runs_sharing_a_stats_dir_collect_each_set_once_and_another_set_again(tmp_path, monkeypatch):
    from sclora import statistics_cache

    calls = []
    collect = statistics_cache.collect_covariances
    monkeypatch.setattr(statistics_cache, "collect_covariances", lambda *a, **k: calls.append(k["desc"]) or collect(*a, **k))
    shared = tmp_path / "shared-stats"
    for lr in (1e-2, 1e-3):  # two learning-rate candidates of one stage: same model, same sets
        run(tmp_path / f"lr{lr:g}", CAPITALS, stats_dir=shared, train_config={**FAST, "learning_rate": lr})
    assert calls == ["plus statistics", "minus statistics"]
    assert not (tmp_path / "lr0.01" / "out" / "stats").exists() and len(list(shared.glob("*.safetensors"))) == 2
    run(tmp_path / "other", REFUSALS, stats_dir=shared)  # another knowledge set: its statistics are collected
    assert calls == ["plus statistics", "minus statistics", "minus statistics"]


def test_a_budgets_beta_is_searched_once_per_statistics_and_settings(tmp_path, monkeypatch):
    """Learning-rate candidates sharing a stats_dir read the beta chosen for the budget from a file named by the
    statistics files and the config; another budget searches again, and so does a damaged file."""
    from sclora import methods

    searches = []
    search = methods.choose_beta
    monkeypatch.setattr(methods, "choose_beta", lambda *a, **k: searches.append(k["budget"]) or search(*a, **k))
    shared = tmp_path / "shared-stats"
    auto = sclora.SCLoRAConfig(r=2, beta="auto", preserve_budget=0.2)
    first, second = (run(tmp_path / f"lr{lr:g}", CAPITALS, stats_dir=shared, config=auto,
                         train_config={**FAST, "learning_rate": lr}) for lr in (1e-2, 1e-3))
    assert searches == [0.2] and first.beta_choice == second.beta_choice
    assert second.config.beta == first.config.beta and second.beta_choice.minus_energy <= 0.2 + 1e-9
    (cached,) = shared.glob("beta-choice-*.json")
    run(tmp_path / "tighter", CAPITALS, stats_dir=shared, config=auto.replace(preserve_budget=0.1))
    assert searches == [0.2, 0.1]
    cached.write_text(cached.read_text()[:20])  # cut short, as by a crash before atomic writes
    again = run(tmp_path / "again", CAPITALS, stats_dir=shared, config=auto)  # (run() silences its warning)
    assert searches == [0.2, 0.1, 0.2] and again.beta_choice == first.beta_choice
    assert json.loads(cached.read_text())["beta"] == first.beta_choice.beta  # written whole again
    monkeypatch.setattr(methods.sc_lora, "BETA_SEARCH_VERSION", -1)  # a choice made by another search
    run(tmp_path / "other-search", CAPITALS, stats_dir=shared, config=auto)
    assert searches == [0.2, 0.1, 0.2, 0.2] and len(list(shared.glob("beta-choice-*.json"))) == 3
