"""choose_beta: the smallest β whose initial subspace keeps at most a budget of D-'s output energy, checked
against the adapter it gives (diagnostics measure the real B), minimal within its tolerance, monotone."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from conftest import random_batches, tiny_llama

import sclora
from sclora.diagnostics import subspace_energy, summarize_energy

TARGETS = ["q_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(seed=8)
    plus = sclora.collect_covariances(model, random_batches(4, seed=1), TARGETS, show_progress=False)
    minus = sclora.collect_covariances(model, random_batches(4, seed=2, seq_len=6), TARGETS, show_progress=False)
    return plus, minus


def minus_share(plus, minus, beta: float) -> float:
    peft_model = sclora.get_sclora_model(tiny_llama(seed=8), sclora.SCLoRAConfig(r=3, beta=beta, target_modules=TARGETS),
                                         plus, minus, show_progress=False)
    return summarize_energy(subspace_energy(peft_model, plus, minus))["overall"]["minus"]


def test_the_chosen_beta_meets_the_budget_and_a_step_less_misses_it(setup):
    plus, minus = setup
    at0, at1 = minus_share(plus, minus, 0.0), minus_share(plus, minus, 0.999)
    assert at1 < at0
    budget = at1 + 0.4 * (at0 - at1)
    choice = sclora.choose_beta(tiny_llama(seed=8), plus, minus, r=3, budget=budget, target_modules=TARGETS,
                                show_progress=False)
    assert 0 < choice.beta < 1 and choice.minus_energy <= budget
    assert minus_share(plus, minus, choice.beta) <= budget + 1e-9  # the adapter it gives keeps no more
    assert minus_share(plus, minus, choice.beta - 1 / 512) > budget  # minimal within the tolerance
    assert len(choice.tried) <= 10
    ordered = sorted(choice.tried)
    assert all(a[1] >= b[1] - 1e-9 for a, b in pairwise(ordered))  # D-'s share never rises with β


def test_loose_and_impossible_budgets(setup):
    plus, minus = setup
    loose = sclora.choose_beta(tiny_llama(seed=8), plus, minus, r=3, budget=1.0, target_modules=TARGETS,
                               show_progress=False)
    assert loose.beta == 0.0 and len(loose.tried) == 1
    with pytest.raises(ValueError, match="even β = 1 keeps"):
        sclora.choose_beta(tiny_llama(seed=8), plus, minus, r=3, budget=0.0, target_modules=TARGETS,
                           show_progress=False)
    with pytest.raises(ValueError, match="budget must be"):
        sclora.choose_beta(tiny_llama(seed=8), plus, minus, r=3, budget=1.5, target_modules=TARGETS)


def test_beta_auto_in_the_config(setup):
    plus, minus = setup
    with pytest.raises(ValueError, match="needs preserve_budget"):
        sclora.SCLoRAConfig(beta="auto")
    with pytest.raises(ValueError, match="applies with beta='auto'"):
        sclora.SCLoRAConfig(beta=0.5, preserve_budget=0.1)
    model = sclora.get_sclora_model(tiny_llama(seed=8), sclora.SCLoRAConfig(r=3, beta="auto", preserve_budget=0.2,
                                                                          target_modules=TARGETS),
                                    plus, minus, show_progress=False)
    choice = sclora.choose_beta(tiny_llama(seed=8), plus, minus, r=3, budget=0.2, target_modules=TARGETS)
    assert choice.minus_energy <= 0.2 and minus_share(plus, minus, choice.beta) <= 0.2 + 1e-9
    assert_same_adapter(model, plus, minus, choice.beta)  # beta="auto" is SC-LoRA at the chosen beta


@pytest.fixture(scope="module")
def two_sets(setup):
    plus, minus = setup
    other = sclora.collect_covariances(tiny_llama(seed=8), random_batches(4, seed=3, seq_len=5), TARGETS,
                                       show_progress=False)
    return plus, [minus, other]


def minus_shares(plus, minus_list, betas) -> list[float]:
    """Each knowledge set's share in the adapter SC-LoRA builds at these betas (measured on its real B)."""
    peft_model = sclora.get_sclora_model(tiny_llama(seed=8), sclora.SCLoRAConfig(r=3, beta=list(betas),
                                                                               target_modules=TARGETS),
                                         plus, minus_list, show_progress=False)
    overall = summarize_energy(subspace_energy(peft_model, plus, minus_list))["overall"]
    return [overall[f"minus_{i}"] for i in range(len(minus_list))]


RTOL = 0.02  # choose_beta's default band: a weighted set keeps between (1 - RTOL) and 1 times its budget


def assert_at_the_budgets(choice, measured, budgets):
    """Every budget met by the adapter built at the choice; every set with a positive weight at its budget within
    the band (protected no more than it asked)."""
    assert all(kept <= b + 1e-9 for kept, b in zip(measured, budgets))
    for beta, kept, b in zip(choice.beta, measured, budgets):
        if beta > 0:
            assert kept >= (1 - RTOL) * b - 1e-9


def test_a_budget_per_knowledge_set_is_met_and_no_set_is_protected_more_than_asked(two_sets):
    plus, minus_list = two_sets
    free = minus_shares(plus, minus_list, [0.0, 0.0])  # at beta = 0 the subspace fits D+ alone
    budgets = [0.6 * free[0], 0.8 * free[1]]
    choice = sclora.choose_beta(tiny_llama(seed=8), plus, minus_list, r=3, budget=budgets, target_modules=TARGETS,
                                show_progress=False)
    assert isinstance(choice.beta, tuple) and len(choice.beta) == 2 and sum(choice.beta) < 1
    assert all(kept <= b for kept, b in zip(choice.minus_energy, budgets))
    assert any(beta > 0 for beta in choice.beta)
    assert_at_the_budgets(choice, minus_shares(plus, minus_list, choice.beta), budgets)
    assert choice.budget == tuple(budgets)


@pytest.fixture(scope="module")
def four_sets(setup):
    """Four knowledge sets drawn alike: each one's weight also lowers the others' shares."""
    plus, _ = setup
    sets = [sclora.collect_covariances(tiny_llama(seed=8), random_batches(3, seed=10 + k, seq_len=6), TARGETS,
                                       show_progress=False) for k in range(4)]
    return plus, sets


def test_four_sets_that_share_directions_are_brought_to_their_budgets(four_sets):
    plus, minus_list = four_sets
    free = minus_shares(plus, minus_list, [0.0] * 4)
    budgets = [f * x for f, x in zip(free, [0.15, 0.3, 0.45, 0.6])]
    choice = sclora.choose_beta(tiny_llama(seed=8), plus, minus_list, r=3, budget=budgets, target_modules=TARGETS,
                                show_progress=False)
    assert_at_the_budgets(choice, minus_shares(plus, minus_list, choice.beta), budgets)
    assert choice.beta[0] > 0 and len(choice.tried) <= 60


def test_one_set_alone_is_the_single_set_search(two_sets, setup):
    # a budget the other set already meets at beta = 0 leaves its weight at 0; the first set's weight then meets
    # its budget within the band, no lower than the one-set bisection's smallest beta
    plus, minus_list = two_sets
    free = minus_shares(plus, minus_list, [0.0, 0.0])
    budget = 0.7 * free[0]
    single = sclora.choose_beta(tiny_llama(seed=8), plus, minus_list[0], r=3, budget=budget,
                                target_modules=TARGETS, show_progress=False)
    both = sclora.choose_beta(tiny_llama(seed=8), plus, minus_list, r=3, budget=[budget, 1.0],
                              target_modules=TARGETS, show_progress=False)
    assert both.beta[1] == 0.0 and (1 - RTOL) * budget <= both.minus_energy[0] <= budget
    assert single.beta <= both.beta[0] + 1 / 512


def test_impossible_joint_budgets_and_a_search_cut_short(two_sets):
    plus, minus_list = two_sets
    kwargs = dict(r=3, target_modules=TARGETS, show_progress=False)
    with pytest.raises(ValueError, match="No weight keeps D-_1's share"):
        sclora.choose_beta(tiny_llama(seed=8), plus, minus_list, budget=[1.0, 0.0], **kwargs)
    free = minus_shares(plus, minus_list, [0.0, 0.0])
    budgets = [0.6 * free[0], 0.8 * free[1]]
    with pytest.raises(ValueError, match="found no weights meeting every budget"):
        sclora.choose_beta(tiny_llama(seed=8), plus, minus_list, budget=budgets, max_evaluations=0, **kwargs)
    with pytest.warns(UserWarning, match="did not bring every weighted set"):
        short = sclora.choose_beta(tiny_llama(seed=8), plus, minus_list, budget=budgets, rtol=1e-12,
                                   max_evaluations=4, **kwargs)
    assert all(kept <= b + 1e-9 for kept, b in zip(minus_shares(plus, minus_list, short.beta), budgets))


def test_budgets_must_match_the_knowledge_sets_and_auto_takes_a_list(two_sets):
    plus, minus_list = two_sets
    with pytest.raises(ValueError, match="one share per set"):
        sclora.choose_beta(tiny_llama(seed=8), plus, minus_list, r=3, budget=0.1, target_modules=TARGETS)
    with pytest.raises(ValueError, match="one share per set"):
        sclora.choose_beta(tiny_llama(seed=8), plus, minus_list[0], r=3, budget=[0.1], target_modules=TARGETS)
    with pytest.raises(ValueError, match="budget must be"):
        sclora.choose_beta(tiny_llama(seed=8), plus, minus_list, r=3, budget=[0.1, -1], target_modules=TARGETS)
    with pytest.raises(ValueError, match="needs preserve_budget"):
        sclora.SCLoRAConfig(beta="auto", preserve_budget=[0.1, "x"])
    free = minus_shares(plus, minus_list, [0.0, 0.0])
    budgets = [0.7 * free[0], 0.7 * free[1]]
    model = sclora.get_sclora_model(tiny_llama(seed=8), sclora.SCLoRAConfig(r=3, beta="auto", preserve_budget=budgets,
                                                                          target_modules=TARGETS),
                                    plus, minus_list, show_progress=False)
    choice = sclora.choose_beta(tiny_llama(seed=8), plus, minus_list, r=3, budget=budgets, target_modules=TARGETS)
    assert_same_adapter(model, plus, minus_list, list(choice.beta))
    assert all(k <= b + 1e-9 for k, b in zip(minus_shares(plus, minus_list, choice.beta), budgets))


def assert_same_adapter(model, plus, minus, beta):
    """``model``'s adapter is SC-LoRA's at ``beta`` (the same B = Q in every layer)."""
    explicit = sclora.get_sclora_model(tiny_llama(seed=8), sclora.SCLoRAConfig(r=3, beta=beta, target_modules=TARGETS),
                                       plus, minus, show_progress=False)
    got = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    want = dict(explicit.named_parameters())
    assert got and all(torch.equal(p, want[n]) for n, p in got.items())


ALL_KINDS = ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # narrowing, square, widening


@pytest.mark.parametrize("side", ["input", "output"])
def test_the_search_shares_are_those_of_the_full_output_covariances(side):
    """The reduced per-module matrices give the shares of sc_subspace + captured_energy on W0 C W0^T formed in
    float64, at betas where every eigenvalue is positive, mixed, and none is (β = 1: the widening layers fill the
    subspace with the directions outside range(W0) before the negative ones)."""
    from sclora.layers import read_weight
    from sclora.methods.sc_lora import _module_covariances, _Reduced
    from sclora.targets import resolve_targets

    model = tiny_llama(seed=8)
    sets = [sclora.collect_covariances(model, random_batches(2, seed=s, seq_len=n), ALL_KINDS, side=side,
                                       show_progress=False).bind(model) for s, n in [(1, 12), (2, 3), (3, 2)]]
    plus, minus = sets[0], sets[1:]
    checked_fill = False
    for name, linear in resolve_targets(model, ALL_KINDS).items():
        w = read_weight(linear).double()
        covs, args = _module_covariances(plus, minus, name, read_weight(linear))
        full = [c.double() if args == {} else w @ c.double() @ w.T for c in covs]
        module = _Reduced.of(covs, args.get("weight"), torch.float64)
        assert module.outside == (max(w.shape[0] - w.shape[1], 0) if args else 0)
        for betas in ([0.0, 0.0], [0.3, 0.2], [0.02, 0.9], [0.5, 0.5]):
            q = sclora.sc_subspace(full[0], full[1:], betas, 5)
            reference = [sclora.captured_energy(q, c) for c in full]
            assert module.shares(betas, 5, "eigh") == pytest.approx(reference, abs=1e-10)
            assert module.shares(betas, 5, "auto") == pytest.approx(reference, abs=1e-8)
            checked_fill |= module.outside > 0 and sum(betas) == 1.0
    assert checked_fill  # gate/up widen their input: collected on the input side even with side="output"


def test_the_cache_bound_changes_nothing_but_memory(two_sets):
    plus, minus_list = two_sets
    kwargs = dict(r=3, budget=[0.3, 0.3], target_modules=TARGETS, show_progress=False)
    cached = sclora.choose_beta(tiny_llama(seed=8), plus, minus_list, **kwargs)
    uncached = sclora.choose_beta(tiny_llama(seed=8), plus, minus_list, cache_bytes=0, **kwargs)
    assert cached == uncached and len(cached.tried) > 3


def test_mean_shares_reorders_to_minus_first_and_skips_modules_without_energy():
    from sclora.methods.sc_lora import mean_shares

    per_module = [[0.5, 0.1, math.nan], [0.7, 0.3, math.nan], [0.9, math.nan, math.nan]]  # (D+, D-_1, D-_2)
    means = mean_shares(iter(per_module))
    assert means[0] == pytest.approx(0.2) and math.isnan(means[1]) and means[2] == pytest.approx(0.7)
