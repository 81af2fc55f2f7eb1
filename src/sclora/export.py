"""Export a fine-tuned residual-form model (SC-LoRA, PiSSA, CorDA) so that it runs on the UNTOUCHED
base model: as a plain PEFT LoRA adapter, or merged into full weights.

A residual-form init replaces W0 by W_res = W0 - s B0 A0. After training to (A, B) the layer
computes W_res + s B A = W0 + s (B A - B0 A0) = W0 + B' A' with the rank-2r factors
A' = [A; A0], B' = s [B, -B0] and scaling 1 (lora_alpha = r' = 2r). This is PEFT's own
"convert to LoRA" identity, written out so that it also holds for rsLoRA and any alpha.

The factors are PEFT's (A: r x in, B: out x r) for every layer layout, so the same file serves transformers'
Conv1D (GPT-2; the adapter config keeps ``fan_in_fan_out=True``) and quantized bases. On a base loaded quantized
(bitsandbytes), the adapter is for that quantized base: there W0 is its dequantized weight, and the trained model,
whose W_res was requantized at init, differs from base + adapter by that requantization only.
"""

from __future__ import annotations

import copy
import os

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .fileio import atomic_dir, atomic_path
from .methods.residual import ADAPTER as _ADAPTER
from .methods.residual import adapter_layers as _layers
from .methods.residual import remember_initial_adapter

__all__ = ["export_lora", "load_lora", "merge_and_save", "remember_initial_adapter", "restore_initial_adapter",
           "save_initial_adapter"]

INITIAL_ADAPTER_FILE = "sclora_initial_adapter.safetensors"


def save_initial_adapter(peft_model: PeftModel, directory: str | os.PathLike, fingerprint: str | None = None) -> str:
    """Write the remembered initial adapter, so that a later process can export the trained model; ``fingerprint``
    (what the init was made from) lets :func:`restore_initial_adapter` recognise it."""
    state = _initial_state(peft_model, None)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, INITIAL_ADAPTER_FILE)
    with atomic_path(path) as tmp:
        save_file({k: v.cpu().contiguous() for k, v in state.items()}, tmp,
                  metadata={"fingerprint": fingerprint} if fingerprint else None)
    return path


@torch.no_grad()
def restore_initial_adapter(peft_model: PeftModel, directory: str | os.PathLike, fingerprint: str, *,
                            residual: bool) -> bool:
    """Turn ``peft_model``, just initialized, into the model the initial adapter in ``directory`` was saved from
    (with the same ``fingerprint``): each layer's A, B set to the saved A0, B0 and, for a ``residual`` init, its
    base weight moved by s (B A - B0 A0), so that W_res + s B0 A0 is still the original weight. A resumed run then
    continues from the very init its checkpoints were trained from, also where recomputing it gives another one
    (another thread count or machine rounds differently, and near-equal eigenvalues turn that into another
    subspace). An init recomputed to the same bits is left as it is. Returns False, changing nothing, when there
    is no such file, it was saved for other inputs or
    layers, a base layer is quantized, or a non-residual init starts with B != 0."""
    from .layers import layer_kind, read_weight, write_weight

    path = os.path.join(directory, INITIAL_ADAPTER_FILE)
    if not os.path.exists(path):
        return False
    with safe_open(path, "pt") as f:
        if (f.metadata() or {}).get("fingerprint") != fingerprint:
            return False
    saved = load_file(path)
    layers = _layers(peft_model)
    if set(saved) != {f"{name}.lora_{x}" for name in layers for x in "AB"}:
        return False
    if any(layer_kind(layer.get_base_layer()) not in ("linear", "conv1d") for layer in layers.values()):
        return False
    if not residual and any(saved[f"{n}.lora_B"].any() or layer.lora_B[_ADAPTER].weight.any()
                            for n, layer in layers.items()):
        return False
    if all(torch.equal(layer.lora_A[_ADAPTER].weight.cpu(), saved[f"{n}.lora_A"]) and
           torch.equal(layer.lora_B[_ADAPTER].weight.cpu(), saved[f"{n}.lora_B"]) for n, layer in layers.items()):
        return True  # recomputed to the same bits: nothing to change (and nothing rounded)
    for name, layer in layers.items():
        a, b = layer.lora_A[_ADAPTER].weight, layer.lora_B[_ADAPTER].weight
        a0, b0 = saved[f"{name}.lora_A"].to(a.device), saved[f"{name}.lora_B"].to(b.device)
        if residual:
            base = layer.get_base_layer()
            s = layer.scaling[_ADAPTER]
            write_weight(base, read_weight(base, torch.float64)
                         + s * (b.double() @ a.double() - b0.double() @ a0.double()))
        a.data.copy_(a0)
        b.data.copy_(b0)
    remember_initial_adapter(peft_model)
    return True


@torch.no_grad()
def export_lora(
    peft_model: PeftModel,
    directory: str | os.PathLike,
    initial: str | os.PathLike | dict[str, torch.Tensor] | None = None,
) -> str:
    """Save ``peft_model`` as a plain LoRA adapter for ``PeftModel.from_pretrained(untouched_base, directory)``.

    ``initial`` is the adapter at initialization: a dict, a directory written by
    :func:`save_initial_adapter`, or None for the copy kept on the model at init. A model whose
    initial adapter is zero (vanilla LoRA) is saved at rank r; residual-form ones at rank 2r.
    """
    state0 = _initial_state(peft_model, initial)
    layers = _layers(peft_model)
    residual = any(state0[f"{n}.lora_B"].abs().max() > 0 for n in layers)
    config = copy.deepcopy(peft_model.peft_config[_ADAPTER])
    tensors = {}
    for name, layer in layers.items():
        a, b = layer.lora_A[_ADAPTER].weight.detach(), layer.lora_B[_ADAPTER].weight.detach()
        s = layer.scaling[_ADAPTER]
        if residual:
            a0 = state0[f"{name}.lora_A"].to(a)
            b0 = state0[f"{name}.lora_B"].to(b)
            a, b = torch.cat([a, a0], dim=0), s * torch.cat([b, -b0], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.float().cpu().contiguous()
    if residual:
        rank = 2 * config.r
        config.r, config.lora_alpha, config.use_rslora = rank, rank, False
        config.rank_pattern, config.alpha_pattern = {}, {}
    config.init_lora_weights = True
    _write_adapter(directory, config, tensors)
    return os.fspath(directory)


@torch.no_grad()
def load_lora(peft_model: PeftModel, directory: str | os.PathLike) -> None:
    """Set ``peft_model``'s LoRA factors to those of a rank-r adapter that :func:`export_lora` wrote for a
    zero-initialized LoRA with the same layers and rank: the trained model again, without training it.
    Raises ValueError, changing nothing, when the adapter holds other layers or shapes."""
    tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    pairs = [(f"base_model.model.{name}.lora_{x}.weight", getattr(layer, f"lora_{x}")[_ADAPTER].weight)
             for name, layer in _layers(peft_model).items() for x in "AB"]
    wrong = sorted({key for key, _ in pairs} ^ set(tensors)) + [
        key for key, weight in pairs if key in tensors and tensors[key].shape != weight.shape]
    if wrong:
        raise ValueError(f"{directory}: the adapter does not fit this model's LoRA layers ({len(wrong)} missing, "
                         f"extra or of another shape, e.g. {wrong[0]}); it was saved from another model, rank or "
                         "target modules.")
    for key, weight in pairs:
        weight.copy_(tensors[key])


def merge_and_save(peft_model: PeftModel, directory: str | os.PathLike, tokenizer=None) -> nn.Module:
    """Merge the adapter into the weights (W_res + s B A) and save a plain transformers model."""
    merged = peft_model.merge_and_unload()
    with atomic_dir(directory) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return merged


def _initial_state(peft_model, initial) -> dict[str, torch.Tensor]:
    if isinstance(initial, dict):
        return initial
    if initial is not None:
        return load_file(os.path.join(initial, INITIAL_ADAPTER_FILE))
    state = getattr(peft_model, "sclora_initial_adapter", None)
    if state is None:
        raise ValueError(
            "This model has no remembered initial adapter: build it with sclora.init_model / get_sclora_model, "
            "or pass initial= the directory written by sclora.save_initial_adapter right after initialization."
        )
    return state


def _write_adapter(directory, config, tensors) -> None:
    if isinstance(config.target_modules, (set, frozenset, list, tuple)):  # a set's order varies between processes
        config.target_modules = sorted(config.target_modules)
    with atomic_dir(directory) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"))
