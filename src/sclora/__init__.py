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
from .data import load_examples
from .registry import METHOD_SPECS, methods_table
from .statistics import CovarianceStats, collect_covariances
from .statistics_cache import statistics_batches
from .subspace import (
    NonUniqueSubspaceWarning,
    captured_energy,
    delta_covariance,
    reward,
    sc_lora_factors,
    sc_subspace,
)
from .stages import StaleStageError
from .train import TrainConfig, TrainResult, train
from .workflow import FinetuneResult, finetune, suggest_train_config

__version__ = "0.1.0"

__all__ = [
    "LLAMA_TARGET_MODULES",
    "METHODS",
    "METHOD_SPECS",
    "BetaChoice",
    "CovarianceStats",
    "FinetuneResult",
    "NonUniqueSubspaceWarning",
    "SCLoRAConfig",
    "StaleStageError",
    "TrainConfig",
    "TrainResult",
    "captured_energy",
    "choose_beta",
    "collect_covariances",
    "delta_covariance",
    "export_lora",
    "finetune",
    "get_corda_model",
    "get_lora_model",
    "get_salora_model",
    "get_sclora_model",
    "init_model",
    "load_examples",
    "merge_and_save",
    "methods_table",
    "models",
    "remember_initial_adapter",
    "reward",
    "save_initial_adapter",
    "sc_lora_factors",
    "sc_subspace",
    "statistics_batches",
    "subspace_energy",
    "suggest_train_config",
    "summarize_energy",
    "train",
]
