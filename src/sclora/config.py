"""SCLoRAConfig: one HF-style config for every initialization method sclora offers."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

import torch
from peft import LoraConfig

from .subspace import SOLVERS, _check_betas

__all__ = ["LLAMA_TARGET_MODULES", "METHODS", "SCLoRAConfig"]

LLAMA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("sc_lora", "lora", "pissa", "corda_ipa", "corda_kpa", "full")
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
    several knowledge sets D-_1 .. D-_k it is a list of k weights, each >= 0, summing to at most 1.
    ``normalize`` is the statistics normalization (see :func:`sclora.collect_covariances`),
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
    beta: float | list[float] = 0.5
    target_modules: list[str] | str = field(default_factory=lambda: list(LLAMA_TARGET_MODULES))
    normalize: str = "none"
    dtype: str = "float64"
    eigen_solver: str = "eigh"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}.")
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}.")
        if isinstance(self.beta, tuple):
            self.beta = list(self.beta)
        _check_betas(self.beta)
        if self.lora_alpha is None:
            self.lora_alpha = self.r
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}.")
        from .statistics import NORMALIZATIONS

        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}.")
        if self.eigen_solver not in EIGEN_SOLVERS:
            raise ValueError(
                f"eigen_solver must be one of {EIGEN_SOLVERS} (eigh: full eigendecomposition, the reference; lobpcg: "
                f"block LOBPCG on the top r; mixed: float32 eigh refined in float64; auto: the fastest measured for "
                f"each module's size), got {self.eigen_solver!r}."
            )
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def scaling(self) -> float:
        """PEFT's adapter scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def to_lora_config(self, init_lora_weights: bool | str = False) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            use_rslora=self.use_rslora,
            target_modules=self.target_modules,
            init_lora_weights=init_lora_weights,
            task_type="CAUSAL_LM",
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
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path + ".tmp", "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(path + ".tmp", path)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> SCLoRAConfig:
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            return cls.from_dict(json.load(f))
