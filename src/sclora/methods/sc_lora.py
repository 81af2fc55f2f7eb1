"""SC-LoRA (paper Algorithm 1): the adapter's output is confined to the subspace that keeps most of
D+'s output energy and least of D-'s; B = Q, A = Q^T W0 (/ scaling), W_res = W0 - Q Q^T W0."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from peft import PeftModel
from torch import nn

from ..config import SCLoRAConfig
from ..statistics import CovarianceStats, require_finite_weight
from ..subspace import NonUniqueSubspaceWarning, check_betas, sc_lora_factors, sc_subspace
from ..targets import resolve_targets
from .residual import build_residual_adapter, require_coverage


def get_sclora_model(
    model: nn.Module,
    config: SCLoRAConfig,
    plus_stats: CovarianceStats,
    minus_stats: CovarianceStats | Sequence[CovarianceStats],
    *,
    check_fingerprint: bool = True,
    show_progress: bool = True,
) -> PeftModel:
    """Wrap ``model`` in a PEFT LoRA model initialized by SC-LoRA from D+ / D- statistics.

    Several knowledge sets: ``minus_stats`` is a list of statistics and ``config.beta`` a list of as many
    weights; dCov = (1 - sum_i beta_i) Cov+ - sum_i beta_i Cov-_i, each Cov-_i normalized on its own."""
    minus_list = [minus_stats] if isinstance(minus_stats, CovarianceStats) else list(minus_stats)
    labels = ["D-"] if len(minus_list) == 1 else [f"D-_{i}" for i in range(len(minus_list))]
    if not isinstance(plus_stats, CovarianceStats) or not minus_list or not all(
        isinstance(m, CovarianceStats) for m in minus_list
    ):
        raise TypeError(
            "plus_stats must be CovarianceStats and minus_stats CovarianceStats or a non-empty list of them, "
            "from sclora.collect_covariances."
        )
    betas = check_betas(config.beta)
    if len(betas) != len(minus_list):
        raise ValueError(
            f"config.beta={config.beta!r} has {len(betas)} weight(s) but {len(minus_list)} D- statistics were given: "
            "give one beta per knowledge set (a float for one set, a list for several)."
        )
    _check_comparable(plus_stats, minus_list, labels)
    plus = plus_stats.bind(model, check_fingerprint=check_fingerprint)
    minus = [m.bind(model, check_fingerprint=check_fingerprint) for m in minus_list]
    tied: list[str] = []

    require_coverage(model, config, plus, "D+")
    for stats, label in zip(minus, labels):
        require_coverage(model, config, stats, label)
    for name, linear in resolve_targets(model, config.target_modules).items():  # before any layer is rewritten
        require_finite_weight(name, linear.weight)

    def factors(name, weight, scaling):
        parts = [plus.factor(name)] + [m.factor(name) for m in minus]
        if all(w is not None for _, w in parts):  # all input-side: the exact reduction through W0
            covs, args = [c for c, _ in parts], {"weight": weight}
        else:  # mixed sides: compare output covariances directly
            covs, args = [c if w is None else w @ c @ w.T for c, w in parts], {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NonUniqueSubspaceWarning)
            q = sc_subspace(covs[0], covs[1:], betas, config.r, dtype=config.torch_dtype,
                            solver=config.eigen_solver, **args)
        if any(issubclass(w.category, NonUniqueSubspaceWarning) for w in caught):
            tied.append(name)
        return sc_lora_factors(weight, q, scaling)

    sparse = _sparse_negative_modules(model, config, minus)
    peft_model = build_residual_adapter(model, config, factors, show_progress=show_progress, desc="SC-LoRA init")
    if sparse:
        name, d_out, d_in = sparse[0]
        tokens = _active_tokens(betas, minus)
        warnings.warn(
            f"beta={config.beta} leaves {len(sparse)} module(s) without a unique best subspace (paper, Appendix B): "
            f"rank(Cov-) <= min(D- tokens, d_in), and for e.g. {name!r} min({tokens}, {d_in}) < d_out - r = "
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


def _check_comparable(plus: CovarianceStats, minus: list[CovarianceStats], labels: list[str]) -> None:
    """beta balances like with like: every set normalized the same way (and, under max_abs, scaled by the
    same side's activations, which the collection side decides)."""
    for stats, label in zip(minus, labels):
        if stats.normalize != plus.normalize:
            raise ValueError(
                f"D+ statistics use normalize={plus.normalize!r} but {label} ones {stats.normalize!r}; "
                "collect all sets the same way so that beta balances like with like."
            )
        if plus.normalize == "max_abs" and stats.side != plus.side:
            raise ValueError(
                f"D+ statistics were collected with side={plus.side!r} but {label} ones with side={stats.side!r}; "
                "under normalize='max_abs' the side decides which activations scale each sample, so collect all "
                "sets with the same side."
            )


def _active_tokens(betas: list[float], minus: list[CovarianceStats]) -> int:
    """Tokens behind sum_i beta_i Cov-_i: its rank is at most the sum of the sets' token counts (beta_i > 0)."""
    return sum(m.n_tokens for b, m in zip(betas, minus) if b > 0)


def _sparse_negative_modules(model, config: SCLoRAConfig, minus: list[CovarianceStats]) -> list[tuple[str, int, int]]:
    """(name, d_out, d_in) of modules where beta ~ 1 and the null space of Cov- exceeds r (Appendix B).

    Cov- = W Cov-_in W^T has rank <= min(B- L, d_in): few D- tokens, or a layer that widens its input
    (gate/up), leave more than r directions with zero D- energy. With several sets, Cov- is
    sum_i beta_i Cov-_i, beta their sum and B- L the sum of their token counts."""
    betas = check_betas(config.beta)
    if 1.0 - sum(betas) >= 1e-3:
        return []
    tokens = _active_tokens(betas, minus)
    return [(n, m.out_features, m.in_features) for n, m in resolve_targets(model, config.target_modules).items()
            if min(tokens, m.in_features if m.bias is None else m.out_features) < m.out_features - config.r]
