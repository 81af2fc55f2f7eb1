"""Safe LoRA against its authors' rule, rewritten here in float64: C = V V^T / ||V||_F (not a projector), the cosine
of vec(C B A) and vec(B A), B <- C B where it is at most the threshold (or among the num_proj_layers lowest)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from sclora import init_model
from sclora.methods.safe_lora import apply_safe_lora, safe_lora_matrix, safe_lora_project


def authors_rule(adapters, aligned, unaligned, threshold):
    """The rule as the authors' code writes it (flattened cosine_similarity), in float64."""
    out, cosines = {}, {}
    for name, (a, b) in adapters.items():
        v = aligned[name].double() - unaligned[name].double()
        c = torch.mm(v, v.t()) / torch.norm(v)
        w = torch.mm(c, b.double())
        cos = torch.nn.functional.cosine_similarity(torch.mm(w, a.double()).reshape(1, -1),
                                                    torch.mm(b.double(), a.double()).reshape(1, -1)).item()
        cosines[name] = cos
        out[name] = w if cos <= threshold else b.double()
    return out, cosines


def random_layers(seed: int, n: int = 6, d_out: int = 12, d_in: int = 9, r: int = 3):
    g = torch.Generator().manual_seed(seed)
    names = [f"layer{i}" for i in range(n)]
    adapters = {k: (torch.randn(r, d_in, generator=g, dtype=torch.float64),
                    torch.randn(d_out, r, generator=g, dtype=torch.float64)) for k in names}
    unaligned = {k: torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for k in names}
    # an aligned model a low-rank step away in some layers and a full one in others: cosines spread out
    aligned = {k: unaligned[k] + (torch.randn(d_out, 2, generator=g, dtype=torch.float64)
                                  @ torch.randn(2, d_in, generator=g, dtype=torch.float64) if i % 2 else
                                  torch.randn(d_out, d_in, generator=g, dtype=torch.float64))
               for i, k in enumerate(names)}
    return adapters, aligned, unaligned


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), threshold=st.floats(-1, 1))
def test_threshold_mode_is_the_authors_rule(seed, threshold):
    adapters, aligned, unaligned = random_layers(seed)
    matrices = {k: safe_lora_matrix(aligned[k], unaligned[k]) for k in adapters}
    got = safe_lora_project(adapters, matrices, threshold=threshold)
    want, cosines = authors_rule(adapters, aligned, unaligned, threshold)
    assert got.cosines == pytest.approx(cosines, abs=1e-12)
    assert set(got.projected) == {k for k, c in cosines.items() if c <= threshold}
    for k in adapters:
        assert torch.allclose(got.lora_b[k], want[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 3, 10])
def test_number_mode_projects_the_layers_with_the_lowest_cosines(n):
    adapters, aligned, unaligned = random_layers(7, n=8)
    matrices = {k: safe_lora_matrix(aligned[k], unaligned[k]) for k in adapters}
    got = safe_lora_project(adapters, matrices, num_proj_layers=n)
    lowest = sorted(got.cosines, key=got.cosines.get)[:n]
    assert sorted(got.projected) == sorted(lowest) and got.threshold == got.cosines[lowest[-1]]


def test_c_is_the_authors_unnormalized_matrix_not_a_projector():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(10, 6, generator=g, dtype=torch.float64)
    v = torch.randn(10, 6, generator=g, dtype=torch.float64)
    c = safe_lora_matrix(w0 + v, w0)
    assert torch.allclose(c, v @ v.T / torch.linalg.matrix_norm(v), rtol=1e-13)
    assert torch.allclose(c, c.T) and not torch.allclose(c @ c, c, atol=1e-3)  # symmetric, not idempotent
    with pytest.raises(ValueError, match="weights are equal"):
        safe_lora_matrix(w0, w0.clone())
    with pytest.raises(ValueError, match="differ in shape"):
        safe_lora_matrix(w0, w0[:5])


def test_apply_projects_the_trained_lora_in_place_and_refuses_a_residual_init():
    unaligned, aligned = tiny_llama(seed=1), tiny_llama(seed=2)
    model = init_model(copy.deepcopy(unaligned), method="lora", r=2, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():  # a "trained" adapter: non-zero B
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    result = apply_safe_lora(model, aligned, unaligned, num_proj_layers=2)
    assert len(result.projected) == 2 and len(result.cosines) == 4
    modules = dict(aligned.named_modules())
    for name, p in model.named_parameters():
        if "lora_B" not in name:
            continue
        layer = name.split("base_model.model.", 1)[1].split(".lora_B", 1)[0]
        if layer in result.projected:
            c = safe_lora_matrix(modules[layer].weight, dict(unaligned.named_modules())[layer].weight)
            assert torch.allclose(p.double(), c @ before[name].double(), atol=1e-6)
        else:
            assert torch.equal(p, before[name])
    residual = init_model(copy.deepcopy(unaligned), method="pissa", r=2, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="residual init"):
        apply_safe_lora(residual, aligned, unaligned)
