"""SaLoRA (Li et al., ICLR 2025): the authors' formulas in float64, its defining property (the adapter never
changes a layer's output along the top safety features, before or after training), init = base, exact export,
exact resume, and the trace-normalization invariance."""

import pytest
import torch
from conftest import random_batches, tiny_llama, tiny_tokenizer
from peft import PeftModel
from test_train import Crash

import sclora
from sclora.methods.residual import adapter_layers
from sclora.methods.salora import safety_directions, salora_factors, top_directions
from sclora.train import TrainConfig, train

TARGETS = ["q_proj", "v_proj", "down_proj", "up_proj"]
IDS = torch.tensor([[3, 14, 15, 16, 17, 40, 41]])
EXAMPLES = [{"prompt": "what is the capital of france", "response": "paris"},
            {"prompt": "how make bread", "response": "sorry cannot help"}] * 4


def _stats(seed_plus=1, seed_minus=2, normalize="none", model_seed=9):
    base = tiny_llama(seed=model_seed)
    plus = sclora.collect_covariances(base, random_batches(seed=seed_plus), TARGETS, normalize, show_progress=False)
    minus = sclora.collect_covariances(base, random_batches(seed=seed_minus), TARGETS, normalize, show_progress=False)
    return plus, minus


def _salora(plus, minus, **overrides):
    config = sclora.SCLoRAConfig(**{"method": "salora", "r": 2, "target_modules": TARGETS, "salora_safety_rank": 3,
                                    "salora_task_rank": 4, **overrides})
    return sclora.init_model(tiny_llama(seed=9), config, plus=plus, minus=minus, show_progress=False)


def _features(model, batches, name):
    """The layer's output features h = W x on every real token (rows), as the authors' code records them."""
    rows = []
    layer = model.get_submodule(name)
    hook = layer.register_forward_hook(lambda m, a, out: rows.append(out.detach().double()))
    masks = []
    with torch.no_grad():
        for b in batches:
            model(**b)
            masks.append(b["attention_mask"].bool())
    hook.remove()
    return torch.cat([h[m] for h, m in zip(rows, masks)])


def _projector_distance(p, q):
    return torch.linalg.matrix_norm(p @ p.T - q @ q.T, ord=2).item()


def test_factors_are_the_authors_formulas_in_float64():
    """Against the authors' recipe written out with explicit matrices: safety directions = top right singular
    vectors of the safety output features (the score matrix X W^T), C = I - V V^T, B0 = V_t V_t^T U_r S_r^1/2,
    A0 = S_r^1/2 V_r^T, W_res = W - C B0 A0."""
    torch.manual_seed(0)
    base = tiny_llama(seed=9)
    name = "model.layers.0.mlp.down_proj"
    safety_batches, task_batches = random_batches(seed=2), random_batches(seed=1)
    minus = sclora.collect_covariances(base, safety_batches, TARGETS, show_progress=False)
    plus = sclora.collect_covariances(base, task_batches, TARGETS, show_progress=False)
    w = base.get_submodule(name).weight.detach().double()
    # the reference: SVDs of the feature matrices themselves
    vs = torch.linalg.svd(_features(base, safety_batches, name), full_matrices=False)[2][:3].T
    vt = torch.linalg.svd(_features(base, task_batches, name), full_matrices=False)[2][:4].T
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    c = torch.eye(w.shape[0], dtype=w.dtype) - vs @ vs.T
    b0 = vt @ vt.T @ u[:, :2] @ torch.diag(s[:2].sqrt())
    a0 = torch.diag(s[:2].sqrt()) @ vh[:2]
    # ours, from the collected statistics (down_proj's are stored on the output side)
    cov_s, _ = minus.factor(name)
    cov_t, _ = plus.factor(name)
    us, ut = top_directions(cov_s, 3), top_directions(cov_t, 4)
    assert _projector_distance(us, vs) < 1e-6 and _projector_distance(ut, vt) < 1e-6
    a, b, w_res = salora_factors(w, vs, vt, 2, 1.0)
    assert torch.allclose(b, c @ b0, atol=1e-10) and torch.allclose(a, a0, atol=1e-10)
    assert torch.allclose(w_res, w - c @ b0 @ a0, atol=1e-10)
    # with scaling s the product s B A is the same update
    a2, b2, w_res2 = salora_factors(w, vs, vt, 2, 4.0)
    assert torch.allclose(4.0 * b2 @ a2, c @ b0 @ a0, atol=1e-10) and torch.allclose(w_res2, w_res, atol=1e-10)


def test_init_is_the_base_model_and_only_adapters_train():
    plus, minus = _stats()
    model = _salora(plus, minus)
    with torch.no_grad():
        ref = tiny_llama(seed=9)(IDS).logits
        assert (model(IDS).logits - ref).abs().max() < 1e-5
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert set(safety_directions(model)) == set(adapter_layers(model))


def test_safety_features_are_unchanged_after_training_while_a_plain_lora_moves_them(tmp_path):
    """The defining property: U_s^T (W_res + s B A) = U_s^T W0 for every layer after optimizer steps, while the
    model's outputs change. The same training of vanilla LoRA does move those features (the check can fail)."""
    plus, minus = _stats()
    model = _salora(plus, minus)
    originals = {n: m.weight.detach().clone() for n, m in tiny_llama(seed=9).named_modules()
                 if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        before = model(IDS).logits
    cfg = TrainConfig(learning_rate=5e-2, batch_size=4, micro_batch_size=4, max_steps=3, max_length=32)
    train(model, tiny_tokenizer(), EXAMPLES, cfg, tmp_path / "salora", show_progress=False)
    model.eval()
    with torch.no_grad():
        assert (model(IDS).logits - before).abs().max() > 1e-3
    directions = safety_directions(model)
    for name, layer in adapter_layers(model).items():
        s = layer.scaling["default"]
        w_eff = layer.get_base_layer().weight + s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        u = directions[name]
        drift = (u.T @ (w_eff - originals[name])).abs().max().item()
        assert drift < 1e-5 * originals[name].abs().max().item(), (name, drift)

    lora = sclora.init_model(tiny_llama(seed=9), method="lora", r=2, target_modules=TARGETS)
    train(lora, tiny_tokenizer(), EXAMPLES, cfg, tmp_path / "lora", show_progress=False)
    moved = []
    for name, layer in adapter_layers(lora).items():
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        moved.append((directions[name].T @ delta).abs().max().item())
    assert max(moved) > 1e-3


def test_export_is_a_plain_lora_adapter_that_reproduces_the_trained_model(tmp_path):
    plus, minus = _stats()
    model = _salora(plus, minus)
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


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    """The parametrized lora_B goes through Trainer checkpoints and back: a resumed run ends where a straight one does."""
    plus, minus = _stats()
    cfg = TrainConfig(learning_rate=1e-2, batch_size=4, micro_batch_size=4, max_steps=4, save_steps=2, max_length=32)
    straight = _salora(plus, minus)
    train(straight, tiny_tokenizer(), EXAMPLES, cfg, tmp_path / "a", show_progress=False)
    interrupted = _salora(plus, minus)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, tiny_tokenizer(), EXAMPLES, cfg, tmp_path / "b", show_progress=False, callbacks=[Crash(2)])
    resumed = _salora(plus, minus)
    result = train(resumed, tiny_tokenizer(), EXAMPLES, cfg, tmp_path / "b", show_progress=False)
    assert result.resumed_from == 2 and result.steps == 4
    a, b = straight.state_dict(), resumed.state_dict()
    assert set(a) == set(b)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_trace_normalization_gives_the_same_adapter_and_input_side_statistics_the_same_directions():
    plus, minus = _stats()
    plus_t, minus_t = _stats(normalize="trace")
    a, b = _salora(plus, minus), _salora(plus_t, minus_t)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)
    base = tiny_llama(seed=9)
    minus_in = sclora.collect_covariances(base, random_batches(seed=2), TARGETS, side="input", show_progress=False)
    name = "model.layers.1.mlp.up_proj"  # d_out > d_in: the exact reduction through W0
    cov_out, w_out = minus.bind(base).factor(name)
    cov_in, w = minus_in.factor(name)
    assert _projector_distance(top_directions(cov_out, 3, weight=w_out), top_directions(cov_in, 3, weight=w)) < 1e-6


@pytest.mark.parametrize("field", ["salora_safety_rank", "salora_task_rank"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True, "32"])
def test_bad_ranks_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        sclora.SCLoRAConfig(method="salora", **{field: value})


def test_salora_needs_both_sets_and_one_knowledge_set():
    plus, minus = _stats()
    with pytest.raises(ValueError, match="needs minus"):
        sclora.init_model(tiny_llama(seed=9), method="salora", r=2, target_modules=TARGETS, plus=plus)
    with pytest.raises(ValueError, match="salora preserves one knowledge set but 2 were given"):
        sclora.init_model(tiny_llama(seed=9), method="salora", r=2, target_modules=TARGETS, plus=plus,
                          minus=[minus, minus])


def test_too_few_directions_in_the_data_get_a_salora_warning_not_sc_loras():
    base = tiny_llama(seed=9)
    few = random_batches(n_batches=1, batch_size=1, seq_len=4, seed=5)  # at most 4 tokens: rank <= 4 < 20
    minus = sclora.collect_covariances(base, few, TARGETS, show_progress=False)
    plus, _ = _stats()
    with pytest.warns(sclora.NonUniqueSubspaceWarning, match="salora_safety_rank=20") as caught:
        _salora(plus, minus, salora_safety_rank=20)
    assert not any("beta" in str(w.message) for w in caught)
