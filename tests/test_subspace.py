"""sclora.subspace against the paper's theorems, with float64 references."""

import math
import warnings

import pytest
import torch
from conftest import random_batches, tiny_llama

from sclora import SCLoRAConfig, collect_covariances, get_sclora_model
from sclora.eigensolvers import SOLVERS, Operator, auto_solver, top_eigenpairs
from sclora.subspace import (
    NonUniqueSubspaceWarning,
    captured_energy,
    delta_covariance,
    reward,
    sc_lora_factors,
    sc_subspace,
)


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


# --- several knowledge sets: dCov = (1 - sum_i beta_i) Cov+ - sum_i beta_i Cov-_i -------------------------


def explicit_delta(cp, cms, betas):
    """The generalized Eq. 4 written out term by term in float64."""
    out = (1.0 - sum(betas)) * cp
    for b, c in zip(betas, cms):
        out = out - b * c
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("betas", [[0.3, 0.4], [0.1, 0.2, 0.6], [0.5, 0.5], [0.0, 0.7]])
def test_several_sets_give_the_top_eigenvectors_of_the_explicit_dcov_and_beat_random_subspaces(seed, betas):
    d, r = 20, 5
    cp = random_cov(d, seed=seed)
    cms = [random_cov(d, seed=100 * (i + 1) + seed) for i in range(len(betas))]
    delta = explicit_delta(cp, cms, betas)
    torch.testing.assert_close(delta_covariance(cp, cms, betas), delta, rtol=0, atol=1e-13)
    eigvals, eigvecs = torch.linalg.eigh(delta)
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    assert eigvals[r - 1] - eigvals[r] > 1e-6  # a unique optimum, so the subspace itself is comparable
    q = sc_subspace(cp, cms, betas, r)
    assert (projector(q) - projector(eigvecs[:, :r])).abs().max() < 1e-8
    top = eigvals[:r].sum()
    assert torch.allclose(reward(q, cp, cms, betas), top, rtol=1e-10, atol=1e-12)  # Theorem 1, generalized
    for trial in range(20):
        assert reward(random_orthonormal(d, r, 1000 * seed + trial), cp, cms, betas) <= top + 1e-12


def test_weighted_sets_are_the_single_set_case_with_the_weighted_mean_covariance():
    cp, cms, betas = random_cov(14, seed=1), [random_cov(14, seed=2), random_cov(14, seed=3)], [0.2, 0.6]
    total = sum(betas)
    mean = sum(b / total * c for b, c in zip(betas, cms))
    torch.testing.assert_close(delta_covariance(cp, cms, betas), delta_covariance(cp, mean, total), rtol=0, atol=1e-13)
    assert torch.allclose(projector(sc_subspace(cp, cms, betas, 4)), projector(sc_subspace(cp, mean, total, 4)),
                          atol=1e-10)


@pytest.mark.parametrize("beta", [0.0, 0.35, 1.0])
def test_one_element_lists_and_zero_weight_sets_equal_the_single_set_call(beta):
    cp, cm, other = random_cov(12, seed=4), random_cov(12, seed=5), random_cov(12, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonUniqueSubspaceWarning)
        single = sc_subspace(cp, cm, beta, 3)
        assert torch.equal(sc_subspace(cp, [cm], [beta], 3), single)
        assert torch.equal(sc_subspace(cp, (cm,), beta, 3), single)
        assert torch.equal(sc_subspace(cp, [cm, other], [beta, 0.0], 3), single)
    assert torch.equal(delta_covariance(cp, [cm, other], [beta, 0.0]), delta_covariance(cp, cm, beta))
    assert torch.equal(reward(single, cp, [cm], [beta]), reward(single, cp, cm, beta))


@pytest.mark.parametrize("betas", [[0.2, 0.3], [0.1, 0.15], [0.0, 0.3]])
def test_several_sets_reduce_exactly_through_the_weight(betas):
    d_in, d_out, r = 10, 26, 4
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cp_in, cms_in = random_cov(d_in, seed=1), [random_cov(d_in, seed=2), random_cov(d_in, seed=3)]
    cp_out, cms_out = w @ cp_in @ w.T, [w @ c @ w.T for c in cms_in]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonUniqueSubspaceWarning)
        q_reduced = sc_subspace(cp_in, cms_in, betas, r, weight=w)
        q_full = sc_subspace(cp_out, cms_out, betas, r)
    assert torch.allclose(reward(q_reduced, cp_out, cms_out, betas), reward(q_full, cp_out, cms_out, betas), atol=1e-9)
    eigvals = torch.linalg.eigvalsh(explicit_delta(cp_out, cms_out, betas)).flip(0)
    assert eigvals[r - 1] - eigvals[r] > 1e-6 * eigvals.abs().max()
    assert torch.allclose(projector(q_reduced), projector(q_full), atol=1e-8)


@pytest.mark.parametrize(
    "n_covs,betas,match",
    [
        (2, [0.3, -0.1], r"beta\[1\] must be a number >= 0"),
        (2, [0.3, float("nan")], r"beta\[1\] must be a number >= 0"),
        (2, [0.3, "0.2"], r"beta\[1\] must be a number >= 0"),
        (2, [0.7, 0.5], r"sum to 1.2 > 1.*scale them down"),
        (2, [], "empty list"),
        (2, 0.5, r"2 D- covariance\(s\) but 1 beta\(s\).*one beta per knowledge set"),
        (3, [0.2, 0.2], r"3 D- covariance\(s\) but 2 beta\(s\)"),
        (1, [0.2, 0.2], r"1 D- covariance\(s\) but 2 beta\(s\)"),
    ],
)
def test_invalid_betas_for_several_sets_are_rejected(n_covs, betas, match):
    cms = [random_cov(5, seed=i) for i in range(n_covs)]
    with pytest.raises(ValueError, match=match):
        sc_subspace(random_cov(5), cms if n_covs > 1 else cms[0], betas, 2)
    with pytest.raises(ValueError, match=match):
        delta_covariance(random_cov(5), cms if n_covs > 1 else cms[0], betas)


def test_several_sets_with_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"Cov-_1 has shape \(6, 6\).*same module"):
        sc_subspace(random_cov(5), [random_cov(5), random_cov(6)], [0.2, 0.2], 2)


def test_betas_summing_to_one_up_to_rounding_are_accepted():
    betas = [0.1] * 10  # sums to 0.9999999999999999
    assert sc_subspace(random_cov(6), [random_cov(6, seed=i) for i in range(10)], betas, 2).shape == (6, 2)
    sc_subspace(random_cov(6), [random_cov(6, seed=1)] * 3, [0.7, 0.2, 0.1], 2)


# --- captured energy --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_captured_energy_against_explicit_traces_with_and_without_weight(seed):
    d_in, d_out, r = 9, 21, 4
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    c_in, c_out = random_cov(d_in, seed=seed), random_cov(d_out, seed=seed + 10)
    q = random_orthonormal(d_out, r, seed)
    expected_out = (q.T @ c_out @ q).trace() / c_out.trace()
    assert math.isclose(captured_energy(q, c_out), expected_out.item(), rel_tol=1e-12)
    full = w @ c_in @ w.T  # formed here only, for the reference
    expected_in = (q.T @ full @ q).trace() / full.trace()
    assert math.isclose(captured_energy(q, c_in, weight=w), expected_in.item(), rel_tol=1e-12)
    assert math.isclose(captured_energy(q.float(), c_in.float(), weight=w.float()), expected_in.item(), rel_tol=1e-5)
    # The whole space captures everything, nothing captures nothing of the complement.
    assert math.isclose(captured_energy(random_orthonormal(d_out, d_out, seed), c_out), 1.0, rel_tol=1e-12)


def test_captured_energy_of_a_set_without_energy_is_nan():
    q = random_orthonormal(6, 2, 0)
    assert math.isnan(captured_energy(q, torch.zeros(6, 6, dtype=torch.float64)))
    assert math.isnan(captured_energy(q, random_cov(3), weight=torch.zeros(6, 3, dtype=torch.float64)))


@pytest.mark.parametrize("r", [1, 3, 7])
def test_captured_energy_of_the_beta0_subspace_is_the_ky_fan_fraction(r):
    cp, cm = random_cov(16, seed=7), random_cov(16, seed=8)
    eigvals = torch.linalg.eigvalsh(cp).flip(0)
    q = sc_subspace(cp, cm, 0.0, r)
    assert math.isclose(captured_energy(q, cp), (eigvals[:r].sum() / eigvals.sum()).item(), rel_tol=1e-10)
    for trial in range(10):  # ...the most any r-dimensional subspace can capture
        assert captured_energy(random_orthonormal(16, r, trial), cp) <= captured_energy(q, cp) + 1e-12


def test_beta1_subspace_captures_nothing_of_a_low_rank_cov_minus():
    d, r = 12, 4
    cm = random_cov(d, rank=d - r, seed=9)  # null space of dimension exactly r: a unique optimum
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonUniqueSubspaceWarning)
        q = sc_subspace(random_cov(d, seed=10), cm, 1.0, r)
    assert abs(captured_energy(q, cm)) < 1e-12
    assert captured_energy(random_orthonormal(d, r, 0), cm) > 0.05


def test_captured_energy_rejects_a_basis_of_the_wrong_space():
    with pytest.raises(ValueError, match="q must be d_out x r with d_out=7"):
        captured_energy(random_orthonormal(6, 2, 0), random_cov(3), weight=torch.randn(7, 3, dtype=torch.float64))


# --- top-r eigensolvers (solver="lobpcg" / "mixed" / "auto") against the float64 eigh reference -------------

FAST_SOLVERS = ("lobpcg", "mixed")


def eigh_reference(delta, r):
    eigvals, eigvecs = torch.linalg.eigh(delta)
    return eigvals.flip(0)[:r].sum(), eigvecs.flip(1)[:, :r]


def projector_distance(q, q_ref):
    return torch.linalg.norm(projector(q) - projector(q_ref)).item()


@pytest.mark.parametrize("solver", FAST_SOLVERS)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("beta", [0.3, 0.7])
def test_fast_solvers_match_the_float64_eigh_subspace_and_reward(solver, seed, beta):
    d, r = 64, 4
    cp, cm = random_cov(d, seed=seed), random_cov(d, seed=40 + seed)
    delta = delta_covariance(cp, cm, beta)
    eigvals = torch.linalg.eigvalsh(delta).flip(0)
    assert eigvals[r - 1] - eigvals[r] > 1e-3 * (eigvals[0] - eigvals[-1])  # a clear eigengap after the r-th
    reward_ref, q_ref = eigh_reference(delta, r)
    info = {}
    _, vecs = top_eigenpairs(Operator(delta), r, solver, info)
    assert info["solver"] == solver and not info["fallback"] and info["iterations"] > 0  # it ran, eigh did not
    q = sc_subspace(cp, cm, beta, r, solver=solver)
    assert torch.allclose(q.T @ q, torch.eye(r, dtype=q.dtype), atol=1e-12)
    assert projector_distance(q, q_ref) < 1e-6
    assert projector_distance(vecs[:, :r], q_ref) < 1e-6
    assert abs((reward(q, cp, cm, beta) - reward_ref) / reward_ref) < 1e-9
    # Same columns as eigh, signs included (distinct eigenvalues): the adapter does not depend on the solver.
    assert torch.allclose(q, sc_subspace(cp, cm, beta, r), atol=1e-6)


@pytest.mark.parametrize("solver", FAST_SOLVERS + ("auto",))
@pytest.mark.parametrize("d_out,d_in", [(96, 48), (40, 64), (128, 128)])
def test_fast_solvers_through_the_weight_match_eigh(solver, d_out, d_in):
    # (96, 48): d_out > d_in, the thin-QR reduction; (40, 64), (128, 128): W0 dCov_in W0^T, which mixed applies
    # through its factors at 128 (cheaper than forming it for a few products).
    r, beta = 4, 0.5
    g = torch.Generator().manual_seed(d_out)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    cp, cm = random_cov(d_in, seed=1), random_cov(d_in, seed=2)
    q_ref = sc_subspace(cp, cm, beta, r, weight=w)
    q = sc_subspace(cp, cm, beta, r, weight=w, solver=solver)
    assert projector_distance(q, q_ref) < 1e-6
    out_p, out_m = w @ cp @ w.T, w @ cm @ w.T
    r_ref = reward(q_ref, out_p, out_m, beta)
    assert abs((reward(q, out_p, out_m, beta) - r_ref) / r_ref) < 1e-9


def test_operator_applies_w_dcov_wt_through_its_factors_when_cheaper():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 128, generator=g, dtype=torch.float64)
    delta = delta_covariance(random_cov(128, seed=1), random_cov(128, seed=2), 0.5)
    op = Operator(delta, w)
    implicit, explicit = op.applier(columns=12, products=4), op.applier(columns=12, products=1000)
    assert getattr(implicit, "__self__", None) is None and isinstance(explicit.__self__, torch.Tensor)
    x = torch.randn(128, 12, generator=g, dtype=torch.float64)
    assert torch.allclose(implicit(x), op.dense() @ x, rtol=1e-12, atol=1e-10)
    assert torch.allclose(explicit(x), op.dense() @ x, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("solver", FAST_SOLVERS)
def test_fast_solvers_in_float32_are_as_close_as_float32_eigh(solver):
    d, r = 96, 4
    cp, cm = random_cov(d, seed=3), random_cov(d, seed=4)
    _, q_ref = eigh_reference(delta_covariance(cp, cm, 0.5), r)
    q32 = sc_subspace(cp, cm, 0.5, r, dtype=torch.float32)
    q = sc_subspace(cp, cm, 0.5, r, dtype=torch.float32, solver=solver)
    assert q.dtype == torch.float32
    assert projector_distance(q.double(), q_ref) < max(1e-4, 10 * projector_distance(q32.double(), q_ref))


@pytest.mark.parametrize("solver", FAST_SOLVERS)
def test_fast_solvers_hand_a_tie_to_eigh_and_its_warning(solver):
    d, r = 64, 3
    cm = torch.diag(torch.tensor([5.0] * 32 + [1.0] * 32, dtype=torch.float64))  # -Cov-: 32-fold tie at the top
    info = {}
    top_eigenpairs(Operator(delta_covariance(random_cov(d, seed=4), cm, 1.0)), r, solver, info)
    assert info["fallback"] and info["solver"] == "eigh"
    with pytest.warns(NonUniqueSubspaceWarning, match="beta slightly below 1"):
        q = sc_subspace(random_cov(d, seed=4), cm, 1.0, r, solver=solver)
    with pytest.warns(NonUniqueSubspaceWarning):
        assert torch.equal(q, sc_subspace(random_cov(d, seed=4), cm, 1.0, r))


def test_auto_picks_the_solver_measured_fastest():
    # benchmarks/eigensolver.py: LOBPCG at large d and small r, mixed precision at SmolLM2's 576 with r=16 in
    # float64, eigh for large r, small d and float32 below that.
    assert auto_solver(4096, 16, torch.float64) == "lobpcg"
    assert auto_solver(1536, 16, torch.float32) == "lobpcg"
    assert auto_solver(576, 16, torch.float64) == "mixed"
    assert auto_solver(576, 16, torch.float32) == "eigh"
    assert auto_solver(576, 128, torch.float64) == "eigh"
    assert auto_solver(192, 16, torch.float64) == "eigh"


def test_solvers_fall_back_to_eigh_where_they_do_not_apply():
    cp, cm = random_cov(12, seed=1), random_cov(12, seed=2)
    info = {}
    top_eigenpairs(Operator(delta_covariance(cp, cm, 0.5)), 3, "lobpcg", info)  # 3 (r + guard) > d
    assert info["solver"] == "eigh" and not info["fallback"]
    for solver in SOLVERS:
        assert torch.allclose(projector(sc_subspace(cp, cm, 0.5, 3, solver=solver)),
                              projector(sc_subspace(cp, cm, 0.5, 3)), atol=1e-10)


def test_bad_solver_is_rejected_naming_the_options():
    cp, cm = random_cov(8, seed=1), random_cov(8, seed=2)
    with pytest.raises(ValueError, match=r"solver must be one of \('eigh', 'lobpcg', 'mixed', 'auto'\)"):
        sc_subspace(cp, cm, 0.5, 2, solver="svd")
    with pytest.raises(ValueError, match=r"eigen_solver must be one of \('eigh', 'lobpcg', 'mixed', 'auto'\)"):
        SCLoRAConfig(eigen_solver="svd")


@pytest.mark.parametrize("solver", SOLVERS)
def test_config_round_trip_keeps_the_solver(tmp_path, solver):
    config = SCLoRAConfig(r=8, beta=0.6, eigen_solver=solver)
    config.save_pretrained(tmp_path)
    loaded = SCLoRAConfig.from_pretrained(tmp_path)
    assert loaded == config and loaded.eigen_solver == solver
    assert SCLoRAConfig().eigen_solver == "eigh"  # the default is unchanged


@pytest.mark.parametrize("solver", FAST_SOLVERS)
def test_sc_lora_model_with_a_fast_solver_builds_the_eigh_adapters(solver):
    adapters = {}
    for name in ("eigh", solver):
        model = tiny_llama(seed=3, dtype=torch.float64, hidden_size=64, intermediate_size=160)
        stats = [collect_covariances(model, random_batches(n_batches=2, seed=s), dtype=torch.float64,
                                     show_progress=False) for s in (21, 22)]
        peft_model = get_sclora_model(model, SCLoRAConfig(r=4, beta=0.5, eigen_solver=name), *stats,
                                      show_progress=False)
        adapters[name] = {n: m.lora_B["default"].weight.detach() for n, m in peft_model.named_modules()
                          if hasattr(m, "lora_B") and "default" in m.lora_B}
    assert adapters["eigh"].keys() == adapters[solver].keys() and len(adapters["eigh"]) == 14
    for name, b in adapters["eigh"].items():
        assert projector_distance(adapters[solver][name], b) < 1e-6, name
