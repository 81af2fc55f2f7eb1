"""Every initialization sclora offers, behind one call: ``init_model(model, config, plus=..., minus=...)``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..config import SCLoRAConfig
from ..statistics import CovarianceStats, collect_covariances
from .builtin import get_lora_model, prepare_full_finetuning
from .corda import corda_factors, get_corda_model
from .sc_lora import get_sclora_model

__all__ = ["corda_factors", "get_corda_model", "get_lora_model", "get_sclora_model", "init_model", "prepare_full_finetuning"]

Data = CovarianceStats | Iterable[Mapping[str, torch.Tensor]] | None


def init_model(
    model: nn.Module,
    config: SCLoRAConfig | None = None,
    *,
    plus: Data = None,
    minus: Data = None,
    show_progress: bool = True,
    **overrides,
) -> nn.Module:
    """Initialize ``model`` for fine-tuning by ``config.method``.

    ``plus`` / ``minus`` are the fine-tuning data D+ and the knowledge to preserve D-, each either
    statistics from :func:`sclora.collect_covariances` or batches to collect them from. SC-LoRA needs
    both, CorDA IPA ``plus`` and CorDA KPA ``minus`` (input-side statistics), the others neither.
    Keyword overrides build or amend the config: ``init_model(model, method="pissa", r=8)``.
    Returns a PEFT model, or the model itself for ``method="full"``.
    """
    config = SCLoRAConfig(**{**(config.to_dict() if config else {}), **overrides})

    def stats(data: Data, label: str, side: str) -> CovarianceStats:
        if data is None:
            raise ValueError(f"method={config.method!r} needs {label} data: pass {label}=batches or statistics.")
        if isinstance(data, CovarianceStats):
            return data
        return collect_covariances(model, data, config.target_modules, config.normalize, side=side,
                                   show_progress=show_progress, desc=f"{label} statistics")

    if config.method == "sc_lora":
        return get_sclora_model(model, config, stats(plus, "plus", "output"), stats(minus, "minus", "output"),
                                show_progress=show_progress)
    if config.method in ("corda_ipa", "corda_kpa"):
        data, label = (plus, "plus") if config.method == "corda_ipa" else (minus, "minus")
        return get_corda_model(model, config, stats(data, label, "input"), config.method[-3:], show_progress=show_progress)
    if config.method == "lora":
        return get_lora_model(model, config)
    if config.method == "pissa":
        return get_lora_model(model, config, init_lora_weights="pissa")
    return prepare_full_finetuning(model)
