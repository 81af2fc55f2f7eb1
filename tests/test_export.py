"""Export: a fine-tuned residual-form model becomes a plain LoRA adapter for the untouched base."""

import pytest
import torch
from conftest import VOCAB, random_batches, tiny_llama
from peft import PeftModel
from transformers import AutoModelForCausalLM

import sclora

IDS = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def train_a_little(peft_model, steps=3):
    """Real optimizer steps on a language-modeling loss, so A and B move away from their init."""
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    for batch in random_batches(steps, seed=9):
        loss = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    return peft_model


@pytest.mark.parametrize(
    "method,kwargs",
    [("sc_lora", {}), ("sc_lora", {"use_rslora": True, "lora_alpha": 6}), ("pissa", {"lora_alpha": 8}),
     ("corda_kpa", {}), ("lora", {"lora_alpha": 8}), ("olora", {}), ("eva", {}),
     ("salora", {"lora_alpha": 8, "salora_safety_rank": 3, "salora_task_rank": 5})],
    ids=["sc_lora", "sc_lora-rslora", "pissa", "corda_kpa", "lora", "olora", "eva", "salora"],
)
def test_exported_adapter_reproduces_finetuned_logits_on_untouched_base(tmp_path, method, kwargs):
    peft_model = sclora.init_model(tiny_llama(seed=4), method=method, r=4, plus=random_batches(2, seed=1),
                                   minus=random_batches(2, seed=2), show_progress=False, **kwargs)
    base_logits = logits(tiny_llama(seed=4))
    tuned = logits(train_a_little(peft_model))
    assert (tuned - base_logits).abs().max() > 1e-2  # training did change the model
    sclora.export_lora(peft_model, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=4), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded), tuned, atol=1e-4, rtol=1e-4)
    expected_rank = 4 if method in ("lora", "eva") else 8  # residual inits export [A; A0], [B | -B0]
    assert reloaded.peft_config["default"].r == expected_rank


def test_export_from_another_process_via_saved_initial_adapter(tmp_path):
    peft_model = sclora.init_model(tiny_llama(seed=5), r=3, plus=random_batches(2, seed=1),
                                   minus=random_batches(2, seed=2), show_progress=False)
    sclora.save_initial_adapter(peft_model, tmp_path / "init")
    tuned = logits(train_a_little(peft_model))
    del peft_model.sclora_initial_adapter  # as if training ran in another process
    with pytest.raises(ValueError, match="save_initial_adapter"):
        sclora.export_lora(peft_model, tmp_path / "adapter")
    sclora.export_lora(peft_model, tmp_path / "adapter", initial=tmp_path / "init")
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=5), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded), tuned, atol=1e-4, rtol=1e-4)


def test_merge_and_save_gives_a_plain_model_with_the_finetuned_function(tmp_path):
    peft_model = sclora.init_model(tiny_llama(seed=6), r=3, beta=0.8, plus=random_batches(2, seed=1),
                                   minus=random_batches(2, seed=2), show_progress=False)
    tuned = logits(train_a_little(peft_model))
    sclora.merge_and_save(peft_model, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    torch.testing.assert_close(logits(reloaded), tuned, atol=1e-4, rtol=1e-4)


def _weights(peft_model) -> dict:
    return {n: p.detach().double().clone() for n, p in peft_model.named_parameters()}


@pytest.mark.parametrize("method", ["sc_lora", "corda_kpa", "lora"])
def test_restore_initial_adapter_turns_another_init_into_the_saved_one(tmp_path, method):
    # the saved init, and another init of the same base from other data / another seed: as different as a
    # recomputed init can get where eigenvalues nearly tie
    def init(seed):
        model = tiny_llama(seed=7)
        torch.manual_seed(seed)  # LoRA's random A
        return sclora.init_model(model, method=method, r=3, plus=random_batches(2, seed=1 + seed),
                                 minus=random_batches(2, seed=3 + seed), show_progress=False)

    first = init(0)
    sclora.save_initial_adapter(first, tmp_path / "init", "inputs-1")
    other = init(1)
    want, before = _weights(first), _weights(other)
    assert max((want[n] - before[n]).abs().max() for n in want) > 1e-3  # the two inits differ
    from sclora.export import restore_initial_adapter

    assert not restore_initial_adapter(other, tmp_path / "init", "inputs-2", residual=method != "lora")
    assert all(torch.equal(before[n], p.detach().double()) for n, p in other.named_parameters())  # untouched
    assert restore_initial_adapter(other, tmp_path / "init", "inputs-1", residual=method != "lora")
    got = _weights(other)
    for name in want:  # A0, B0 exactly; each W_res = W - s B0 A0 to float32 rounding of the weight
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=0), name
    torch.testing.assert_close(logits(other), logits(first), atol=1e-5, rtol=1e-5)
    # and a model trained from it exports to the same adapter as one trained from the saved init
    tuned = logits(train_a_little(other))
    sclora.export_lora(other, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=7), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded), tuned, atol=1e-4, rtol=1e-4)


def test_load_lora_refuses_an_adapter_of_other_layers(tmp_path):
    from peft import LoraConfig, get_peft_model

    from sclora.export import export_lora, load_lora, remember_initial_adapter

    def lora(r, targets):
        model = get_peft_model(tiny_llama(seed=1), LoraConfig(r=r, lora_alpha=r, target_modules=targets))
        remember_initial_adapter(model)  # B = 0: exported at rank r
        return model

    trained = lora(2, ["q_proj", "v_proj"])
    for p in trained.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    export_lora(trained, tmp_path / "a")
    fresh = lora(2, ["q_proj", "v_proj"])
    load_lora(fresh, tmp_path / "a")
    assert all(torch.equal(p, q) for (n, p), (_, q) in zip(fresh.named_parameters(), trained.named_parameters())
               if "lora_" in n)
    for other in (lora(4, ["q_proj", "v_proj"]), lora(2, ["q_proj"])):
        before = [p.clone() for p in other.parameters()]
        with pytest.raises(ValueError, match="does not fit this model's LoRA layers"):
            load_lora(other, tmp_path / "a")
        assert all(torch.equal(p, q) for p, q in zip(before, other.parameters()))  # nothing changed
