"""SCLoRAConfig: one HF-style config for every initialization method sclora offers."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields

import torch
from peft import LoraConfig

from .fileio import atomic_write_json
from .subspace import SOLVERS, check_betas

__all__ = ["LLAMA_TARGET_MODULES", "METHODS", "SCLoRAConfig"]

LLAMA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("sc_lora", "lora", "pissa", "olora", "eva", "corda_ipa", "corda_kpa", "salora", "full")
#: each method's statistics normalization when none is given: CorDA as its authors and PEFT compute it
METHOD_NORMALIZE = {"corda_ipa": "abs_of_max", "corda_kpa": "abs_of_max"}
#: "eigh" (full eigendecomposition, the reference), "lobpcg", "mixed", "auto": see sclora.subspace
EIGEN_SOLVERS = SOLVERS
DTYPES = {"float64": torch.float64, "float32": torch.float32}
CONFIG_NAME = "sclora_config.json"


@dataclass
class SCLoRAConfig:
    """Hyper-parameters of an adapter initialization.

    ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora`` and ``target_modules`` mean what they
    mean in PEFT's ``LoraConfig``; ``lora_alpha=None`` means ``lora_alpha = r`` (scaling 1, as the
    authors' code). ``beta`` balances fitting D+ (0) against preserving D- (1) (paper, Eq. 1); with
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
    large modules and small r, e.g. 4096-dim at r=16), ``"mixed"`` (float32 eigh refined in float64: 1.3-1.8x
    at 576-dim, r=16), or ``"auto"`` (whichever measured fastest at equal accuracy for each module's size;
    benchmarks/eigensolver.py). All reach the float64 eigh subspace to ~1e-8 in projector distance.
    """

    method: str = "sc_lora"
    r: int = 16
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    beta: float | list[float] | str = 0.5  # "auto": the smallest β meeting preserve_budget (choose_beta)
    preserve_budget: float | list[float] | None = None  # with beta="auto": the share of D-'s output energy the
    # subspace may keep (one per knowledge set for several)
    lock_subspace: bool = False  # SC-LoRA: B stays Q (frozen), only A trains: the output stays in span(Q)
    salora_safety_rank: int = 32  # SaLoRA: directions of D-'s outputs its fixed module C removes (authors' r_s = 32)
    salora_task_rank: int = 32  # SaLoRA: directions of D+'s outputs its B0 is projected on (authors' 32)
    quantize_residual: str | None = None  # "nf4" / "fp4": the frozen base (W_res) in 4-bit after init (QLoRA-style)
    target_modules: list[str] | str = field(default_factory=lambda: list(LLAMA_TARGET_MODULES))
    normalize: str | None = None  # None: the method's own (METHOD_NORMALIZE)
    dtype: str = "float64"
    eigen_solver: str = "eigh"

    def __post_init__(self):
        """Reject every invalid value with a ValueError naming the field, the value and what is allowed."""
        from .statistics import NORMALIZATIONS

        _choice("method", self.method, METHODS)
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
        if self.lora_alpha is None:
            self.lora_alpha = self.r
        if not _real(self.lora_alpha) or self.lora_alpha <= 0:
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
        if self.normalize is None:
            self.normalize = METHOD_NORMALIZE.get(self.method, "none")
        _choice("normalize", self.normalize, NORMALIZATIONS)
        _choice("dtype", self.dtype, tuple(DTYPES))
        _choice("eigen_solver", self.eigen_solver, EIGEN_SOLVERS,
                " (eigh: full eigendecomposition, the reference; lobpcg: block LOBPCG on the top r; mixed: float32 "
                "eigh refined in float64; auto: the fastest measured for each module's size)")

    def _check_target_modules(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(f"target_modules {targets!r} is not a valid regex ({err}).") from None
        elif not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"target_modules must be a regex string or a non-empty list of module name suffixes (strings), "
                f"e.g. {LLAMA_TARGET_MODULES}; got {targets!r}."
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def scaling(self) -> float:
        """PEFT's adapter scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def to_lora_config(self, init_lora_weights: bool | str = False, **extra) -> LoraConfig:
        """PEFT's LoraConfig for these values; ``extra`` are further LoraConfig fields (e.g. ``eva_config``)."""
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            use_rslora=self.use_rslora,
            target_modules=self.target_modules,
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
