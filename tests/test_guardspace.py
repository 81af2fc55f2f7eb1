"""GuardSpace (arXiv 2510.14301): the authors' formulas in float64 from raw activation matrices, its defining
property (the adapter's update vanishes on the harmful activations, before and after training), init = base, and
exact export."""

import pytest
import torch
from conftest import random_batches, tiny_llama, tiny_tokenizer
from peft import PeftModel

import sclora
from sclora.methods.guardspace import guardspace_factors, null_space_bases, null_space_basis
from sclora.methods.residual import adapter_layers
from sclora.train import TrainConfig, train

TARGETS = ["q_proj", "v_proj", "down_proj", "up_proj"]
IDS = torch.tensor([[3, 14, 15, 16, 17, 40, 41]])
EXAMPLES = [{"prompt": "what is the capital of france", "response": "paris"},
            {"prompt": "how make bread", "response": "sorry cannot help"}] * 4


def _decomposition_batches():
    return random_batches(seed=2)


def _null_batches():
    """Fewer tokens (<= 16) than any target's input width (32 / 80), so every layer has a null space."""
    return random_batches(n_batches=1, batch_size=2, seq_len=8, seed=5)


def _stats():
    base = tiny_llama(seed=9)
    kw = {"normalize": "abs_of_max", "side": "input", "dtype": torch.float64, "show_progress": False}
    return (sclora.collect_covariances(base, _decomposition_batches(), TARGETS, **kw),
            sclora.collect_covariances(base, _null_batches(), TARGETS, **kw))


def _guardspace(stats, null_stats, **overrides):
    config = sclora.SCLoRAConfig(**{"method": "guardspace", "r": 2, "target_modules": TARGETS, **overrides})
    return sclora.init_model(tiny_llama(seed=9), config, minus=[stats, null_stats], show_progress=False)


def _inputs(model, batches, name):
    """The layer's input tokens, one (tokens x d_in) float64 matrix per sample (padding left out)."""
    rows = []
    hook = model.get_submodule(name).register_forward_hook(lambda m, a, out: rows.append(a[0].detach().double()))
    samples = []
    with torch.no_grad():
        for b in batches:
            model(**b)
            x = rows.pop()
            samples += [x[i][b["attention_mask"][i].bool()] for i in range(x.shape[0])]
    hook.remove()
    return samples


def _authors_covariance(samples):
    """act_aware_utils.calib_cov_distribution: each sample X / |max X|, sum of X^T X, divided by the sample count."""
    return sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in samples) / len(samples)


def _authors_layer(w, cov, cov_null, r):
    """decomposition_Null.decompose_to_adapter_Null (cov_aware, sigma_fuse="UV", first_eigen=False) in float64:
    (ALinear, BLinear, P, weight_residual)."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    damp = 0.01
    while True:
        fix = cov + eye * torch.mean(torch.diag(cov)) * damp
        cov_inv = torch.linalg.inv(fix)
        if torch.dist(fix @ cov_inv, eye) < 0.05:
            break
        damp *= 2
    u, s, v = torch.linalg.svd(w @ fix, full_matrices=False)
    v = (v @ cov_inv).T
    u, s, v = u[:, -r:], s[-r:], v[:, -r:]
    c = 0.5 * (cov_null + cov_null.T)
    eigvals, ux = torch.linalg.eigh(c)
    th = max(1e-8, 1e-6 * float(eigvals.abs().max().item()))
    ux_hat = ux[:, eigvals <= th]
    if ux_hat.numel() == 0:
        p = torch.zeros_like(c)
    else:
        q = torch.linalg.qr(ux_hat)[0]
        p = q @ q.T
    w_res = w - u @ torch.diag(s) @ v.T @ p
    return u * s.sqrt(), v.T * s.sqrt()[:, None], p, w_res


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"])
def test_factors_are_the_authors_formulas_in_float64(name):
    base = tiny_llama(seed=9)
    stats, null_stats = _stats()
    cov = _authors_covariance(_inputs(base, _decomposition_batches(), name))
    cov_null = _authors_covariance(_inputs(base, _null_batches(), name))
    assert torch.allclose(stats.input_covariance(name), cov, rtol=1e-10, atol=1e-12)
    assert torch.allclose(null_stats.input_covariance(name), cov_null, rtol=1e-10, atol=1e-12)
    w = base.get_submodule(name).weight.detach().double()
    b_ref, a_ref, p, w_res_ref = _authors_layer(w, cov, cov_null, 2)
    assert 0 < torch.trace(p).round() < w.shape[1]  # a proper null space: the test sees P act
    q = null_space_basis(cov_null)
    assert torch.allclose(q @ q.T, p, atol=1e-10)
    for scaling in (1.0, 4.0):
        a, b, w_res = guardspace_factors(w, cov, q, 2, scaling)
        assert torch.allclose(scaling * b @ a, b_ref @ a_ref @ p, atol=1e-9)  # the adapter's effective update
        assert torch.allclose(w_res, w_res_ref, atol=1e-9)
        assert torch.allclose(w_res + scaling * b @ a, w, atol=1e-9)  # the layer is W at init
        assert torch.allclose(a @ p, a, atol=1e-10)  # A is stored as the effective A0 P


def test_no_null_space_gives_a_dead_adapter_as_the_authors():
    cov = torch.eye(6, dtype=torch.float64)
    q = null_space_basis(cov)
    assert q.shape == (6, 0)
    w = torch.randn(4, 6, dtype=torch.float64)
    a, _, w_res = guardspace_factors(w, cov, q, 2, 1.0)
    assert a.abs().max() == 0 and torch.equal(w_res, w)


def test_init_is_the_base_model_and_only_adapters_train():
    stats, null_stats = _stats()
    model = _guardspace(stats, null_stats)
    with torch.no_grad():
        assert (model(IDS).logits - tiny_llama(seed=9)(IDS).logits).abs().max() < 1e-5
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert set(null_space_bases(model)) == set(adapter_layers(model))
    # one D- for both covariances: the same init as passing it twice
    one = sclora.init_model(tiny_llama(seed=9), method="guardspace", r=2, target_modules=TARGETS, minus=null_stats,
                            show_progress=False)
    two = _guardspace(null_stats, null_stats)
    for (n1, p1), (n2, p2) in zip(one.named_parameters(), two.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_update_vanishes_on_harmful_activations_after_training_while_a_plain_lora_moves_them(tmp_path):
    """The defining property: (W_res + s B A P - W0) x_h = 0 for the harmful inputs x_h after optimizer steps, while
    the model's outputs change. The same training of vanilla LoRA does change them (the check can fail)."""
    stats, null_stats = _stats()
    model = _guardspace(stats, null_stats)
    base = tiny_llama(seed=9)
    harmful = {name: torch.cat(_inputs(base, _null_batches(), name)).float() for name in adapter_layers(model)}
    originals = {n: base.get_submodule(n).weight.detach().clone() for n in harmful}
    with torch.no_grad():
        before = model(IDS).logits
    cfg = TrainConfig(learning_rate=5e-2, batch_size=4, micro_batch_size=4, max_steps=3, max_length=32)
    train(model, tiny_tokenizer(), EXAMPLES, cfg, tmp_path / "guardspace", show_progress=False)
    model.eval()
    with torch.no_grad():
        assert (model(IDS).logits - before).abs().max() > 1e-3
        for name, layer in adapter_layers(model).items():
            s = layer.scaling["default"]
            w_eff = layer.get_base_layer().weight + s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            x = harmful[name]
            drift = ((w_eff - originals[name]) @ x.T).abs().max().item()
            assert drift < 1e-5 * (originals[name] @ x.T).abs().max().item(), (name, drift)

    lora = sclora.init_model(tiny_llama(seed=9), method="lora", r=2, target_modules=TARGETS)
    train(lora, tiny_tokenizer(), EXAMPLES, cfg, tmp_path / "lora", show_progress=False)
    moved = []
    with torch.no_grad():
        for name, layer in adapter_layers(lora).items():
            delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            moved.append(((delta @ harmful[name].T).abs().max() / (originals[name] @ harmful[name].T).abs().max()).item())
    assert max(moved) > 1e-3


def test_export_is_a_plain_lora_adapter_that_reproduces_the_trained_model(tmp_path):
    stats, null_stats = _stats()
    model = _guardspace(stats, null_stats)
    cfg = TrainConfig(learning_rate=5e-2, batch_size=4, micro_batch_size=4, max_steps=2, max_length=32)
    train(model, tiny_tokenizer(), EXAMPLES, cfg, tmp_path / "ckpt", show_progress=False)
    model.eval()
    sclora.export_lora(model, tmp_path / "adapter")
    with torch.no_grad():
        trained = model(IDS).logits
        plain = PeftModel.from_pretrained(tiny_llama(seed=9), tmp_path / "adapter")(IDS).logits
        merged = model.merge_and_unload()(IDS).logits
    assert (plain - trained).abs().max() < 1e-4
    assert (merged - trained).abs().max() < 1e-4


def test_more_than_two_harmful_sets_are_refused():
    stats, null_stats = _stats()
    with pytest.raises(ValueError, match="one harmful set or two"):
        sclora.init_model(tiny_llama(seed=9), method="guardspace", r=2, target_modules=TARGETS, beta=[0.3, 0.3, 0.3],
                          minus=[stats, null_stats, stats], show_progress=False)
