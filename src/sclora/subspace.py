"""SC-LoRA's mathematics (paper Section 3, Algorithm 1, Appendix B). Tensors in, tensors out.

For a linear layer h = W0 x and two output covariances Cov+ (fine-tuning data, D+) and
Cov- (knowledge to preserve, D-), SC-LoRA picks the r-dimensional subspace S of the output
space that maximizes the reward (Definition 1)

    R(S) = (1 - beta) E||Pi_S(h+)||^2 - beta E||Pi_S(h-)||^2 = tr(Q^T dCov Q),

where Q holds an orthonormal basis of S and dCov = (1 - beta) Cov+ - beta Cov- (Eq. 4).
By Ky Fan's theorem (Theorem 1) the maximum is the sum of the r largest eigenvalues of dCov,
reached by their eigenvectors. The adapter is then B = Q, A = Q^T W0, W_res = W0 - B A
(Eq. 6-8), so that at initialization B A x = Q Q^T W0 x = Pi_S(h) (Theorem 2).
"""

from __future__ import annotations

import warnings

import torch

__all__ = [
    "NonUniqueSubspaceWarning",
    "delta_covariance",
    "reward",
    "sc_lora_factors",
    "sc_subspace",
]

#: Eigenvalues whose gap is below this fraction of their magnitude count as tied (exact zeros tie).
TIE_RTOL = 1e-9


class NonUniqueSubspaceWarning(UserWarning):
    """The r-th and (r+1)-th eigenvalues of dCov tie, so the optimal subspace is not unique."""


def delta_covariance(cov_plus: torch.Tensor, cov_minus: torch.Tensor, beta: float) -> torch.Tensor:
    """dCov = (1 - beta) Cov+ - beta Cov-  (Eq. 4)."""
    _check_beta(beta)
    if cov_plus.shape != cov_minus.shape:
        raise ValueError(
            f"Cov+ has shape {tuple(cov_plus.shape)} but Cov- has shape {tuple(cov_minus.shape)}; "
            "both must be statistics of the same module."
        )
    return (1.0 - beta) * cov_plus - beta * cov_minus


def reward(q: torch.Tensor, cov_plus: torch.Tensor, cov_minus: torch.Tensor, beta: float) -> torch.Tensor:
    """R(S) of the subspace spanned by the orthonormal columns of q (Eq. 1 and 15): tr(Q^T dCov Q)."""
    delta = delta_covariance(cov_plus, cov_minus, beta).to(q.dtype)
    return torch.einsum("ir,ij,jr->", q, delta, q)


def sc_subspace(
    cov_plus: torch.Tensor,
    cov_minus: torch.Tensor,
    beta: float,
    rank: int,
    *,
    weight: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Orthonormal basis Q (d_out x rank) of the optimal subspace S of Theorem 1.

    Columns are the eigenvectors of dCov for its ``rank`` algebraically largest eigenvalues, in
    descending order, each with its largest-magnitude entry positive (a deterministic sign).

    Without ``weight`` the covariances are the layer's output covariances (d_out x d_out).
    With ``weight`` (W0, d_out x d_in) they are INPUT covariances and the output ones are
    W0 Cov W0^T. When d_out > d_in, dCov = W0 dCov_in W0^T has rank <= d_in; with the thin QR
    W0 = U R its eigenvectors are U V where R dCov_in R^T = V diag(lam) V^T, and the remaining
    d_out - d_in eigenvalues are exactly 0 (directions outside the range of W0). This is exact
    and needs a d_in x d_in eigendecomposition instead of a d_out x d_out one.
    """
    _check_beta(beta)
    d_out = cov_plus.shape[0] if weight is None else weight.shape[0]
    max_rank = d_out if weight is None else min(weight.shape)
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise ValueError(
            f"rank must be an integer in [1, {max_rank}] for a module of this shape"
            f"{'' if weight is None else ' (d_out=%d, d_in=%d)' % tuple(weight.shape)}, got {rank!r}; "
            "choose a smaller r."
        )
    delta = delta_covariance(cov_plus.to(dtype), cov_minus.to(dtype), beta)
    if weight is None:
        eigvals, eigvecs = _eigh_descending(delta)
    else:
        w = weight.to(dtype)
        if w.shape[1] != delta.shape[0]:
            raise ValueError(
                f"weight has d_in={w.shape[1]} but the input covariances are {delta.shape[0]} x {delta.shape[0]}."
            )
        if w.shape[0] <= w.shape[1]:
            eigvals, eigvecs = _eigh_descending(w @ delta @ w.T)
        else:
            eigvals, eigvecs = _eigh_through_weight(w, delta, rank)
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


def _eigh_descending(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    return eigvals.flip(0), eigvecs.flip(1)


def _eigh_through_weight(
    w: torch.Tensor, delta_in: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """All d_out eigenvalues of W dCov_in W^T (descending) and the eigenvectors of the top ``rank``."""
    d_out, d_in = w.shape
    u, r = torch.linalg.qr(w)
    lam, v = _eigh_descending(r @ delta_in @ r.T)
    # The d_out - d_in directions orthogonal to range(W0) carry eigenvalue exactly 0; they rank
    # after the positive eigenvalues and before the negative ones.
    n_pos = int((lam > 0).sum())
    eigvals = torch.cat([lam[:n_pos], lam.new_zeros(d_out - d_in), lam[n_pos:]])
    if rank <= n_pos:
        return eigvals, u @ v[:, :rank]
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


def _check_beta(beta: float) -> None:
    if not isinstance(beta, (int, float)) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1] (paper, Definition 1), got {beta!r}.")
