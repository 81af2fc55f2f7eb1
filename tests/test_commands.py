"""The library's commands (`sclora finetune`, `init`, `train`) on a tiny model saved to disk and small files the
test writes: one command from files to an adapter that vanilla PEFT loads without sclora, resumable, with bad
data refused before any model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import TRIVIA, save_tiny_model

from sclora import cli, commands, workflow

WORDS = "paris rome berlin one two three four five six seven eight nine ten".split()
IDS = [[3, 14, 15, 16, 17, 18, 19]]


@pytest.fixture
def files(tmp_path):
    model = save_tiny_model(tmp_path / "my-model")
    with open(tmp_path / "task.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"what is {WORDS[i % 13]} plus {WORDS[(i * 7) % 13]}",
                                "response": f"{WORDS[(i * 3) % 13]} ."}) + "\n")
    with open(tmp_path / "keep.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"what is the capital of {WORDS[i % 3]}"},
                                             {"role": "assistant", "content": f"the capital is {WORDS[i % 3]}"}]}) + "\n")
    return tmp_path, model


def finetune_args(tmp_path, model, *extra):
    return ["finetune", "--model", str(model), "--data", str(tmp_path / "task.jsonl"), "--preserve",
            str(tmp_path / "keep.jsonl"), "--beta", "0.8", "--r", "2", "--seq-len", "32", "--output",
            str(tmp_path / "out"), "--quiet", "--set", "batch_size=8", "--set", "micro_batch_size=4",
            "--set", "learning_rate=1e-2", "--num-epochs", "1", *extra]


def test_finetune_writes_an_adapter_vanilla_peft_loads_without_sclora(files, monkeypatch, capsys):
    tmp_path, model = files
    trained = {}
    export = workflow.export_model

    def recording_export(peft_model, tokenizer, out, merge):
        with torch.no_grad():
            trained["logits"] = peft_model(torch.tensor(IDS)).logits.clone()
        return export(peft_model, tokenizer, out, merge)

    monkeypatch.setattr(workflow, "export_model", recording_export)
    assert cli.main(finetune_args(tmp_path, model, "--merge")) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["examples"] == {"data": 24, "plus": 24, "minus": 12}
    energy = summary["initial_subspace_energy"]
    assert 0 <= energy["minus"] < energy["plus"] <= 1  # the subspace leans to D+ and away from D-
    assert "initial subspace holds" in printed and str(tmp_path / "out" / "adapter") in printed
    script = f"""
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
ids = torch.tensor({IDS})
with torch.no_grad():
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(model)!r}),
                                        {str(tmp_path / 'out' / 'adapter')!r})(ids).logits
    merged = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out' / 'merged')!r})(ids).logits
assert not [m for m in sys.modules if m.split('.')[0] == 'sclora'], 'sclora was imported'
torch.save({{"adapter": adapter, "merged": merged}}, {str(tmp_path / 'logits.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    loaded = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert (loaded["adapter"] - trained["logits"]).abs().max() < 1e-5
    assert (loaded["merged"] - trained["logits"]).abs().max() < 1e-4


def test_finetune_resumes_and_its_statistics_are_cached(files, capsys):
    tmp_path, model = files
    assert cli.main(finetune_args(tmp_path, model)) == 0
    stats = sorted((tmp_path / "out" / "stats").iterdir())
    first = json.loads((tmp_path / "out" / "summary.json").read_text())
    capsys.readouterr()
    assert cli.main(finetune_args(tmp_path, model)) == 0
    again = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "already trained" in capsys.readouterr().out
    assert sorted((tmp_path / "out" / "stats").iterdir()) == stats  # reused, not collected again under new names
    assert again == first  # the finished stage is read from disk: nothing recomputed, nothing rewritten


@pytest.mark.parametrize("change,said", [
    (("--data", "{task}:99"), "24 rows, but offset 0 + n 99"),
    (("--preserve", "{bad}"), "line 2, message 0: field 'content' is empty"),
    (("--preserve", "no-such-name"), "no installed package knows this name"),
    (("--beta", "1.5"), "beta"),
    (("--stats-samples", "0"), "--stats-samples"),
])
def test_bad_inputs_are_refused_before_the_model_loads(files, monkeypatch, change, said):
    tmp_path, model = files
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}]}\n'
                                        '{"messages": [{"role": "user", "content": ""}]}\n')
    monkeypatch.setattr(commands, "_load_model", lambda *a: pytest.fail("the model was loaded"))
    argv = finetune_args(tmp_path, model)
    flag, value = change
    value = value.format(task=tmp_path / "task.jsonl", bad=tmp_path / "bad.jsonl")
    argv = argv[:argv.index(flag) + 1] + [value] + argv[argv.index(flag) + 2:] if flag in argv else argv + [flag, value]
    with pytest.raises(SystemExit, match=said.replace("+", "\\+")):
        cli.main(argv)


def test_presets_and_catalogue_names_come_from_the_kit(files, monkeypatch):
    from sclora.data import resolve_data
    from sclora.experiments import data

    monkeypatch.setattr(data, "harmful_requests", lambda *a, **k: [{"prompt": f"how make bread {i}"} for i in range(9)])
    monkeypatch.setattr(data, "trivia", lambda *a, **k: TRIVIA)
    safety = resolve_data("safety:4")
    assert len(safety) == 4 and all(e["prompt"].startswith("how make bread") and e["response"] for e in safety)
    assert len(resolve_data("knowledge:5")) == 5 and len(resolve_data("trivia:3:2")) == 3


def test_data_with_nothing_to_train_on_is_refused_before_the_statistics(files, monkeypatch):
    tmp_path, model = files
    monkeypatch.setattr(commands, "_build_init", lambda *a, **k: pytest.fail("statistics were collected"))
    argv = finetune_args(tmp_path, model)
    argv[argv.index("--seq-len") + 1] = "4"  # every prompt fills 4 tokens
    with pytest.raises(SystemExit, match="no example keeps a trained token within max_length=4"):
        cli.main(argv)


def test_finetune_with_beta_auto_meets_its_budget(files, capsys):
    tmp_path, model = files
    argv = finetune_args(tmp_path, model)
    argv[argv.index("--beta") + 1] = "auto"
    assert cli.main([*argv, "--budget", "0.05"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert 0 <= summary["beta"] <= 1 and summary["beta_chosen_for_budget"] == 0.05
    assert summary["initial_subspace_energy"]["minus"] <= 0.05 + 1e-9  # measured on the adapter itself
    assert "chosen for a D- budget of 5.0%" in capsys.readouterr().out


def test_finetune_with_salora_exports_an_adapter_that_keeps_the_safety_features(files):
    """`--method salora` from the same files: the fixed safety module comes from --preserve; after training the
    exported plain adapter changes no layer's output along those directions."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sclora.methods.salora import safety_directions

    tmp_path, model = files
    argv = finetune_args(tmp_path, model, "--method", "salora")
    argv[argv.index("--beta"):argv.index("--beta") + 2] = []
    kept = {}
    export = workflow.export_model

    def recording_export(peft_model, tokenizer, out, merge):
        kept["u"] = {k: v.detach().clone() for k, v in safety_directions(peft_model).items()}
        return export(peft_model, tokenizer, out, merge)

    workflow.export_model = recording_export
    try:
        assert cli.main(argv) == 0
    finally:
        workflow.export_model = export
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["method"] == "salora" and summary["steps"] == 3
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), tmp_path / "out" / "adapter")
    moved = changed = 0.0
    for name, u in kept["u"].items():
        layer = adapter.base_model.model.get_submodule(name)
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        moved = max(moved, (u.T @ delta).abs().max().item())
        changed = max(changed, delta.abs().max().item())
    assert kept["u"] and changed > 1e-3 and moved < 1e-5 * changed
