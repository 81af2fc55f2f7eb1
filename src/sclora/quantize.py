"""A 4-bit base under the adapter (QLoRA's storage) after any initialization: the decomposition and the statistics
stay in full precision, then every frozen linear weight — the residual W_res of the adapted layers, W0 of the
others — is stored in bitsandbytes' NF4 (or FP4); the LoRA factors train in full precision on top.

Why after the init: PiSSA's and LoftQ's argument. A residual init moves the layer's largest directions into the
adapter, so W_res is what gets quantized, and it has less to lose than W0 (measured by
``benchmarks/qlora_init.py``, docs/features.md). bitsandbytes >= 0.49 runs 4-bit linear layers on CPU (forward
and backward); on GPUs it uses its CUDA kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import cpu_kernel_fits, dequantize_4bit, layer_dims, layer_kind, quantize_4bit_like, read_weight

__all__ = ["QUANT_TYPES", "quantization_error", "quantize_frozen_linears"]

QUANT_TYPES = ("nf4", "fp4")


def _bnb():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError("quantize_residual needs bitsandbytes: pip install 'bitsandbytes>=0.49' (CPU and CUDA "
                          "builds on PyPI).") from err
    return bitsandbytes


def quantize_frozen_linears(model: nn.Module, quant_type: str = "nf4", *, compute_dtype: torch.dtype | None = None,
                            skip: tuple[str, ...] = ("lm_head",)) -> dict:
    """Replace, in place, every float linear layer (``nn.Linear``, transformers' ``Conv1D``) whose weight does not
    train (the base layers under LoRA, and the layers no adapter targets; not the modules named in ``skip``, e.g.
    the output head) by a bitsandbytes 4-bit layer of the same (out, in) weight. Returns ``{"layers": n,
    "bytes_before": b0, "bytes_after": b1}`` (weights only)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}.")
    bnb = _bnb()
    replaced, before, after = 0, 0, 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            dense = type(child) is nn.Linear or layer_kind(child) == "conv1d"
            if not dense or child.weight.requires_grad or any(full.endswith(s) for s in skip):
                continue
            if "lora_" in full:  # PEFT's own factor layers are nn.Linear too; they stay as they are
                continue
            dtype = compute_dtype or child.weight.dtype
            d_in, d_out = layer_dims(child)
            layer = bnb.nn.Linear4bit(d_in, d_out, bias=child.bias is not None, compute_dtype=dtype,
                                      quant_type=quant_type, device="meta")
            layer.weight = quantize_4bit_like(read_weight(child), module=layer, quant_type=quant_type,
                                              compress_statistics=False,  # transformers' default
                                              dtype=torch.float32, device=child.weight.device)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            if getattr(layer, "support_avx512bf16_for_cpu", False) and not cpu_kernel_fits(layer):
                layer.support_avx512bf16_for_cpu = False  # bitsandbytes' CPU kernel fails on this shape
            before += child.weight.numel() * child.weight.element_size()
            after += layer.weight.numel() * layer.weight.element_size() + _state_bytes(layer.weight.quant_state)
            setattr(parent, child_name, layer)
            replaced += 1
    if not replaced:
        raise ValueError("No frozen nn.Linear layer to quantize: initialize the adapter first (its base layers are "
                         "the frozen ones), and check `skip`.")
    return {"layers": replaced, "bytes_before": before, "bytes_after": after}


def _state_bytes(state) -> int:
    tensors = [getattr(state, k, None) for k in ("absmax", "code")]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [getattr(nested, k, None) for k in ("absmax", "code")]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def quantization_error(weight: torch.Tensor, quant_type: str = "nf4") -> float:
    """||Q(W) - W||_F / ||W||_F for bitsandbytes' 4-bit round trip of ``weight`` (0: lossless)."""
    _bnb()
    w = weight.detach().to(torch.float32).contiguous()
    back = dequantize_4bit(quantize_4bit_like(w, quant_type=quant_type))
    return ((back - w).norm() / w.norm().clamp_min(torch.finfo(w.dtype).tiny)).item()
