"""sclora: Subspace-Constrained LoRA initialization (SC-LoRA) for Hugging Face models and PEFT."""

from . import models
from .config import LLAMA_TARGET_MODULES, METHODS, SCLoRAConfig
from .diagnostics import subspace_energy, summarize_energy
from .export import export_lora, merge_and_save, remember_initial_adapter, save_initial_adapter
from .methods import BetaChoice, choose_beta, get_corda_model, get_lora_model, get_sclora_model, init_model
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
