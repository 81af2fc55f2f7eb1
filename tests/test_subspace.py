"""sclora.subspace against the paper's theorems, with float64 references."""

import warnings

import pytest
import torch

from sclora.subspace import NonUniqueSubspaceWarning, delta_covariance, reward, sc_lora_factors, sc_subspace


def random_cov(d, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, rank or 3 * d, generator=g, dtype=torch.float64)
    return x @ x.T / x.shape[1]


def random_orthonormal(d, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]


def projector(q):
    return q @ q.T


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_theorem1_reward_is_sum_of_top_eigenvalues_and_beats_random_subspaces(seed, beta):
    d, r = 24, 5
    cp, cm = random_cov(d, seed=seed), random_cov(d, seed=100 + seed)
    q = sc_subspace(cp, cm, beta, r)
    top = torch.linalg.eigvalsh(delta_covariance(cp, cm, beta)).flip(0)[:r].sum()
    assert torch.allclose(reward(q, cp, cm, beta), top, rtol=1e-10, atol=1e-12)
    for trial in range(20):
        assert reward(random_orthonormal(d, r, 1000 * seed + trial), cp, cm, beta) <= top + 1e-12


def test_columns_are_orthonormal_and_sorted_by_eigenvalue():
    cp, cm = random_cov(20, seed=1), random_cov(20, seed=2)
    q = sc_subspace(cp, cm, 0.4, 6)
    assert torch.allclose(q.T @ q, torch.eye(6, dtype=q.dtype), atol=1e-12)
    rayleigh = torch.einsum("ir,ij,jr->r", q, delta_covariance(cp, cm, 0.4), q)
    assert (rayleigh[:-1] >= rayleigh[1:]).all()


def test_beta0_is_top_principal_subspace_of_cov_plus():
    cp, cm = random_cov(16, seed=3), random_cov(16, seed=4)
    evecs = torch.linalg.eigh(cp).eigenvectors.flip(1)[:, :4]
    assert torch.allclose(projector(sc_subspace(cp, cm, 0.0, 4)), projector(evecs), atol=1e-10)


def test_beta1_is_least_principal_subspace_of_cov_minus():
    cp, cm = random_cov(16, seed=5), random_cov(16, seed=6)
    evecs = torch.linalg.eigh(cm).eigenvectors[:, :4]  # smallest eigenvalues of Cov-
    assert torch.allclose(projector(sc_subspace(cp, cm, 1.0, 4)), projector(evecs), atol=1e-10)


def test_sign_convention_is_deterministic_under_input_sign_flips():
    cp, cm = random_cov(12, seed=7), random_cov(12, seed=8)
    q = sc_subspace(cp, cm, 0.5, 3)
    pivots = q.abs().argmax(dim=0)
    assert (q[pivots, torch.arange(3)] > 0).all()
    assert torch.allclose(sc_subspace(cp.clone(), cm.clone(), 0.5, 3), q)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_reduction_through_weight_matches_full_output_eigendecomposition(beta, seed):
    d_in, d_out, r = 10, 26, 4
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    cp_in, cm_in = random_cov(d_in, seed=seed), random_cov(d_in, seed=50 + seed)
    cp_out, cm_out = w @ cp_in @ w.T, w @ cm_in @ w.T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonUniqueSubspaceWarning)  # beta=1 ties at 0 by design
        q_reduced = sc_subspace(cp_in, cm_in, beta, r, weight=w)
        q_full = sc_subspace(cp_out, cm_out, beta, r)
    # Both reach the optimum of Theorem 1 on the output covariances...
    assert torch.allclose(reward(q_reduced, cp_out, cm_out, beta), reward(q_full, cp_out, cm_out, beta), atol=1e-9)
    assert torch.allclose(q_reduced.T @ q_reduced, torch.eye(r, dtype=torch.float64), atol=1e-10)
    # ...and, where the optimum is unique (an eigenvalue gap after the r-th), the same subspace.
    eigvals = torch.linalg.eigvalsh(delta_covariance(cp_out, cm_out, beta)).flip(0)
    if eigvals[r - 1] - eigvals[r] > 1e-6 * eigvals.abs().max():
        assert torch.allclose(projector(q_reduced), projector(q_full), atol=1e-8)


def test_reduction_fills_from_null_space_when_few_positive_eigenvalues():
    # beta=1: dCov = -W Cov- W^T <= 0, so the optimum is any r directions outside range(W).
    d_in, d_out, r = 6, 20, 4
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    with pytest.warns(NonUniqueSubspaceWarning, match="Appendix B"):
        q = sc_subspace(random_cov(d_in, seed=1), random_cov(d_in, seed=2), 1.0, r, weight=w)
    assert torch.allclose(q.T @ w, torch.zeros(r, d_in, dtype=torch.float64), atol=1e-10)


def test_exact_eigenvalue_tie_warns_and_beta_below_one_breaks_it():
    d, r = 12, 3
    cm = torch.diag(torch.tensor([5.0] * 6 + [1.0] * 6, dtype=torch.float64))  # -Cov-: 6-fold tie at the top
    with pytest.warns(NonUniqueSubspaceWarning, match="beta slightly below 1"):
        sc_subspace(random_cov(d, seed=4), cm, 1.0, r)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonUniqueSubspaceWarning)
        sc_subspace(random_cov(d, seed=4), cm, 0.99, r)  # Cov+ breaks the tie


def test_wide_spectrum_with_distinct_small_eigenvalues_is_not_a_tie():
    # A "massive activation" direction: the largest eigenvalue 1e9 times the r-th, which is still distinct.
    eigvals = torch.tensor([1e9] + [1000.0 - 30 * i for i in range(20)], dtype=torch.float64)
    basis = random_orthonormal(21, 21, seed=5)
    cov = basis @ torch.diag(eigvals) @ basis.T
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonUniqueSubspaceWarning)
        sc_subspace(cov, torch.zeros_like(cov), 0.0, 16)


@pytest.mark.parametrize("scaling", [1.0, 2.0, 0.25, 16 / 4**0.5])
def test_theorem2_adapter_output_is_projection_of_layer_output(scaling):
    d_in, d_out, r = 12, 9, 3
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    q = sc_subspace(random_cov(d_out, seed=1), random_cov(d_out, seed=2), 0.5, r)
    a, b, w_res = sc_lora_factors(w, q, scaling)
    x = torch.randn(d_in, 7, dtype=torch.float64)
    assert torch.allclose(scaling * b @ (a @ x), q @ q.T @ (w @ x), atol=1e-12)
    assert torch.allclose(w_res + scaling * b @ a, w, atol=1e-12)
    assert torch.equal(b, q)
    assert torch.allclose(q.T @ w_res, torch.zeros(r, d_in, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan"), "0.5"])
def test_beta_outside_unit_interval_is_rejected(beta):
    with pytest.raises(ValueError, match="beta must be a number in \\[0, 1\\]"):
        sc_subspace(random_cov(5), random_cov(5), beta, 2)


@pytest.mark.parametrize("rank", [0, 6, 2.0])
def test_bad_rank_is_rejected(rank):
    with pytest.raises(ValueError, match="rank must be an integer"):
        sc_subspace(random_cov(5), random_cov(5), 0.5, rank)


def test_rank_above_min_of_weight_shape_is_rejected():
    w = torch.randn(20, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="rank must be an integer in \\[1, 4\\]"):
        sc_subspace(random_cov(4), random_cov(4), 0.5, 5, weight=w)


def test_mismatched_covariances_are_rejected():
    with pytest.raises(ValueError, match="same module"):
        sc_subspace(random_cov(5), random_cov(6), 0.5, 2)
