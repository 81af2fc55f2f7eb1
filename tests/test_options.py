"""Options defined once: every SCLoRAConfig / TrainConfig field is a flag of the commands that use it, with the
same name, the dataclass's own checks and its help text; repeated flags give several knowledge sets."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
from conftest import save_tiny_model

from sclora import SCLoRAConfig, TrainConfig, cli
from sclora.options import flag_values

#: a valid value other than the default for every field, as typed on the command line, and what it means
SCLORA_VALUES = {
    "method": ("pissa", "pissa"), "r": ("4", 4), "lora_alpha": ("8", 8), "lora_dropout": ("0.1", 0.1),
    "beta": ("0.7", 0.7), "lock_subspace": (None, True), "salora_safety_rank": ("4", 4),
    "salora_task_rank": ("5", 5), "quantize_residual": ("nf4", "nf4"), "target_modules": ("q_proj v_proj", None),
    "normalize": ("trace", "trace"), "dtype": ("float32", "float32"), "eigen_solver": ("lobpcg", "lobpcg"),
    "use_rslora": (None, True), "preserve_budget": (None, None),
}
TRAIN_VALUES = {
    "learning_rate": ("3e-4", 3e-4), "num_epochs": ("2", 2), "batch_size": ("8", 8), "micro_batch_size": ("2", 2),
    "lr_scheduler": ("linear", "linear"), "warmup_ratio": ("0.1", 0.1), "weight_decay": ("0.01", 0.01),
    "max_grad_norm": ("0.5", 0.5), "max_length": ("64", 64), "bf16": (None, True), "logging_steps": ("2", 2),
    "save_steps": ("3", 3), "save_total_limit": ("1", 1), "max_steps": ("9", 9), "chat": (None, True),
    "orthogonal_penalty": ("0.5", 0.5),
}


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_the_tables_above_cover_every_field():
    assert set(SCLORA_VALUES) == {f.name for f in fields(SCLoRAConfig)}
    assert set(TRAIN_VALUES) == {f.name for f in fields(TrainConfig)} - {"seed"}


@pytest.mark.parametrize("command", ["init", "finetune"])
@pytest.mark.parametrize("name", sorted(SCLORA_VALUES))
def test_every_init_field_is_a_flag_with_its_meaning(command, name):
    text, value = SCLORA_VALUES[name]
    base = [command, "--output", "o"] + (["--data", "d.jsonl"] if command == "finetune" else [])
    if name == "preserve_budget":
        args = parse(*base, "--beta", "auto", "--preserve-budget", "0.05")
        assert SCLoRAConfig(**flag_values(args, SCLoRAConfig)).preserve_budget == 0.05
        args = parse(*base, "--beta", "auto", "--budget", "0.1", "--budget", "0.2")  # one per knowledge set
        assert SCLoRAConfig(**flag_values(args, SCLoRAConfig)).preserve_budget == [0.1, 0.2]
        return
    if name == "target_modules":
        for typed, meant in ((["q_proj", "v_proj"], ["q_proj", "v_proj"]), ([r".*\.q_proj"], r".*\.q_proj"),
                             (["all-linear"], None)):
            args = parse(*base, flag(name), *typed)
            assert SCLoRAConfig(**flag_values(args, SCLoRAConfig)).target_modules == meant
        return
    args = parse(*base, flag(name), *([] if text is None else [text]))
    config = SCLoRAConfig(**flag_values(args, SCLoRAConfig))
    assert getattr(config, name) == value
    assert all(getattr(config, f.name) == getattr(SCLoRAConfig(), f.name) for f in fields(SCLoRAConfig)
               if f.name != name)  # nothing else changed


@pytest.mark.parametrize("command", ["train", "finetune"])
@pytest.mark.parametrize("name", sorted(TRAIN_VALUES))
def test_every_training_field_is_a_flag_with_its_meaning(command, name):
    text, value = TRAIN_VALUES[name]
    base = [command, "--output", "o", "--data", "d.jsonl"] + (["--init", "i"] if command == "train" else [])
    args = parse(*base, flag(name), *([] if text is None else [text]))
    values = flag_values(args, TrainConfig)
    if command == "finetune":  # its --seed (data order and training) is TrainConfig's seed too
        assert values.pop("seed") == 0
    assert values == {name: value}
    if name == "micro_batch_size":
        values["batch_size"] = 8
    assert getattr(TrainConfig.from_dict(values), name) == value


def test_aliases_and_negated_booleans():
    args = parse("finetune", "--output", "o", "--data", "d", "--lora-r", "3", "--dropout", "0.2", "--rslora",
                 "--quantize", "fp4", "--no-chat")
    config = SCLoRAConfig(**flag_values(args, SCLoRAConfig))
    assert (config.r, config.lora_dropout, config.use_rslora, config.quantize_residual) == (3, 0.2, True, "fp4")
    assert flag_values(args, TrainConfig) == {"chat": False, "seed": 0}


def test_help_shows_each_fields_help_text(capsys):
    with pytest.raises(SystemExit):
        parse("finetune", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for f in [*fields(SCLoRAConfig), *fields(TrainConfig)]:
        if f.name != "seed":
            assert flag(f.name) in text and " ".join(f.metadata["help"].split())[:40] in text, f.name


def test_a_bad_value_is_refused_by_the_configs_own_check(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"sclora finetune: lora_dropout must be a number in \[0, 1\), got 2"):
        cli.main(["finetune", "--output", str(tmp_path), "--data", "d.jsonl", "--lora-dropout", "2"])
    with pytest.raises(SystemExit, match="sclora finetune: learning_rate must be > 0"):
        cli.main(["finetune", "--output", str(tmp_path), "--data", "d.jsonl", "--learning-rate", "0"])


@pytest.fixture
def files(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    numbers = "one two three four five six seven eight nine ten".split()
    for name, rows in {
        "task": [{"prompt": f"what is {numbers[i % 10]} plus {numbers[(i * 3) % 10]}", "response": "ten ."}
                 for i in range(16)],
        "capitals": [{"prompt": f"what is the capital of {c}", "response": f"the capital is {c} ."}
                     for c in ("paris", "rome", "berlin") * 3],
        "refusals": [{"prompt": f"how make {w}", "response": "sorry , cannot help ."} for w in ("bread", "paper") * 4],
    }.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path, model


def test_two_preserve_flags_with_two_betas_keep_two_knowledge_sets(files):
    tmp_path, model = files
    assert cli.main(["finetune", "--model", str(model), "--data", str(tmp_path / "task.jsonl"),
                     "--preserve", str(tmp_path / "capitals.jsonl"), "--preserve", str(tmp_path / "refusals.jsonl"),
                     "--beta", "0.4", "--beta", "0.4", "--r", "2", "--seq-len", "32", "--max-steps", "2",
                     "--batch-size", "4", "--output", str(tmp_path / "out"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["beta"] == [0.4, 0.4] and summary["examples"] == {"data": 16, "plus": 16, "minus_0": 9,
                                                                      "minus_1": 8}
    assert set(summary["initial_subspace_energy"]) == {"plus", "minus_0", "minus_1"}


@pytest.mark.parametrize("betas", [["0.4"], ["0.4", "0.4", "0.1"]])
def test_a_beta_count_other_than_the_preserve_count_is_refused_before_the_model_loads(files, betas):
    tmp_path, _ = files
    argv = ["finetune", "--model", str(tmp_path / "no-such-model"), "--data", str(tmp_path / "task.jsonl"),
            "--preserve", str(tmp_path / "capitals.jsonl"), "--preserve", str(tmp_path / "refusals.jsonl"),
            "--output", str(tmp_path / "out")]
    for beta in betas:
        argv += ["--beta", beta]
    with pytest.raises(SystemExit, match=r"but 2 knowledge set\(s\) are to be preserved.*--preserve was given 2"):
        cli.main(argv)
    assert not (tmp_path / "out").exists()


def test_init_with_two_minus_sets_then_train_rebuilds_the_same_init(files):
    tmp_path, model = files
    assert cli.main(["init", "--model", str(model), "--plus", str(tmp_path / "task.jsonl"),
                     "--minus", str(tmp_path / "capitals.jsonl"), "--minus", str(tmp_path / "refusals.jsonl"),
                     "--beta", "0.3", "--beta", "0.5", "--r", "2", "--seq-len", "32", "--output", str(tmp_path / "init"),
                     "--quiet"]) == 0
    saved = SCLoRAConfig.from_pretrained(tmp_path / "init")
    assert saved.beta == [0.3, 0.5] and saved.r == 2
    stats = sorted(p.name.split("-")[0] for p in (tmp_path / "init" / "stats").iterdir())
    assert stats == ["minus_0", "minus_1", "plus"]
    assert cli.main(["train", "--init", str(tmp_path / "init"), "--data", str(tmp_path / "task.jsonl"),
                     "--max-steps", "1", "--batch-size", "4", "--max-length", "32", "--output", str(tmp_path / "ft"),
                     "--quiet"]) == 0
    assert (tmp_path / "ft" / "adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "init" / "stats").iterdir()) == stats  # reused
