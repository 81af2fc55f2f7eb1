"""SC-LoRA (paper Algorithm 1): the adapter's output is confined to the subspace that keeps most of
D+'s output energy and least of D-'s; B = Q, A = Q^T W0 (/ scaling), W_res = W0 - Q Q^T W0."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm

from ..config import SCLoRAConfig
from ..statistics import PER_SAMPLE_NORMALIZATIONS, CovarianceStats, require_finite_weight
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
    choice = None
    if config.beta == "auto":  # the smallest β meeting the preservation budget, then SC-LoRA at it
        from dataclasses import replace

        if len(minus_list) != 1:
            raise ValueError("beta='auto' balances one knowledge set; with several, give one beta each.")
        choice = choose_beta(model, plus_stats, minus_list[0], r=config.r, budget=config.preserve_budget,
                             target_modules=config.target_modules, dtype=config.torch_dtype,
                             solver=config.eigen_solver, show_progress=show_progress)
        config = replace(config, beta=choice.beta, preserve_budget=None)
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
        covs, args = _module_covariances(plus, minus, name, weight)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NonUniqueSubspaceWarning)
            q = sc_subspace(covs[0], covs[1:], betas, config.r, dtype=config.torch_dtype,
                            solver=config.eigen_solver, **args)
        if any(issubclass(w.category, NonUniqueSubspaceWarning) for w in caught):
            tied.append(name)
        return sc_lora_factors(weight, q, scaling)

    sparse = _sparse_negative_modules(model, config, minus)
    peft_model = build_residual_adapter(model, config, factors, show_progress=show_progress, desc="SC-LoRA init")
    peft_model.sclora_beta_choice = choice  # what beta="auto" chose (None for a given beta)
    if config.lock_subspace:  # B = Q frozen: every update of A keeps B A x in span(Q) (paper's limitation, lifted)
        for name, parameter in peft_model.named_parameters():
            if ".lora_B." in name:
                parameter.requires_grad_(False)
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


def _module_covariances(plus: CovarianceStats, minus: list[CovarianceStats], name: str, weight: torch.Tensor):
    """([Cov+, Cov-_1, ...], sc_subspace's extra arguments) of a module: input covariances and its weight when every
    set was collected on the input side (the exact reduction through W0), else output covariances."""
    parts = [plus.factor(name)] + [m.factor(name) for m in minus]
    if all(w is not None for _, w in parts):
        return [c for c, _ in parts], {"weight": weight}
    return [c if w is None else w @ c @ w.T for c, w in parts], {}


@dataclass(frozen=True)
class BetaChoice:
    """The β :func:`choose_beta` found, and what the initial subspace keeps at it (means over the target modules)."""

    beta: float
    budget: float
    minus_energy: float  # share of D-'s output energy the subspace keeps (<= budget)
    plus_energy: float  # share of D+'s
    tried: list[tuple[float, float, float]] = field(default_factory=list)  # (beta, minus share, plus share)


def choose_beta(model: nn.Module, plus_stats: CovarianceStats, minus_stats: CovarianceStats, *, r: int,
                budget: float, target_modules=None, tol: float = 1 / 512, dtype=torch.float64,
                solver: str = "eigh", show_progress: bool = True) -> BetaChoice:
    """The smallest β (within ``tol``) whose SC-LoRA initial subspace keeps at most ``budget`` of D-'s output
    energy, as the mean over the target modules of tr(Q^T Cov- Q) / tr(Cov-).

    That share can only fall as β grows (comparative statics of max_Q tr(Q^T((1-β)Cov+ - βCov-)Q)), so bisection
    on [0, 1] finds it: β = 0 first (a budget LoRA-like fitting already meets), then halving, 1 + log2(1/tol)
    decompositions (10 at the default), β = 1 only when the budget is that tight. A budget below what β = 1
    reaches is an error naming that minimum. Statistics are cached, so this costs decompositions only."""
    from ..config import LLAMA_TARGET_MODULES
    from ..subspace import captured_energy, sc_subspace

    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget <= 1:
        raise ValueError(f"budget must be a share of D-'s energy in [0, 1], e.g. 0.05, got {budget!r}.")
    if not isinstance(minus_stats, CovarianceStats):
        raise TypeError("choose_beta balances one knowledge set: minus_stats must be one CovarianceStats (several "
                        "sets, one budget each, are not supported yet).")
    _check_comparable(plus_stats, [minus_stats], ["D-"])
    plus, minus = plus_stats.bind(model), minus_stats.bind(model)
    targets = resolve_targets(model, LLAMA_TARGET_MODULES if target_modules is None else target_modules)
    for name, linear in targets.items():
        require_finite_weight(name, linear.weight)

    def shares(beta: float) -> tuple[float, float]:
        kept = {"minus": [], "plus": []}
        for name, linear in targets.items():  # one module's covariances at a time: no copy of every module held
            covs, args = _module_covariances(plus, [minus], name, linear.weight.detach())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NonUniqueSubspaceWarning)  # ties do not change the kept energy
                q = sc_subspace(covs[0], [covs[1]], [beta], r, dtype=dtype, solver=solver, **args)
            weight = args.get("weight")
            for key, cov in (("plus", covs[0]), ("minus", covs[1])):
                share = captured_energy(q, cov.to(q.dtype), None if weight is None else weight.to(q.dtype))
                if math.isfinite(share):
                    kept[key].append(share)
        means = [sum(v) / len(v) if v else math.nan for v in (kept["minus"], kept["plus"])]
        tried.append((beta, *means))
        return means[0], means[1]

    tried: list[tuple[float, float, float]] = []
    bar = tqdm(total=1 + math.ceil(math.log2(1 / tol)), desc="choose beta", disable=not show_progress)
    minus0, plus0 = shares(0.0)
    bar.update()
    if minus0 <= budget:
        bar.close()
        return BetaChoice(0.0, budget, minus0, plus0, tried)
    lo, hi, at_hi = 0.0, 1.0, None
    while hi - lo > tol:
        mid = (lo + hi) / 2
        m, pl = shares(mid)
        bar.update()
        if m <= budget:
            hi, at_hi = mid, (m, pl)
        else:
            lo = mid
    bar.close()
    if at_hi is None:  # never met below 1: does β = 1 meet it?
        m, pl = shares(1.0)
        if m > budget:
            raise ValueError(f"No β keeps D-'s share at or below budget={budget}: even β = 1 keeps {m:.4f} (mean over "
                             "modules; rank r directions with no D- energy do not exist in every module). Raise the "
                             "budget, or lower r.")
        at_hi = (m, pl)
    return BetaChoice(hi, budget, at_hi[0], at_hi[1], tried)


def _check_comparable(plus: CovarianceStats, minus: list[CovarianceStats], labels: list[str]) -> None:
    """beta balances like with like: every set normalized the same way (and, under max_abs, scaled by the
    same side's activations, which the collection side decides)."""
    for stats, label in zip(minus, labels):
        if stats.normalize != plus.normalize:
            raise ValueError(
                f"D+ statistics use normalize={plus.normalize!r} but {label} ones {stats.normalize!r}; "
                "collect all sets the same way so that beta balances like with like."
            )
        if plus.normalize in PER_SAMPLE_NORMALIZATIONS and stats.side != plus.side:
            raise ValueError(
                f"D+ statistics were collected with side={plus.side!r} but {label} ones with side={stats.side!r}; "
                f"under normalize={plus.normalize!r} the side decides which activations scale each sample, so collect all "
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
