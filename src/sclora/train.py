"""Fine-tuning with transformers' Trainer: the SC-LoRA paper's recipe, loss on responses only, resumable.

:func:`train` fine-tunes a plain model (full fine-tuning) or a ``peft.PeftModel`` (only the adapter
trains) on ``{"prompt", "response"}``, chat ``{"messages"}`` or plain ``{"text"}`` examples. Checkpoints are Trainer's ``checkpoint-*`` folders
in ``output_dir``; a later call with ``resume=True`` continues from the newest one, optimizer,
scheduler, data order and RNG state included.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
from torch.utils.data import Dataset

from . import distributed
from .chat import example_segments
from .fileio import atomic_write_json
from .options import option

__all__ = ["PadCollator", "Tokenized", "TrainConfig", "TrainResult", "orthogonal_loss", "tokenize_examples", "train"]

IGNORE_INDEX = -100
TRAIN_LOG = "train_log.json"
RUN_FILE = "train_run.json"  # what a resume must match: the config and a fingerprint of the data
_RESUME_FREE = ("logging_steps", "save_steps", "save_total_limit")  # may change between a run and its resume
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainConfig:
    """Fine-tuning hyper-parameters; the defaults are the SC-LoRA paper's recipe.

    ``batch_size`` is the effective batch (examples per optimizer step), reached by gradient
    accumulation over micro-batches of ``micro_batch_size``; under torchrun / accelerate launch it stays
    the global batch (micro-batch x accumulation x processes, so a multiple of ``micro_batch_size`` x
    processes; docs/distributed.md). ``save_steps`` and ``max_steps`` count optimizer steps;
    ``max_steps > 0`` overrides ``num_epochs``. ``bf16`` trains under bf16 autocast, also on a CPU: faster than
    fp32 where the CPU has bf16 instructions (AVX512-BF16 or AMX), far slower where it has not (a warning says so,
    :func:`cpu_has_native_bf16`). ``chat`` wraps prompts in the tokenizer's chat template.
    ``max_grad_norm`` is Trainer's gradient clipping (its default).
    """

    learning_rate: float = option(2e-5, "Peak learning rate.")
    num_epochs: float = option(1.0, "Passes over the training data (max_steps > 0 overrides it).")
    batch_size: int = option(128, "Effective batch: examples per optimizer step (gradient accumulation over "
                             "micro-batches).")
    micro_batch_size: int = option(4, "Examples per forward pass.")
    lr_scheduler: str = option("cosine", "transformers' scheduler name (cosine, linear, constant, ...).")
    warmup_ratio: float = option(0.03, "Share of the steps warming the learning rate up.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    max_length: int = option(512, "Tokens per training example (longer ones are cut).")
    seed: int = option(0, "Seed of data order, dropout and any random init.")
    bf16: bool = option(False, "Train under bf16 autocast (faster on GPUs and on CPUs with AVX512-BF16 or AMX; "
                        "far slower on other CPUs).")
    logging_steps: int = option(1, "Log the loss every this many optimizer steps.")
    save_steps: int = option(50, "Checkpoint every this many optimizer steps (and at the end).")
    save_total_limit: int | None = option(2, "Newest checkpoints kept (None: all).")
    max_steps: int = option(-1, "Optimizer steps to train; -1: num_epochs.")
    chat: bool = option(True, "Wrap prompts in the tokenizer's chat template.")
    orthogonal_penalty: float = option(0.0, "O-LoRA's lambda_1: adds lambda * sum |A_earlier A_new^T| over the target "
                                       "modules to the loss, keeping the new adapter's input directions orthogonal "
                                       "to earlier stages' (its authors use 0.5); needs earlier stages (after=).")

    def __post_init__(self):
        from transformers.trainer_utils import SchedulerType

        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

        def number(name, low, *, low_open=False, high=None):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
            if value < low or (low_open and value == low) or (high is not None and value >= high):
                bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
                raise ValueError(f"{name} must be {bound}, got {value!r}.")

        for name in ("batch_size", "micro_batch_size", "max_length", "logging_steps", "save_steps"):
            positive_int(name)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size}): "
                "the effective batch is reached by gradient accumulation over micro-batches."
            )
        if self.max_length < 2:
            raise ValueError(
                f"max_length must be at least 2 (a prompt token and a response token), got {self.max_length}.")
        number("learning_rate", 0.0, low_open=True)
        number("warmup_ratio", 0.0, high=1.0)
        number("weight_decay", 0.0)
        number("max_grad_norm", 0.0)
        number("orthogonal_penalty", 0.0)
        steps = self.max_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or (steps < 1 and steps != -1):
            raise ValueError(f"max_steps must be -1 (train for num_epochs) or a positive integer, got {steps!r}.")
        if self.max_steps == -1:
            number("num_epochs", 0.0, low_open=True)
        schedulers = tuple(s.value for s in SchedulerType)
        if self.lr_scheduler not in schedulers:
            raise ValueError(f"lr_scheduler must be one of {schedulers}, got {self.lr_scheduler!r}.")
        if self.save_total_limit is not None:
            positive_int("save_total_limit")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}.")
        for name in ("bf16", "chat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> TrainConfig:
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"Unknown TrainConfig key(s) {unknown}; valid keys are {valid}.")
        return cls(**data)


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including those before a resume)
    train_seconds: float  # wall time of this call's training loop
    tokens_per_second: float  # non-padding tokens processed by this call / train_seconds
    loss_history: list[tuple[int, float]]  # (step, logged training loss), over the whole run
    final_loss: float  # the last logged training loss (nan if none)
    tokens: int = 0  # non-padding tokens processed by this call
    resumed_from: int | None = None  # the checkpoint step this call resumed from
    dropped_examples: int = 0  # examples whose response max_length cut off entirely
    truncated_examples: int = 0  # examples cut to max_length (still trained on)
    extra: dict = field(default_factory=dict)
    # wall time of the whole run's training loop: this call's plus, after a resume, the time the checkpoint
    # records for the calls before it (None if that checkpoint has no such record)
    total_train_seconds: float | None = None
    total_tokens: int = 0  # non-padding tokens processed by the whole run

    @property
    def total_tokens_per_second(self) -> float:
        t = self.total_train_seconds
        return self.total_tokens / t if t else float("nan")


# --------------------------------------------------------------------------- data


class Tokenized(list):
    """Tokenized examples, with how many were cut to max_length (``truncated``) or dropped (``dropped``)."""

    truncated: int = 0
    dropped: int = 0


def tokenize_examples(
    tokenizer, examples: Sequence[Mapping], max_length: int, chat: bool = True
) -> Tokenized:
    """Token ids, attention mask and labels of examples in any of the three formats of
    :func:`sclora.chat.example_segments` (``{"prompt", "response"}``, ``{"messages"}``, ``{"text"}``).

    Each rendered piece is tokenized separately and the ids concatenated, so the boundary between what is trained
    and what is not is exact; labels are -100 outside the trained pieces (the prompt; a conversation's system and
    user turns). Prompt / response and text examples end with eos (trained), so the model learns where to stop;
    a conversation ends with its template's end-of-turn. A prompt gets the tokenizer's special tokens (BOS) only
    when it is not rendered through a chat template (``chat=False``), plain text always, a conversation never
    (templates carry their own). Sequences longer than ``max_length`` are cut from the right and counted
    (``truncated``, with a warning); an example left with no trained token is dropped and counted (``dropped``).
    The response is used as given: with ``chat=False`` put any separator (a space) in it or at the end of the
    prompt yourself.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos token; set tokenizer.eos_token so the model learns where to stop.")
    out = Tokenized()
    for i, example in enumerate(examples):
        try:
            segments = example_segments(tokenizer, dict(example) if isinstance(example, Mapping) else example, chat=chat)
        except ValueError as err:
            raise ValueError(f"Example {i}: {err}") from None
        kind = "messages" if "messages" in example else "text" if "prompt" not in example else "prompt_response"
        input_ids, labels = [], []
        for k, (text, trained) in enumerate(segments):
            special = k == 0 and (kind == "text" or (kind == "prompt_response" and not chat))
            ids = tokenizer(text, add_special_tokens=special)["input_ids"]
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        if kind != "messages":
            input_ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        if len(input_ids) > max_length:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            if all(x == IGNORE_INDEX for x in labels):
                out.dropped += 1
                continue
            out.truncated += 1
        out.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    if out.dropped:
        warnings.warn(
            f"Dropped {out.dropped} of {len(examples)} example(s) with no trained token within max_length="
            f"{max_length} (a prompt that fills it); raise max_length or shorten the prompts.",
            stacklevel=2,
        )
    if out.truncated:
        warnings.warn(f"Cut {out.truncated} of {len(examples)} example(s) to max_length={max_length} tokens.",
                      stacklevel=2)
    return out


class PadCollator:
    """Right-pads ``input_ids`` (pad id), ``attention_mask`` (0) and ``labels`` (-100) to the longest in the batch."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        batch = {}
        for key, pad in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
            rows = [list(f[key]) + [pad] * (length - len(f[key])) for f in features]
            batch[key] = torch.tensor(rows, dtype=torch.long)
        return batch


class _ListDataset(Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


# --------------------------------------------------------------------------- training


def _checkpoints(output_dir: str) -> list[str]:
    found = [p for p in glob.glob(os.path.join(output_dir, "checkpoint-*"))
             if os.path.isdir(p) and _CHECKPOINT.match(os.path.basename(p))]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(os.path.basename(p)).group(1)))


def incomplete_checkpoint(path: str) -> str | None:
    """Why ``path`` cannot be resumed from, or None if it is complete. Trainer writes trainer_state.json last
    (after the weights, optimizer, scheduler and RNG state), so a readable one for the folder's own step next
    to non-empty weights means the save finished; a process killed while saving leaves it missing, empty or
    truncated. (One killed while Trainer's rotation deleted an older checkpoint can leave that older one
    partly deleted; it is never the newest complete one, so it is never resumed from.)"""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return "no readable trainer_state.json"
    step = int(_CHECKPOINT.match(os.path.basename(path)).group(1))
    if not isinstance(state, dict) or state.get("global_step") != step:
        return f"trainer_state.json is not for step {step}"
    weights = [f for f in os.listdir(path) if f.startswith(("adapter_model", "model", "pytorch_model"))]
    if not any(os.path.isdir(os.path.join(path, f)) or os.path.getsize(os.path.join(path, f)) > 0 for f in weights):
        return "no weights"
    return None


def _complete_checkpoints(output_dir: str, main: bool) -> list[str]:
    """The complete checkpoints in ``output_dir``, oldest first; the main process removes incomplete ones (a
    resume would otherwise fail on them, and Trainer's rotation would count them)."""
    complete = []
    for path in _checkpoints(output_dir):
        why = incomplete_checkpoint(path)
        if why is None:
            complete.append(path)
        elif main:
            warnings.warn(f"Removing the incomplete checkpoint {path} ({why}: its save was interrupted); "
                          "resuming from the newest complete one.", stacklevel=3)
            shutil.rmtree(path, ignore_errors=True)
    return complete


def _with_defaults(recorded: dict) -> dict:
    """A recorded run config with the TrainConfig fields it does not name (added after it was written) at their
    defaults, which is what the run trained with; kept as it is if it names a field this version lacks."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.name not in _RESUME_FREE}
    return {**defaults, **recorded} if set(recorded) <= set(defaults) else recorded


def _fingerprint(items: list[dict]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item["input_ids"], item["labels"]]).encode())
    return digest.hexdigest()


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def rounded(x: float | None, digits: int = 1) -> float | None:
    """``x`` rounded for a report, None where it is unknown (None or not finite)."""
    return round(x, digits) if x is not None and math.isfinite(x) else None


_METER = "SCLoRAMeter"  # its record in each checkpoint's trainer_state.json ("stateful_callbacks")


def _recorded_seconds(checkpoint: str | None) -> float | None:
    """The training-loop seconds ``checkpoint`` records for the run up to its step (0 without a checkpoint)."""
    if checkpoint is None:
        return 0.0
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            seconds = json.load(f)["stateful_callbacks"][_METER]["attributes"]["seconds"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(seconds) if isinstance(seconds, (int, float)) and math.isfinite(seconds) else None


def _meter_callback(earlier_seconds: float | None):
    """Times the training loop of this call and counts the tokens it processed (after any resume). Each checkpoint
    records the run's training seconds up to its step (``earlier_seconds``, the resumed checkpoint's record, plus this
    call's), so a resumed run still knows what its whole training cost."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class Meter(TrainerCallback, ExportableState):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
            state.stateful_callbacks.setdefault(_METER, self.state())  # a checkpoint saved without one

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.start
            self.tokens = state.num_input_tokens_seen - self.tokens0
            self.total_tokens = state.num_input_tokens_seen

        def state(self) -> dict:
            start = getattr(self, "start", None)
            if earlier_seconds is None or start is None:
                return {"args": {}, "attributes": {"seconds": None}}
            return {"args": {}, "attributes": {"seconds": earlier_seconds + time.perf_counter() - start}}

    Meter.__name__ = Meter.__qualname__ = _METER
    return Meter()


def _progress_callback():
    """One progress bar over the optimizer steps, showing the running loss and tokens/s (instead of Trainer's
    bar and its dict lines)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                                dynamic_ncols=True)
                self.start, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                seconds = time.perf_counter() - self.start
                speed = (state.num_input_tokens_seen - self.tokens0) / seconds if seconds > 0 else 0.0
                self.bar.set_postfix_str(f"loss {float(logs['loss']):.4f}, {speed:.0f} tok/s", refresh=True)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Progress()


def orthogonal_loss(pairs) -> torch.Tensor:
    """O-LoRA's orthogonality penalty (Wang et al. 2023): ``sum |A_earlier A_new^T|`` (entrywise) over ``pairs``
    of (earlier stacked A, the new adapter's A)."""
    return sum(torch.mm(old.to(new), new.T).abs().sum() for old, new in pairs)


def _orthogonal_pairs(model, earlier: Mapping | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(earlier A, trainable A) for every adapted module of ``model`` that an earlier adapter also adapted."""
    if not earlier:
        raise ValueError("orthogonal_penalty > 0 (O-LoRA) keeps the new adapter orthogonal to earlier stages' "
                         "adapters, and none were given: train after an earlier stage (sclora.finetune(..., "
                         "after=...)) or set orthogonal_penalty=0.")
    pairs = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or "default" not in lora_a:
            continue
        key = name.removeprefix("base_model.model.")
        if key in earlier:
            weight = lora_a["default"].weight
            if earlier[key].shape[1] != weight.shape[1]:
                raise ValueError(f"orthogonal_penalty: the earlier adapter's A of {key} has {earlier[key].shape[1]} "
                                 f"inputs, the new one {weight.shape[1]}: the stages adapt another model.")
            pairs.append((earlier[key].detach().to(weight.device), weight))
    if not pairs:
        raise ValueError("orthogonal_penalty: no module of the new adapter was adapted by an earlier stage; give the "
                         "earlier stages' target modules.")
    return pairs


def _penalized_trainer(weight: float, pairs):
    """Trainer whose loss gains ``weight * orthogonal_loss(pairs)`` once per optimizer step."""
    from transformers import Trainer

    class PenalizedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            loss = out[0] if return_outputs else out
            penalty = weight * orthogonal_loss(pairs)
            # a loss normalized over the whole accumulated batch is summed over its micro-batches, and Trainer
            # divides the others by the accumulation steps itself: the penalty counts once per step either way
            if (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func:
                penalty = penalty / self.current_gradient_accumulation_steps
            loss = loss + penalty.to(loss)
            return (loss, *out[1:]) if return_outputs else loss

    return PenalizedTrainer


class SlowBF16Warning(UserWarning):
    """bf16 training was asked for on a CPU without bf16 instructions."""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX tiles). Without them PyTorch emulates
    bf16: on an AVX2-only AMD EPYC, SmolLM2-135M's layer matmuls took 54-61x as long in bf16 as in fp32 and an
    MLP block's forward + backward under bf16 autocast 15x as long (benchmarks/cpu_bf16.py)."""
    cpu = torch.cpu
    return any(getattr(cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _warn_if_bf16_is_emulated(config: TrainConfig, cuda: bool) -> None:
    if config.bf16 and not cuda and not cpu_has_native_bf16():
        warnings.warn("bf16=True on a CPU without bf16 instructions (no AVX512-BF16 or AMX): PyTorch emulates bf16 "
                      "here, and training runs many times slower than in fp32 (15x for an MLP block's forward + backward, "
                      "54-61x per matmul, measured on an AVX2-only CPU). Train with bf16=False (--no-bf16, `bf16: false` under train: in a config) on this "
                      "machine.", SlowBF16Warning, stacklevel=3)


def _training_arguments(config: TrainConfig, output_dir: str, show_progress: bool):
    """Trainer's arguments for ``config``. ``config.batch_size`` stays the global batch under data parallelism:
    micro-batch x gradient accumulation x processes."""
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    _warn_if_bf16_is_emulated(config, cuda)
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="no",
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,
        report_to="none",
        disable_tqdm=True,  # our own bar (_progress_callback) when show_progress
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,  # every adapter (or model) weight takes part in each forward pass
    )
    processes = args.world_size
    if processes > 1:
        per_step = config.micro_batch_size * processes
        if config.batch_size % per_step:
            raise ValueError(
                f"batch_size ({config.batch_size}) must be a multiple of micro_batch_size x processes "
                f"({config.micro_batch_size} x {processes} = {per_step}): batch_size is the global batch, reached by "
                "gradient accumulation over micro-batches on every process. Change batch_size, micro_batch_size "
                "or the number of processes."
            )
        args.gradient_accumulation_steps = config.batch_size // per_step
    return args


def train(
    model,
    tokenizer,
    examples: Sequence[Mapping[str, str]],
    config: TrainConfig,
    output_dir: str | os.PathLike,
    *,
    resume: bool = True,
    show_progress: bool = True,
    callbacks: Sequence | None = None,
    context=None,
    orthogonal_to: Mapping | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place on examples with transformers' Trainer: ``{"prompt", "response"}``, chat
    ``{"messages"}`` or ``{"text"}`` (see :func:`tokenize_examples`; :func:`sclora.data.load_examples` reads them
    from files).

    ``model`` is a plain causal LM (every parameter with ``requires_grad`` trains: full fine-tuning)
    or a ``peft.PeftModel`` (only the adapter trains). Checkpoints (``checkpoint-<step>``, every
    ``config.save_steps`` optimizer steps and at the end, the newest ``config.save_total_limit``
    kept) go to ``output_dir`` with the optimizer, scheduler, RNG and trainer state. With
    ``resume=True`` and a checkpoint there, training continues from the newest one and ends exactly
    where an uninterrupted run would; with ``resume=False`` existing checkpoints are deleted first.
    The trained model itself is not saved beyond those checkpoints: export it afterwards
    (:func:`sclora.export_lora`, :func:`sclora.merge_and_save`).

    Resuming a PEFT model restores only its adapter weights (that is all a PEFT checkpoint holds).
    Residual-form inits (SC-LoRA, PiSSA, CorDA) also replace the frozen base weights by residuals at
    init, so before ``train(..., resume=True)`` rebuild the model exactly as the first run did (same
    base model, method, config and statistics: the inits are deterministic), then call train with
    the same ``config`` and ``examples``. The initial adapter that :func:`sclora.export_lora` needs
    is then the rebuilt init's (or save it once with :func:`sclora.save_initial_adapter`).

    A resume with another config (learning rate, batch size, ``max_steps``, ...) or other examples
    is refused with a ValueError, because Trainer would restore the old run's schedule and data
    order (a cosine schedule keeps its old horizon); only ``logging_steps``, ``save_steps`` and
    ``save_total_limit`` may change.

    Writes ``output_dir/train_log.json`` (loss history, per-call timings, config) and
    ``output_dir/train_run.json`` (what a resume must match: also ``context``, any JSON value naming what else
    the run depends on, e.g. a fingerprint of the initialization). Only complete checkpoints are resumed
    from: one a killed process left half-written (no readable ``trainer_state.json`` for its step, or no
    weights) is removed with a warning, and the newest complete one is used. ``callbacks`` are extra
    ``transformers.TrainerCallback`` objects. The model is left in the mode it came in.

    With ``config.orthogonal_penalty`` > 0 (O-LoRA), ``orthogonal_to`` maps target module names to the earlier
    adapters' stacked A matrices (:func:`sclora.stages.earlier_lora_A`), and every optimizer step's loss gains
    ``orthogonal_penalty * sum |A_earlier A^T|`` (:func:`orthogonal_loss`).
    """
    from transformers import Trainer

    output_dir = os.fspath(output_dir)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}.")
    items = tokenize_examples(tokenizer, examples, config.max_length, chat=config.chat)
    if not items:
        raise ValueError("No training examples left after tokenization (none given, or all truncated away).")
    dropped = items.dropped
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("The model has no trainable parameter; wrap it with sclora.init_model first.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    penalty = _orthogonal_pairs(model, orthogonal_to) if config.orthogonal_penalty > 0 else None

    # Creating the arguments sets up the processes under torchrun / accelerate launch (DDP, FSDP).
    args = _training_arguments(config, output_dir, show_progress)
    main = args.process_index == 0  # writes train_run.json, train_log.json (Trainer saves checkpoints itself)
    os.makedirs(output_dir, exist_ok=True)
    existing = _complete_checkpoints(output_dir, main)
    distributed.barrier()  # no rank looks at the folder while the main one removes incomplete checkpoints
    if existing and not resume:
        if main:
            warnings.warn(f"resume=False: deleting {len(existing)} checkpoint(s) of an earlier run in {output_dir}.",
                          stacklevel=2)
            for path in existing:
                shutil.rmtree(path)
        existing = []
    resume_from = existing[-1] if existing else None
    resume_from = distributed.broadcast_object(resume_from)  # every rank resumes from rank 0's choice
    run = {"config": {k: v for k, v in config.to_dict().items() if k not in _RESUME_FREE},
           "examples": len(items), "data_sha256": _fingerprint(items), **({"context": context} if context else {})}
    run_path = os.path.join(output_dir, RUN_FILE)
    if resume_from is not None and os.path.exists(run_path):
        with open(run_path) as f:
            before = json.load(f)
        before["config"] = _with_defaults(before.get("config", {}))  # a key added since: its default trained
        if before != run:
            changed = sorted(k for k in set(before["config"]) | set(run["config"])
                             if before["config"].get(k) != run["config"].get(k))
            if before.get("data_sha256") != run["data_sha256"]:
                changed.append("examples (different data)")
            if before.get("context") != run.get("context"):
                changed.append(f"context ({before.get('context')!r} -> {run.get('context')!r})")
            raise ValueError(
                f"Cannot resume from {resume_from}: the run there used different settings ({', '.join(changed)}). "
                "A resume restores the old optimizer, schedule and data order, so it must use the same config and "
                "examples; pass resume=False (deletes the checkpoints) or use another output_dir."
            )
    if main:
        atomic_write_json(run_path, run)
    distributed.barrier()

    earlier_seconds = _recorded_seconds(resume_from)  # None: the checkpoint does not say what earlier calls took
    meter = _meter_callback(earlier_seconds)
    trainer = (_penalized_trainer(config.orthogonal_penalty, penalty) if penalty else Trainer)(
        model=model,
        args=args,
        train_dataset=_ListDataset(items),
        data_collator=PadCollator(pad_id),
        callbacks=[meter, *(callbacks or [])],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # it would print every log line as a dict
    trainer.remove_callback(ProgressCallback)
    if show_progress:
        trainer.add_callback(_progress_callback())
    was_training = model.training
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        model.train(was_training)
    if trainer.is_fsdp_enabled:  # for sclora.distributed.full_parameters (an export after FSDP training)
        object.__setattr__(model, "_sclora_fsdp_root", trainer.model_wrapped)

    state = trainer.state
    history = [(int(e["step"]), float(e["loss"])) for e in state.log_history if "loss" in e and "step" in e]
    seconds = getattr(meter, "seconds", float("nan"))
    tokens = int(getattr(meter, "tokens", 0))
    result = TrainResult(
        steps=int(state.global_step),
        train_seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else float("nan"),
        loss_history=history,
        final_loss=history[-1][1] if history else float("nan"),
        tokens=tokens,
        resumed_from=int(_CHECKPOINT.match(os.path.basename(resume_from)).group(1)) if resume_from else None,
        dropped_examples=dropped,
        truncated_examples=items.truncated,
        extra={"examples": len(items), "max_steps": int(state.max_steps)},
        total_train_seconds=None if earlier_seconds is None else earlier_seconds + seconds,
        total_tokens=int(getattr(meter, "total_tokens", tokens)),
    )
    if not main:
        return result
    log_path = os.path.join(output_dir, TRAIN_LOG)
    calls = []
    if resume_from and os.path.exists(log_path):  # keep the timings of the calls before this resume
        try:
            with open(log_path) as f:
                calls = [c for c in json.load(f).get("calls", []) if c.get("end_step", 0) <= result.resumed_from]
        except (OSError, ValueError, AttributeError):
            calls = []
    calls.append({"resumed_from": result.resumed_from, "end_step": result.steps, "train_seconds": _finite(seconds),
                  "tokens": tokens, "tokens_per_second": _finite(result.tokens_per_second)})
    atomic_write_json(log_path, {
        "steps": result.steps,
        "max_steps": int(state.max_steps),
        "final_loss": _finite(result.final_loss),
        "examples": len(items),
        "dropped_examples": dropped,
        "truncated_examples": items.truncated,
        "loss_history": [list(x) for x in history],
        "calls": calls,
        "config": config.to_dict(),
    })
    return result
