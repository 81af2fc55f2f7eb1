"""sclora.statistics: covariances against a brute-force float64 reference, one sample at a time."""

import pytest
import torch
from conftest import VOCAB, random_batches, tiny_llama

import sclora
from sclora import statistics
from sclora.statistics import CovarianceStats, add_gram_upper, collect_covariances, staircase_size, unpack_gram


def reference_covariances(model, batches, normalize="none", side="output"):
    """(1/B) sum_samples sum_tokens h h^T, feeding each sample alone and unpadded, hooking every linear."""
    sums, handles, n = {}, [], 0
    head = model.get_output_embeddings()

    def hook(name):
        def fn(module, args, output):
            h = (args[0] if side == "input" else output)[0].double()
            if normalize == "max_abs":
                h = h / h.abs().max()
            sums[name] = sums.get(name, 0) + h.T @ h

        return fn

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m is not head:
            handles.append(m.register_forward_hook(hook(name)))
    with torch.no_grad():
        for batch in batches:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                model(input_ids=ids[mask.bool()][None])
                n += 1
    for h in handles:
        h.remove()
    covs = {k: v / n for k, v in sums.items()}
    if normalize == "trace":
        covs = {k: v / v.trace() for k, v in covs.items()}
    return covs


@pytest.fixture(scope="module")
def model64():
    return tiny_llama(seed=3, dtype=torch.float64)


@pytest.mark.parametrize("normalize", ["none", "max_abs", "trace"])
@pytest.mark.parametrize("pad_left", [False, True])
def test_batched_padded_output_covariances_equal_one_unpadded_sample_at_a_time(model64, normalize, pad_left):
    batches = random_batches(n_batches=3, batch_size=4, seq_len=10, pad_left=pad_left)
    stats = collect_covariances(model64, batches, normalize=normalize, dtype=torch.float64, show_progress=False)
    ref = reference_covariances(model64, batches, normalize)
    assert set(stats) == set(ref)
    for name, cov in ref.items():
        assert stats[name].shape == cov.shape
        torch.testing.assert_close(stats[name], cov, rtol=1e-9, atol=1e-12, msg=name)
    assert stats.n_samples == 12
    assert stats.n_tokens == sum(int(b["attention_mask"].sum()) for b in batches)


@pytest.mark.parametrize("normalize", ["none", "max_abs"])
def test_input_side_covariances_for_corda(model64, normalize):
    batches = random_batches(n_batches=2, batch_size=3, seq_len=9)
    stats = collect_covariances(model64, batches, normalize=normalize, side="input", dtype=torch.float64,
                                show_progress=False)
    ref = reference_covariances(model64, batches, normalize, side="input")
    for name, cov in ref.items():
        torch.testing.assert_close(stats.input_covariance(name), cov, rtol=1e-9, atol=1e-12, msg=name)


def test_siblings_share_one_input_statistic_and_small_side_is_stored(model64):
    stats = collect_covariances(model64, random_batches(n_batches=1), dtype=torch.float64, show_progress=False)
    layer = "model.layers.0"
    info = {p: stats.modules[f"{layer}.{p}"] for p in
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    # gate/up (80 x 32): one 32 x 32 input statistic instead of two 80 x 80 output ones.
    assert info["mlp.gate_proj"].side == info["mlp.up_proj"].side == "input"
    assert info["mlp.gate_proj"].key == info["mlp.up_proj"].key
    assert stats.matrix(info["mlp.gate_proj"].key).shape == (32, 32)
    # q/k/v (32x32, 16x32, 16x32): one 32^2 input statistic beats 32^2 + 2 * 16^2 output ones.
    assert len({info[f"self_attn.{p}_proj"].key for p in "qkv"}) == 1
    assert info["self_attn.k_proj"].side == "input"
    # o (32 x 32) and down (32 x 80) read inputs of their own and keep the output side (no larger).
    assert info["self_attn.o_proj"].side == info["mlp.down_proj"].side == "output"
    assert len(stats.sums) == 4 * 2 < len(stats) == 7 * 2
    # max_abs on outputs: each module scales by its own output, so nothing is shared.
    stats = collect_covariances(model64, random_batches(n_batches=1), normalize="max_abs", show_progress=False)
    assert len(stats.sums) == len(stats)
    assert stats.modules[f"{layer}.mlp.up_proj"].side == "input"


def test_q_k_v_share_when_collecting_inputs(model64):
    stats = collect_covariances(model64, random_batches(n_batches=1), side="input", show_progress=False)
    keys = {stats.modules[f"model.layers.1.self_attn.{p}_proj"].key for p in "qkv"}
    assert len(keys) == 1
    assert len(stats.sums) == 4 * 2  # qkv, o, gate+up, down per layer


def test_accumulates_in_float32_for_a_bfloat16_model():
    model = tiny_llama(seed=4, dtype=torch.bfloat16)
    batches = random_batches(n_batches=2)
    stats = collect_covariances(model, batches, show_progress=False)
    assert all(s.dtype == torch.float32 for s in stats.sums.values())
    ref = reference_covariances(model, batches)
    for name, cov in ref.items():  # the bf16 forward is the same; only the accumulation differs
        torch.testing.assert_close(stats[name].double(), cov, rtol=2e-2, atol=1e-3 * cov.abs().max().item())


def test_save_and_load_round_trip(tmp_path, model64):
    stats = collect_covariances(model64, random_batches(n_batches=1), normalize="trace", show_progress=False)
    path = tmp_path / "plus.safetensors"
    stats.save(path)
    loaded = CovarianceStats.load(path, model=model64)
    assert (loaded.n_samples, loaded.n_tokens, loaded.normalize) == (stats.n_samples, stats.n_tokens, "trace")
    for name in stats:
        torch.testing.assert_close(loaded[name], stats[name], rtol=0, atol=0)
    unbound = CovarianceStats.load(path)
    with pytest.raises(ValueError, match="bind"):
        unbound["model.layers.0.mlp.up_proj"]
    torch.testing.assert_close(unbound["model.layers.0.mlp.down_proj"], stats["model.layers.0.mlp.down_proj"])


def test_load_rejects_a_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not sclora statistics"):
        CovarianceStats.load(tmp_path / "other.safetensors")


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, model, monkeypatch):
    stats = collect_covariances(model, random_batches(1), ["q_proj"], show_progress=False)
    path = tmp_path / "plus.safetensors"
    stats.save(path)
    good = path.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(statistics.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        stats.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and path.read_bytes() == good


# --- damaged statistics files are named, with the fix, before anything uses them ------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A good statistics file with input-side (gate/up, q/k/v) and output-side (o/down) matrices."""
    model = tiny_llama(seed=5)
    path = tmp_path_factory.mktemp("stats") / "good.safetensors"
    collect_covariances(model, random_batches(1), show_progress=False).save(path)
    return model, path


def rewrite(path, out, edit):
    """Copy the statistics file ``path`` to ``out`` with ``edit(tensors, header)`` applied."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["sclora"])  # noqa: SIM118
    edit(tensors, header)
    save_file(tensors, str(out), metadata={"sclora": json.dumps(header)})
    return out


UP = "model.layers.0.mlp.up_proj"
DOWN = "model.layers.0.mlp.down_proj"


def _set(tensors, key, index, value):
    tensors[key].view(-1)[index] = value  # a packed staircase: the flat index of a stored entry


DAMAGE = {
    "nan": (lambda t, h: _set(t, h["modules"][DOWN]["key"], 34, float("nan")), "NaN / inf"),
    "inf": (lambda t, h: _set(t, h["modules"][UP]["key"], 0, float("inf")), "NaN / inf"),
    "zero samples": (lambda t, h: h.update(n_samples=0), "n_samples is 0, not a positive integer"),
    "negative tokens": (lambda t, h: h.update(n_tokens=-4), "n_tokens is -4"),
    "fractional samples": (lambda t, h: h.update(n_samples=2.5), "n_samples is 2.5"),
    "boolean samples": (lambda t, h: h.update(n_samples=True), "n_samples is True"),
    "missing tensor": (lambda t, h: t.pop(h["modules"][DOWN]["key"]), f"tensor .* of module '{DOWN}' is missing"),
    "wrong input shape": (lambda t, h: t.update({h["modules"][UP]["key"]: torch.eye(80)}),  # gate/up share one
                          r"input-side tensor .* of module '.*gate_proj' has shape \(80, 80\), expected \(1024,\)"),
    "wrong output shape": (lambda t, h: t.update({h["modules"][DOWN]["key"]: torch.eye(80)}),
                           rf"output-side tensor .* of module '{DOWN}' has shape \(80, 80\), expected \(1024,\)"),
    "bad strip width": (lambda t, h: h["strips"].update({h["modules"][UP]["key"]: 0}), "strip widths .* are not positive"),
    "strip width of another layout": (lambda t, h: h["strips"].update({h["modules"][UP]["key"]: 8}),
                                      r"has shape \(1024,\), expected \(640,\)"),
    "missing field": (lambda t, h: h.pop("n_tokens"), r"lacks the field\(s\) \['n_tokens'\]"),
    "bad side": (lambda t, h: h.update(side="both"), "side is 'both'"),
    "bad normalize": (lambda t, h: h.update(normalize="l2"), "normalize is 'l2'"),
    "output module in input stats": (lambda t, h: h.update(side="input"),
                                     "module '.*o_proj' has side 'output' in statistics collected with side='input'"),
    "bad module entry": (lambda t, h: h["modules"][UP].pop("d_in"), f"module '{UP}' has the entry"),
    "no fingerprint": (lambda t, h: h.update(fingerprint=None), "no model fingerprint"),
}


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_load_names_the_file_and_the_problem_of_damaged_statistics(tmp_path, saved, damage, lazy):
    edit, problem = DAMAGE[damage]
    path = rewrite(saved[1], tmp_path / "damaged.safetensors", edit)
    with pytest.raises(ValueError, match=f"damaged.safetensors: .*{problem}.*delete it and collect"):
        CovarianceStats.load(path, model=saved[0], lazy=lazy)


@pytest.mark.parametrize("lazy", [False, True])
def test_format_1_files_with_full_matrices_still_load(tmp_path, saved, lazy):
    model, path = saved
    packed = CovarianceStats.load(path, model=model)

    def to_format_1(tensors, header):
        for key, strip in header.pop("strips").items():
            tensors[key] = unpack_gram(tensors[key], packed.dims[key], strip)
        header["format"] = 1

    old = CovarianceStats.load(rewrite(path, tmp_path / "v1.safetensors", to_format_1), model=model, lazy=lazy)
    assert not old.strips and all(old.sums[k].ndim == 2 for k in old.sums)
    for name in packed:
        assert torch.equal(old[name], packed[name]), name


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("keep", [0, 7, 0.5, -1])  # bytes kept: none, part of the header length, half, all but one
def test_load_names_a_truncated_file(tmp_path, saved, keep, lazy):
    data = saved[1].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ValueError, match="cut.safetensors cannot be read.*truncated or corrupt.*Delete it"):
        CovarianceStats.load(path, lazy=lazy)


def test_offloaded_and_lazily_loaded_statistics_read_the_same_matrices_and_build_the_same_adapter(tmp_path):
    from sclora.statistics import FileSums

    model = tiny_llama(seed=7)
    plus, minus = (collect_covariances(model, random_batches(2, seed=s), show_progress=False) for s in (1, 2))
    expected = {name: plus.factor(name) for name in plus}
    keys = set(plus.sums)
    assert plus.offload(tmp_path / "plus.safetensors") is plus and isinstance(plus.sums, FileSums)
    assert set(plus.sums) == keys and len(plus.sums) == len(keys)
    for name, (cov, weight) in expected.items():
        got = plus.factor(name)
        assert torch.equal(got[0], cov) and (weight is None) == (got[1] is None)
    lazy = CovarianceStats.load(tmp_path / "plus.safetensors", model=model, lazy=True)
    assert isinstance(lazy.sums, FileSums) and all(torch.equal(lazy[n], plus[n]) for n in plus)
    # the file replaced afterwards (as an atomic rewrite does): what was offloaded still reads the original
    minus.save(tmp_path / "plus.safetensors")
    assert all(torch.equal(plus.factor(n)[0], cov) for n, (cov, _) in expected.items())
    # the same adapter as from the statistics in memory
    config = sclora.SCLoRAConfig(r=4, beta=0.5)
    in_memory = collect_covariances(model, random_batches(2, seed=1), show_progress=False)
    a = sclora.get_sclora_model(tiny_llama(seed=7), config, in_memory, minus, show_progress=False)
    b = sclora.get_sclora_model(tiny_llama(seed=7), config, plus, minus.offload(tmp_path / "minus.safetensors"),
                                show_progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_names_a_file_with_a_corrupt_header(tmp_path, saved):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2, 2)}, tmp_path / "bad.safetensors", metadata={"sclora": '{"format": 1, "n_'})
    with pytest.raises(ValueError, match="bad.safetensors has a corrupt statistics header.*Delete it"):
        CovarianceStats.load(tmp_path / "bad.safetensors")


def test_a_nonfinite_weight_is_named_instead_of_giving_a_nan_covariance():
    model = tiny_llama(seed=6)
    stats = collect_covariances(model, random_batches(1), ["up_proj", "down_proj"], show_progress=False)
    assert stats.modules[UP].side == "input"  # Cov_out = W Cov_in W^T needs the weight
    weight = model.get_submodule(UP).weight
    bad = weight.detach().clone()
    bad[1, 1] = float("nan")  # not one of the fingerprint's sampled weights
    with pytest.raises(ValueError, match=f"weight of module '{UP}' holds NaN or inf"):
        stats.factor(UP, weight=bad)
    with torch.no_grad():
        weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match=f"weight of module '{UP}' holds NaN or inf"):
        stats[UP]
    assert torch.isfinite(stats[DOWN]).all()  # output-side statistics need no weight


# --- bad input gets a clear error ----------------------------------------------------------------


def test_empty_data_is_rejected(model):
    with pytest.raises(ValueError, match="empty"):
        collect_covariances(model, [], show_progress=False)


def test_all_padding_is_rejected(model):
    batch = random_batches(n_batches=1)[0]
    batch["attention_mask"] = torch.zeros_like(batch["attention_mask"])
    with pytest.raises(ValueError, match="padding"):
        collect_covariances(model, [batch], show_progress=False)


def test_unknown_target_module_is_rejected(model):
    with pytest.raises(ValueError, match="'qkv_proj' not found.*q_proj"):
        collect_covariances(model, random_batches(1), target_modules=["qkv_proj"], show_progress=False)


def test_batches_must_be_dicts(model):
    with pytest.raises(ValueError, match="input_ids"):
        collect_covariances(model, [torch.zeros(2, 3, dtype=torch.long)], show_progress=False)


@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("check_every", [1, 1000])  # 1000: only the final check sees it
def test_nonfinite_activations_are_reported_with_the_module(model, monkeypatch, check_every, side):
    monkeypatch.setattr(statistics, "FINITE_CHECK_EVERY", check_every)
    with torch.no_grad():  # input side: the inf reaches layer 1's MLP input (as NaN after its norm)
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf activations.*layers.1"):
        collect_covariances(model, random_batches(3), side=side, show_progress=False)


def test_stats_from_another_model_are_rejected(tmp_path):
    stats = collect_covariances(tiny_llama(seed=0), random_batches(1), show_progress=False)
    with pytest.raises(ValueError, match="differ from those the statistics were collected on"):
        stats.bind(tiny_llama(seed=1))  # same architecture, other weights
    with pytest.raises(ValueError, match="weight shape"):
        stats.bind(tiny_llama(seed=0, intermediate_size=96))
    with pytest.raises(ValueError, match="different configuration"):
        stats.bind(tiny_llama(seed=0, rms_norm_eps=1e-3))
    stats.bind(tiny_llama(seed=0, dtype=torch.bfloat16))  # a dtype cast of the same model is the same model


def test_target_modules_select_a_subset(model):
    stats = sclora.collect_covariances(model, random_batches(1), target_modules=["v_proj"], show_progress=False)
    assert sorted(stats) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


def test_none_and_trace_statistics_convert_without_a_new_pass(model):
    batches = random_batches()
    raw = collect_covariances(model, batches, ["q_proj", "down_proj"], "none")
    trace = collect_covariances(model, batches, ["q_proj", "down_proj"], "trace")
    converted = raw.with_normalize("trace")
    for name in raw:
        torch.testing.assert_close(converted[name], trace[name])
        assert torch.allclose(converted[name].trace(), torch.tensor(1.0, dtype=converted[name].dtype))
        torch.testing.assert_close(converted.with_normalize("none")[name], raw[name])
    scaled = collect_covariances(model, batches, ["q_proj"], "max_abs")
    with pytest.raises(ValueError, match="max_abs"):
        scaled.with_normalize("trace")


def test_bfloat16_autocast_forward_keeps_float32_sums_and_the_subspace():
    from sclora.subspace import reward, sc_subspace

    model = tiny_llama(seed=4)
    batches = random_batches(n_batches=2)
    exact = collect_covariances(model, batches, show_progress=False)
    half = collect_covariances(model, batches, show_progress=False, autocast=torch.bfloat16)
    assert all(s.dtype == torch.float32 for s in half.sums.values())
    assert half.n_tokens == exact.n_tokens
    worst_cov = worst_reward = 0.0
    for name in exact:
        a, b = exact[name].double(), half[name].double()
        worst_cov = max(worst_cov, (torch.linalg.norm(a - b) / torch.linalg.norm(a)).item())
        q_exact, q_half = sc_subspace(a, a.diag().diag(), 0.3, 4), sc_subspace(b, b.diag().diag(), 0.3, 4)
        best = reward(q_exact, a, a.diag().diag(), 0.3)
        worst_reward = max(worst_reward, ((best - reward(q_half, a, a.diag().diag(), 0.3)) / best.abs()).item())
    assert 0 < worst_cov < 3e-2  # bf16 really ran (not identical), and stays close
    assert worst_reward < 1e-2  # the subspace it picks is within 1% of the optimum on the exact statistics
    with pytest.raises(ValueError, match="autocast must be"):
        collect_covariances(model, batches, show_progress=False, autocast=torch.float64)


@pytest.mark.parametrize("d,strip", [(5, 1), (64, 7), (193, 192), (400, 192), (100, 1000), (576, 96)])
def test_upper_strip_gram_equals_the_full_product(d, strip):
    torch.manual_seed(d)
    packed = torch.zeros(staircase_size(d, strip), dtype=torch.float64)
    batches = [torch.randn(n, d, dtype=torch.float64) for n in (3, 17, 40)]
    for x in batches:
        add_gram_upper(packed, x, strip)
    full = unpack_gram(packed, d, strip)
    ref = sum(x.T @ x for x in batches)
    torch.testing.assert_close(full, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(full, full.T)
    # the staircase holds the upper triangle and the strips' diagonal blocks, nothing below them
    k = -(-d // strip)
    assert d * (d + 1) // 2 <= packed.numel() <= d * d
    if d % strip == 0:
        assert packed.numel() == d * d * (k + 1) // (2 * k)


def test_covariances_are_exact_when_the_gram_is_split_into_many_strips(model64, monkeypatch):
    monkeypatch.setattr(statistics, "GRAM_STRIP", 24)  # the tiny model's 64- and 128-wide statistics span 3-6 strips
    batches = random_batches(n_batches=2, batch_size=3, seq_len=9, pad_left=True)
    stats = collect_covariances(model64, batches, dtype=torch.float64, show_progress=False)
    ref = reference_covariances(model64, batches)
    for name, cov in ref.items():
        torch.testing.assert_close(stats[name], cov, rtol=1e-9, atol=1e-12, msg=name)
    assert stats.strips and all(w == 24 for w in stats.strips.values())
    for leader in stats.sums:
        total = stats.matrix(leader)
        assert stats.sums[leader].numel() < total.numel() and torch.equal(total, total.T), leader


@pytest.mark.parametrize("normalize", ["none", "max_abs"])
def test_unpadded_batches_take_the_no_copy_path_and_stay_exact(model64, normalize):
    g = torch.Generator().manual_seed(5)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}
               for ids in torch.randint(1, VOCAB, (2, 3, 8), generator=g)]
    stats = collect_covariances(model64, batches, normalize=normalize, dtype=torch.float64, show_progress=False)
    for name, cov in reference_covariances(model64, batches, normalize).items():
        torch.testing.assert_close(stats[name], cov, rtol=1e-9, atol=1e-12, msg=name)
    assert stats.n_tokens == 2 * 3 * 8


def test_weight_check_finds_non_finite_entries_and_tolerates_a_sum_that_overflows():
    from sclora.statistics import require_finite_weight

    huge = torch.full((4, 8), 3e38)  # finite entries whose float32 sum overflows to inf
    require_finite_weight("w", huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.randn(4, 8)
        w[2, 5] = bad
        with pytest.raises(ValueError, match="'w' holds NaN or inf"):
            require_finite_weight("w", w)
