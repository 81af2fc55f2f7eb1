"""SCLoRAConfig: one HF-style config for every initialization method sclora offers."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields

import torch
from peft import LoraConfig

from .fileio import atomic_write_json
from .options import option
from .registry import METHODS, method_spec
from .statistics import NORMALIZATIONS
from .subspace import SOLVERS, check_betas

__all__ = ["LLAMA_TARGET_MODULES", "METHODS", "SCLoRAConfig"]

#: the paper's targets on Llama models (the default, None, targets every linear layer but the output head)
LLAMA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: "eigh" (full eigendecomposition, the reference), "lobpcg", "mixed", "auto": see sclora.subspace
EIGEN_SOLVERS = SOLVERS
DTYPES = {"float64": torch.float64, "float32": torch.float32}
CONFIG_NAME = "sclora_config.json"


@dataclass
class SCLoRAConfig:
    """Hyper-parameters of an adapter initialization.

    ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora`` and ``target_modules`` mean what they
    mean in PEFT's ``LoraConfig``; ``lora_alpha=None`` means ``lora_alpha = r`` (scaling 1, as the
    authors' code); ``target_modules=None`` means every linear layer of the model but the output head
    (PEFT's "all-linear"), found from the model, for any causal LM family.
    Fields keep what was given: ``None`` defaults are resolved where they are used (:attr:`resolved_alpha`,
    :attr:`resolved_normalize`), so changing ``method`` or ``r`` later gives what naming them first gives. ``beta`` balances fitting D+ (0) against preserving D- (1) (paper, Eq. 1); with
    several knowledge sets D-_1 .. D-_k it is a list of k weights, each >= 0, summing to at most 1;
    ``beta="auto"`` with ``preserve_budget=b`` takes the smallest β whose initial subspace keeps at most a share
    b of D-'s output energy (:func:`sclora.choose_beta`; several knowledge sets: a list, one budget per set).
    ``lock_subspace=True`` keeps the constraint through training, not only at initialization: B stays Q (frozen)
    and only A trains, so the adapter's output B A x stays in span(Q) at every step (half the trainable
    parameters; export stays exact).
    ``salora_safety_rank`` / ``salora_task_rank`` are SaLoRA's r_s and r_t (:mod:`sclora.methods.salora`).
    ``quantize_residual="nf4"`` stores the frozen base in 4-bit after the (full-precision) initialization, as
    QLoRA does (:mod:`sclora.quantize`; needs bitsandbytes).
    ``normalize`` is the statistics normalization (see :func:`sclora.collect_covariances`); ``None`` means the
    method's own: ``"none"`` for SC-LoRA (Algorithm 1), ``"abs_of_max"`` for CorDA (each sample divided by the
    absolute value of its largest activation, as the CorDA authors and PEFT do);
    ``dtype`` the precision of the decomposition, ``eigen_solver`` its algorithm: ``"eigh"`` (full
    eigendecomposition, the default and reference), ``"lobpcg"`` (block LOBPCG on the top r: fastest for
    large modules and small r, e.g. 4096-dim at r=16), ``"mixed"`` (float32 eigh refined in float64: faster
    than eigh at 576-dim, r=16), or ``"auto"`` (whichever measured fastest at equal accuracy for each module's
    size; benchmarks/eigensolver.py, timings in docs/performance.md). All reach the float64 eigh subspace to ~1e-8
    in projector distance.
    """

    method: str = option("sc_lora", "The initialization method.", choices=METHODS)
    r: int = option(16, "LoRA rank.", aliases=("--lora-r",))  # torchrun's parser rejects "--r" (a prefix)
    lora_alpha: float | None = option(None, "LoRA alpha; None: alpha = r (scaling 1).")
    lora_dropout: float = option(0.0, "Dropout on the adapter's input, in [0, 1).", aliases=("--dropout",))
    use_rslora: bool = option(False, "rsLoRA scaling alpha / sqrt(r) instead of alpha / r.", aliases=("--rslora",))
    beta: float | list[float] | str = option(
        0.5, "SC-LoRA: weight of preserving D- against fitting D+ (0: only fit, 1: only preserve), or auto: the "
        "smallest beta meeting --preserve-budget.", repeat=True)
    preserve_budget: float | list[float] | None = option(
        None, "With beta auto: the share of D-'s output energy the initial subspace may keep, e.g. 0.05.",
        aliases=("--budget",), repeat=True)
    lock_subspace: bool = option(False, "SC-LoRA: B stays Q (frozen) and only A trains, so the adapter's output "
                                 "stays in the chosen subspace through training.")
    salora_safety_rank: int = option(32, "SaLoRA: directions of D-'s outputs its fixed module removes (r_s).")
    salora_task_rank: int = option(32, "SaLoRA: directions of D+'s outputs its B0 is projected on (r_t).")
    quantize_residual: str | None = option(
        None, "After the init, store the frozen base (W_res) in 4-bit, QLoRA-style (needs bitsandbytes).",
        choices=("nf4", "fp4"), aliases=("--quantize",))
    target_modules: list[str] | str | None = option(
        None, "Layers to adapt: module name suffixes (q_proj v_proj), one regex over full names, or all-linear "
        "(every linear layer but the output head).", names=True)
    normalize: str | None = option(None, "Statistics normalization; None: the method's own (none for SC-LoRA, "
                                   "abs_of_max for CorDA).", choices=NORMALIZATIONS)
    dtype: str = option("float64", "Precision of the decomposition.", choices=tuple(DTYPES))
    eigen_solver: str = option("eigh", "Eigensolver: eigh (the reference), lobpcg, mixed, auto.",
                               choices=EIGEN_SOLVERS)

    def __post_init__(self):
        """Reject every invalid value with a ValueError naming the field, the value and what is allowed."""
        method_spec(self.method)  # a ValueError listing the methods
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}.")
        if isinstance(self.beta, tuple):
            self.beta = list(self.beta)
        if self.beta == "auto":
            if isinstance(self.preserve_budget, tuple):
                self.preserve_budget = list(self.preserve_budget)
            budgets = self.preserve_budget if isinstance(self.preserve_budget, list) else [self.preserve_budget]
            if not budgets or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b <= 1
                                  for b in budgets):
                raise ValueError("beta='auto' needs preserve_budget, the share of D-'s output energy the initial "
                                 "subspace may keep, a number in [0, 1] such as 0.05 (a list of them, one per "
                                 f"knowledge set, for several); got {self.preserve_budget!r}.")
            if self.method != "sc_lora":
                raise ValueError(f"beta='auto' applies to method 'sc_lora', not {self.method!r}.")
        else:
            if self.preserve_budget is not None:
                raise ValueError("preserve_budget applies with beta='auto' (it chooses β); drop it or set beta='auto'.")
            check_betas(self.beta)
        if self.lora_alpha is not None and (not _real(self.lora_alpha) or self.lora_alpha <= 0):
            raise ValueError(f"lora_alpha must be a finite number > 0 (or None for lora_alpha = r), "
                             f"got {self.lora_alpha!r}.")
        if not _real(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}.")
        for name in ("salora_safety_rank", "salora_task_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.lock_subspace, bool):
            raise ValueError(f"lock_subspace must be True or False, got {self.lock_subspace!r}.")  # noqa: TRY004
        if self.lock_subspace and self.method != "sc_lora":
            raise ValueError(f"lock_subspace applies to method 'sc_lora', not {self.method!r}.")
        if self.quantize_residual is not None:
            from .quantize import QUANT_TYPES

            _choice("quantize_residual", self.quantize_residual, QUANT_TYPES)
            if self.method == "full":
                raise ValueError("quantize_residual needs an adapter method: full fine-tuning trains the weights "
                                 "it would quantize.")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be True or False, got {self.use_rslora!r}.")  # noqa: TRY004
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self._check_target_modules()
        if self.normalize is not None:
            _choice("normalize", self.normalize, NORMALIZATIONS)
        _choice("dtype", self.dtype, tuple(DTYPES))
        _choice("eigen_solver", self.eigen_solver, EIGEN_SOLVERS,
                " (eigh: full eigendecomposition, the reference; lobpcg: block LOBPCG on the top r; mixed: float32 "
                "eigh refined in float64; auto: the fastest measured for each module's size)")

    def _check_target_modules(self) -> None:
        targets = self.target_modules
        if targets is None:
            return
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(f"target_modules {targets!r} is not a valid regex ({err}).") from None
        elif not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"target_modules must be None (every linear layer but the output head), a regex string or a non-empty "
                f"list of module name suffixes (strings), e.g. {LLAMA_TARGET_MODULES}; got {targets!r}."
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def resolved_alpha(self) -> float:
        """``lora_alpha``, or ``r`` where it is None."""
        return self.r if self.lora_alpha is None else self.lora_alpha

    @property
    def resolved_normalize(self) -> str:
        """``normalize``, or the method's own where it is None (CorDA: ``"abs_of_max"``; the others ``"none"``)."""
        return self.normalize if self.normalize is not None else method_spec(self.method).normalize

    @property
    def scaling(self) -> float:
        """PEFT's adapter scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
        return self.resolved_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def check_sets(self, n_sets: int) -> None:
        """Refuse ``n_sets`` knowledge sets (D-) this config cannot weigh (a method that reads none ignores them):
        several need a method that takes them (SC-LoRA) and one ``beta`` (or, with ``beta="auto"``, one ``preserve_budget``) per set."""
        spec = method_spec(self.method)
        if "minus" not in spec.needs:
            return  # the method reads no knowledge set
        if n_sets > 1 and not spec.several_sets:
            raise ValueError(f"{self.method} preserves one knowledge set but {n_sets} were given; pass one (e.g. the "
                             "union of their examples). Only sc_lora weighs several sets, with one beta each.")
        if self.method != "sc_lora":
            return
        name, value = ("preserve_budget", self.preserve_budget) if self.beta == "auto" else ("beta", self.beta)
        n_values = len(value) if isinstance(value, list) else 1
        if n_values != n_sets:
            raise ValueError(f"{name}={value!r} has {n_values} value(s) but {n_sets} knowledge set(s) are to be "
                             f"preserved: give one {name} per set (a number for one set, a list for several).")

    def replace(self, **changes) -> SCLoRAConfig:
        """A copy with ``changes``; fields left as None keep meaning "the default of the (new) method / rank"."""
        return SCLoRAConfig.from_dict({**self.to_dict(), **changes})

    def to_lora_config(self, model=None, init_lora_weights: bool | str = False, **extra) -> LoraConfig:
        """PEFT's LoraConfig for these values; ``extra`` are further LoraConfig fields (e.g. ``eva_config``).

        With ``model``, ``target_modules`` is resolved on it (None: every linear layer but the output head), so
        PEFT wraps exactly the layers sclora initializes; PEFT's own default for None differs by model family."""
        targets = self.target_modules
        if model is not None:
            from .layers import layer_kind
            from .targets import peft_target_modules, resolve_targets

            if any(layer_kind(m) == "conv1d" for m in resolve_targets(model, targets).values()):
                extra.setdefault("fan_in_fan_out", True)  # transformers' Conv1D stores its weight as (in, out)
            targets = peft_target_modules(model, targets)
        elif targets is None:
            targets = "all-linear"
        return LoraConfig(
            r=self.r,
            lora_alpha=self.resolved_alpha,
            lora_dropout=self.lora_dropout,
            use_rslora=self.use_rslora,
            target_modules=targets,
            init_lora_weights=init_lora_weights,
            task_type="CAUSAL_LM",
            **extra,
        )

    # --- HF-style persistence -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SCLoRAConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown SCLoRAConfig field(s) {unknown}; valid fields are {sorted(known)}.")
        return cls(**data)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        atomic_write_json(os.path.join(directory, CONFIG_NAME), self.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> SCLoRAConfig:
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            return cls.from_dict(json.load(f))


def _real(x) -> bool:
    """A finite int or float, not a bool (True is an int in Python)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and -math.inf < x < math.inf


def _choice(field_name: str, value, allowed: tuple, explain: str = "") -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{field_name} must be one of {allowed}{explain}, got {value!r}.")
