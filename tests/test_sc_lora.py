"""The SC-LoRA PEFT model: Theorem 2 on real layers, exact logits at init, Appendix B, bad input."""

import warnings

import pytest
import torch
from peft import PeftModel

import sclora
from sclora import NonUniqueSubspaceWarning, SCLoRAConfig, collect_covariances, get_sclora_model
from sclora.subspace import delta_covariance
from conftest import VOCAB, random_batches, tiny_llama


def stats_pair(model, **kwargs):
    kwargs.setdefault("show_progress", False)
    plus = collect_covariances(model, random_batches(n_batches=3, seed=11), **kwargs)
    minus = collect_covariances(model, random_batches(n_batches=3, seed=12), **kwargs)
    return plus, minus


def adapter_output(layer, x):
    return layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]


@pytest.mark.parametrize(
    "alpha,rslora", [(None, False), (16, False), (3, False), (8, True)], ids=["alpha=r", "alpha=16", "alpha=3", "rslora"]
)
def test_theorem2_adapter_output_is_projection_onto_optimal_subspace(alpha, rslora):
    model = tiny_llama(seed=5, dtype=torch.float64)
    plus, minus = stats_pair(model, dtype=torch.float64)
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # Independent float64 reference for the optimal subspace: eigh of the full output dCov.
    expected_projector = {}
    for name in plus:
        evecs = torch.linalg.eigh(delta_covariance(plus[name], minus[name], 0.7)).eigenvectors.flip(1)[:, :4]
        expected_projector[name] = evecs @ evecs.T
    config = SCLoRAConfig(r=4, beta=0.7, lora_alpha=alpha, use_rslora=rslora)
    peft_model = get_sclora_model(model, config, plus, minus, show_progress=False)
    for name, projector in expected_projector.items():
        layer = peft_model.base_model.model.get_submodule(name)
        q = layer.lora_B["default"].weight.double()
        torch.testing.assert_close(q.T @ q, torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)
        torch.testing.assert_close(q @ q.T, projector, atol=1e-8, rtol=0)
        xin = torch.randn(5, w0[name].shape[1], dtype=torch.float64)
        torch.testing.assert_close(adapter_output(layer, xin), xin @ w0[name].T @ projector, atol=1e-10, rtol=0)
        w_res = layer.get_base_layer().weight
        torch.testing.assert_close(w_res + layer.scaling["default"] * layer.lora_B["default"].weight
                                   @ layer.lora_A["default"].weight, w0[name], atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10), (torch.bfloat16, 0.05)])
def test_logits_at_init_equal_the_base_model(dtype, tol):
    # Tolerances: float64 exact to rounding; float32 relative ~1e-5 of logits ~O(10); bfloat16 keeps 8 bits
    # of mantissa, so W_res + BA differs from W0 by rounding of ~0.4% per weight (measured: 2% of the max logit).
    model = tiny_llama(seed=6, dtype=dtype)
    ids = torch.randint(1, VOCAB, (3, 11))
    with torch.no_grad():
        ref = model(ids).logits.double()
    plus, minus = stats_pair(model)
    peft_model = get_sclora_model(model, SCLoRAConfig(r=6, beta=0.5, lora_alpha=12), plus, minus, show_progress=False)
    assert isinstance(peft_model, PeftModel)
    with torch.no_grad():
        got = peft_model(ids).logits.double()
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= tol * max(scale, 1.0)


def test_only_adapters_are_trainable_and_shapes_match_vanilla_lora():
    model = tiny_llama(seed=7)
    plus, minus = stats_pair(model)
    peft_model = get_sclora_model(model, SCLoRAConfig(r=4), plus, minus, show_progress=False)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B for 7 projections in 2 layers
    vanilla = sclora.init_model(tiny_llama(seed=7), method="lora", r=4)
    assert {n: p.shape for n, p in peft_model.named_parameters() if p.requires_grad} == {
        n: p.shape for n, p in vanilla.named_parameters() if p.requires_grad
    }


def test_beta_sweep_from_saved_stats_without_running_the_model(tmp_path):
    model = tiny_llama(seed=8)
    plus, minus = stats_pair(model)
    plus.save(tmp_path / "p.safetensors")
    minus.save(tmp_path / "m.safetensors")
    bs = []
    for beta in (0.0, 0.5, 1.0):
        fresh = tiny_llama(seed=8)
        calls = []
        fresh.register_forward_hook(lambda *a: calls.append(1))
        p = sclora.CovarianceStats.load(tmp_path / "p.safetensors")
        m = sclora.CovarianceStats.load(tmp_path / "m.safetensors")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonUniqueSubspaceWarning)
            pm = get_sclora_model(fresh, SCLoRAConfig(r=3, beta=beta), p, m, show_progress=False)
        assert not calls
        bs.append(pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.clone())
    assert not torch.allclose(bs[0], bs[2])


def test_appendix_b_warning_for_beta1_with_few_negative_tokens():
    model = tiny_llama(seed=9)
    plus = collect_covariances(model, random_batches(n_batches=3, seed=1), show_progress=False)
    minus = collect_covariances(model, random_batches(n_batches=1, batch_size=1, seq_len=4, seed=2),
                                show_progress=False)
    with pytest.warns(NonUniqueSubspaceWarning, match=r"Appendix B.*min\(4, 32\).*beta slightly below 1"):
        get_sclora_model(model, SCLoRAConfig(r=4, beta=1.0), plus, minus, show_progress=False)


# --- bad input ------------------------------------------------------------------------------------


def test_rank_above_module_size_is_rejected():
    model = tiny_llama()
    plus, minus = stats_pair(model)
    with pytest.raises(ValueError, match=r"r=17 exceeds min\(d_in, d_out\)=16 of module .*k_proj"):
        get_sclora_model(model, SCLoRAConfig(r=17), plus, minus)


def test_beta_outside_unit_interval_is_rejected_by_the_config():
    with pytest.raises(ValueError, match="beta must be a number in \\[0, 1\\]"):
        SCLoRAConfig(beta=1.2)


def test_stats_missing_a_target_module_are_rejected():
    model = tiny_llama()
    plus = collect_covariances(model, random_batches(1), target_modules=["q_proj"], show_progress=False)
    minus = collect_covariances(model, random_batches(1), target_modules=["q_proj"], show_progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="do not cover 12 target module.*k_proj"):
        get_sclora_model(model, SCLoRAConfig(r=2), plus, minus, show_progress=False)
    # Refused before anything was touched: no adapter, same weights.
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_stats_from_another_model_are_rejected():
    plus, minus = stats_pair(tiny_llama(seed=0))
    with pytest.raises(ValueError, match="differ from those the statistics were collected on"):
        get_sclora_model(tiny_llama(seed=1), SCLoRAConfig(r=2), plus, minus)


def test_initializing_twice_is_caught():
    model = tiny_llama()
    plus, minus = stats_pair(model)
    get_sclora_model(model, SCLoRAConfig(r=2), plus, minus, show_progress=False)
    with pytest.raises(ValueError, match="already initialized|changed since"):
        plus["model.layers.0.mlp.up_proj"]  # the bound weight is now W_res, not W0


def test_unknown_target_module_is_rejected():
    model = tiny_llama()
    plus, minus = stats_pair(model)
    with pytest.raises(ValueError, match="'proj_q' not found"):
        get_sclora_model(model, SCLoRAConfig(r=2, target_modules=["proj_q"]), plus, minus)


def test_mixed_normalizations_are_rejected():
    model = tiny_llama()
    plus = collect_covariances(model, random_batches(1), normalize="trace", show_progress=False)
    minus = collect_covariances(model, random_batches(1), show_progress=False)
    with pytest.raises(ValueError, match="normalize"):
        get_sclora_model(model, SCLoRAConfig(r=2), plus, minus)


def test_beta1_on_widening_layers_warns_even_with_plenty_of_tokens():
    # gate/up map 32 -> 80 dims: rank(Cov-) <= 32, so 80 - 32 = 48 > r null directions whatever the data.
    model = tiny_llama(seed=10)
    plus = collect_covariances(model, random_batches(n_batches=6, seed=1), show_progress=False)
    minus = collect_covariances(model, random_batches(n_batches=6, seed=2), show_progress=False)
    assert minus.n_tokens > 80
    with pytest.warns(NonUniqueSubspaceWarning, match=r"gate_proj.*min\(\d+, 32\) < d_out - r = 80 - 4"):
        peft_model = get_sclora_model(model, SCLoRAConfig(r=4, beta=1.0), plus, minus, show_progress=False)
    # The optimum there lies outside range(W0): the adapter starts with zero output (A = Q^T W0 = 0).
    layer = peft_model.base_model.model.model.layers[0].mlp.gate_proj
    assert layer.lora_A["default"].weight.abs().max() < 1e-6
    # Below 1 the tie persists while fewer than r directions carry more weighted D+ than D- energy (here
    # D+ and D- are the same random-token distribution, so at 0.99 none do), and is gone at 0.5.
    with pytest.warns(NonUniqueSubspaceWarning, match="outside the range of W0"):
        get_sclora_model(tiny_llama(seed=10), SCLoRAConfig(r=4, beta=0.99), plus, minus, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonUniqueSubspaceWarning)
        get_sclora_model(tiny_llama(seed=10), SCLoRAConfig(r=4, beta=0.5), plus, minus, show_progress=False)
