"""choose_beta: the smallest β whose initial subspace keeps at most a budget of D-'s output energy, checked
against the adapter it gives (diagnostics measure the real B), minimal within its tolerance, monotone."""

from __future__ import annotations

from itertools import pairwise

import pytest
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
    choice = model.sclora_beta_choice
    assert choice.minus_energy <= 0.2 and minus_share(plus, minus, choice.beta) <= 0.2 + 1e-9
