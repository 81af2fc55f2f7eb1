"""Baselines PEFT (or plain PyTorch) already implements: vanilla LoRA, PiSSA, full fine-tuning."""

from __future__ import annotations

from peft import PeftModel, get_peft_model
from torch import nn

from ..config import SCLoRAConfig
from ..targets import resolve_targets
from .residual import check_rank, remember_initial_adapter


def get_lora_model(model: nn.Module, config: SCLoRAConfig, init_lora_weights: bool | str = True) -> PeftModel:
    """Vanilla LoRA (Kaiming A, zero B) or any PEFT init given by name, e.g. ``"pissa"``."""
    if isinstance(model, PeftModel):
        raise ValueError("The model already carries a PEFT adapter; initialize the untouched base model.")
    check_rank(resolve_targets(model, config.target_modules), config.r)
    peft_model = get_peft_model(model, config.to_lora_config(init_lora_weights=init_lora_weights))
    remember_initial_adapter(peft_model)
    return peft_model


def prepare_full_finetuning(model: nn.Module) -> nn.Module:
    """Full fine-tuning: no adapter, every parameter trainable."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model
