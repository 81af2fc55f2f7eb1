"""SC-LoRA (paper Algorithm 1): the adapter's output is confined to the subspace that keeps most of
D+'s output energy and least of D-'s; B = Q, A = Q^T W0 (/ scaling), W_res = W0 - Q Q^T W0."""

from __future__ import annotations

import warnings

from peft import PeftModel
from torch import nn

from ..config import SCLoRAConfig
from ..statistics import CovarianceStats, resolve_targets
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

    sparse = _sparse_negative_modules(model, config, minus)
    peft_model = build_residual_adapter(model, config, factors, show_progress=show_progress, desc="SC-LoRA init")
    if sparse:
        name, d_out, d_in = sparse[0]
        warnings.warn(
            f"beta={config.beta} leaves {len(sparse)} module(s) without a unique best subspace (paper, Appendix B): "
            f"rank(Cov-) <= min(D- tokens, d_in), and for e.g. {name!r} min({minus.n_tokens}, {d_in}) < d_out - r = "
            f"{d_out} - {config.r}, so the null space of Cov- has more than r dimensions and any r directions in it "
            "are equally optimal: the initialization is arbitrary. Use beta slightly below 1 (e.g. 0.99) so that "
            "Cov+ picks among them, or more / longer D- samples (this does not help layers with d_out - d_in > r).",
            NonUniqueSubspaceWarning,
            stacklevel=2,
        )
    elif tied:
        warnings.warn(
            f"{len(tied)} module(s), e.g. {tied[0]!r}, have no unique best subspace at beta={config.beta}: the r-th "
            "and (r+1)-th eigenvalues of dCov are equal, so part of the initialization is arbitrary. Usually they "
            "are 0: fewer than r directions carry more (1-beta)-weighted D+ than beta-weighted D- energy, and in "
            "layers that widen their input (d_out > d_in, e.g. gate/up) the other optimal directions lie outside "
            "the range of W0, where neither set has energy and the adapter starts at zero. Lower beta or r, or "
            "use more / longer D- samples.",
            NonUniqueSubspaceWarning,
            stacklevel=2,
        )
    return peft_model


def _sparse_negative_modules(model, config: SCLoRAConfig, minus: CovarianceStats) -> list[tuple[str, int, int]]:
    """(name, d_out, d_in) of modules where beta ~ 1 and the null space of Cov- exceeds r (Appendix B).

    Cov- = W Cov-_in W^T has rank <= min(B- L, d_in): few D- tokens, or a layer that widens its input
    (gate/up), leave more than r directions with zero D- energy."""
    if 1.0 - config.beta >= 1e-3:
        return []
    return [(n, m.out_features, m.in_features) for n, m in resolve_targets(model, config.target_modules).items()
            if min(minus.n_tokens, m.in_features if m.bias is None else m.out_features) < m.out_features - config.r]
