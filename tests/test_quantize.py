"""SC-LoRA on a 4-bit base (QLoRA-style): the full-precision init, then the frozen residual stored in NF4; the
4-bit model computes exactly Q(W_res) + B A, trains its adapter, exports, and its init error is measured."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_batches, tiny_llama, tiny_tokenizer

import sclora
from sclora.quantize import quantization_error, quantize_frozen_linears

bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit path needs bitsandbytes (dev extra)")
IDS = torch.tensor([[3, 14, 15, 16, 17, 18]])


@pytest.fixture(scope="module")
def stats():
    base = tiny_llama(seed=3)
    return (sclora.collect_covariances(base, random_batches(seed=1), show_progress=False),
            sclora.collect_covariances(base, random_batches(seed=2), show_progress=False))


def dequantized_copy(fp_model, quant_type="nf4"):
    """The full-precision model with every frozen base weight replaced by its 4-bit round trip."""
    import bitsandbytes.functional as F

    out = copy.deepcopy(fp_model)
    for name, module in out.named_modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad and "lora_" not in name \
                and not name.endswith("lm_head"):
            packed, state = F.quantize_4bit(module.weight.data.float().contiguous(), quant_type=quant_type)
            module.weight.data = F.dequantize_4bit(packed, state, quant_type=quant_type).to(module.weight.dtype)
    return out


def test_the_4bit_model_is_q_of_w_res_plus_the_adapter_and_trains_and_exports(stats, tmp_path):
    from peft import PeftModel

    from sclora.train import TrainConfig, train

    plus, minus = stats
    fp = sclora.init_model(tiny_llama(seed=3), method="sc_lora", r=4, beta=0.5, plus=plus, minus=minus,
                           show_progress=False)
    q = sclora.init_model(tiny_llama(seed=3), method="sc_lora", r=4, beta=0.5, plus=plus, minus=minus,
                          quantize_residual="nf4", show_progress=False)
    from sclora.quantize import quantize_frozen_linears

    info = quantize_frozen_linears(sclora.init_model(tiny_llama(seed=3), method="sc_lora", r=4, beta=0.5, plus=plus,
                                                     minus=minus, show_progress=False), "nf4")
    assert info["layers"] == 14 and info["bytes_after"] < info["bytes_before"] / 3  # 4 bits + scales vs 32 bits
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in q.modules()) == 14
    with torch.no_grad():
        want = dequantized_copy(fp)(IDS).logits
        assert (q(IDS).logits - want).abs().max() < 1e-4  # exactly Q(W_res) + B A: nothing else changed
    before = {n: p.detach().clone() for n, p in q.named_parameters() if p.requires_grad}
    examples = [{"prompt": "what is the capital of france", "response": "paris"}] * 4
    train(q, tiny_tokenizer(), examples, TrainConfig(learning_rate=5e-2, batch_size=4, micro_batch_size=4,
          max_steps=2, max_length=32), tmp_path / "ckpt", show_progress=False)
    assert any(not torch.equal(p, before[n]) for n, p in q.named_parameters() if n in before)
    sclora.export_lora(q, tmp_path / "adapter")  # for the untouched full-precision base
    loaded = PeftModel.from_pretrained(tiny_llama(seed=3), tmp_path / "adapter")
    assert loaded.peft_config["default"].r == 8


def test_init_error_and_quantization_error_are_reported_against_plain_qlora(stats):
    plus, minus = stats
    base = tiny_llama(seed=3)
    with torch.no_grad():
        reference = base(IDS).logits
    errors = {}
    for method in ("lora", "sc_lora", "pissa"):
        model = sclora.init_model(tiny_llama(seed=3), method=method, r=4, beta=0.5, plus=plus, minus=minus,
                                  quantize_residual="nf4", show_progress=False)
        with torch.no_grad():
            errors[method] = (model(IDS).logits - reference).abs().mean().item()
    assert all(e > 0 for e in errors.values())  # 4 bits always cost something at init
    w0 = base.model.layers[0].self_attn.q_proj.weight
    assert 0 < quantization_error(w0) < 0.5
    with pytest.raises(ValueError, match="quant_type must be"):
        quantize_frozen_linears(base, "int3")
    with pytest.raises(ValueError, match="needs an adapter method"):
        sclora.SCLoRAConfig(method="full", quantize_residual="nf4")
