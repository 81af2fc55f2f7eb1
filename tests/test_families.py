"""Every causal LM family sclora targets, on tiny random models built from configs: Llama, Qwen2 (attention biases),
Qwen3 (q/k norms), Mistral, Gemma2 (soft-capping, tied head), Phi-3 (fused qkv_proj / gate_up_proj) and GPT-2
(transformers' Conv1D, weights stored (in, out)). For each: SC-LoRA keeps the function at init (Theorem 2), PiSSA
and CorDA give PEFT's own adapters, the exported adapter runs on the untouched base in vanilla PEFT, and
`sclora finetune` runs from files to an adapter."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers
from conftest import VOCAB, random_batches, tiny_tokenizer

import sclora
from sclora import SCLoRAConfig, cli
from sclora.methods.residual import get_pissa_model
from sclora.targets import resolve_targets

R = 4
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8, "tie_word_embeddings": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": False}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "query_pre_attn_scalar": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "tie_word_embeddings": False}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4,
                                               "n_positions": 64, "bos_token_id": 1, "eos_token_id": 1}),
}
#: the target layers' leaf names of each family (every linear layer but the head)
LEAVES = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
          "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, "gpt2": {"c_attn", "c_proj", "c_fc"}}
for _family in ("qwen2", "qwen3", "mistral", "gemma2"):
    LEAVES[_family] = LEAVES["llama"]
IDS = torch.tensor([[3, 14, 15, 16, 17, 18, 19, 20], [5, 9, 26, 30, 41, 7, 2, 11]])


def tiny(family: str, seed: int = 0):
    config_name, model_name, extra = FAMILIES[family]
    kwargs = extra if family == "gpt2" else {**COMMON, **extra}
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs))
    with torch.no_grad():  # larger than the default init, so activations carry signal
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model.eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.double()


def config(method: str, **changes) -> SCLoRAConfig:
    return SCLoRAConfig(method=method, r=R, target_modules=None, **changes)


def projector_distance(b1, b2) -> float:
    q1, q2 = torch.linalg.qr(b1.double())[0], torch.linalg.qr(b2.double())[0]
    return torch.linalg.matrix_norm(q1 @ q1.T - q2 @ q2.T, ord=2).item()


def factors(peft_model) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name, p in peft_model.named_parameters():
        if ".lora_" in name:
            module, kind = name.removeprefix("base_model.model.").split(".lora_")
            out.setdefault(module, {})[kind.split(".")[0]] = p.detach()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_sc_lora_keeps_the_function_at_init_and_the_export_runs_on_the_untouched_base(family, tmp_path):
    from peft import PeftModel

    base = tiny(family)
    targets = resolve_targets(base, None)
    per_block = 4 if family == "gpt2" else len(LEAVES[family])  # GPT-2: attn.c_proj and mlp.c_proj
    assert {n.rsplit(".", 1)[-1] for n in targets} == LEAVES[family] and len(targets) == 2 * per_block
    before = logits(base)
    model = sclora.init_model(copy.deepcopy(base), config("sc_lora", beta=0.5), plus=random_batches(seed=1),
                              minus=random_batches(seed=2), show_progress=False)
    assert set(factors(model)) == set(targets)  # PEFT wrapped exactly the resolved layers
    # Theorem 2: W_res + s B A = W0 to float32 rounding of W_res, A and B, so the logits are the same
    assert (logits(model) - before).abs().max() <= 1e-5 * before.abs().max()
    if family == "gpt2":
        assert model.peft_config["default"].fan_in_fan_out  # Conv1D weights are stored (in, out)

    with torch.no_grad():  # "training": any change of A and B
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    trained = logits(model)
    assert (trained - before).abs().max() > 1e-2
    sclora.export_lora(model, tmp_path / "adapter")
    vanilla = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    assert (logits(vanilla) - trained).abs().max() <= 1e-4 * trained.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_salora_keeps_the_function_at_init(family):
    base = tiny(family, seed=4)
    before = logits(base)
    model = sclora.init_model(copy.deepcopy(base), config("salora", salora_safety_rank=4, salora_task_rank=8),
                              plus=random_batches(seed=1), minus=random_batches(seed=2), show_progress=False)
    assert (logits(model) - before).abs().max() <= 1e-5 * before.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_pissa_through_the_residual_path_is_peft_pissa(family):
    """sclora's residual mechanism (layers read and written through sclora.layers) gives PEFT's PiSSA adapter."""
    base = tiny(family, seed=1)
    theirs = factors(sclora.init_model(copy.deepcopy(base), config("pissa"), show_progress=False))
    model = get_pissa_model(copy.deepcopy(base), config("pissa"), show_progress=False)
    ours = factors(model)
    assert set(ours) == set(theirs) == set(resolve_targets(base, None))
    for name in ours:
        for kind in ("A", "B"):  # singular vectors up to sign: compare the products and the spans
            torch.testing.assert_close(ours[name]["B"] @ ours[name]["A"], theirs[name]["B"] @ theirs[name]["A"],
                                       rtol=1e-4, atol=1e-4)
        assert projector_distance(ours[name]["B"], theirs[name]["B"]) < 1e-3
    assert (logits(model) - logits(base)).abs().max() <= 1e-5 * logits(base).abs().max()


def peft_corda_factors(model, rows, mode: str):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    from sclora.targets import peft_target_modules

    lora_config = LoraConfig(r=R, lora_alpha=R, target_modules=peft_target_modules(model, None),
                             init_lora_weights="corda", corda_config=CordaConfig(corda_method={"ipa": "ipm",
                                                                                               "kpa": "kpm"}[mode]))

    @torch.no_grad()
    def run_model():
        for ids in rows:
            model(ids)

    preprocess_corda(model, lora_config, run_model=run_model)
    return factors(get_peft_model(model, lora_config))


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_corda_is_peft_corda(family, mode):
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(1, VOCAB, (1, int(n)), generator=g) for n in torch.randint(6, 16, (6,), generator=g)]
    batches = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows]
    base = tiny(family, seed=2)
    theirs = peft_corda_factors(copy.deepcopy(base), rows, mode)
    ours = factors(sclora.init_model(copy.deepcopy(base), config(f"corda_{mode}", lora_alpha=R),
                                     **{"plus" if mode == "ipa" else "minus": batches}, show_progress=False))
    assert set(ours) == set(theirs) == set(resolve_targets(base, None))
    distances = torch.tensor([projector_distance(ours[n]["B"], theirs[n]["B"]) for n in ours])
    assert distances.median() <= 1e-4 and distances.max() <= 1e-2, distances


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_corda_on_conv1d_is_the_float64_decomposition_of_the_transposed_weight(mode):
    """GPT-2 keeps W0^T: CorDA's factors are those of the (out, in) matrix, W0 C = U S V^T, and W_res is stored
    transposed again."""
    from sclora.methods.corda import corda_factors

    base = tiny("gpt2", seed=2)
    data = random_batches(seed=3)
    stats = sclora.collect_covariances(base, data, None, "abs_of_max", side="input", show_progress=False)
    model = sclora.init_model(copy.deepcopy(base), config(f"corda_{mode}"), plus=stats, minus=stats,
                              show_progress=False)
    for name, got in factors(model).items():
        w0 = base.get_submodule(name).weight.detach().T.double()
        a, b, w_res = corda_factors(w0, stats.input_covariance(name), R, 1.0, mode)
        torch.testing.assert_close(got["B"].double() @ got["A"].double(), b @ a, rtol=1e-4, atol=1e-5)
        layer = model.base_model.model.get_submodule(name).get_base_layer()
        torch.testing.assert_close(layer.weight.T.double(), w_res, rtol=1e-5, atol=1e-5)


def test_lora_wraps_the_same_layers_as_the_residual_inits():
    for family in ("phi3", "gpt2"):
        base = tiny(family)
        model = sclora.init_model(copy.deepcopy(base), config("lora"), show_progress=False)
        assert set(factors(model)) == set(resolve_targets(base, None))
        assert torch.equal(logits(model), logits(base))  # B = 0


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_runs_from_files_to_an_adapter(family, tmp_path):
    from peft import PeftModel

    words = ["paris", "rome", "berlin", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    folder = tmp_path / "model"
    tiny(family, seed=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"what is {words[i % 13]} plus {words[(i * 7) % 13]}",
                                        "response": f"{words[(i * 3) % 13]} ."} for i in range(8)])
    write_jsonl(tmp_path / "k.jsonl", [{"prompt": f"what is the capital of {words[i % 3]}",
                                        "response": f"the capital is {words[i % 3]}"} for i in range(6)])
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(folder), "--data", str(tmp_path / "d.jsonl"), "--preserve",
            str(tmp_path / "k.jsonl"), "--r", str(R), "--seq-len", "24", "--set", "max_steps=2", "--set",
            "batch_size=4", "--set", "micro_batch_size=4", "--output", str(out), "--quiet"]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {t.rsplit(".", 1)[-1] for t in adapter["target_modules"]} == LEAVES[family]
    base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    vanilla = PeftModel.from_pretrained(base, out / "adapter").eval()
    assert torch.isfinite(logits(vanilla)).all()
