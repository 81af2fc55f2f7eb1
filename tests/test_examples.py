"""The scripts in examples/ run end to end on a tiny random model folder and do what their docstrings say."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--r", "2", "--seq-len", "32"]


def example(name: str):
    """examples/<name>.py as a module (its main(argv) runs it in this process)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def tiny_folder(path: Path, **sizes) -> str:
    tiny_llama(seed=2, **sizes).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder and JSONL files in the tiny tokenizer's vocabulary: --data, two --preserve sets."""
    root = tmp_path_factory.mktemp("examples")
    numbers = ("one", "two", "three", "four")
    return {
        "model": tiny_folder(root / "model"),
        "data": write_jsonl(root / "task.jsonl", [{"prompt": f"what is {a} plus {b}", "response": f"{a} plus {b} "
                                                   f"equals {b} ."} for a in numbers for b in ("five", "six")]),
        "keep": write_jsonl(root / "keep.jsonl", [{"prompt": f"what is the capital of {c}",
                                                   "response": f"the capital city is {c} ."}
                                                  for c in ("france", "paris", "rome", "berlin")]),
        "refuse": write_jsonl(root / "refuse.jsonl", [{"prompt": f"how to make {w}", "response": "sorry , cannot help ."}
                                                      for w in ("bread", "a paper", "a summary", "a method")]),
    }


PROBE = torch.tensor([[10, 20, 30, 40, 50, 60]])


def logits(model, ids=PROBE):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_quickstart_writes_an_adapter_plain_peft_loads_as_the_trained_model(files, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = example("quickstart").main(["--model", files["model"], "--data", files["data"], "--preserve",
                                         files["keep"], "--output", str(tmp_path / "out"), "--max-steps", "2",
                                         "--max-new-tokens", "4", *TINY])
    printed = capsys.readouterr().out
    assert result.text in printed and re.search(r"'what is \w+ plus \w+' -> '[\w .,]*'", printed)
    assert result.training.steps == 2
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(files["model"])
    plain = PeftModel.from_pretrained(base, result.adapter_dir)
    assert (logits(plain) - logits(result.model)).abs().max() < 1e-4


def test_beta_sweep_reuses_saved_statistics_and_the_preserved_share_falls_with_beta(files, tmp_path, capsys):
    betas = [0.2, 0.5, 0.8, 0.95]
    argv = ["--model", files["model"], "--data", files["data"], "--preserve", files["keep"],
            "--output", str(tmp_path / "stats"), *TINY]
    energies, _ = example("beta_sweep").main(argv + ["--betas", *map(str, betas), "--budget", "0.99"])
    assert (tmp_path / "stats" / "plus.safetensors").exists() and (tmp_path / "stats" / "minus.safetensors").exists()
    assert list(energies) == betas
    shares = [energies[b]["minus"] for b in betas]
    assert all(0 <= e[k] <= 1 for e in energies.values() for k in ("plus", "minus"))
    assert all(later <= earlier + 1e-6 for earlier, later in itertools.pairwise(shares)), shares
    assert shares[-1] < shares[0]
    # a budget between the shares at 0.5 and 0.8: choose_beta lands in (0.5, 0.8]
    budget = (energies[0.5]["minus"] + energies[0.8]["minus"]) / 2
    _, choice = example("beta_sweep").main(argv + ["--betas", "0.5", "--budget", str(budget)])
    assert 0.5 < choice.beta <= 0.8 and choice.minus_energy <= budget
    assert "smallest beta keeping at most" in capsys.readouterr().out


def test_several_knowledge_sets_reports_each_sets_energy(files, tmp_path, capsys):
    result = example("several_knowledge_sets").main(
        ["--model", files["model"], "--data", files["data"], "--preserve", files["keep"], "--beta", "0.3",
         "--preserve", files["refuse"], "--beta", "0.4", "--output", str(tmp_path / "out"), "--max-steps", "1", *TINY])
    assert result.config.beta == [0.3, 0.4]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    energy = summary["initial_subspace_energy"]
    assert set(energy) == {"plus", "minus_0", "minus_1"} and all(0 <= v <= 1 for v in energy.values())
    assert summary["examples"]["minus_0"] == 4 and summary["examples"]["minus_1"] == 4
    printed = capsys.readouterr().out
    assert "(D-_0)" in printed and "(D-_1)" in printed and files["refuse"] in printed
    with pytest.raises(SystemExit):  # two sets, one beta
        example("several_knowledge_sets").main(["--model", files["model"], "--data", files["data"], "--preserve",
                                                files["keep"], "--preserve", files["refuse"], "--beta", "0.4"])


def test_trl_sft_trains_the_adapter_and_the_export_reproduces_it_on_the_base(files, tmp_path):
    pytest.importorskip("trl", reason="TRL is in the dev extra")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, adapter = example("trl_sft").main(["--model", files["model"], "--data", files["data"], "--preserve",
                                              files["keep"], "--output", str(tmp_path / "out"), "--max-steps", "2",
                                              "--learning-rate", "1e-2", *TINY])
    assert (adapter / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(files["model"])
    untouched = logits(base)
    plain = PeftModel.from_pretrained(base, adapter)
    trained = logits(model)
    assert (logits(plain) - trained).abs().max() < 1e-4
    assert (trained - untouched).abs().max() > 1e-3  # the training moved the model


def test_quantized_base_reports_a_nonzero_finite_drift_at_init(tmp_path, files, capsys):
    pytest.importorskip("bitsandbytes", reason="quantized bases need bitsandbytes")
    # hidden / intermediate sizes bitsandbytes' CPU 4-bit kernel handles
    folder = tiny_folder(tmp_path / "model64", hidden_size=64, intermediate_size=128)
    result = example("quantized_base").main(["--model", folder, "--data", files["data"], "--preserve", files["keep"],
                                             "--output", str(tmp_path / "out"), "--max-steps", "1", *TINY])
    drift = result.init_drift
    assert math.isfinite(drift["max_abs_logit"]) and drift["max_abs_logit"] > 0 and math.isfinite(drift["kl"])
    assert result.summary["quantized_base"] == "nf4"
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
    assert "model at init vs the nf4 base" in capsys.readouterr().out
