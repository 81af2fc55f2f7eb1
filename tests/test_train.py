"""The fine-tuning stage: label masking, padding, loss goes down (full and LoRA), exact resume, config checks."""

import importlib
import json
import os

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from transformers import TrainerCallback

import sclora
from sclora.experiments.evaluate.generation import build_prompt
from sclora.train import IGNORE_INDEX, PadCollator, TrainConfig, tokenize_examples, train

PROMPT, RESPONSE = "what is one plus two ?", "three ."
# The tiny chat template: "user : {prompt}\nassistant :" ("user"/"assistant" are unknown words).
PROMPT_TOKENS = ["<unk>", ":", "what", "is", "one", "plus", "two", "?", "<unk>", ":"]
RESPONSE_TOKENS = ["three", ".", "<eos>"]

EXAMPLES = [
    {"prompt": "what is one plus two ?", "response": "one plus two equals three ."},
    {"prompt": "what is the capital of france ?", "response": "the capital of france is paris ."},
    {"prompt": "what is two plus two ?", "response": "two plus two equals four ."},
    {"prompt": "how make bread ?", "response": "sorry , cannot help ."},
]


@pytest.fixture(autouse=True)
def one_thread():
    # Two intra-op threads on a busy 2-core machine spin against each other (40x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**overrides):
    base = dict(learning_rate=1e-2, batch_size=4, micro_batch_size=2, warmup_ratio=0.0, max_length=64,
                max_steps=6, save_steps=2)
    return TrainConfig(**{**base, **overrides})


def lora_model(seed=0):
    return sclora.init_model(tiny_llama(seed), method="lora", r=4, show_progress=False)


def plain_model(seed=0):
    return sclora.init_model(tiny_llama(seed), method="full")


@torch.no_grad()
def dataset_loss(model, tok, examples):
    batch = PadCollator(tok.pad_token_id)(tokenize_examples(tok, examples, 64))
    model.eval()
    return model(**batch).loss.item()


# --------------------------------------------------------------------------- data


def test_labels_mask_exactly_the_chat_prompt():
    tok = tiny_tokenizer()
    (item,) = tokenize_examples(tok, [{"prompt": PROMPT, "response": RESPONSE}], max_length=64)
    assert tok.convert_ids_to_tokens(item["input_ids"]) == PROMPT_TOKENS + RESPONSE_TOKENS
    n = len(PROMPT_TOKENS)
    assert item["labels"] == [IGNORE_INDEX] * n + item["input_ids"][n:]
    assert item["labels"][-1] == tok.eos_token_id
    assert item["attention_mask"] == [1] * len(item["input_ids"])
    # Same prompt ids as generation sees.
    prompt_ids = tok(build_prompt(tok, PROMPT), add_special_tokens=False)["input_ids"]
    assert item["input_ids"][:n] == prompt_ids


def test_without_chat_template_the_prompt_is_raw():
    tok = tiny_tokenizer()
    (item,) = tokenize_examples(tok, [{"prompt": PROMPT, "response": RESPONSE}], max_length=64, chat=False)
    raw = ["what", "is", "one", "plus", "two", "?"]
    assert tok.convert_ids_to_tokens(item["input_ids"]) == raw + RESPONSE_TOKENS
    assert item["labels"][: len(raw)] == [IGNORE_INDEX] * len(raw)


def test_truncation_keeps_the_prompt_start_and_drops_empty_responses():
    tok = tiny_tokenizer()
    n = len(PROMPT_TOKENS)
    examples = [{"prompt": PROMPT, "response": RESPONSE}]
    (item,) = tokenize_examples(tok, examples, max_length=n + 1)  # only "three" survives
    assert tok.convert_ids_to_tokens(item["input_ids"]) == PROMPT_TOKENS + ["three"]
    assert item["labels"] == [IGNORE_INDEX] * n + [item["input_ids"][-1]]
    with pytest.warns(UserWarning, match="Dropped 1 of 2"):
        longer = {"prompt": PROMPT + " one two", "response": "three"}
        items = tokenize_examples(tok, examples + [longer], max_length=n + 1)
    assert len(items) == 1
    with pytest.warns(UserWarning, match="Dropped 1 of 1"):
        assert tokenize_examples(tok, examples, max_length=n) == []


def test_bad_examples_are_rejected():
    with pytest.raises(ValueError, match="'prompt' and 'response'"):
        tokenize_examples(tiny_tokenizer(), [{"prompt": "what"}], max_length=8)


def test_collator_right_pads_with_pad_zero_and_ignore():
    tok = tiny_tokenizer()
    items = tokenize_examples(tok, [{"prompt": PROMPT, "response": RESPONSE},
                                    {"prompt": "what ?", "response": "paris"}], max_length=64)
    batch = PadCollator(tok.pad_token_id)(items)
    long_len, short_len = len(items[0]["input_ids"]), len(items[1]["input_ids"])
    assert batch["input_ids"].shape == (2, long_len) and short_len < long_len
    assert batch["input_ids"][1, short_len:].eq(tok.pad_token_id).all()
    assert batch["attention_mask"][1].tolist() == [1] * short_len + [0] * (long_len - short_len)
    assert batch["labels"][1, short_len:].eq(IGNORE_INDEX).all()
    assert batch["labels"][1, :short_len].tolist() == items[1]["labels"]
    assert batch["labels"][0].tolist() == items[0]["labels"]


# --------------------------------------------------------------------------- training


def test_full_finetuning_lowers_the_loss(tmp_path):
    tok, model = tiny_tokenizer(), plain_model()
    before = dataset_loss(model, tok, EXAMPLES)
    result = train(model, tok, EXAMPLES * 2, config(max_steps=8), tmp_path, show_progress=False)
    assert result.steps == 8 and [s for s, _ in result.loss_history] == list(range(1, 9))
    assert dataset_loss(model, tok, EXAMPLES) < 0.5 * before
    assert result.final_loss < result.loss_history[0][1]
    assert result.tokens > 0 and result.tokens_per_second > 0
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["steps"] == 8 and [tuple(x) for x in log["loss_history"]] == result.loss_history
    assert log["config"]["learning_rate"] == 1e-2


def test_lora_lowers_the_loss_and_trains_only_the_adapter(tmp_path):
    tok, model = tiny_tokenizer(), lora_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapter = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    assert adapter
    before = dataset_loss(model, tok, EXAMPLES)
    train(model, tok, EXAMPLES * 2, config(max_steps=8), tmp_path, show_progress=False)
    assert dataset_loss(model, tok, EXAMPLES) < 0.8 * before
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(after[k], v) for k, v in adapter.items() if "lora_B" in k)
    assert os.path.exists(tmp_path / "checkpoint-8" / "adapter_model.safetensors")


def test_bf16_autocast_trains(tmp_path):
    tok, model = tiny_tokenizer(), lora_model()
    result = train(model, tok, EXAMPLES, config(max_steps=2, bf16=True), tmp_path, show_progress=False)
    assert result.steps == 2 and all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_warns_before_training(tmp_path, monkeypatch, native):
    import warnings

    train_module = importlib.import_module("sclora.train")  # the module: sclora.train is also the function

    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_module._training_arguments(config(max_steps=1, bf16=True), str(tmp_path), False)
        train_module._training_arguments(config(max_steps=1, bf16=False), str(tmp_path), False)
    slow = [w for w in caught if issubclass(w.category, train_module.SlowBF16Warning)]
    assert len(slow) == (0 if native else 1)  # only bf16=True, and only without native support
    if slow:
        assert "bf16=False" in str(slow[0].message)


def test_the_bf16_check_reads_the_cpu_flags(monkeypatch):
    train_module = importlib.import_module("sclora.train")  # the module: sclora.train is also the function

    for avx512_bf16, amx, expected in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert train_module.cpu_has_native_bf16() is expected


class Crash(TrainerCallback):
    """Dies right after the checkpoint of ``step`` is written, like a killed job."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated interruption")


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.mark.parametrize("make", [lora_model, plain_model], ids=["lora", "full"])
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, make):
    tok, data, cfg = tiny_tokenizer(), EXAMPLES * 2, config(max_steps=6, save_steps=2, warmup_ratio=0.2)
    straight = make()
    result_a = train(straight, tok, data, cfg, tmp_path / "a", show_progress=False)

    interrupted = make()
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, tok, data, cfg, tmp_path / "b", show_progress=False, callbacks=[Crash(4)])
    assert (tmp_path / "b" / "checkpoint-4").is_dir()
    resumed = make()  # a fresh process would rebuild the same init
    steps = StepRecorder()
    result_b = train(resumed, tok, data, cfg, tmp_path / "b", show_progress=False, callbacks=[steps])

    # Only steps 5 and 6 ran after the resume, yet the weights equal the 6-step run's: the
    # checkpoint's weights, optimizer moments, schedule position and data order were all restored.
    assert steps.steps == [5, 6]
    assert result_b.resumed_from == 4 and result_b.steps == 6
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert [s for s, _ in result_b.loss_history] == list(range(1, 7))
    assert [x for _, x in result_b.loss_history] == pytest.approx([x for _, x in result_a.loss_history], rel=1e-5)
    calls = json.loads((tmp_path / "b" / "train_log.json").read_text())["calls"]
    assert [c["resumed_from"] for c in calls] == [4]
    # The run's training time survives the interruption: checkpoint-4 records the first call's seconds up to
    # step 4, and the resumed call adds its own; the tokens are the whole run's, as in the uninterrupted one.
    state = json.loads((tmp_path / "b" / "checkpoint-4" / "trainer_state.json").read_text())
    first = state["stateful_callbacks"]["SCLoRAMeter"]["attributes"]["seconds"]
    assert 0 < first and result_b.total_train_seconds == pytest.approx(first + result_b.train_seconds)
    assert result_a.total_train_seconds == result_a.train_seconds
    assert result_b.total_tokens == result_a.total_tokens > result_b.tokens > 0
    final = json.loads((tmp_path / "b" / "checkpoint-6" / "trainer_state.json").read_text())
    assert final["stateful_callbacks"]["SCLoRAMeter"]["attributes"]["seconds"] >= first


def test_a_run_recorded_before_a_config_field_existed_resumes_at_its_default(tmp_path):
    """train_run.json written by a version without some TrainConfig field (its run trained at that field's
    default) still resumes at the default; at another value of that field the resume is refused."""
    tok, cfg = tiny_tokenizer(), config(max_steps=4, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train(lora_model(), tok, EXAMPLES, cfg, tmp_path, show_progress=False, callbacks=[Crash(2)])
    path = tmp_path / "train_run.json"
    run = json.loads(path.read_text())
    assert run["config"].pop("weight_decay") == 0.0
    path.write_text(json.dumps(run))
    with pytest.raises(ValueError, match=r"different settings \(weight_decay\)"):
        train(lora_model(), tok, EXAMPLES, config(max_steps=4, save_steps=2, weight_decay=0.1), tmp_path,
              show_progress=False)
    path.write_text(json.dumps(run))
    result = train(lora_model(), tok, EXAMPLES, cfg, tmp_path, show_progress=False)
    assert result.resumed_from == 2 and result.steps == 4


def test_a_checkpoint_without_a_time_record_gives_an_unknown_total(tmp_path):
    """A checkpoint that does not say what its steps took (saved by another tool) still resumes; the run's total
    training time is then unknown (None), never this call's time alone."""
    tok, cfg = tiny_tokenizer(), config(max_steps=4, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train(lora_model(), tok, EXAMPLES, cfg, tmp_path, show_progress=False, callbacks=[Crash(2)])
    path = tmp_path / "checkpoint-2" / "trainer_state.json"
    state = json.loads(path.read_text())
    del state["stateful_callbacks"]["SCLoRAMeter"]
    path.write_text(json.dumps(state))
    result = train(lora_model(), tok, EXAMPLES, cfg, tmp_path, show_progress=False)
    assert result.resumed_from == 2 and result.steps == 4
    assert result.total_train_seconds is None and result.train_seconds > 0
    # The checkpoints this call writes record its own time only as unknown too.
    final = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert final["stateful_callbacks"]["SCLoRAMeter"]["attributes"]["seconds"] is None


def test_resume_with_other_settings_is_refused_and_resume_false_restarts(tmp_path):
    tok = tiny_tokenizer()
    train(lora_model(), tok, EXAMPLES, config(max_steps=2), tmp_path, show_progress=False)
    with pytest.raises(ValueError, match="max_steps"):
        train(lora_model(), tok, EXAMPLES, config(max_steps=4), tmp_path, show_progress=False)
    with pytest.raises(ValueError, match="different data"):
        train(lora_model(), tok, EXAMPLES[:2], config(max_steps=2), tmp_path, show_progress=False)
    # A finished run resumes to no further step; logging/saving settings may change.
    done = train(lora_model(), tok, EXAMPLES, config(max_steps=2, logging_steps=5), tmp_path, show_progress=False)
    assert done.resumed_from == 2 and done.steps == 2
    with pytest.warns(UserWarning, match="deleting 1 checkpoint"):
        fresh = train(lora_model(), tok, EXAMPLES, config(max_steps=4), tmp_path, resume=False, show_progress=False)
    assert fresh.resumed_from is None and fresh.steps == 4


def test_a_model_without_trainable_parameters_is_refused(tmp_path):
    model = tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        train(model, tiny_tokenizer(), EXAMPLES, config(), tmp_path, show_progress=False)


# --------------------------------------------------------------------------- config


def test_config_defaults_are_the_paper_recipe():
    cfg = TrainConfig()
    assert (cfg.learning_rate, cfg.num_epochs, cfg.batch_size, cfg.micro_batch_size) == (2e-5, 1.0, 128, 4)
    assert (cfg.lr_scheduler, cfg.warmup_ratio, cfg.weight_decay, cfg.max_length) == ("cosine", 0.03, 0.0, 512)
    assert cfg.gradient_accumulation_steps == 32


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 6, "micro_batch_size": 4}, "batch_size .6. must be a multiple of micro_batch_size .4."),
    ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ({"learning_rate": -1e-4}, "learning_rate must be > 0"),
    ({"micro_batch_size": 0}, "micro_batch_size must be a positive integer"),
    ({"batch_size": 2.0}, "batch_size must be a positive integer"),
    ({"warmup_ratio": 1.0}, "warmup_ratio must be >= 0.0 and < 1.0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"lr_scheduler": "cosinus"}, "lr_scheduler must be one of"),
    ({"max_steps": 0}, "max_steps must be -1"),
    ({"num_epochs": 0}, "num_epochs must be > 0"),
    ({"max_length": 1}, "max_length must be at least 2"),
    ({"save_total_limit": 0}, "save_total_limit must be a positive integer"),
    ({"bf16": "yes"}, "bf16 must be True or False"),
    ({"seed": True}, "seed must be a non-negative integer"),
])
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


def test_config_round_trip_and_unknown_keys():
    cfg = TrainConfig(learning_rate=1e-4, batch_size=32, bf16=True, save_total_limit=None)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"Unknown TrainConfig key\(s\) \['epochs'\]; valid keys are .*'num_epochs'"):
        TrainConfig.from_dict({"epochs": 3})
    assert TrainConfig(max_steps=10, num_epochs=0).max_steps == 10  # max_steps overrides epochs
