"""Baselines PEFT (or plain PyTorch) already implements: vanilla LoRA, PiSSA, OLoRA, EVA, full fine-tuning."""

from __future__ import annotations

from peft import PeftModel, get_peft_model
from torch import nn

from ..config import SCLoRAConfig
from ..targets import resolve_targets
from .residual import check_rank, remember_initial_adapter


def get_lora_model(model: nn.Module, config: SCLoRAConfig, init_lora_weights: bool | str = True) -> PeftModel:
    """Vanilla LoRA (Kaiming A, zero B) or any PEFT init given by name, e.g. ``"pissa"``."""
    if isinstance(model, PeftModel):
        raise ValueError("The model already carries a PEFT adapter; initialize the untouched base model.")  # noqa: TRY004
    check_rank(resolve_targets(model, config.target_modules), config.r)
    peft_model = get_peft_model(model, config.to_lora_config(model, init_lora_weights=init_lora_weights))
    remember_initial_adapter(peft_model)
    return peft_model


def get_eva_model(model: nn.Module, config: SCLoRAConfig, batches, *, show_progress: bool = True) -> PeftModel:
    """PEFT's EVA (Paischer et al., 2024): ``batches`` (dicts of input_ids, attention_mask, from D+) run through the
    model until the incremental SVD of every target's inputs converges; A takes the top right-singular vectors,
    ranks are redistributed by explained variance (EvaConfig's ``rho`` = 2), B starts at zero."""
    import torch
    from peft import EvaConfig, initialize_lora_eva_weights

    if isinstance(model, PeftModel):
        raise ValueError("The model already carries a PEFT adapter; initialize the untouched base model.")  # noqa: TRY004
    check_rank(resolve_targets(model, config.target_modules), config.r)
    batches = [{k: batch[k] for k in ("input_ids", "attention_mask")} for batch in batches]
    lora_config = config.to_lora_config(model, init_lora_weights="eva", eva_config=EvaConfig())
    peft_model = get_peft_model(model, lora_config, low_cpu_mem_usage=True)
    with torch.no_grad():
        initialize_lora_eva_weights(peft_model, dataloader=batches, show_progress_bar=show_progress)
    remember_initial_adapter(peft_model)
    return peft_model


def prepare_full_finetuning(model: nn.Module) -> nn.Module:
    """Full fine-tuning: no adapter, every parameter trainable."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model
