"""Every initialization sclora offers, behind one call: ``init_model(model, config, plus=..., minus=...)``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..config import SCLoRAConfig
from ..statistics import CovarianceStats, collect_covariances
from .builtin import get_eva_model, get_lora_model, prepare_full_finetuning
from .corda import corda_factors, get_corda_model
from .salora import get_salora_model, salora_factors
from .sc_lora import BetaChoice, choose_beta, get_sclora_model

__all__ = ["BetaChoice", "choose_beta", "corda_factors", "get_corda_model", "get_eva_model", "get_lora_model",
           "get_salora_model", "get_sclora_model", "init_model", "prepare_full_finetuning", "salora_factors"]

Data = CovarianceStats | Iterable[Mapping[str, torch.Tensor]] | None
#: D- may also be several knowledge sets: a list of statistics (or of batch lists), one beta each.
MinusData = Data | list[CovarianceStats | Iterable[Mapping[str, torch.Tensor]]]


def _several_sets(data) -> bool:
    """A list of statistics / of batch lists is several knowledge sets; a list of batch dicts is one set."""
    return isinstance(data, (list, tuple)) and len(data) > 0 and all(
        isinstance(d, CovarianceStats) or not isinstance(d, Mapping) for d in data
    )


def init_model(
    model: nn.Module,
    config: SCLoRAConfig | None = None,
    *,
    plus: Data = None,
    minus: MinusData = None,
    show_progress: bool = True,
    **overrides,
) -> nn.Module:
    """Initialize ``model`` for fine-tuning by ``config.method``.

    ``plus`` / ``minus`` are the fine-tuning data D+ and the knowledge to preserve D-, each either
    statistics from :func:`sclora.collect_covariances` or batches to collect them from. SC-LoRA and SaLoRA need
    both, CorDA IPA ``plus`` and CorDA KPA ``minus`` (input-side statistics), the others neither.
    SC-LoRA can preserve several knowledge sets: ``minus=[stats_a, stats_b], beta=[0.4, 0.4]``.
    Keyword overrides build or amend the config: ``init_model(model, method="pissa", r=8)``.
    Returns a PEFT model, or the model itself for ``method="full"``.
    """
    config = SCLoRAConfig(**{**(config.to_dict() if config else {}), **overrides})
    if config.quantize_residual is not None:  # after the full-precision init, the frozen base in 4-bit
        from ..quantize import quantize_frozen_linears

        peft_model = _init(model, config, plus, minus, show_progress)
        peft_model.sclora_quantization = quantize_frozen_linears(peft_model, config.quantize_residual)
        return peft_model
    return _init(model, config, plus, minus, show_progress)


def _init(model: nn.Module, config: SCLoRAConfig, plus, minus, show_progress: bool) -> nn.Module:
    def stats(data: Data, label: str, side: str) -> CovarianceStats:
        if data is None:
            raise ValueError(f"method={config.method!r} needs {label} data: pass {label}=batches or statistics.")
        if isinstance(data, CovarianceStats):
            return data
        return collect_covariances(model, data, config.target_modules, config.normalize, side=side,
                                   show_progress=show_progress, desc=f"{label} statistics")

    several = _several_sets(minus)
    if config.method == "sc_lora":
        n_sets, n_betas = len(minus) if several else 1, len(config.beta) if isinstance(config.beta, list) else 1
        if n_sets != n_betas:  # before any statistics are collected
            raise ValueError(
                f"beta={config.beta!r} has {n_betas} weight(s) but minus holds {n_sets} knowledge set(s): give one "
                "beta per set (a float for one set, a list for several)."
            )
        plus_stats = stats(plus, "plus", "output")
        minus_stats = ([stats(m, f"minus[{i}]", "output") for i, m in enumerate(minus)] if several
                       else stats(minus, "minus", "output"))
        return get_sclora_model(model, config, plus_stats, minus_stats, show_progress=show_progress)
    if config.method == "salora":  # fixed safety module from D-, B0 from D+ (output-side statistics)
        if several:
            raise ValueError(f"SaLoRA builds its safety module from one set but minus holds {len(minus)}; pass one "
                             "(e.g. statistics collected over their union).")
        return get_salora_model(model, config, stats(plus, "plus", "output"), stats(minus, "minus", "output"),
                                show_progress=show_progress)
    if several and config.method == "corda_kpa":
        raise ValueError(
            f"CorDA KPA preserves one knowledge set but minus holds {len(minus)}; pass one (e.g. statistics collected "
            "over their union). Only sc_lora weighs several sets, with one beta each."
        )
    if config.method in ("corda_ipa", "corda_kpa"):
        data, label = (plus, "plus") if config.method == "corda_ipa" else (minus, "minus")
        return get_corda_model(model, config, stats(data, label, "input"), config.method[-3:], show_progress=show_progress)
    if config.method == "lora":
        return get_lora_model(model, config)
    if config.method in ("pissa", "olora"):  # PEFT's own: SVD / QR of W, the residual left in the base weight
        return get_lora_model(model, config, init_lora_weights=config.method)
    if config.method == "eva":  # PEFT's EVA: A from the SVD of D+'s layer inputs, B = 0, ranks redistributed
        if plus is None or isinstance(plus, CovarianceStats):
            raise ValueError("method='eva' needs plus= batches (dicts of input_ids, attention_mask): EVA runs its own "
                             "incremental SVD over the inputs, not over covariance statistics.")
        return get_eva_model(model, config, plus, show_progress=show_progress)
    return prepare_full_finetuning(model)
