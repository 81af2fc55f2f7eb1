"""Top-r eigenpairs of a symmetric matrix, the one numerical kernel of SC-LoRA (math only, no I/O).

Theorem 1 needs only the r algebraically largest eigenpairs of dCov. "eigh" computes all of them (the
reference); "lobpcg" is block LOBPCG with Rayleigh-Ritz (only products dCov @ X, X with r + a few guard
columns); "mixed" refines a float32 eigh in float64; "auto" picks the one measured fastest at equal
accuracy for the size (benchmarks/eigensolver.py; timings in docs/performance.md). The fast solvers stop
when the projector onto the top r Ritz vectors changes by less than 1e-8 (float64) between iterations and
hand over to eigh when they do not converge or meet a near-tie, so they return eigh's subspace up to that
tolerance.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SOLVERS", "Operator", "auto_solver", "check_solver", "eigh_descending", "top_eigenpairs"]

#: The top-r eigensolvers of :func:`sc_subspace` (module docstring).
SOLVERS = ("eigh", "lobpcg", "mixed", "auto")
#: Iteration caps of the fast solvers; past them the full eigh takes over.
LOBPCG_MAX_ITER = 150
MIXED_MAX_ITER = 10
#: A fast solver whose r-th and (r+1)-th Ritz values are closer than this (relative) hands over to eigh,
#: so that near-ties get eigh's subspace and eigh's tie warning.
NEAR_TIE_RTOL = 1e-6


def eigh_descending(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    return eigvals.flip(0), eigvecs.flip(1)


def check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(
            f"solver must be one of {SOLVERS} (eigh: full eigendecomposition, the reference; lobpcg: block LOBPCG "
            f"on the top r; mixed: float32 eigh refined in float64; auto: the fastest measured), got {solver!r}."
        )


class Operator:
    """The symmetric matrix A = L M L^T (A = M without L), applied through its factors where that is cheaper
    than forming it once (W0 dCov_in W0^T: forming it costs 4 d^3, as much as its eigendecomposition)."""

    def __init__(self, middle: torch.Tensor, left: torch.Tensor | None = None):
        self.middle, self.left = middle, left
        self.size = middle.shape[0] if left is None else left.shape[0]
        self.dtype, self.device = middle.dtype, middle.device

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        m = self.middle if dtype is None else self.middle.to(dtype)
        if self.left is None:
            return m
        left = self.left if dtype is None else self.left.to(dtype)
        return left @ m @ left.T

    def applier(self, columns: int, products: int):
        """x -> A x for ``products`` products with blocks of ``columns`` columns, the cheaper way (in flops)."""
        if self.left is None:
            return self.middle.__matmul__
        n, m = self.left.shape
        form = 2 * n * m * m + 2 * n * n * m
        if products * columns * (2 * (2 * n * m + m * m) - 2 * n * n) >= form:
            a = self.dense()
            return a.__matmul__
        left, middle = self.left, self.middle
        return lambda x: left @ (middle @ (left.T @ x))


def top_eigenpairs(op: Operator, rank: int, solver: str, info: dict | None = None):
    """(eigenvalues, eigenvectors) of ``op``, descending: all of them with eigh, else at least the top
    min(rank + 1, n) eigenvalues and ``rank`` eigenvectors. ``info`` (if given) gets the solver that
    produced them, its iterations and whether it handed over to eigh."""
    info = {} if info is None else info
    n = op.size
    info["requested"] = solver
    if solver == "auto":
        solver = auto_solver(n, rank, op.dtype)
    info.update(solver=solver, iterations=0, fallback=False)
    result = None
    if solver == "lobpcg" and 3 * (rank + _guard(rank, n)) <= n:
        result = _lobpcg(op, rank, _guard(rank, n), info)
    elif solver == "mixed" and op.dtype == torch.float64:
        result = _mixed(op, rank, _guard(rank, n), info)
    elif solver != "eigh":
        info["solver"] = "eigh"  # lobpcg on a space too small for its 3 (r + guard) columns; mixed in float32
    if result is None:
        info["fallback"] = info["solver"] != "eigh"
        info["solver"] = "eigh"
        return eigh_descending(op.dense())
    return result


def auto_solver(n: int, rank: int, dtype: torch.dtype) -> str:
    """The solver measured fastest at equal accuracy (benchmarks/eigensolver.py, one CPU thread; timings in
    docs/performance.md): LOBPCG when its k = rank + guard columns are a small slice of the space (it wins at
    n = 1536 and 4096 with r = 16; its per-iteration 3k x 3k Rayleigh-Ritz makes it lose at r = 128), else
    the float64 refinement of a float32 eigh (it wins at n = 576, r = 16), else eigh (small n or large r,
    and every float32 case below n = 1536)."""
    k = rank + _guard(rank, n)
    if 48 * k <= n:
        return "lobpcg"
    if dtype == torch.float64 and 8 * k <= n and n >= 256:
        return "mixed"
    return "eigh"


def _guard(rank: int, n: int) -> int:
    """Extra columns beyond the top ``rank``: the subspace then converges at the rate set by the gap
    between the rank-th and the (rank + guard + 1)-th eigenvalue instead of the (rank + 1)-th."""
    return max(0, min(max(8, rank // 4), n - rank))


def _rayleigh_ritz(x: torch.Tensor, ax: torch.Tensor, k: int):
    """Top-k Ritz values and vectors (and their images) of A on the orthonormal basis x, descending."""
    h = x.T @ ax
    theta, y = torch.linalg.eigh((h + h.T) / 2)
    y = y.flip(1)[:, :k]
    return theta.flip(0)[:k], x @ y, ax @ y


def _orthonormalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning w's part outside the orthonormal ``basis`` (twice is enough)."""
    w = w / w.norm(dim=0).clamp_min(torch.finfo(w.dtype).tiny)
    for _ in range(2):
        w = torch.linalg.qr(w - basis @ (basis.T @ w)).Q
    return w


def _projector_change(x: torch.Tensor, y: torch.Tensor) -> float:
    """||X X^T - Y Y^T||_F for orthonormal X, Y of the same width, without cancellation."""
    return math.sqrt(2) * torch.linalg.norm(y - x @ (x.T @ y)).item()


def _tolerance(dtype: torch.dtype) -> float:
    """Projector change ||X X^T - Y Y^T||_F between iterations that counts as converged: ~ sqrt(eps) in
    float64 (the error then is ~1e-9), ~100 eps in float32 (the rounding floor of float32 eigh)."""
    return 1e-8 if dtype == torch.float64 else 1e-5


def _stalled(changes: list[float], residual: torch.Tensor, theta: torch.Tensor, tol: float, window: int = 5) -> bool:
    """The projector change has not halved over ``window`` iterations although every wanted residual is
    already below tol ||A|| (||A|| estimated by the extreme Ritz values): a float32 iteration sits at its
    rounding floor, where float32 eigh is no more accurate. (Not used in float64, where slow progress
    means a small gap, not rounding.)"""
    if len(changes) <= window or min(changes[-window:]) < 0.5 * min(changes[:-window]):
        return False
    scale = theta.abs().max()
    return bool(residual.norm(dim=0).max() <= tol * scale)


def _near_tie(theta: torch.Tensor, rank: int) -> bool:
    if rank >= theta.numel():
        return False
    a, b = theta[rank - 1], theta[rank]
    return bool((a - b).abs() <= NEAR_TIE_RTOL * torch.maximum(a.abs(), b.abs()))


def _lobpcg(op: Operator, rank: int, guard: int, info: dict, max_iter: int = LOBPCG_MAX_ITER, init=None):
    """Block LOBPCG for the algebraically largest eigenpairs, no preconditioner, k = rank + guard columns.

    Each iteration does one product A @ W (W: the residuals, made orthonormal to [X, P]) and a
    Rayleigh-Ritz step on the orthonormal basis S = [X, P, W] (3k columns); the new search direction P
    is the part of the new X outside the old one, taken orthonormal in the small 3k space
    (Hetmaniuk & Lehoucq 2006), so that S stays orthonormal and A S needs no further products.
    Converged when the projector onto the top ``rank`` Ritz vectors moves by less than 1e-8 (float64;
    1e-5 in float32), or, in float32, when that change has stopped shrinking at rounding level."""
    n, k = op.size, rank + guard
    apply = op.applier(k, 40)
    if init is None:
        init = torch.randn(n, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.linalg.qr(init.to(device=op.device, dtype=op.dtype)).Q
    theta, x, ax = _rayleigh_ritz(x, apply(x), k)
    p = ap = None
    tol, changes = _tolerance(op.dtype), []
    for iteration in range(1, max_iter + 1):
        basis, images = (x, ax) if p is None else (torch.cat([x, p], 1), torch.cat([ax, ap], 1))
        residual = ax - x * theta
        w = _orthonormalize(residual, basis)
        s, as_ = torch.cat([basis, w], 1), torch.cat([images, apply(w)], 1)
        h = s.T @ as_
        theta_all, y = torch.linalg.eigh((h + h.T) / 2)
        theta, y = theta_all.flip(0)[:k], y.flip(1)[:, :k]
        z = y.clone()
        z[:k] = 0  # the new X's components along P and W: the next search direction
        z = _orthonormalize(z, y)
        x_new, p, ap = s @ y, s @ z, as_ @ z
        changes.append(_projector_change(x[:, :rank], x_new[:, :rank]))
        x, ax = x_new, as_ @ y
        if changes[-1] < tol or (op.dtype != torch.float64 and _stalled(changes, residual[:, :rank], theta_all, tol)):
            info["iterations"] = iteration
            theta, x, _ = _rayleigh_ritz(x, apply(x), k)  # fresh products: no drift from the recurrences
            return None if _near_tie(theta, rank) else (theta, x)
    info["iterations"] = max_iter
    return None


def _mixed(op: Operator, rank: int, guard: int, info: dict, max_iter: int = MIXED_MAX_ITER):
    """float32 eigh of A, then float64 refinement of its top k = rank + guard eigenvectors.

    The float32 eigenpairs (V, w) are accurate to ~eps32 ||A|| / gap. Each refinement step takes the
    float64 residual R = A X - X diag(theta) and subtracts the correction -(A - theta_j)^{-1} r_j
    solved in the float32 eigenbasis outside the top k (a Jacobi-Davidson / Newton step with the float32
    decomposition as the inverse), then a float64 Rayleigh-Ritz step; each step gains about
    log10(gap / (eps32 ||A||)) digits. A float32 eigh costs about half a float64 one (docs/performance.md)."""
    k = min(op.size, rank + guard)
    w32, v32 = torch.linalg.eigh(op.dense(torch.float32))
    w32, v32 = w32.flip(0), v32.flip(1)
    apply = op.applier(k, 4)
    floor = 10 * torch.finfo(torch.float32).eps * w32.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    x = torch.linalg.qr(v32[:, :k].to(op.dtype)).Q
    theta, x, ax = _rayleigh_ritz(x, apply(x), k)
    tol = _tolerance(op.dtype)
    for iteration in range(1, max_iter + 1):
        c = v32.T @ (ax - x * theta).to(torch.float32)
        gap = w32[:, None] - theta.to(torch.float32)[None, :]
        gap = torch.where(gap >= 0, gap.clamp_min(floor), gap.clamp_max(-floor))
        c = c / gap
        c[:k] = 0
        x_new = torch.linalg.qr(x - (v32 @ c).to(op.dtype)).Q
        theta, x_new, ax = _rayleigh_ritz(x_new, apply(x_new), k)
        change = _projector_change(x[:, :rank], x_new[:, :rank])
        x = x_new
        if change < tol:
            info["iterations"] = iteration
            return None if _near_tie(theta, rank) else (theta, x)
    info["iterations"] = max_iter
    return None
