"""SC-LoRA (paper Algorithm 1): the adapter's output is confined to the subspace that keeps most of
D+'s output energy and least of D-'s; B = Q, A = Q^T W0 (/ scaling), W_res = W0 - Q Q^T W0."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm

from ..config import SCLoRAConfig
from ..layers import layer_dims, read_weight
from ..statistics import PER_SAMPLE_NORMALIZATIONS, CovarianceStats, require_finite_weight
from ..eigensolvers import Operator, top_eigenpairs
from ..subspace import NonUniqueSubspaceWarning, check_betas, delta_covariance, sc_lora_factors, sc_subspace
from ..targets import resolve_targets
from .residual import build_residual_adapter, check_rank, require_coverage


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

    Like PEFT's ``get_peft_model`` this changes ``model`` itself (its target layers are wrapped and their weights
    replaced by W_res): initialize a fresh copy for each β of a sweep.

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
    config.check_sets(len(minus_list))  # one beta (or budget) per knowledge set
    if config.beta == "auto":  # the smallest beta meeting the budget(s) (sclora.finetune returns the choice)
        choice = choose_beta(model, plus_stats, minus_stats, r=config.r, budget=config.preserve_budget,
                             target_modules=config.target_modules, dtype=config.torch_dtype,
                             solver=config.eigen_solver, show_progress=show_progress)
        config = config.replace(beta=choice.beta, preserve_budget=None)
    betas = check_betas(config.beta)
    _check_comparable(plus_stats, minus_list, labels)
    targets = resolve_targets(model, config.target_modules)
    check_rank(targets, config.r)  # unsupported layers and ranks before the statistics are bound
    plus = plus_stats.bind(model, check_fingerprint=check_fingerprint)
    minus = [m.bind(model, check_fingerprint=check_fingerprint) for m in minus_list]
    tied: list[str] = []

    require_coverage(model, config, plus, "D+")
    for stats, label in zip(minus, labels):
        require_coverage(model, config, stats, label)
    for name, linear in targets.items():  # before any layer is rewritten
        require_finite_weight(name, read_weight(linear))

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
    if config.lock_subspace:  # B = Q frozen: every update of A keeps B A x in span(Q) (paper's limitation, lifted)
        for name, parameter in peft_model.named_parameters():
            if ".lora_B." in name:
                parameter.requires_grad_(False)
    if sparse:
        name, d_out, d_in = sparse[0]
        tokens = _active_tokens(betas, minus)
        total = sum(betas)
        fix = ("Use beta slightly below 1 (e.g. 0.99)" if len(betas) == 1 else
               f"Keep the betas' sum slightly below 1 (it is {total:g}: Cov+ gets weight 1 - sum = {1 - total:g})")
        warnings.warn(
            f"beta={config.beta} leaves {len(sparse)} module(s) without a unique best subspace (paper, Appendix B): "
            f"rank(Cov-) <= min(D- tokens, d_in), and for e.g. {name!r} min({tokens}, {d_in}) < d_out - r = "
            f"{d_out} - {config.r}, so the null space of Cov- has more than r dimensions and any r directions in it "
            f"are equally optimal: the initialization is arbitrary. {fix} so that "
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
    """The β :func:`choose_beta` found, and what the initial subspace keeps at it (means over the target modules).
    With several knowledge sets ``beta``, ``budget`` and ``minus_energy`` are tuples, one entry per set."""

    beta: float | tuple[float, ...]
    budget: float | tuple[float, ...]
    minus_energy: float | tuple[float, ...]  # share of each D-'s output energy the subspace keeps (<= its budget)
    plus_energy: float  # share of D+'s
    tried: list[tuple] = field(default_factory=list)  # (beta, minus share(s), plus share) per decomposition


def choose_beta(model: nn.Module, plus_stats: CovarianceStats,
                minus_stats: CovarianceStats | Sequence[CovarianceStats], *, r: int,
                budget: float | Sequence[float], target_modules=None, tol: float = 1 / 512, dtype=torch.float64,
                solver: str = "eigh", show_progress: bool = True, rtol: float = 0.02,
                max_evaluations: int = 60, cache_bytes: int = 4 << 30) -> BetaChoice:
    """The smallest β (within ``tol``) whose SC-LoRA initial subspace keeps at most ``budget`` of D-'s output
    energy, as the mean over the target modules of tr(Q^T Cov- Q) / tr(Cov-).

    That share can only fall as β grows (comparative statics of max_Q tr(Q^T((1-β)Cov+ - βCov-)Q)), so bisection
    on [0, 1] finds it: β = 0 first (a budget LoRA-like fitting already meets), then halving, 1 + log2(1/tol)
    decompositions (10 at the default), β = 1 only when the budget is that tight. A budget below what β = 1
    reaches is an error naming that minimum. Statistics are cached, so this costs decompositions only.

    Several knowledge sets (``minus_stats`` a list, ``budget`` one share per set): dCov = (1 - Σβ_i) Cov+ -
    Σ β_i Cov-_i has the eigenvectors of Cov+ - Σ t_i Cov-_i with t_i = β_i / (1 - Σβ). Weights are sought at which
    every set with t_i > 0 keeps between (1 - ``rtol``) and 1 times its budget and every set at t_i = 0 keeps at
    most its budget: no set is protected more than it asked, none less (the complementary slackness of keeping
    D+ subject to the budgets). Raising one set's weight lowers the others' shares too (the sets share
    directions), so searching one weight after the other can circle; instead all weights move at once,
    log t_i += η log(share_i / target_i) with the target the middle of the band, η halved (down to 1/8)
    whenever the worst miss grows and raised by a quarter (up to 1) when it shrinks. A set below the band with
    under 1/10 of the largest weight, at a point that meets every budget, is tried once at weight 0 (and given its
    weight back if that misses its budget). t = 0 first (budgets LoRA-like fitting meets), then, for each set over
    its budget, β_i -> 1 alone (a budget even that misses is an error naming the minimum). Within
    ``max_evaluations`` decompositions it stops at the band; if it does not get there, it warns and returns the
    point that met every budget with the most D+ energy (an error if none did).

    Every set's output covariance of a module is first written once as U M_k U^T, U orthonormal with
    min(d_out, d_in) columns (U = I for output-side statistics; W0 C W0^T itself when d_out <= d_in; the thin QR
    W0 = U R and M_k = R C R^T when the layer widens its input, whose other d_out - d_in directions carry no
    energy of any set). Each β then costs one eigendecomposition of Σ_k c_k M_k and r-column products per
    module, and the same shares as :func:`sclora.sc_subspace` + :func:`sclora.captured_energy` on the full
    matrices. The M_k are kept for the whole search while they fit in ``cache_bytes`` (the modules beyond it are
    reduced again at every β)."""

    several = not isinstance(minus_stats, CovarianceStats)
    minus_list = list(minus_stats) if several else [minus_stats]
    budgets = _check_budgets(budget, len(minus_list), several)
    if not minus_list or not all(isinstance(m, CovarianceStats) for m in minus_list):
        raise TypeError("minus_stats must be CovarianceStats or a non-empty list of them, from "
                        "sclora.collect_covariances.")
    labels = ["D-"] if not several else [f"D-_{i}" for i in range(len(minus_list))]
    _check_comparable(plus_stats, minus_list, labels)
    targets = resolve_targets(model, target_modules)
    check_rank(targets, r)
    plus, minus = plus_stats.bind(model), [m.bind(model) for m in minus_list]
    for name, linear in targets.items():
        require_finite_weight(name, read_weight(linear))
    tried: list[tuple] = []

    cached: dict[str, _Reduced] = {}
    room = cache_bytes

    def reduced(name: str, linear: nn.Module) -> _Reduced:
        nonlocal room
        if name in cached:
            return cached[name]
        covs, args = _module_covariances(plus, minus, name, read_weight(linear))
        module = _Reduced.of(covs, args.get("weight"), dtype)
        if module.nbytes <= room:
            cached[name], room = module, room - module.nbytes
        return module

    def shares(betas: list[float]) -> tuple[list[float], float]:
        means = mean_shares(reduced(name, linear).shares(betas, r, solver) for name, linear in targets.items())
        tried.append((betas[0] if not several else tuple(betas), means[0] if not several else tuple(means[:-1]),
                      means[-1]))
        bar.update()
        return means[:-1], means[-1]

    most = 1 + math.ceil(math.log2(1 / tol)) if not several else 1 + len(minus_list) + max_evaluations
    bar = tqdm(total=most, desc="choose beta", disable=not show_progress)
    try:
        choice = (_bisect_one(shares, budgets[0], tol) if not several else
                  _joint_search(shares, budgets, rtol, max_evaluations))
    finally:
        bar.close()
    return replace(choice, tried=tried)


def mean_shares(per_module: Iterable[list[float]]) -> list[float]:
    """Each set's share averaged over modules, from per-module shares ordered (D+, D-_1, ..): returned as
    (D-_1, .., D+). A module where a set has no energy (nan) does not count for that set; nan if none has any."""
    kept: list[list[float]] = []
    for module_shares in per_module:
        kept = kept or [[] for _ in module_shares]
        for slot, share in zip(kept, [*module_shares[1:], module_shares[0]]):
            if math.isfinite(share):
                slot.append(share)
    return [sum(v) / len(v) if v else math.nan for v in kept]


@dataclass(frozen=True)
class _Reduced:
    """One module's sets (D+ first) as the m x m matrices M_k of output covariances U M_k U^T, U orthonormal;
    ``outside`` more output directions (orthogonal to U) carry no energy of any set."""

    matrices: list[torch.Tensor]
    outside: int

    @classmethod
    def of(cls, covs: list[torch.Tensor], weight: torch.Tensor | None, dtype: torch.dtype) -> _Reduced:
        if weight is None:
            return cls([c.to(dtype) for c in covs], 0)
        w = weight.to(dtype)
        d_out, d_in = w.shape
        if d_out <= d_in:
            return cls([w @ c.to(dtype) @ w.T for c in covs], 0)
        r = torch.linalg.qr(w, mode="r")[1]  # W0 = U R
        return cls([r @ c.to(dtype) @ r.T for c in covs], d_out - d_in)

    @property
    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.matrices)

    def shares(self, betas: list[float], rank: int, solver: str) -> list[float]:
        """tr(Q^T Cov_k Q) / tr(Cov_k) for every set, Q the SC-LoRA subspace at ``betas``: the top ``rank``
        eigenvectors of dCov, the zero-eigenvalue directions outside U ranked after the positive eigenvalues and
        before the negative ones, as :func:`sclora.sc_subspace` does (they keep no energy). nan for a set with
        no energy in the module."""
        plus, *minus = self.matrices
        lam, v = top_eigenpairs(Operator(delta_covariance(plus, minus, betas)), rank, solver)
        n_pos = int((lam[:rank] > 0).sum())
        n_zero = min(rank - n_pos, self.outside)
        q = torch.cat([v[:, :n_pos], v[:, n_pos:rank - n_zero]], dim=1)
        out = []
        for m in self.matrices:
            total = m.trace().item()
            out.append(((q.T @ m) * q.T).sum().item() / total if total != 0 else math.nan)
        return out


def _check_budgets(budget, n_sets: int, several: bool) -> list[float]:
    values = list(budget) if isinstance(budget, (list, tuple)) else [budget]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"budget must be a share of D-'s energy in [0, 1], e.g. 0.05 (one per knowledge set), "
                             f"got {budget!r}.")
    if len(values) != n_sets or isinstance(budget, (list, tuple)) != several:
        raise ValueError(f"budget={budget!r} for {n_sets} knowledge set(s): give one share per set (a number for one "
                         "set, a list of as many numbers for several).")
    return [float(v) for v in values]


def _bisect_one(shares, budget: float, tol: float) -> BetaChoice:
    minus0, plus0 = shares([0.0])
    if minus0[0] <= budget:
        return BetaChoice(0.0, budget, minus0[0], plus0, [])
    lo, hi, at_hi = 0.0, 1.0, None
    while hi - lo > tol:
        mid = (lo + hi) / 2
        m, pl = shares([mid])
        if m[0] <= budget:
            hi, at_hi = mid, (m[0], pl)
        else:
            lo = mid
    if at_hi is None:  # never met below 1: does β = 1 meet it?
        m, pl = shares([1.0])
        if m[0] > budget:
            raise ValueError(f"No β keeps D-'s share at or below budget={budget}: even β = 1 keeps {m[0]:.4f} (mean "
                             "over modules; rank r directions with no D- energy do not exist in every module). Raise "
                             "the budget, or lower r.")
        at_hi = (m[0], pl)
    return BetaChoice(hi, budget, at_hi[0], at_hi[1], [])


def _joint_search(shares, budgets: list[float], rtol: float, max_evaluations: int) -> BetaChoice:
    n = len(budgets)

    def betas_of(t: list[float]) -> list[float]:  # beta_i = t_i / (1 + sum t)
        return [x / (1 + sum(t)) for x in t]

    def choice(t, kept, plus_kept) -> BetaChoice:
        return BetaChoice(tuple(betas_of(t)), tuple(budgets), tuple(kept), plus_kept, [])

    kept, plus_kept = shares([0.0] * n)
    if all(k <= b for k, b in zip(kept, budgets)):
        return choice([0.0] * n, kept, plus_kept)
    for i, (k, b) in enumerate(zip(kept, budgets)):  # the least set i can keep: its weight alone -> infinity
        if k > b:
            alone = shares([1.0 - 1.0 / _HUGE_WEIGHT if j == i else 0.0 for j in range(n)])[0][i]
            if alone > b:
                raise ValueError(f"No weight keeps D-_{i}'s share at or below its budget {b}: even with β_{i} -> 1 "
                                 f"it keeps {alone:.4f} (mean over modules). Raise that budget, or lower r.")
    t = [1.0 if k > b else 0.0 for k, b in zip(kept, budgets)]
    band = math.log(1 - rtol)
    step, worst_before, best = 1.0, math.inf, None
    tried_zero: dict[int, float] = {}  # set -> its weight when it was tried at 0
    for _ in range(max_evaluations):
        kept, plus_kept = shares(betas_of(t))
        g = [math.log(max(k, 1e-300) / b) if b > 0 else (math.inf if k > 0 else -math.inf)
             for k, b in zip(kept, budgets)]  # > 0: over budget
        met = all(x <= 0 for x in g)
        if met and (best is None or plus_kept > best[2]):
            best = (list(t), kept, plus_kept)
        if met and all(x >= band for x, w in zip(g, t) if w > 0):
            return choice(t, kept, plus_kept)
        worst = max([abs(x - band / 2) for x, w in zip(g, t) if w > 0 and x >= band]  # slack sets left out:
                    + [x for x, w in zip(g, t) if w == 0], default=0.0)  # falling to the band is no miss
        step = max(step / 2, 1 / 8) if worst > worst_before else min(1.25 * step, 1.0)
        worst_before = worst
        light = [i for i, (x, w) in enumerate(zip(g, t)) if 0 < w < 0.1 * max(t) and x < band and i not in tried_zero]
        if met and light:  # a light set the others already protect: tried once at weight 0
            i = min(light, key=lambda j: g[j])
            tried_zero[i], t[i] = t[i], 0.0
            continue
        for i, x in enumerate(g):
            if t[i] > 0:  # aimed at the middle of the band
                t[i] = min(t[i] * math.exp(step * max(min(x - band / 2, 20.0), -20.0)), _HUGE_WEIGHT)
            elif x > 0:  # a set at weight 0 over its budget: back at the weight it had
                t[i] = tried_zero.get(i) or min((w for w in t if w > 0), default=1.0)
    if best is None:
        raise ValueError(f"choose_beta found no weights meeting every budget {budgets} within {max_evaluations} "
                         "decompositions; the knowledge sets pull the subspace against each other. Loosen a budget, "
                         "or give the betas by hand.")
    warnings.warn(f"choose_beta did not bring every weighted set to its budget {budgets} within {max_evaluations} "
                  f"decompositions; it returns the weights that met every budget with the most D+ energy "
                  f"(D- shares {[round(k, 4) for k in best[1]]}), which protect some sets more than asked.",
                  stacklevel=3)
    return choice(*best)


BETA_SEARCH_VERSION = 2  # names the search in cached choices: a changed search never reuses an old one's β
_HUGE_WEIGHT = 1e6  # t_i at which a set's weight counts as infinite (beta_i within 1e-6 of 1)


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
    out = []
    for n, m in resolve_targets(model, config.target_modules).items():
        d_in, d_out = layer_dims(m)
        if min(tokens, d_in if m.bias is None else d_out) < d_out - config.r:
            out.append((n, d_out, d_in))
    return out
