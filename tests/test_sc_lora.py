"""The SC-LoRA PEFT model: Theorem 2 on real layers, exact logits at init, Appendix B, bad input."""

import warnings

import pytest
import torch
from conftest import VOCAB, random_batches, tiny_llama
from peft import PeftModel

import sclora
from sclora import NonUniqueSubspaceWarning, SCLoRAConfig, collect_covariances, get_sclora_model
from sclora.subspace import delta_covariance


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
    # several knowledge sets whose betas add up to 1: the advice is about their sum
    with pytest.warns(NonUniqueSubspaceWarning, match=r"Appendix B.*betas' sum slightly below 1 \(it is 1: Cov\+ "
                      r"gets weight 1 - sum = 0\)"):
        get_sclora_model(tiny_llama(seed=9), SCLoRAConfig(r=4, beta=[0.5, 0.5]), plus, [minus, minus],
                         show_progress=False)


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


# --- several knowledge sets -------------------------------------------------------------------------------


def token_batches(lo, hi, n_batches=3, batch_size=4, seq_len=12, seed=0):
    """Unpadded batches of tokens drawn from [lo, hi): data sets with different output distributions."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(lo, hi, (batch_size, seq_len), generator=g),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)} for _ in range(n_batches)]


def three_sets(model, normalize="none", **kwargs):
    kwargs = {"show_progress": False, "normalize": normalize, **kwargs}
    return (collect_covariances(model, token_batches(1, VOCAB, seed=1), **kwargs),
            collect_covariances(model, token_batches(1, 30, seed=2), **kwargs),
            collect_covariances(model, token_batches(60, VOCAB, seed=3), **kwargs))


def combined_optimum(plus, minus, betas, r, normalize=lambda cov: cov):
    """Float64 reference per module, from (1 - sum beta_i) Cov+ - sum beta_i Cov-_i built explicitly: the
    projector onto its top-r eigenvectors, the optimal reward (sum of the top-r eigenvalues), and whether
    the optimum is unique (an eigenvalue gap after the r-th; gate/up tie at 0 outside range(W0))."""
    out = {}
    for name in plus:
        delta = (1 - sum(betas)) * normalize(plus[name].double())
        for b, m in zip(betas, minus):
            delta = delta - b * normalize(m[name].double())
        eigvals, eigvecs = torch.linalg.eigh(delta)
        eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
        unique = bool(eigvals[r - 1] - eigvals[r] > 1e-6 * eigvals.abs().max())
        out[name] = (eigvecs[:, :r] @ eigvecs[:, :r].T, eigvals[:r].sum(), delta, unique)
    return out


def test_two_knowledge_sets_end_to_end_theorem2_and_combined_subspace():
    model = tiny_llama(seed=12, dtype=torch.float64)
    plus, minus_a, minus_b = three_sets(model, dtype=torch.float64)
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = combined_optimum(plus, [minus_a, minus_b], [0.4, 0.4], 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonUniqueSubspaceWarning)  # gate/up: fewer than r positive eigenvalues
        peft_model = sclora.init_model(model, method="sc_lora", plus=plus, minus=[minus_a, minus_b], beta=[0.4, 0.4],
                                       r=4, lora_alpha=8, show_progress=False)
    n_unique = 0
    for name, (projector, best, delta, unique) in expected.items():
        layer = peft_model.base_model.model.get_submodule(name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(b.T @ b, torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)
        torch.testing.assert_close((b.T @ delta @ b).trace(), best, atol=1e-9, rtol=1e-10, msg=name)  # Theorem 1
        if unique:
            n_unique += 1
            torch.testing.assert_close(b @ b.T, projector, atol=1e-8, rtol=0, msg=name)
        torch.testing.assert_close(layer.get_base_layer().weight + layer.scaling["default"] * b @ a, w0[name],
                                   atol=1e-12, rtol=0)  # Theorem 2's invariant W_res + s B A = W0
    assert n_unique >= 2 * 5  # all but the widening gate/up projections


def test_trace_normalization_applies_to_each_knowledge_set_before_weighting():
    model = tiny_llama(seed=13, dtype=torch.float64)
    raw = three_sets(model, dtype=torch.float64)
    normalized = three_sets(model, normalize="trace", dtype=torch.float64)
    expected = combined_optimum(raw[0], raw[1:], [0.3, 0.3], 3, normalize=lambda cov: cov / cov.trace())
    unnormalized = combined_optimum(raw[0], raw[1:], [0.3, 0.3], 3)  # what weighting before normalizing gives
    peft_model = get_sclora_model(model, SCLoRAConfig(r=3, beta=[0.3, 0.3], normalize="trace"), normalized[0],
                                  list(normalized[1:]), show_progress=False)
    differs = 0
    for name, (projector, _, _, unique) in expected.items():
        assert unique, name
        b = peft_model.base_model.model.get_submodule(name).lora_B["default"].weight
        torch.testing.assert_close(b @ b.T, projector, atol=1e-8, rtol=0, msg=name)
        differs += bool((unnormalized[name][0] - projector).abs().max() > 1e-3)
    assert differs >= 3  # the test tells the two orders apart


def test_one_set_as_a_list_and_a_zero_weight_set_equal_the_single_set_init():
    model = tiny_llama(seed=14)
    plus, minus_a, minus_b = three_sets(model)

    def b_of(minus, beta):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonUniqueSubspaceWarning)
            pm = get_sclora_model(tiny_llama(seed=14), SCLoRAConfig(r=3, beta=beta), plus, minus, show_progress=False)
        return {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_B" in n}

    single = b_of(minus_a, 0.6)
    for minus, beta in (([minus_a], [0.6]), ([minus_a], 0.6), (minus_a, [0.6]), ([minus_a, minus_b], [0.6, 0.0])):
        got = b_of(minus, beta)
        assert all(torch.equal(got[n], single[n]) for n in single)


def test_init_model_collects_several_knowledge_sets_from_batches():
    model = tiny_llama(seed=15)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    peft_model = sclora.init_model(model, method="sc_lora", r=2, beta=[0.3, 0.3], show_progress=False,
                                   plus=token_batches(1, VOCAB, n_batches=1),
                                   minus=[token_batches(1, 30, n_batches=1), token_batches(60, VOCAB, n_batches=1)])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ref, atol=2e-4, rtol=1e-4)


def test_appendix_b_warning_counts_the_tokens_of_every_weighted_set():
    model = tiny_llama(seed=9)
    plus = collect_covariances(model, random_batches(n_batches=3, seed=1), show_progress=False)
    few = [collect_covariances(model, random_batches(n_batches=1, batch_size=1, seq_len=4, seed=s), show_progress=False)
           for s in (2, 3)]
    tokens = few[0].n_tokens + few[1].n_tokens
    with pytest.warns(NonUniqueSubspaceWarning, match=rf"Appendix B.*min\({tokens}, 32\)"):
        get_sclora_model(model, SCLoRAConfig(r=4, beta=[0.5, 0.5]), plus, few, show_progress=False)
    with pytest.warns(NonUniqueSubspaceWarning, match=rf"Appendix B.*min\({few[1].n_tokens}, 32\)"):
        get_sclora_model(tiny_llama(seed=9), SCLoRAConfig(r=4, beta=[0.0, 1.0]), plus, few, show_progress=False)


def test_config_takes_a_list_of_betas_and_round_trips(tmp_path):
    config = SCLoRAConfig(beta=(0.25, 0.5))
    assert config.beta == [0.25, 0.5]
    config.save_pretrained(tmp_path)
    loaded = SCLoRAConfig.from_pretrained(tmp_path)
    assert loaded == config and loaded.beta == [0.25, 0.5]
    assert SCLoRAConfig.from_dict(SCLoRAConfig(beta=0.3).to_dict()).beta == 0.3


@pytest.mark.parametrize("beta,match", [([0.6, 0.6], r"sum to 1.2 > 1"), ([0.5, -0.1], r"beta\[1\] must be a number >= 0"),
                                        ([], "empty list"), (1.2, r"beta must be a number in \[0, 1\]")])
def test_config_rejects_bad_betas(beta, match):
    with pytest.raises(ValueError, match=match):
        SCLoRAConfig(beta=beta)


def test_number_of_betas_must_match_the_knowledge_sets_before_anything_is_touched():
    model = tiny_llama()
    plus, minus_a, minus_b = three_sets(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"beta=\[0.3, 0.3\] has 2 value\(s\) but 1 knowledge set\(s\)"):
        get_sclora_model(model, SCLoRAConfig(r=2, beta=[0.3, 0.3]), plus, minus_a, show_progress=False)
    with pytest.raises(ValueError, match=r"beta=0.3 has 1 value\(s\) but 2 knowledge set\(s\)"):
        get_sclora_model(model, SCLoRAConfig(r=2, beta=0.3), plus, [minus_a, minus_b], show_progress=False)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"has 1 value\(s\) but 2 knowledge set"):
        sclora.init_model(model, method="sc_lora", r=2, beta=0.3, plus=random_batches(1),
                          minus=[random_batches(1), random_batches(1, seed=2)], show_progress=False)
    assert not calls  # refused before collecting any statistics
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_knowledge_sets_collected_differently_are_rejected():
    model = tiny_llama()
    plus, minus_a, _ = three_sets(model)
    trace = collect_covariances(model, random_batches(1), normalize="trace", show_progress=False)
    with pytest.raises(ValueError, match=r"D-_1 ones 'trace'.*collect all sets the same way"):
        get_sclora_model(model, SCLoRAConfig(r=2, beta=[0.3, 0.3]), plus, [minus_a, trace])
    max_abs = {side: collect_covariances(model, random_batches(1), normalize="max_abs", side=side, show_progress=False)
               for side in ("output", "input")}
    with pytest.raises(ValueError, match=r"side='input'.*max_abs"):
        get_sclora_model(model, SCLoRAConfig(r=2, beta=[0.3, 0.3], normalize="max_abs"), max_abs["output"],
                         [max_abs["output"], max_abs["input"]])
    other = collect_covariances(tiny_llama(seed=1), random_batches(1), show_progress=False)
    with pytest.raises(ValueError, match="differ from those the statistics were collected on"):
        get_sclora_model(model, SCLoRAConfig(r=2, beta=[0.3, 0.3]), plus, [minus_a, other])
    with pytest.raises(TypeError, match="non-empty list"):
        get_sclora_model(model, SCLoRAConfig(r=2, beta=[0.3, 0.3]), plus, [minus_a, "stats"])


def test_corda_kpa_refuses_several_knowledge_sets():
    model = tiny_llama()
    with pytest.raises(ValueError, match="corda_kpa preserves one knowledge set but 2 were given"):
        sclora.init_model(model, method="corda_kpa", r=2, minus=[random_batches(1), random_batches(1, seed=2)])


def test_residual_weights_are_written_in_place_without_a_second_copy():
    model = tiny_llama(seed=2)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    before = {n: (m.weight.data_ptr(), m.weight.detach().clone()) for n, m in linears.items()}
    plus, minus = stats_pair(model)
    peft_model = get_sclora_model(model, SCLoRAConfig(r=4, beta=0.5), plus, minus, show_progress=False)
    inner = peft_model.base_model.model
    for name, (pointer, w0) in before.items():
        layer = inner.get_submodule(name)
        weight = layer.get_base_layer().weight
        assert weight.data_ptr() == pointer, name  # the same storage: no second copy of the weights
        rebuilt = weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(rebuilt, w0, rtol=1e-5, atol=1e-5, msg=name)


def test_a_locked_subspace_stays_put_while_the_model_learns(tmp_path):
    """lock_subspace: after optimizer steps B is unchanged (so is its column space, span(Q)), A moved, the
    outputs changed, only A was trainable, and the export still reproduces the trained model."""
    from conftest import tiny_tokenizer

    from sclora.train import TrainConfig, train

    targets = ["q_proj", "down_proj"]
    base = tiny_llama(seed=9)
    plus = sclora.collect_covariances(base, random_batches(seed=1), targets, show_progress=False)
    minus = sclora.collect_covariances(base, random_batches(seed=2), targets, show_progress=False)
    config = sclora.SCLoRAConfig(r=2, beta=0.6, target_modules=targets, lock_subspace=True)
    model = sclora.get_sclora_model(tiny_llama(seed=9), config, plus, minus, show_progress=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n for n in trainable)
    b0 = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n}
    a0 = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    ids = torch.tensor([[3, 14, 15, 16, 17]])
    with torch.no_grad():
        before = model(ids).logits
    examples = [{"prompt": "what is the capital of france", "response": "paris"}] * 8
    train(model, tiny_tokenizer(), examples, TrainConfig(learning_rate=5e-2, batch_size=4, micro_batch_size=4,
          max_steps=3, max_length=32), tmp_path / "ckpt", show_progress=False)
    for n, p in model.named_parameters():
        if n in b0:
            assert torch.equal(p, b0[n]), n  # B, hence span(B) = span(Q), exactly unchanged
    assert any(not torch.equal(p, a0[n]) for n, p in model.named_parameters() if n in a0)
    model.eval()
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() > 1e-3
    sclora.export_lora(model, tmp_path / "adapter")
    with torch.no_grad():
        plain = PeftModel.from_pretrained(tiny_llama(seed=9), tmp_path / "adapter")(ids).logits
    assert (plain - after).abs().max() < 1e-4
    with pytest.raises(ValueError, match="lock_subspace applies"):
        sclora.SCLoRAConfig(method="lora", lock_subspace=True)
