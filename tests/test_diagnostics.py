"""sclora.diagnostics: the energy fractions an adapter subspace captures, against float64 references
computed from the untouched model's output covariances."""

import math
import warnings
from itertools import pairwise

import pytest
import torch
from conftest import VOCAB, tiny_llama

import sclora
from sclora import NonUniqueSubspaceWarning, collect_covariances, subspace_energy, summarize_energy
from sclora.subspace import captured_energy

SEED = 20
R = 4


def token_batches(lo, hi, n_batches=3, batch_size=4, seq_len=12, seed=0):
    """Unpadded batches of tokens drawn from [lo, hi): D+ and D- with different output distributions."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(lo, hi, (batch_size, seq_len), generator=g),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)} for _ in range(n_batches)]


def collect(model, lo, hi, seed, **kwargs):
    kwargs = {"show_progress": False, "dtype": torch.float64, **kwargs}
    return collect_covariances(model, token_batches(lo, hi, seed=seed), **kwargs)


def setup(dtype=torch.float64, **kwargs):
    """A tiny model, its D+ / D- statistics, and float64 output covariances taken before any init."""
    model = tiny_llama(seed=SEED, dtype=dtype)
    plus, minus = collect(model, 1, 40, seed=1, **kwargs), collect(model, 50, VOCAB, seed=2, **kwargs)
    covs = {name: (plus[name].double(), minus[name].double()) for name in plus}
    return model, plus, minus, covs


def float32_copy():
    """The float64 model of :func:`setup`, cast to float32 (PEFT's PiSSA refuses float64)."""
    return tiny_llama(seed=SEED, dtype=torch.float64).float()


def sc_lora(model, plus, minus, beta, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonUniqueSubspaceWarning)  # gate/up tie at 0 for large beta: still optimal
        return sclora.init_model(model, method="sc_lora", plus=plus, minus=minus, beta=beta, r=R,
                                 show_progress=False, **overrides)


def orthonormal_b(peft_model, name):
    return peft_model.base_model.model.get_submodule(name).lora_B["default"].weight.detach().double()


def fraction(q, cov):
    return ((q.T @ cov @ q).trace() / cov.trace()).item()


def test_fractions_equal_a_float64_reference_from_the_original_weights():
    model, plus, minus, covs = setup()
    peft_model = sc_lora(model, plus, minus, 0.5, lora_alpha=8)
    rows = subspace_energy(peft_model, plus, minus)
    assert [row["module"] for row in rows] == list(covs)
    for row in rows:
        q = orthonormal_b(peft_model, row["module"])  # SC-LoRA's B is orthonormal
        cov_p, cov_m = covs[row["module"]]
        assert math.isclose(row["plus"], fraction(q, cov_p), rel_tol=1e-10)
        assert math.isclose(row["minus"], fraction(q, cov_m), rel_tol=1e-10)
    first = rows[0]
    assert first == {"module": "model.layers.0.self_attn.q_proj", "layer": 0, "kind": "q_proj",
                     "plus": first["plus"], "minus": first["minus"]}
    assert rows[-1]["layer"] == 1 and rows[-1]["kind"] == "down_proj"


def test_beta0_plus_fraction_is_the_ky_fan_bound_of_each_module():
    model, plus, minus, covs = setup()
    rows = subspace_energy(sc_lora(model, plus, minus, 0.0), plus, minus)
    for row in rows:
        eigvals = torch.linalg.eigvalsh(covs[row["module"]][0]).flip(0)
        assert math.isclose(row["plus"], (eigvals[:R].sum() / eigvals.sum()).item(), rel_tol=1e-9), row["module"]


def test_fractions_fall_weakly_in_every_module_as_beta_rises():
    # For optimal Q_b (maximizing P - b (P + M), P / M the captured D+ / D- energies) and b1 < b2, adding the two
    # optimality inequalities gives (b2 - b1)(T1 - T2) >= 0 with T = P + M, then P1 - P2 >= b1 (T1 - T2) >= 0;
    # the same argument on P - g M, g = b / (1 - b) increasing, gives M1 >= M2. The traces are fixed, so both
    # fractions are non-increasing in beta, module by module, for any optimal Q (ties included).
    results = []
    for beta in (0.0, 0.5, 0.9):
        model, plus, minus, _ = setup()
        results.append(subspace_energy(sc_lora(model, plus, minus, beta), plus, minus))
    for lower, higher in pairwise(results):
        for a, b in zip(lower, higher):
            assert b["plus"] <= a["plus"] + 1e-9, a["module"]
            assert b["minus"] <= a["minus"] + 1e-9, a["module"]
    means = [summarize_energy(rows)["overall"] for rows in results]
    # Strictly, on this data (D+ and D- use disjoint tokens): the observable the diagnostic exists for.
    assert means[0]["plus"] > means[1]["plus"] > means[2]["plus"]
    assert means[0]["minus"] > means[1]["minus"] > means[2]["minus"]


@pytest.mark.parametrize("beta", [0.3, 0.7])
def test_sc_lora_maximizes_the_weighted_energy_against_pissa_and_random_subspaces(beta):
    # In absolute units (fraction * trace), (1 - beta) P - beta M is the reward of Definition 1, maximal for SC-LoRA.
    model, plus, minus, covs = setup()
    sc_rows = subspace_energy(sc_lora(model, plus, minus, beta), plus, minus)
    pissa_model = sclora.init_model(float32_copy(), method="pissa", r=R)  # PEFT's PiSSA needs float32
    pissa_rows = subspace_energy(pissa_model, plus, minus)
    g = torch.Generator().manual_seed(0)
    for sc, pissa in zip(sc_rows, pissa_rows):
        cov_p, cov_m = covs[sc["module"]]
        traces = cov_p.trace().item(), cov_m.trace().item()
        best = weighted_energy(sc, beta, traces)
        assert weighted_energy(pissa, beta, traces) <= best + 1e-6 * abs(best)
        for _ in range(5):
            q = torch.linalg.qr(torch.randn(cov_p.shape[0], R, generator=g, dtype=torch.float64))[0]
            random_row = {"plus": captured_energy(q, cov_p), "minus": captured_energy(q, cov_m)}
            assert weighted_energy(random_row, beta, traces) <= best + 1e-9 * abs(best)


def weighted_energy(row, beta, traces):
    return (1 - beta) * row["plus"] * traces[0] - beta * row["minus"] * traces[1]


def test_input_side_and_output_side_statistics_give_the_same_fractions():
    model, plus, minus, _ = setup()
    plus_in, minus_in = collect(model, 1, 40, seed=1, side="input"), collect(model, 50, VOCAB, seed=2, side="input")
    assert {m.side for m in plus_in.modules.values()} == {"input"}
    peft_model = sc_lora(model, plus, minus, 0.5)
    for a, b in zip(subspace_energy(peft_model, plus, minus), subspace_energy(peft_model, plus_in, minus_in)):
        assert math.isclose(a["plus"], b["plus"], rel_tol=1e-9) and math.isclose(a["minus"], b["minus"], rel_tol=1e-9)


def test_trace_normalized_statistics_give_the_same_fractions():
    model, plus, minus, _ = setup()
    plus_t, minus_t = collect(model, 1, 40, seed=1, normalize="trace"), collect(model, 50, VOCAB, seed=2, normalize="trace")
    peft_model = sc_lora(model, plus, minus, 0.5)
    for a, b in zip(subspace_energy(peft_model, plus, minus), subspace_energy(peft_model, plus_t, minus_t)):
        assert math.isclose(a["plus"], b["plus"], rel_tol=1e-9) and math.isclose(a["minus"], b["minus"], rel_tol=1e-9)


def test_several_knowledge_sets_get_one_fraction_each():
    model, plus, minus, covs = setup()
    other = collect(model, 1, 20, seed=3)
    other_covs = {name: other[name].double() for name in other}
    peft_model = sc_lora(model, plus, [minus, other], [0.3, 0.3])
    rows = subspace_energy(peft_model, plus, [minus, other])
    assert set(rows[0]) == {"module", "layer", "kind", "plus", "minus_0", "minus_1"}
    for row in rows:
        q = orthonormal_b(peft_model, row["module"])
        assert math.isclose(row["minus_0"], fraction(q, covs[row["module"]][1]), rel_tol=1e-10)
        assert math.isclose(row["minus_1"], fraction(q, other_covs[row["module"]]), rel_tol=1e-10)
    assert set(subspace_energy(peft_model, plus)[0]) == {"module", "layer", "kind", "plus"}
    assert set(subspace_energy(peft_model, plus, [minus])[0]) == {"module", "layer", "kind", "plus", "minus"}


def test_pissa_subspace_is_the_column_space_of_b_not_b_itself():
    # PiSSA's B = U_r sqrt(S_r) is not orthonormal; the subspace is the span of the top-r left singular vectors.
    _, plus, minus, covs = setup()
    model = float32_copy()  # PEFT's PiSSA needs float32; the statistics tolerate the cast
    w0 = {name: model.get_submodule(name).weight.detach().double() for name in covs}
    rows = subspace_energy(sclora.init_model(model, method="pissa", r=R), plus, minus)
    for row in rows:
        u = torch.linalg.svd(w0[row["module"]], full_matrices=False)[0][:, :R]
        assert math.isclose(row["plus"], fraction(u, covs[row["module"]][0]), rel_tol=1e-4)
        assert math.isclose(row["minus"], fraction(u, covs[row["module"]][1]), rel_tol=1e-4)


def test_float32_model_rebuilds_w0_within_the_fingerprint_tolerance():
    model, plus, minus, covs = setup(dtype=torch.float32)
    peft_model = sc_lora(model, plus, minus, 0.5)
    for row in subspace_energy(peft_model, plus, minus):
        q = orthonormal_b(peft_model, row["module"])
        q = torch.linalg.qr(q)[0]  # float32 B, re-orthonormalized in float64
        assert math.isclose(row["plus"], fraction(q, covs[row["module"]][0]), rel_tol=1e-4)


# --- bad input ------------------------------------------------------------------------------------------


def test_vanilla_lora_has_no_subspace_at_init():
    model, plus, minus, _ = setup()
    with pytest.raises(ValueError, match="B of .* is zero, so the adapter subspace is undefined at init"):
        subspace_energy(sclora.init_model(model, method="lora", r=R), plus, minus)


def test_statistics_of_another_model_are_rejected():
    _, plus, minus, _ = setup()
    other = tiny_llama(seed=SEED + 1, dtype=torch.float64)
    peft_model = sc_lora(other, collect(other, 1, 40, seed=1), collect(other, 50, VOCAB, seed=2), 0.5)
    with pytest.raises(ValueError, match="differs from the one the statistics were collected on"):
        subspace_energy(peft_model, plus, minus)
    bigger = tiny_llama(seed=SEED, intermediate_size=96)
    with pytest.raises(ValueError, match="different configuration"):
        subspace_energy(sclora.init_model(bigger, method="pissa", r=R), plus, minus)


def test_statistics_missing_an_adapted_module_are_rejected():
    model, plus, minus, _ = setup()
    q_only = collect(model, 1, 40, seed=1, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="do not cover 12 adapted module.*k_proj"):
        subspace_energy(sc_lora(model, plus, minus, 0.5), q_only, minus)


def test_a_plain_model_is_rejected():
    model, plus, minus, _ = setup()
    with pytest.raises(TypeError, match="PEFT model"):
        subspace_energy(model, plus, minus)


# --- summary ----------------------------------------------------------------------------------------------


def test_summary_means_per_kind_and_overall_skip_nan():
    rows = [
        {"module": "model.layers.0.self_attn.q_proj", "layer": 0, "kind": "q_proj", "plus": 0.5, "minus": 0.1},
        {"module": "model.layers.1.self_attn.q_proj", "layer": 1, "kind": "q_proj", "plus": 0.7, "minus": math.nan},
        {"module": "model.layers.0.mlp.down_proj", "layer": 0, "kind": "down_proj", "plus": 0.3, "minus": 0.4},
    ]
    summary = summarize_energy(rows)
    assert summary["by_kind"]["q_proj"] == pytest.approx({"plus": 0.6, "minus": 0.1})
    assert summary["by_kind"]["down_proj"] == pytest.approx({"plus": 0.3, "minus": 0.4})
    assert summary["overall"] == pytest.approx({"plus": 0.5, "minus": 0.25})
    assert summarize_energy([]) == {"overall": {}, "by_kind": {}}
