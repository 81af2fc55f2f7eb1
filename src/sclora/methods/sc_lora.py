"""SC-LoRA (paper Algorithm 1): the adapter's output is confined to the subspace that keeps most of
D+'s output energy and least of D-'s; B = Q, A = Q^T W0 (/ scaling), W_res = W0 - Q Q^T W0."""

from __future__ import annotations

import warnings

import torch
from peft import PeftModel
from torch import nn

from ..config import SCLoRAConfig
from ..statistics import CovarianceStats
from ..subspace import NonUniqueSubspaceWarning, sc_lora_factors, sc_subspace
from .residual import build_residual_adapter, require_coverage


def get_sclora_model(
    model: nn.Module,
    config: SCLoRAConfig,
    plus_stats: CovarianceStats,
    minus_stats: CovarianceStats,
    *,
    check_fingerprint: bool = True,
    show_progress: bool = True,
) -> PeftModel:
    """Wrap ``model`` in a PEFT LoRA model initialized by SC-LoRA from D+ / D- statistics."""
    if not isinstance(plus_stats, CovarianceStats) or not isinstance(minus_stats, CovarianceStats):
        raise TypeError("plus_stats and minus_stats must be CovarianceStats from sclora.collect_covariances.")
    if plus_stats.normalize != minus_stats.normalize:
        raise ValueError(
            f"D+ statistics use normalize={plus_stats.normalize!r} but D- ones {minus_stats.normalize!r}; "
            "collect both the same way so that beta balances like with like."
        )
    plus = plus_stats.bind(model, check_fingerprint=check_fingerprint)
    minus = minus_stats.bind(model, check_fingerprint=check_fingerprint)
    tied: list[str] = []

    require_coverage(model, config, plus, "D+")
    require_coverage(model, config, minus, "D-")

    def factors(name, weight, scaling):
        (cov_p, w_p), (cov_m, w_m) = plus.factor(name), minus.factor(name)
        if w_p is not None and w_m is not None:  # both input-side: the exact reduction through W0
            args = dict(weight=weight)
        else:  # mixed sides: compare output covariances directly
            cov_p = cov_p if w_p is None else w_p @ cov_p @ w_p.T
            cov_m = cov_m if w_m is None else w_m @ cov_m @ w_m.T
            args = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NonUniqueSubspaceWarning)
            q = sc_subspace(cov_p, cov_m, config.beta, config.r, dtype=config.torch_dtype, **args)
        if any(issubclass(w.category, NonUniqueSubspaceWarning) for w in caught):
            tied.append(name)
        return sc_lora_factors(weight, q, scaling)

    peft_model = build_residual_adapter(model, config, factors, show_progress=show_progress, desc="SC-LoRA init")
    if tied:
        warnings.warn(_appendix_b_message(tied, config, minus.n_tokens), NonUniqueSubspaceWarning, stacklevel=2)
    return peft_model


def _appendix_b_message(tied: list[str], config: SCLoRAConfig, n_minus_tokens: int) -> str:
    return (
        f"{len(tied)} module(s), e.g. {tied[0]!r}, have no unique best subspace at beta={config.beta}: the r-th and "
        f"(r+1)-th eigenvalues of dCov tie, so part of the initialization is arbitrary. With beta near 1 this is "
        f"the sparse-sample case of the paper's Appendix B: D- has {n_minus_tokens} tokens, and when that is below "
        f"d_out - r the null space of Cov- has more than r={config.r} dimensions. Use beta slightly below 1 "
        "(e.g. 0.99) so that Cov+ picks among them, or more / longer D- samples."
    )
