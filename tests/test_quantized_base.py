"""Residual inits on a base the user loaded quantized with bitsandbytes (``from_pretrained(dir,
quantization_config=BitsAndBytesConfig(...))``): statistics from the quantized model's own forward, the decomposition
on the dequantized weights in float64, W_res requantized in the layer's own format, float32 adapters; the model at
init moves from the quantized base by one requantization, of the order of quantizing the base itself."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_batches, tiny_llama

import sclora
from sclora import SCLoRAConfig
from sclora.diagnostics import logit_drift
from sclora.layers import is_quantized, read_weight, write_weight
from sclora.methods.residual import get_pissa_model
from sclora.targets import resolve_targets

bnb = pytest.importorskip("bitsandbytes", reason="quantized bases need bitsandbytes (dev extra)")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

R = 4
#: hidden and intermediate sizes multiples of 64 and 32: bitsandbytes' CPU 4-bit kernel needs them
SIZES = {"hidden_size": 64, "intermediate_size": 128}
LAYOUTS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "nf4-uint8": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_quant_storage": torch.uint8},
    "nf4-bf16-storage": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                         "bnb_4bit_quant_storage": torch.bfloat16},
    "nf4-nested": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}
PLUS, MINUS, PROBE = random_batches(seed=1), random_batches(seed=2), random_batches(n_batches=2, seed=9)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(seed=4, **SIZES)
    with torch.no_grad():  # weights of a trained model's scale, so the quantized model stays close to it
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    return path


def load(folder, layout: str):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**LAYOUTS[layout]),
                                                device_map="cpu").eval()


def run(model, batches=PROBE) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double() for b in batches]


def drift(before, after) -> dict:
    return logit_drift(before, after, [b["attention_mask"] for b in PROBE])


def formats(model) -> dict[str, tuple]:
    """Each quantized layer's class and storage format."""
    out = {}
    for name, m in model.named_modules():
        if is_quantized(m):
            w = m.weight
            state = getattr(w, "quant_state", None)
            out[name.removeprefix("base_model.model.").removesuffix(".base_layer")] = (
                type(m), type(w), getattr(w, "quant_storage", w.dtype), getattr(w, "blocksize", None),
                getattr(w, "compress_statistics", None), None if state is None else state.quant_type)
    return out


def dense_copy(folder, quantized) -> torch.nn.Module:
    """The model in float64 with every quantized layer's weight replaced by its dequantization: the model the
    quantized one stands for."""
    model = AutoModelForCausalLM.from_pretrained(folder).double().eval()
    for name, layer in resolve_targets(quantized, None).items():
        model.get_submodule(name).weight.data = read_weight(layer, torch.float64)
    return model


def init(model, method: str, **kwargs):
    if method == "pissa":  # PEFT refuses PiSSA on bitsandbytes layers; sclora's residual path runs it
        return get_pissa_model(model, SCLoRAConfig(method="pissa", r=R, target_modules=None), show_progress=False)
    config = SCLoRAConfig(method=method, r=R, target_modules=None, beta=0.5, salora_safety_rank=4, salora_task_rank=8)
    return sclora.init_model(model, config, plus=PLUS, minus=MINUS, show_progress=False, **kwargs)


@pytest.mark.parametrize("method", ["sc_lora", "corda_ipa", "corda_kpa", "pissa", "salora"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_init_requantizes_the_residual_in_the_layers_format_and_drifts_like_one_quantization(folder, layout, method):
    base = load(folder, layout)
    reference = run(AutoModelForCausalLM.from_pretrained(folder).eval())  # full precision
    before_formats = formats(base)
    assert len(before_formats) == 14  # every linear layer but the head
    before = run(base)
    model = init(base, method)
    assert formats(model) == before_formats  # same classes, storage dtype, block size, nesting, quant type
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)
    quantization = drift(reference, before)  # what quantizing the base cost
    moved = drift(before, run(model))  # one more quantization: of W_res instead of W0
    assert 0 < moved["kl"] <= 2 * quantization["kl"], (moved, quantization)
    assert moved["max_abs_logit"] <= 2 * quantization["max_abs_logit"], (moved, quantization)


@pytest.mark.parametrize("layout", ["nf4", "fp4", "nf4-bf16-storage", "int8"])
def test_the_decomposition_is_the_float64_one_of_the_dequantized_weights(folder, layout):
    base = load(folder, layout)
    plus = sclora.collect_covariances(base, PLUS, show_progress=False)  # the quantized model's own forward
    minus = sclora.collect_covariances(base, MINUS, show_progress=False)
    dense = dense_copy(folder, base)
    config = SCLoRAConfig(r=R, target_modules=None, beta=0.5)
    want_before = run(dense)
    # the quantization config is part of the config fingerprint; the weights' fingerprints match
    ref = sclora.get_sclora_model(dense, config, plus, minus, check_fingerprint=False, show_progress=False)
    assert (run(ref)[0] - want_before[0]).abs().max() <= 1e-9 * want_before[0].abs().max()  # Theorem 2, float64
    targets = resolve_targets(base, None)
    model = sclora.get_sclora_model(base, config, plus, minus, show_progress=False)
    for name, layer in targets.items():
        got, want = model.base_model.model.get_submodule(name), ref.base_model.model.get_submodule(name)
        for kind in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(got, kind)["default"].weight,
                                       getattr(want, kind)["default"].weight.float(), rtol=1e-6, atol=1e-7)
        # the stored residual is exactly the layer's format applied to the float64 W_res
        w_res = want.get_base_layer().weight.detach()
        probe = copy.deepcopy(layer)
        write_weight(probe, w_res)
        assert torch.equal(read_weight(layer), read_weight(probe)), name
        assert layer is got.get_base_layer()  # the module PEFT wraps is the one rewritten


@pytest.mark.parametrize("layout", ["nf4", "int8"])
def test_rewriting_the_unchanged_weights_moves_nothing(folder, layout):
    """The write adds no error but the rounding of what it writes: W0 read and written back, unchanged."""
    base = load(folder, layout)
    before = run(base)
    for layer in resolve_targets(base, None).values():
        write_weight(layer, read_weight(layer, torch.float64))
    assert drift(before, run(base))["max_abs_logit"] <= 1e-6


def test_the_exported_adapter_on_the_quantized_base_is_the_trained_model_up_to_the_requantization(folder, tmp_path):
    from peft import PeftModel

    model = init(load(folder, "nf4"), "sc_lora")
    initial = {k: v.double() for k, v in model.sclora_initial_adapter.items()}
    with torch.no_grad():  # "training"
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    trained = run(model)
    sclora.export_lora(model, tmp_path / "adapter")
    fresh = load(folder, "nf4")
    for m in fresh.modules():  # bitsandbytes' generic CPU path (float32 matmuls) rather than its bf16 CPU kernel
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    expected = dense_copy(folder, fresh)  # Q(W0), dequantized, + s (B A - B0 A0): what the export must add
    for name in resolve_targets(fresh, None):
        layer = model.base_model.model.get_submodule(name)
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        delta = b @ a - initial[f"{name}.lora_B"] @ initial[f"{name}.lora_A"]
        expected.get_submodule(name).weight.data += layer.scaling["default"] * delta
    base_logits = run(fresh)
    vanilla = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    exported = run(vanilla)
    want = run(expected)
    assert max((e - w).abs().max().item() for e, w in zip(exported, want)) <= 1e-4 * want[0].abs().max()
    # and the trained model (Q(W_res) + s B A, W_res = Q(W0) - s B0 A0) differs from it by W_res's requantization
    # only, as the model at init differed from the quantized base
    at_init = drift(run(load(folder, "nf4")), run(init(load(folder, "nf4"), "sc_lora")))
    moved = drift(trained, exported)
    assert moved["kl"] <= 2 * at_init["kl"] and moved["max_abs_logit"] <= 2 * at_init["max_abs_logit"]
    assert drift(base_logits, exported)["kl"] > 10 * moved["kl"]  # the training is what the adapter carries


def test_shapes_the_cpu_kernel_cannot_run_are_initialized_and_the_model_runs(tmp_path):
    """A 160 -> 64 down_proj: bitsandbytes' AVX512-BF16 CPU kernel cannot repack it (its own inference forward fails
    with a reshape error); the statistics run on bitsandbytes' generic path and the written layers stay on it."""
    path = tmp_path / "odd"
    tiny_llama(seed=4, hidden_size=64, intermediate_size=160).save_pretrained(path)
    model = init(load(path, "nf4"), "sc_lora")
    assert all(not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))  # the statistics left the storage as is
    assert all(torch.isfinite(x).all() for x in run(model))  # and the model runs in inference


def test_several_processes_are_refused_on_a_quantized_base(folder, monkeypatch):
    from sclora import distributed
    from sclora.methods.residual import build_residual_adapter

    model = load(folder, "nf4")
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    with pytest.raises(ValueError, match="quantized .*several processes"):
        build_residual_adapter(model, SCLoRAConfig(r=R, target_modules=None), lambda *a: None, show_progress=False)
    assert formats(model) and not hasattr(model, "peft_config")  # untouched


def test_quantize_residual_stores_conv1d_bases_in_4bit_as_their_out_by_in_weight():
    """quantize_frozen_linears (quantize_residual="nf4") on GPT-2: each frozen Conv1D becomes a Linear4bit of its
    (out, in) weight; the model computes exactly with the dequantized residuals."""
    import bitsandbytes.functional as F
    from test_families import tiny

    from sclora.quantize import quantize_frozen_linears

    model = sclora.init_model(tiny("gpt2"), SCLoRAConfig(r=R, target_modules=None, beta=0.5), plus=PLUS, minus=MINUS,
                              show_progress=False)
    reference = copy.deepcopy(model)
    info = quantize_frozen_linears(model, "nf4")
    assert info["layers"] == 8
    for (name, layer), (_, conv) in zip(model.named_modules(), reference.named_modules()):
        if name.endswith("base_layer"):
            assert isinstance(layer, bnb.nn.Linear4bit) and (layer.in_features, layer.out_features) == (
                conv.weight.shape[0], conv.nf)
            w = conv.weight.detach().T.contiguous()
            conv.weight.data = F.dequantize_4bit(*F.quantize_4bit(w, quant_type="nf4"), quant_type="nf4").T.contiguous()
            assert torch.equal(read_weight(layer), conv.weight.T)
    for m in model.modules():  # float32 matmuls, comparable with the reference's
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    got, want = run(model), run(reference)
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) <= 1e-5 * want[0].abs().max()


def test_logit_drift_is_max_abs_logit_and_mean_kl_over_real_tokens():
    g = torch.Generator().manual_seed(0)
    before, after = torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, generator=g,
                                                                                          dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    p, q = before.softmax(-1), after.softmax(-1)
    kl = [(p[i, j] * (p[i, j] / q[i, j]).log()).sum().item() for i, j in ((0, 0), (0, 1), (1, 0))]
    got = logit_drift(before.float(), after.float(), mask)
    assert got["tokens"] == 3 and abs(got["kl"] - sum(kl) / 3) < 1e-6
    assert abs(got["max_abs_logit"] - max((before[i, j] - after[i, j]).abs().max().item()
                                          for i, j in ((0, 0), (0, 1), (1, 0)))) < 1e-6
    assert logit_drift([before], [before], [mask]) == {"max_abs_logit": 0.0, "kl": 0.0, "tokens": 3}
    with pytest.raises(ValueError, match="differ in shape"):
        logit_drift(before, after[:, :2])
    with pytest.raises(ValueError, match="masked out"):
        logit_drift(before, after, torch.zeros(2, 3))


def test_subspace_energy_on_a_quantized_base(folder):
    base = load(folder, "nf4")
    plus = sclora.collect_covariances(base, PLUS, show_progress=False)
    minus = sclora.collect_covariances(base, MINUS, show_progress=False)
    model = sclora.get_sclora_model(base, SCLoRAConfig(r=R, target_modules=None, beta=0.9), plus, minus,
                                    show_progress=False)
    rows = sclora.subspace_energy(model, plus, minus)  # W0 rebuilt as Q(W_res) + s B A: shape-checked only
    assert len(rows) == 14 and all(0 <= r["plus"] <= 1 and 0 <= r["minus"] <= 1 for r in rows)
    summary = sclora.summarize_energy(rows)["overall"]
    assert summary["minus"] < summary["plus"]  # beta = 0.9 leans away from D-


@pytest.mark.parametrize("load_in", ["nf4", "int8"])
def test_finetune_on_a_base_loaded_quantized_reports_its_drift_at_init(folder, tmp_path, load_in):
    import json

    from conftest import tiny_tokenizer

    from sclora import cli

    tiny_tokenizer().save_pretrained(folder)
    rows = [{"prompt": f"what is {a} plus {b}", "response": f"{a} ."} for a in ("one", "two", "three", "four")
            for b in ("five", "six")]
    keep = [{"prompt": f"what is the capital of {c}", "response": f"the capital is {c} ."} for c in ("paris", "rome")]
    for name, data in (("task", rows), ("keep", keep)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    assert cli.main(["finetune", "--model", str(folder), "--load-in", load_in, "--data", str(tmp_path / "task.jsonl"),
                     "--preserve", str(tmp_path / "keep.jsonl"), "--r", "2", "--seq-len", "32", "--max-steps", "2",
                     "--batch-size", "4", "--output", str(tmp_path / "out"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["quantized_base"] == load_in
    drift = summary["init_drift"]  # one requantization of W_res: not zero, and small
    assert 0 < drift["max_abs_logit"] < 1 and 0 <= drift["kl"] < 1e-2
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_load_model_refuses_an_unknown_format():
    from sclora.models import load_model

    with pytest.raises(ValueError, match=r"load_in must be one of \('nf4', 'fp4', 'int8'\)"):
        load_model("smollm2-135m-instruct", load_in="int4")
