"""The library works without the paper-reproduction kit's extra dependencies (`pip install sclora`, no extras):
collect -> init -> train -> export on the tiny model, and `sclora finetune` on files, with rouge-score,
math-verify and matplotlib made unimportable and the kit itself never imported."""

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = """
    import importlib.abc, sys

    BLOCKED = ("rouge_score", "math_verify", "matplotlib", "sclora.experiments")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.startswith(BLOCKED):
                raise ImportError(name + " is not installed (blocked by the test)")
            return None

    sys.meta_path.insert(0, Block())

    import torch
    from peft import PeftModel

    OUT = sys.argv[1]
    from conftest import random_batches, tiny_llama, tiny_tokenizer
    from sclora import SCLoRAConfig, collect_covariances, export_lora, get_sclora_model
    from sclora.train import TrainConfig, train

    model = tiny_llama()
    plus = collect_covariances(model, random_batches(seed=1), show_progress=False)
    minus = collect_covariances(model, random_batches(seed=2), show_progress=False)
    peft_model = get_sclora_model(model, SCLoRAConfig(r=2, beta=0.5), plus, minus, show_progress=False)
    examples = [{"prompt": "what is the capital of france", "response": "paris"}] * 4
    train(peft_model, tiny_tokenizer(), examples, TrainConfig(learning_rate=1e-2, batch_size=2, micro_batch_size=2,
          max_steps=2, max_length=32), OUT, show_progress=False)
    export_lora(peft_model, OUT + "/adapter")
    base = tiny_llama()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        want, got = peft_model(ids).logits, PeftModel.from_pretrained(base, OUT + "/adapter")(ids).logits
    assert torch.allclose(want, got, atol=1e-4), (want - got).abs().max()
    # the practitioner's command on files, with the kit unavailable
    import json, os
    from conftest import save_tiny_model
    from sclora import cli

    save_tiny_model(OUT + "/model")
    with open(OUT + "/task.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": f"what is {w}", "response": w}) + "\\n" for w in ("paris", "rome", "one", "two"))
    with open(OUT + "/keep.jsonl", "w") as f:
        f.writelines(json.dumps({"text": f"the capital of france is {w}"}) + "\\n" for w in ("paris", "rome"))
    assert cli.main(["finetune", "--model", OUT + "/model", "--data", OUT + "/task.jsonl", "--preserve",
                     OUT + "/keep.jsonl", "--r", "2", "--seq-len", "16", "--output", OUT + "/ft", "--quiet",
                     "--set", "batch_size=2", "--set", "micro_batch_size=2"]) == 0
    assert os.path.exists(OUT + "/ft/adapter/adapter_model.safetensors")
    leaked = sorted(m for m in sys.modules if m.startswith(BLOCKED))
    assert not leaked, leaked
    print("library ok without the kit")
"""


def test_the_library_runs_without_the_kit_and_its_extra_dependencies(tmp_path):
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(tmp_path / "run")], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "library ok without the kit" in done.stdout


def test_a_kit_command_without_its_extras_says_what_to_install(monkeypatch, capsys):
    from sclora import cli

    def missing(argv=None):
        raise ModuleNotFoundError("No module named 'rouge_score'", name="rouge_score")

    monkeypatch.setattr(cli, "main", missing)
    assert cli.entry([]) == 2
    assert 'pip install "sclora[experiments]"' in capsys.readouterr().err
