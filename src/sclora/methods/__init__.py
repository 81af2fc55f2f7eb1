"""Every initialization sclora offers, behind one call: ``init_model(model, config, plus=..., minus=...)``.

Which data a method reads, on which side of the layers and with which normalization is its record in
:mod:`sclora.registry`; the ``build_*`` functions below turn that data into the method's model, one per record,
all with the signature ``build(model, config, plus, minus, show_progress)``."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..config import SCLoRAConfig
from ..layers import is_quantized
from ..registry import method_spec
from ..statistics import CovarianceStats, collect_covariances
from ..targets import resolve_targets
from .builtin import get_eva_model, get_lora_model, prepare_full_finetuning
from .corda import corda_factors, get_corda_model
from .guardspace import get_guardspace_model, guardspace_factors
from .residual import get_pissa_model
from .salora import get_salora_model, salora_factors
from .sc_lora import BetaChoice, choose_beta, get_sclora_model

__all__ = ["BetaChoice", "choose_beta", "corda_factors", "get_corda_model", "get_eva_model", "get_guardspace_model",
           "get_lora_model", "get_salora_model", "get_sclora_model", "guardspace_factors", "init_model",
           "prepare_full_finetuning", "salora_factors", "several_sets"]

Data = CovarianceStats | Iterable[Mapping[str, torch.Tensor]] | None
#: D- may also be several knowledge sets: a list of statistics (or of batch lists), one beta each.
MinusData = Data | list[CovarianceStats | Iterable[Mapping[str, torch.Tensor]]]


def several_sets(data) -> bool:
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
    both, CorDA IPA ``plus`` and CorDA KPA ``minus`` (input-side statistics), EVA ``plus`` batches, the others
    neither (:func:`sclora.registry.methods_table`).
    SC-LoRA can preserve several knowledge sets: ``minus=[stats_a, stats_b], beta=[0.4, 0.4]``.
    Keyword overrides amend the config: ``init_model(model, method="pissa", r=8)`` is
    ``init_model(model, SCLoRAConfig(method="pissa", r=8))``, and with a config, its fields left at None
    (``lora_alpha``, ``normalize``) take the defaults of the overridden method and rank.
    Returns a PEFT model, or the model itself for ``method="full"``.
    """
    config = (config or SCLoRAConfig()).replace(**overrides) if overrides else (config or SCLoRAConfig())
    spec = method_spec(config.method)
    n_sets = len(minus) if several_sets(minus) else 1
    config.check_sets(n_sets)  # before any statistics are collected
    for label, data in (("plus", plus), ("minus", minus)):
        if label in spec.needs and data is None:
            form = "batches" if spec.data_form == "batches" else "batches or statistics"
            raise ValueError(f"method={config.method!r} needs {label} data: pass {label}={form}.")
    model = getattr(sys.modules[__name__], spec.builder)(model, config, plus, minus, show_progress)
    if config.quantize_residual is not None:  # after the full-precision init, the frozen base in 4-bit
        from ..quantize import quantize_frozen_linears

        quantize_frozen_linears(model, config.quantize_residual)
    return model


def _stats(model, config: SCLoRAConfig, data: Data, label: str, show_progress: bool) -> CovarianceStats:
    """``data`` as statistics on the method's side: given statistics as they are, batches collected."""
    if isinstance(data, CovarianceStats):
        return data
    return collect_covariances(model, data, config.target_modules, config.resolved_normalize,
                               side=method_spec(config.method).side, show_progress=show_progress,
                               desc=f"{label} statistics")


def _minus_stats(model, config, minus, show_progress):
    if several_sets(minus):
        return [_stats(model, config, m, f"minus[{i}]", show_progress) for i, m in enumerate(minus)]
    return _stats(model, config, minus, "minus", show_progress)


def build_sc_lora(model, config, plus, minus, show_progress):
    """SC-LoRA (Algorithm 1): output-side statistics of D+ and of each knowledge set."""
    return get_sclora_model(model, config, _stats(model, config, plus, "plus", show_progress),
                            _minus_stats(model, config, minus, show_progress), show_progress=show_progress)


def build_salora(model, config, plus, minus, show_progress):
    """SaLoRA: a fixed safety module from D-, B0 from D+ (output-side statistics)."""
    return get_salora_model(model, config, _stats(model, config, plus, "plus", show_progress),
                            _stats(model, config, minus, "minus", show_progress), show_progress=show_progress)


def build_corda(model, config, plus, minus, show_progress):
    """CorDA IPA (D+'s input covariance) or KPA (D-'s)."""
    mode = config.method[-3:]
    data, label = (plus, "plus") if mode == "ipa" else (minus, "minus")
    return get_corda_model(model, config, _stats(model, config, data, label, show_progress), mode,
                           show_progress=show_progress)


def build_guardspace(model, config, plus, minus, show_progress):
    """GuardSpace: D-'s input covariance for the decomposition and the null space, or ``minus=[decomposition set,
    null-space set]`` (the authors' two harmful-prompt sets)."""
    if several_sets(minus):
        if len(minus) != 2:
            raise ValueError(f"method='guardspace' takes minus= one harmful set or two (the decomposition set, the "
                             f"null-space set), got {len(minus)}.")
        stats = _stats(model, config, minus[0], "minus[0]", show_progress)
        null_stats = _stats(model, config, minus[1], "minus[1] (null space)", show_progress)
    else:
        stats, null_stats = _stats(model, config, minus, "minus", show_progress), None
    return get_guardspace_model(model, config, stats, null_stats, show_progress=show_progress)


def build_lora(model, config, plus, minus, show_progress):
    """Vanilla LoRA, or PEFT's own PiSSA / OLoRA (SVD / QR of W, the residual left in the base weight) / MiCA
    (B = W's minor left singular vectors, frozen; A = 0). PEFT
    refuses PiSSA on a quantized base; there sclora's residual path builds the same adapter (tested equal to
    PEFT's on the dequantized weights) and stores W_res in the layer's own format."""
    if config.method == "pissa" and any(is_quantized(m) for m in resolve_targets(model, config.target_modules).values()):
        return get_pissa_model(model, config, show_progress=show_progress)
    return get_lora_model(model, config, init_lora_weights=True if config.method == "lora" else config.method)


def build_eva(model, config, plus, minus, show_progress):
    """PEFT's EVA: A from the SVD of D+'s layer inputs, B = 0, ranks redistributed."""
    if isinstance(plus, CovarianceStats):
        raise ValueError("method='eva' needs plus= batches (dicts of input_ids, attention_mask): EVA runs its own "
                         "incremental SVD over the inputs, not over covariance statistics.")
    return get_eva_model(model, config, plus, show_progress=show_progress)


def build_full(model, config, plus, minus, show_progress):
    """Full fine-tuning: no adapter."""
    return prepare_full_finetuning(model)
