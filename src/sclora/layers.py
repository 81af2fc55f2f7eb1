"""Read and write the weight of a target layer whatever its storage: one dense (out, in) float matrix in, one out.

Layouts handled:

* ``torch.nn.Linear`` (and subclasses with a plain floating weight): ``weight`` is (out, in).
* transformers' ``Conv1D`` (GPT-2 family): ``weight`` is stored transposed, (in, out); ``y = x @ W + b``.
* bitsandbytes ``Linear4bit`` (``Params4bit``, NF4 / FP4, any ``quant_storage``, with or without nested
  statistics): read by dequantizing with the layer's ``quant_state``; written by quantizing the new dense weight
  into a new ``Params4bit`` with the same quant type, block size, nested statistics, storage dtype and original
  dtype. On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its CPU kernel at the first inference
  forward (bf16 block scales, another nibble order); that layout is read as the forward uses it. A written layer
  whose shape that kernel cannot run (:func:`cpu_kernel_fits`) is left on bitsandbytes' generic path.
* bitsandbytes ``Linear8bitLt`` (``Int8Params``, LLM.int8()): read as ``CB * SCB / 127`` (row-wise absmax
  scales); written by row-wise int8 quantization of the new weight, as bitsandbytes quantizes a loaded one.

Writing keeps the module object (PEFT's LoRA wrapper holds it as its base layer) and replaces only its weight.
:func:`check_supported` refuses every other layout, before any work, naming the layer.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
from torch import nn

__all__ = ["check_supported", "cpu_kernel_fits", "dequantize_4bit", "is_quantized", "layer_dims", "layer_kind",
           "quantize_4bit_like", "read_weight", "without_cpu_repacking", "write_weight"]

SUPPORTED = "torch.nn.Linear, transformers' Conv1D, bitsandbytes Linear4bit (NF4 / FP4) and Linear8bitLt"


@cache
def _conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _bnb():
    """bitsandbytes if it is imported: a model cannot hold its layers otherwise (and importing it is slow)."""
    return sys.modules.get("bitsandbytes")


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"``, ``"4bit"``, ``"8bit"``, or None for a module that is none of these."""
    bnb = _bnb()
    if bnb is not None:
        if isinstance(module, bnb.nn.Linear4bit):
            return "4bit"
        if isinstance(module, bnb.nn.Linear8bitLt):
            return "8bit"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _conv1d_class()):
        return "conv1d"
    return None


def is_quantized(module: nn.Module) -> bool:
    return layer_kind(module) in ("4bit", "8bit")


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a target layer."""
    if layer_kind(module) == "conv1d":
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def read_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's weight as a dense (out, in) matrix in ``dtype`` (None: the layer's own float dtype; a quantized
    layer's dequantized dtype). For ``nn.Linear`` in its own dtype this is the weight itself (no copy; do not
    modify it, use :func:`write_weight`), for ``Conv1D`` a transposed view."""
    kind = layer_kind(module)
    if kind == "linear":
        weight = module.weight.detach()
    elif kind == "conv1d":
        weight = module.weight.detach().T
    elif kind == "4bit":
        weight = dequantize_4bit(module.weight)
    elif kind == "8bit":
        weight = _dequantize_8bit(module)
    else:
        raise ValueError(f"{type(module).__name__} is not a layer sclora can read; it reads {SUPPORTED}.")
    return weight if dtype is None else weight.to(dtype)


@torch.no_grad()
def write_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Store the dense (out, in) ``weight`` in the layer, in the layer's own format: copied in place into a float
    weight (cast to its dtype), requantized the way the layer was quantized for a bitsandbytes one."""
    d_in, d_out = layer_dims(module)
    if tuple(weight.shape) != (d_out, d_in):
        raise ValueError(f"The new weight has shape {tuple(weight.shape)} but the {type(module).__name__} layer "
                         f"maps {d_in} -> {d_out} features, so it takes ({d_out}, {d_in}).")
    kind = layer_kind(module)
    if kind == "linear":
        module.weight.data.copy_(weight)
    elif kind == "conv1d":
        module.weight.data.copy_(weight.T)
    elif kind == "4bit":
        old = module.weight
        module.weight = quantize_4bit_like(weight, old, module=module)
        if getattr(module, "support_avx512bf16_for_cpu", False) and not cpu_kernel_fits(module):
            module.support_avx512bf16_for_cpu = False  # bitsandbytes' generic path: the CPU kernel fails on it
    elif kind == "8bit":
        _write_8bit(module, weight)
    else:
        raise ValueError(f"{type(module).__name__} is not a layer sclora can write; it writes {SUPPORTED}.")


def check_supported(targets: dict[str, nn.Module]) -> None:
    """Raise a ValueError naming the first target layer whose weight sclora cannot read or write, with its type
    and what to do instead. Call before any work on the model."""
    for name, module in targets.items():
        problem = _unsupported(module)
        if problem is not None:
            raise ValueError(f"Target layer {name!r} ({type(module).__module__}.{type(module).__name__}) {problem}")


def _unsupported(module: nn.Module) -> str | None:
    kind = layer_kind(module)
    leave_out = "leave it out of target_modules"
    if kind is None:
        return f"is not a layer sclora can adapt: it handles {SUPPORTED}; {leave_out}."
    weight = module.weight
    if kind in ("linear", "conv1d"):
        if type(weight.data) is not torch.Tensor or not weight.is_floating_point():
            return (f"stores its weight as {type(weight.data).__name__} of {weight.dtype}, a format sclora cannot "
                    f"read: it handles float weights and bitsandbytes' 4-bit / 8-bit layers. Load the model in a "
                    f"float dtype or with bitsandbytes (BitsAndBytesConfig), or {leave_out}.")
        if weight.device.type == "meta":
            return ("has its weight on the meta device (not loaded, e.g. offloaded by device_map): load the model "
                    "fully onto devices before initializing.")
        return None
    if kind == "4bit":
        state = getattr(weight, "quant_state", None)
        if state is None or not getattr(weight, "bnb_quantized", False):
            return ("holds a 4-bit weight that was not quantized yet (no quant_state): move the model to its "
                    "device first (bitsandbytes quantizes on .to(device)), or load it with from_pretrained.")
        if weight.device.type == "meta":
            return "has its weight on the meta device: load the model fully onto devices before initializing."
        if state.quant_type not in ("nf4", "fp4"):
            return f"uses the 4-bit quant type {state.quant_type!r}; sclora handles 'nf4' and 'fp4'."
        return None
    # 8-bit
    if getattr(module.state, "has_fp16_weights", False):
        if not weight.is_floating_point():
            return "has has_fp16_weights=True but an int8 weight; load it again with bitsandbytes."
        return None
    if weight.dtype != torch.int8:
        return ("holds a weight that was not quantized to int8 yet: move the model to its device first (bitsandbytes "
                "quantizes on .to(device)), or load it with from_pretrained.")
    if getattr(weight, "SCB", None) is None and getattr(module.state, "SCB", None) is None:
        return "has an int8 weight without its row scales (SCB): load the model again with bitsandbytes."
    return None


def cpu_kernel_fits(module: nn.Module) -> bool:
    """Whether bitsandbytes' AVX512-BF16 CPU kernel can run this 4-bit layer: it repacks the weight at the first
    inference forward and needs out_features divisible by 32 and in_features by the block size (bitsandbytes 0.50
    fails with a reshape error otherwise, e.g. a 160 -> 64 down_proj)."""
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return True
    d_out, d_in = state.shape
    return d_out % 32 == 0 and d_in % state.blocksize == 0


@contextmanager
def without_cpu_repacking(model: nn.Module) -> Iterator[None]:
    """Run the model's 4-bit layers on bitsandbytes' generic path (dequantize, then a matmul in the compute dtype)
    instead of its AVX512-BF16 CPU kernel, which repacks each weight in place at its first inference forward.
    bitsandbytes 0.50's ``state_dict()`` unpacks such a weight again but leaves its block scales transposed, so a
    4-bit layer whose in_features exceed the block size computes with scrambled scales after any later save: sclora's
    own forward passes (statistics) leave the layers' storage as it was. A no-op without such layers."""
    bnb = _bnb()
    layers = [] if bnb is None else [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
                                     and getattr(m, "support_avx512bf16_for_cpu", False)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m in layers:
            m.support_avx512bf16_for_cpu = True


# --- 4-bit ---------------------------------------------------------------------------------------------------


def dequantize_4bit(weight) -> torch.Tensor:
    """The dense (out, in) weight a Params4bit stands for, in its quant_state's dtype."""
    import bitsandbytes.functional as F

    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return _dequantize_cpu_packed(weight.data, state)
    return F.dequantize_4bit(weight.data, state, quant_type=state.quant_type)


def _dequantize_cpu_packed(packed: torch.Tensor, state, block_n: int = 32) -> torch.Tensor:
    """Dequantize bitsandbytes' CPU layout (``_convert_weight_packed_for_cpu``): per group of ``block_n`` rows and
    pair of columns, 64 codes stored as 32 bytes (low nibbles the first 32, high the last 32); the block scales
    are bf16, (in / blocksize, out). Returns the weight the CPU kernel computes with, in ``original_dtype``."""
    d_out, d_in = state.shape
    packed = packed.reshape(-1, block_n).to(torch.int32)
    codes = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)  # (d_out / block_n * d_in / 2, 64)
    codes = codes.reshape(d_out // block_n, d_in // 2, block_n, 2).transpose(1, 2).reshape(d_out, d_in)
    absmax = state.absmax.T.to(torch.float32).repeat_interleave(state.blocksize, dim=1)  # (d_out, d_in)
    dense = state.code.to(torch.float32)[codes.long()] * absmax
    return dense.to(getattr(state, "original_dtype", torch.float32))


def quantize_4bit_like(weight: torch.Tensor, like=None, *, module: nn.Module | None = None, quant_type: str = "nf4",
                       blocksize: int = 64, compress_statistics: bool = False,
                       quant_storage: torch.dtype = torch.uint8, dtype: torch.dtype | None = None,
                       device=None):
    """A quantized ``Params4bit`` of the dense (out, in) ``weight``: in the format of the Params4bit ``like`` (its
    quant type, block size, nested statistics, storage dtype, original dtype, device), or in the one given.
    ``module`` is the Linear4bit it will belong to (bitsandbytes keeps the quant state there too)."""
    import bitsandbytes as bnb

    requires_grad = False
    if like is not None:
        state = like.quant_state
        quant_type, blocksize = state.quant_type, like.blocksize
        compress_statistics, quant_storage = like.compress_statistics, like.quant_storage
        dtype = getattr(state, "original_dtype", None) if getattr(state, "packing_format_for_cpu", False) else None
        dtype = dtype or state.dtype
        device = like.device
        requires_grad = like.requires_grad
    dense = weight.detach().to(dtype=dtype or weight.dtype, device=device or weight.device).contiguous()
    param = bnb.nn.Params4bit(dense, requires_grad=requires_grad, blocksize=blocksize,
                              compress_statistics=compress_statistics, quant_type=quant_type,
                              quant_storage=quant_storage, module=module)
    return param._quantize(dense.device)


# --- 8-bit ---------------------------------------------------------------------------------------------------


def _dequantize_8bit(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if weight.is_floating_point():  # has_fp16_weights: a float weight, int8 only inside the matmul
        return weight.detach()
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB  # the forward moves it
    return weight.data.to(torch.float32) * (scb.to(torch.float32)[:, None] / 127.0)


def _write_8bit(module: nn.Module, weight: torch.Tensor) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    old = module.weight
    if old.is_floating_point():
        old.data.copy_(weight)
        return
    dense = weight.detach().to(device=old.device, dtype=torch.float16).contiguous()  # as Int8Params quantizes
    cb, scb, _ = F.int8_vectorwise_quant(dense)
    module.weight = bnb.nn.Int8Params(cb, requires_grad=old.requires_grad, has_fp16_weights=False, CB=cb, SCB=scb)
    module.state.CB, module.state.SCB = None, None  # the next forward takes them from the new weight
