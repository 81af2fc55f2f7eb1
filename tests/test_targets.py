"""sclora.targets: the layers an adapter targets, by PEFT's rules, for every layer layout (nn.Linear, Conv1D,
bitsandbytes 4-bit / 8-bit); never the output head under None, never PEFT's own factor layers."""

from __future__ import annotations

import pytest
from conftest import tiny_llama
from test_families import tiny
from torch import nn

from sclora.targets import find_linear_modules, peft_target_modules, resolve_targets

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_none_is_every_linear_layer_but_the_head_in_every_layout():
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    assert set(resolve_targets(model, None)) == {f"model.layers.{i}.{p}.{n}" for i in range(2)
                                                 for p, names in (("self_attn", LLAMA[:4]), ("mlp", LLAMA[4:]))
                                                 for n in names}
    assert "lm_head" in dict(find_linear_modules(model))
    gpt2 = tiny("gpt2")  # Conv1D layers; the head is tied to the embeddings
    assert {n.rsplit(".", 1)[-1] for n in resolve_targets(gpt2, None)} == {"c_attn", "c_proj", "c_fc"}
    assert "lm_head" not in resolve_targets(gpt2, None)
    mixed = nn.ModuleDict({"a": nn.Linear(64, 64), "b": bnb.nn.Linear4bit(64, 64), "c": bnb.nn.Linear8bitLt(64, 64),
                           "d": nn.Conv1d(2, 2, 1), "e": nn.Embedding(3, 4)})
    assert list(dict(find_linear_modules(mixed))) == ["a", "b", "c"]


def test_peft_factor_layers_are_never_targets():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    names = list(dict(find_linear_modules(model)))
    assert not [n for n in names if ".lora_" in n]
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in names


def test_lists_and_regexes_follow_peft_and_misses_name_the_layers():
    model = tiny_llama()
    assert list(resolve_targets(model, ["down_proj", "q_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj"]  # model order
    assert list(resolve_targets(model, r".*\.1\.self_attn\.(q|v)_proj")) == ["model.layers.1.self_attn.q_proj",
                                                                              "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match=r"'c_attn' not found.*\['down_proj', 'gate_proj', 'k_proj', 'lm_head'"):
        resolve_targets(model, ["c_attn"])
    with pytest.raises(ValueError, match="matches no linear module"):
        resolve_targets(model, r"nothing")
    with pytest.raises(ValueError, match="no linear layers to adapt"):
        resolve_targets(nn.Sequential(nn.Embedding(3, 4)), None)


def test_peft_target_modules_make_peft_wrap_exactly_the_resolved_layers():
    from peft import LoraConfig, get_peft_model

    for model, targets in ((tiny_llama(), None), (tiny("gpt2"), None), (tiny("phi3"), None),
                           (tiny_llama(), ["q_proj", "down_proj"])):
        wanted = set(resolve_targets(model, targets))
        given = peft_target_modules(model, targets)
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=given,
                                                      fan_in_fan_out=any(n.endswith("c_attn") for n in wanted)))
        wrapped = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
                   for n, _ in peft_model.named_parameters() if n.endswith("lora_A.default.weight")}
        assert wrapped == wanted
    regex = r"model\.layers\.0\..*_proj"
    assert peft_target_modules(tiny_llama(), regex) == regex  # a regex is passed as it is
    assert peft_target_modules(tiny_llama(), None) == sorted(LLAMA)  # leaf names where they select the same layers
