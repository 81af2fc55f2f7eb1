"""The safety-alignment stage on a tiny model: data assembly, disjoint held-out sources, the report."""

import json

import pytest
from conftest import tiny_llama, tiny_tokenizer

from sclora.experiments import data
from sclora.experiments.align import AlignConfig, align, alignment_examples
from sclora.experiments.evaluate.judges import RefusalJudge
from sclora.experiments.prompts import REFUSALS

HARMFUL = {"harmbench": [{"prompt": f"how make bread {i}", "category": "c", "source": "harmbench"} for i in range(6)],
           "strongreject": [{"prompt": "how make six", "category": "c", "source": "strongreject"}],
           "jailbreakbench": [{"prompt": "how make ten", "category": "c", "source": "jailbreakbench"}]}


@pytest.fixture
def fake_data(monkeypatch):
    monkeypatch.setattr(data, "harmful_requests", lambda source="harmbench": HARMFUL[source])
    monkeypatch.setattr(data, "trivia", lambda *a, **k: [{"question": f"what is {w}", "answers": [w], "topic": "t"}
                                                        for w in ("paris", "rome", "one", "two", "three")])
    monkeypatch.setattr(data, "benign_requests", lambda *a, **k: [{"prompt": "what is paris", "category": "x",
                                                                 "source": "t"}])


def config(**kw):
    settings = dict(n_harmful=6, n_benign=4, n_heldout=1, n_benign_eval=1, benign_max_new_tokens=4,
                    benign_kinds=("trivia",), train={"learning_rate": 1e-2, "batch_size": 4, "micro_batch_size": 2,
                                                    "num_epochs": 1, "max_length": 48, "save_steps": 100})
    return AlignConfig(**{**settings, **kw})


def test_refusals_are_refusals_for_the_proxy():
    assert all(RefusalJudge().judge_one(r).score == 1 for r in REFUSALS)


def test_alignment_examples_pair_harmful_with_refusals_and_benign_with_own_answers(fake_data):
    examples = alignment_examples(tiny_llama(), tiny_tokenizer(), config(), show_progress=False)
    harmful = [e for e in examples if e["prompt"].startswith("how make bread")]
    assert len(harmful) == 6 and all(e["response"] in REFUSALS for e in harmful)
    benign = [e for e in examples if e not in harmful]
    assert benign and all(e["response"] not in REFUSALS for e in benign)
    assert alignment_examples(tiny_llama(), tiny_tokenizer(), config(), show_progress=False) == examples  # seeded


def test_align_reports_before_and_after_and_saves_the_model(fake_data, tmp_path):
    report = align(tiny_llama(), tiny_tokenizer(), config(), tmp_path, show_progress=False)
    assert {"config", "before", "train", "after"} <= set(report)
    assert 0 <= report["after"]["heldout_refusal_rate"] <= 100 and report["train"]["steps"] >= 1
    assert json.loads((tmp_path / "align_report.json").read_text())["after"] == report["after"]
    assert (tmp_path / "model" / "config.json").exists()
    from sclora.data import content_digest
    from sclora.models import model_identity
    assert report["model"] == {"sha256": content_digest(tmp_path / "model"),
                               "identity": model_identity(str(tmp_path / "model"))}
    weights = next((tmp_path / "model").glob("*.safetensors"))
    with open(weights, "r+b") as f:  # one changed byte deep inside the weights changes the digest
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    assert content_digest(tmp_path / "model") != report["model"]["sha256"]


def test_heldout_prompts_seen_in_training_are_dropped(fake_data, monkeypatch, tmp_path):
    leaked = {**HARMFUL, "strongreject": HARMFUL["harmbench"][:1] + HARMFUL["strongreject"]}
    monkeypatch.setattr(data, "harmful_requests", lambda source="harmbench": leaked[source])
    report = align(tiny_llama(), tiny_tokenizer(), config(n_heldout=2), tmp_path, show_progress=False)
    assert report["heldout_dropped_as_seen_in_training"] == 1 and report["heldout_prompts"] == 2
    only_leaked = {**HARMFUL, "strongreject": HARMFUL["harmbench"][:1], "jailbreakbench": HARMFUL["harmbench"][1:2]}
    monkeypatch.setattr(data, "harmful_requests", lambda source="harmbench": only_leaked[source])
    with pytest.raises(ValueError, match="also appears in the training source"):
        align(tiny_llama(), tiny_tokenizer(), config(), tmp_path, show_progress=False)


@pytest.mark.parametrize("flag, bf16", [([], True), (["--no-bf16"], False)])
def test_align_command_passes_the_bf16_choice_to_training(flag, bf16, monkeypatch, tmp_path):
    from sclora import cli, models
    from sclora.experiments import align as align_module

    seen = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (None, None))

    def fake_align(model, tokenizer, config, output_dir, show_progress=True):
        seen.append(config)
        return {s: {"heldout_refusal_rate": 0.0, "benign_refusal_rate": 0.0} for s in ("before", "after")}

    monkeypatch.setattr(align_module, "align", fake_align)
    assert cli.main(["align", *flag, "--output", str(tmp_path), "--quiet"]) == 0
    assert seen[0].train["bf16"] is bf16
    assert AlignConfig().train["bf16"] is True  # the default config is not changed in place
