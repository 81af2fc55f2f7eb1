"""SC-LoRA's mathematics (paper Section 3, Algorithm 1, Appendix B). Tensors in, tensors out.

For a linear layer h = W0 x and two output covariances Cov+ (fine-tuning data, D+) and
Cov- (knowledge to preserve, D-), SC-LoRA picks the r-dimensional subspace S of the output
space that maximizes the reward (Definition 1)

    R(S) = (1 - beta) E||Pi_S(h+)||^2 - beta E||Pi_S(h-)||^2 = tr(Q^T dCov Q),

where Q holds an orthonormal basis of S and dCov = (1 - beta) Cov+ - beta Cov- (Eq. 4).
Several knowledge sets D-_1 .. D-_k, each with its own weight beta_i >= 0 (sum_i beta_i <= 1),
generalize this to

    R(S) = (1 - sum_i beta_i) E||Pi_S(h+)||^2 - sum_i beta_i E||Pi_S(h-_i)||^2,
    dCov = (1 - sum_i beta_i) Cov+ - sum_i beta_i Cov-_i,

which is the one-set case with beta = sum_i beta_i and Cov- = sum_i (beta_i / beta) Cov-_i.
By Ky Fan's theorem (Theorem 1) the maximum is the sum of the r largest eigenvalues of dCov,
reached by their eigenvectors. The adapter is then B = Q, A = Q^T W0, W_res = W0 - B A
(Eq. 6-8), so that at initialization B A x = Q Q^T W0 x = Pi_S(h) (Theorem 2).
The fraction of a data set's output energy E||h||^2 that S keeps is tr(Q^T Cov Q) / tr(Cov)
(:func:`captured_energy`).

Only the top r eigenpairs of dCov are needed. ``solver`` picks how they are found: "eigh" (a full
eigendecomposition, the default and reference), "lobpcg" (block LOBPCG with Rayleigh-Ritz: only
products dCov @ X, where X has r + a few guard columns), "mixed" (a float32 eigh refined in float64)
or "auto" (the one measured fastest at equal accuracy for that size; see benchmarks/eigensolver.py).
The fast solvers stop when the projector onto the top r Ritz vectors changes by less than
1e-8 (float64) between iterations and hand over to eigh when they do not converge or meet a near-tie,
so they return the same subspace as eigh up to that tolerance.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch

from .eigensolvers import SOLVERS, Operator, check_solver, top_eigenpairs

__all__ = [
    "SOLVERS",
    "check_betas",
    "NonUniqueSubspaceWarning",
    "captured_energy",
    "delta_covariance",
    "reward",
    "sc_lora_factors",
    "sc_subspace",
]

#: Eigenvalues whose gap is below this fraction of their magnitude count as tied (exact zeros tie).
TIE_RTOL = 1e-9


#: One D- covariance and its float beta, or a sequence of them and a sequence of betas (one each).
Covariances = torch.Tensor | Sequence[torch.Tensor]
Betas = float | Sequence[float]


class NonUniqueSubspaceWarning(UserWarning):
    """The r-th and (r+1)-th eigenvalues of dCov tie, so the optimal subspace is not unique."""


def delta_covariance(cov_plus: torch.Tensor, cov_minus: Covariances, beta: Betas) -> torch.Tensor:
    """dCov = (1 - beta) Cov+ - beta Cov-  (Eq. 4), or (1 - sum_i beta_i) Cov+ - sum_i beta_i Cov-_i."""
    minus, betas = _knowledge_sets(cov_minus, beta)
    for i, cov in enumerate(minus):
        if cov_plus.shape != cov.shape:
            which = "Cov-" if len(minus) == 1 else f"Cov-_{i}"
            raise ValueError(
                f"Cov+ has shape {tuple(cov_plus.shape)} but {which} has shape {tuple(cov.shape)}; "
                "all must be statistics of the same module."
            )
    dtype = functools.reduce(torch.promote_types, [c.dtype for c in minus], cov_plus.dtype)
    delta = torch.mul(cov_plus.to(dtype), 1.0 - sum(betas))
    for b, cov in zip(betas, minus):
        delta.add_(cov, alpha=-b)  # in place: one d x d temporary for any number of sets
    return delta


def reward(q: torch.Tensor, cov_plus: torch.Tensor, cov_minus: Covariances, beta: Betas) -> torch.Tensor:
    """R(S) of the subspace spanned by the orthonormal columns of q (Eq. 1 and 15): tr(Q^T dCov Q)."""
    delta = delta_covariance(cov_plus, cov_minus, beta).to(q.dtype)
    return torch.einsum("ir,ij,jr->", q, delta, q)


def captured_energy(q: torch.Tensor, cov: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """tr(Q^T Cov Q) / tr(Cov): the fraction of a data set's output energy E||h||^2 kept by Pi_S, S spanned by
    the orthonormal columns of q. With ``weight`` (W0), ``cov`` is an input covariance and the output one
    is W0 Cov W0^T, never formed: tr(Q^T W C W^T Q) = tr((Q^T W) C (Q^T W)^T), tr(W C W^T) = sum((W C) * W).
    A data set without energy in the layer gives nan (0 / 0)."""
    c = cov.to(torch.float64)
    q = q.to(device=c.device, dtype=torch.float64)
    d_out = c.shape[0] if weight is None else weight.shape[0]
    if q.ndim != 2 or q.shape[0] != d_out:
        raise ValueError(f"q must be d_out x r with d_out={d_out} for this covariance, got shape {tuple(q.shape)}.")
    if weight is None:
        kept, total = torch.einsum("ir,ij,jr->", q, c, q), c.trace()
    else:
        w = weight.to(device=c.device, dtype=torch.float64)
        if w.shape[1] != c.shape[0]:
            raise ValueError(f"weight has d_in={w.shape[1]} but the input covariance is {c.shape[0]} x {c.shape[0]}.")
        qw = q.T @ w
        kept, total = ((qw @ c) * qw).sum(), ((w @ c) * w).sum()
    return kept.item() / total.item() if total.item() != 0 else math.nan


def sc_subspace(
    cov_plus: torch.Tensor,
    cov_minus: Covariances,
    beta: Betas,
    rank: int,
    *,
    weight: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    solver: str = "eigh",
) -> torch.Tensor:
    """Orthonormal basis Q (d_out x rank) of the optimal subspace S of Theorem 1.

    Columns are the eigenvectors of dCov for its ``rank`` algebraically largest eigenvalues, in
    descending order, each with its largest-magnitude entry positive (a deterministic sign).
    ``cov_minus`` / ``beta`` are one D- covariance and a float, or sequences (several knowledge sets).

    Without ``weight`` the covariances are the layer's output covariances (d_out x d_out).
    With ``weight`` (W0, d_out x d_in) they are INPUT covariances and the output ones are
    W0 Cov W0^T. When d_out > d_in, dCov = W0 dCov_in W0^T has rank <= d_in; with the thin QR
    W0 = U R its eigenvectors are U V where R dCov_in R^T = V diag(lam) V^T, and the remaining
    d_out - d_in eigenvalues are exactly 0 (directions outside the range of W0). This is exact
    and needs a d_in x d_in eigendecomposition instead of a d_out x d_out one.

    ``solver`` ("eigh", "lobpcg", "mixed" or "auto", see the module docstring) only changes how the
    top eigenpairs are computed; the iterative ones apply W0 dCov_in W0^T through its factors when
    that is cheaper than forming it.
    """
    check_solver(solver)
    minus, betas = _knowledge_sets(cov_minus, beta)
    d_out = cov_plus.shape[0] if weight is None else weight.shape[0]
    max_rank = d_out if weight is None else min(weight.shape)
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise ValueError(
            f"rank must be an integer in [1, {max_rank}] for a module of this shape"
            f"{'' if weight is None else ' (d_out={}, d_in={})'.format(*weight.shape)}, got {rank!r}; "
            "choose a smaller r."
        )
    delta = delta_covariance(cov_plus.to(dtype), [c.to(dtype) for c in minus], betas)
    if weight is None:
        eigvals, eigvecs = top_eigenpairs(Operator(delta), rank, solver)
    else:
        w = weight.to(dtype)
        if w.shape[1] != delta.shape[0]:
            raise ValueError(
                f"weight has d_in={w.shape[1]} but the input covariances are {delta.shape[0]} x {delta.shape[0]}."
            )
        if w.shape[0] <= w.shape[1]:
            eigvals, eigvecs = top_eigenpairs(Operator(delta, w), rank, solver)
        else:
            eigvals, eigvecs = _eigh_through_weight(w, delta, rank, solver)
    _warn_if_tied(eigvals, rank)
    return _fix_signs(eigvecs[:, :rank].contiguous())


def sc_lora_factors(
    weight: torch.Tensor, q: torch.Tensor, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, W_res) of Eq. 6-8 for an adapter whose output is ``scaling * B @ A @ x``.

    B = Q and A = Q^T W0 / scaling, so scaling * B A = Q Q^T W0 = Pi_S W0 for any scaling
    (PEFT's lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA), and W_res = W0 - Q Q^T W0.
    """
    w = weight.to(q.dtype)
    projected = q.T @ w
    return projected / scaling, q, w - q @ projected


def _eigh_through_weight(
    w: torch.Tensor, delta_in: torch.Tensor, rank: int, solver: str = "eigh"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues of W dCov_in W^T (descending: all d_out with eigh, else at least the top rank + 1)
    and the eigenvectors of the top ``rank``."""
    d_out, d_in = w.shape
    # W0 = U R as Householder reflectors (geqrf): U is never formed, only applied to the few columns needed
    # (ormqr), which halves the cost of the QR (the one beta-independent step that dominated a beta sweep).
    reflectors, tau = torch.geqrf(w)
    r = reflectors[:d_in].triu()

    def times_u(x: torch.Tensor) -> torch.Tensor:  # U x for x with d_in rows
        return torch.ormqr(reflectors, tau, torch.cat([x, x.new_zeros(d_out - d_in, x.shape[1])]))

    lam, v = top_eigenpairs(Operator(delta_in, r), rank, solver)
    # The d_out - d_in directions orthogonal to range(W0) carry eigenvalue exactly 0; they rank
    # after the positive eigenvalues and before the negative ones.
    n_pos = int((lam > 0).sum())
    eigvals = torch.cat([lam[:n_pos], lam.new_zeros(d_out - d_in), lam[n_pos:]])
    if rank <= n_pos:
        return eigvals, times_u(v[:, :rank])
    u = times_u(torch.eye(d_in, dtype=w.dtype, device=w.device))
    # The optimum then includes zero-eigenvalue directions outside range(W0); any orthonormal set of
    # them is optimal (a tie, warned about), so take a fixed pseudo-random one: cheaper than a full QR.
    n_zero = min(rank - n_pos, d_out - d_in)
    g = torch.randn(d_out, n_zero, generator=torch.Generator().manual_seed(0), dtype=w.dtype).to(w.device)
    complement = torch.linalg.qr(g - u @ (u.T @ g))[0]
    eigvecs = torch.cat([u @ v[:, :n_pos], complement, u @ v[:, n_pos : rank - n_zero]], dim=1)
    return eigvals, eigvecs


def _warn_if_tied(eigvals: torch.Tensor, rank: int) -> None:
    # Relative to the pair itself, not to the largest eigenvalue: LLM layers with massive activations
    # have spectra spanning 1e6 and more, and their small eigenvalues are still distinct.
    if rank >= eigvals.numel():
        return
    a, b = eigvals[rank - 1], eigvals[rank]
    if (a - b).abs() <= TIE_RTOL * torch.maximum(a.abs(), b.abs()):
        warnings.warn(
            "The r-th and (r+1)-th eigenvalues of dCov are equal, so the best subspace is not unique and "
            "part of the initialization is arbitrary. With beta = 1 this is the paper's Appendix B case "
            "(null space of Cov- larger than r). Set beta slightly below 1 (e.g. 0.99) so that Cov+ breaks "
            "the tie, or use more / longer D- samples.",
            NonUniqueSubspaceWarning,
            stacklevel=3,
        )


def _fix_signs(q: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive (as sklearn's svd_flip)."""
    pivots = q.abs().argmax(dim=0)
    signs = torch.sign(q[pivots, torch.arange(q.shape[1], device=q.device)])
    signs[signs == 0] = 1
    return q * signs


def _knowledge_sets(cov_minus: Covariances, beta: Betas) -> tuple[list[torch.Tensor], list[float]]:
    """([Cov-_i], [beta_i]) from one covariance + one beta, or sequences of the same length; validated."""
    minus = [cov_minus] if isinstance(cov_minus, torch.Tensor) else list(cov_minus)
    betas = check_betas(beta)
    if len(minus) != len(betas):
        raise ValueError(
            f"{len(minus)} D- covariance(s) but {len(betas)} beta(s): give one beta per knowledge set, "
            f"e.g. beta={[round(0.8 / len(minus), 3)] * len(minus)} for {len(minus)} sets."
        )
    return minus, betas


def check_betas(beta: Betas) -> list[float]:
    """[beta] for one number in [0, 1], or the list of several D- weights, each >= 0 and summing to at most 1.
    Bools, NaN and inf are rejected (True would silently mean beta = 1)."""

    def real(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and -math.inf < x < math.inf

    if not isinstance(beta, (list, tuple)):
        if not real(beta) or not 0 <= beta <= 1:
            raise ValueError(f"beta must be a number in [0, 1] (paper, Definition 1), got {beta!r}.")
        return [float(beta)]
    if not beta:
        raise ValueError("beta is an empty list: give one weight per knowledge set D-_i, e.g. beta=[0.4, 0.4].")
    for i, b in enumerate(beta):
        if not real(b) or not 0 <= b <= 1:
            raise ValueError(f"beta[{i}] must be a number >= 0 and <= 1 (the weight of knowledge set D-_{i}), "
                             f"got {b!r}.")
    if not sum(beta) <= 1.0 + 1e-12:
        raise ValueError(
            f"The betas {list(beta)} sum to {sum(beta):g} > 1, which would give Cov+ a negative weight "
            f"1 - sum(beta); scale them down so that they sum to at most 1, e.g. "
            f"{[round(b / sum(beta), 3) for b in beta]}."
        )
    return [float(b) for b in beta]
