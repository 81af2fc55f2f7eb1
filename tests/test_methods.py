"""Every init method behind init_model: logits preserved at init, CorDA against PEFT's own math."""

import pytest
import torch
from conftest import VOCAB, random_batches, tiny_llama
from peft import LoraConfig, PeftModel

from sclora import SCLoRAConfig, collect_covariances, init_model
from sclora.methods.corda import corda_factors

IDS = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("method", ["sc_lora", "lora", "pissa", "olora", "eva", "corda_ipa", "corda_kpa", "salora"])
def test_every_adapter_method_keeps_the_model_function_at_init(method):
    model = tiny_llama(seed=2)
    ref = logits(model)
    peft_model = init_model(model, method=method, r=4, lora_alpha=8, plus=random_batches(2, seed=3),
                            minus=random_batches(2, seed=4), show_progress=False)
    assert isinstance(peft_model, PeftModel)
    torch.testing.assert_close(logits(peft_model), ref, atol=2e-4, rtol=1e-4)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_full_finetuning_has_no_adapter_and_everything_trainable():
    model = tiny_llama()
    model.requires_grad_(False)
    out = init_model(model, method="full")
    assert out is model and all(p.requires_grad for p in out.parameters())


@pytest.mark.parametrize("method,needs", [("sc_lora", "plus"), ("corda_ipa", "plus"), ("corda_kpa", "minus"),
                                                ("salora", "plus")])
def test_methods_that_need_data_say_so(method, needs):
    with pytest.raises(ValueError, match=f"needs {needs} data"):
        init_model(tiny_llama(), method=method, r=2, minus=random_batches(1) if needs == "plus" else None)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method must be one of"):
        init_model(tiny_llama(), method="dora")


def test_corda_needs_input_side_statistics():
    model = tiny_llama()
    out_stats = collect_covariances(model, random_batches(1), show_progress=False)
    with pytest.raises(ValueError, match="side='input'"):
        init_model(model, method="corda_ipa", r=2, plus=out_stats, show_progress=False)


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_corda_factors_match_peft_decomposition(mode):
    """Same covariance in, same adapter out as PEFT's collect_eigens_for_layer + corda_init crop."""
    from peft.tuners.lora.corda import collect_eigens_for_layer

    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 20, bias=False)
    x = torch.randn(200, 12) * torch.linspace(0.1, 3, 12)
    cov = x.T @ x / 200
    linear.covariance_matrix = cov.clone()
    eig = collect_eigens_for_layer(linear, LoraConfig(r=4))
    r, scaling = 4, 2.0
    keep = slice(0, r) if mode == "ipa" else slice(12 - r, 12)
    u, s, v = eig.U_WC[:, keep].double(), eig.S_WC[keep].double() / scaling, eig.V_WC[:, keep].double()
    a_ref, b_ref = v.T * s.sqrt()[:, None], u * s.sqrt()
    a, b, w_res = corda_factors(linear.weight.detach(), cov, r, scaling, mode)
    # Singular vectors are defined up to sign: compare the products.
    torch.testing.assert_close(b @ a, b_ref @ a_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w_res + scaling * b @ a, linear.weight.double(), atol=1e-10, rtol=0)


def test_corda_ipa_captures_most_and_kpa_least_of_the_context():
    # IPA keeps the components of W C with the largest singular values, KPA the smallest.
    torch.manual_seed(1)
    w = torch.randn(16, 10, dtype=torch.float64)
    x = torch.randn(300, 10, dtype=torch.float64) * torch.linspace(0.05, 4, 10, dtype=torch.float64)
    cov = x.T @ x / 300
    energy = {}
    for mode in ("ipa", "kpa"):
        a, b, _ = corda_factors(w, cov, 3, 1.0, mode)
        energy[mode] = torch.trace(b @ a @ cov @ (b @ a).T)
    assert energy["ipa"] > 10 * energy["kpa"]


def test_pissa_is_peft_pissa():
    model = tiny_llama(seed=3)
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peft_model = init_model(model, method="pissa", r=3)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    u, s, vh = torch.linalg.svd(w0)
    torch.testing.assert_close(layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight,
                               u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5, rtol=1e-5)


def test_config_round_trip_and_validation(tmp_path):
    config = SCLoRAConfig(method="corda_kpa", r=8, beta=0.9, target_modules=["q_proj"], normalize="max_abs")
    config.save_pretrained(tmp_path)
    assert SCLoRAConfig.from_pretrained(tmp_path) == config
    assert config.resolved_alpha == 8 and config.scaling == 1.0
    assert SCLoRAConfig(r=16, lora_alpha=8, use_rslora=True).scaling == 2.0
    for bad, match in [({"r": 0}, "r must be"), ({"normalize": "l2"}, "normalize"), ({"dtype": "float16"}, "dtype"),
                       ({"eigen_solver": "svd"}, "eigen_solver"), ({"lora_alpha": -1}, "lora_alpha")]:
        with pytest.raises(ValueError, match=match):
            SCLoRAConfig(**bad)
    with pytest.raises(ValueError, match="Unknown SCLoRAConfig field"):
        SCLoRAConfig.from_dict({"rank": 8})


@pytest.mark.parametrize("method,side", [("sc_lora", "output"), ("corda_ipa", "input")])
def test_a_nonfinite_weight_is_named_before_any_layer_is_rewritten(method, side):
    from peft.tuners.lora import LoraLayer

    model = tiny_llama(seed=7)
    stats = collect_covariances(model, random_batches(1), side=side, show_progress=False)
    first = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with torch.no_grad():  # the last target layer; [1, 1] is not one of the fingerprint's sampled weights
        model.model.layers[1].mlp.down_proj.weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match="weight of module 'model.layers.1.mlp.down_proj' holds NaN or inf"):
        init_model(model, method=method, r=2, plus=stats, minus=stats, show_progress=False)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, first)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
