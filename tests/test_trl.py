"""A model from get_sclora_model trains with TRL's SFTTrainer (chat rows, loss on the assistant turns), and the
trained adapter still exports to a plain LoRA adapter that reproduces it on the untouched base."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batches, tiny_llama, tiny_tokenizer

import sclora

trl = pytest.importorskip("trl", reason="TRL is in the dev extra: pip install -e '.[dev]'")


def test_sft_trainer_trains_an_sclora_model_and_export_stays_exact(tmp_path):
    from datasets import Dataset
    from peft import PeftModel

    base = tiny_llama(seed=4)
    targets = ["q_proj", "v_proj", "down_proj"]
    plus = sclora.collect_covariances(base, random_batches(seed=1), targets, show_progress=False)
    minus = sclora.collect_covariances(base, random_batches(seed=2), targets, show_progress=False)
    model = sclora.get_sclora_model(tiny_llama(seed=4), sclora.SCLoRAConfig(r=2, beta=0.7, target_modules=targets),
                                    plus, minus, show_progress=False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tokenizer = tiny_tokenizer()
    rows = [{"messages": [{"role": "user", "content": f"what is {a} plus {b}"},
                          {"role": "assistant", "content": f"{a} plus {b} equals {b}"}]}
            for a in ("one", "two", "three") for b in ("four", "five", "six")]
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=3,
                         learning_rate=5e-2, report_to="none", use_cpu=True, logging_steps=1, save_strategy="no",
                         assistant_only_loss=False, max_length=32, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)  # bf16 training patches forward with autocast
    assert len([e for e in trainer.state.log_history if "loss" in e]) == 3
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and all("lora_" in n for n in moved)  # only the adapter trained
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    sclora.export_lora(model, tmp_path / "adapter")
    ids = torch.tensor([[3, 14, 15, 16, 17]])
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
        plain = PeftModel.from_pretrained(tiny_llama(seed=4), tmp_path / "adapter")(ids).logits
    assert (plain - trained).abs().max() < 1e-5
