"""sclora: Subspace-Constrained LoRA initialization (SC-LoRA) for Hugging Face models and PEFT."""

import logging as _logging

# PEFT imports bitsandbytes when it is installed; on CPUs with AVX512-BF16 bitsandbytes then logs, at import, that an
# optional faster kernel package is missing. Not an error, and not actionable for most commands (the README's 4-bit
# section says it); keep it out of every command's output.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

from . import models
from .config import LLAMA_TARGET_MODULES, METHODS, SCLoRAConfig
from .diagnostics import subspace_energy, summarize_energy
from .export import export_lora, merge_and_save, remember_initial_adapter, save_initial_adapter
from .methods import (
    BetaChoice,
    choose_beta,
    get_corda_model,
    get_lora_model,
    get_salora_model,
    get_sclora_model,
    init_model,
)
from .statistics import CovarianceStats, collect_covariances
from .subspace import (
    NonUniqueSubspaceWarning,
    captured_energy,
    delta_covariance,
    reward,
    sc_lora_factors,
    sc_subspace,
)

__version__ = "0.1.0"

__all__ = [
    "LLAMA_TARGET_MODULES",
    "METHODS",
    "BetaChoice",
    "CovarianceStats",
    "NonUniqueSubspaceWarning",
    "SCLoRAConfig",
    "captured_energy",
    "choose_beta",
    "collect_covariances",
    "delta_covariance",
    "export_lora",
    "get_corda_model",
    "get_lora_model",
    "get_salora_model",
    "get_sclora_model",
    "init_model",
    "merge_and_save",
    "models",
    "remember_initial_adapter",
    "reward",
    "save_initial_adapter",
    "sc_lora_factors",
    "sc_subspace",
    "subspace_energy",
    "summarize_energy",
]
