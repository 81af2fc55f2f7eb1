"""The shared mechanism of residual-form inits (SC-LoRA, CorDA): wrap the model with PEFT, then for
each target layer write A, B and the frozen residual W_res so that W_res + scaling * B A = W0.

W0 is the layer's dense (out, in) weight whatever its storage (:mod:`sclora.layers`: ``nn.Linear``, ``Conv1D``,
bitsandbytes 4-bit / 8-bit, dequantized); W_res is written back in the layer's own format (a quantized layer is
requantized as it was quantized), A and B are PEFT's float32 factors."""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..config import SCLoRAConfig
from ..layers import check_supported, is_quantized, layer_dims, layer_kind, read_weight, write_weight
from ..memory import release_freed_memory
from ..targets import resolve_targets

ADAPTER = "default"
#: float64 bytes of weights decomposed between two heap trims: every module of a 7B model, every few layers of
#: SmolLM2, where a trim after every module costs time and saves no peak memory (measured: docs/performance.md)
TRIM_AFTER_BYTES = 64 * 2**20

#: (module name, W0, scaling) -> (A, B, W_res)
FactorFn = Callable[[str, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def check_rank(targets: dict[str, nn.Module], r: int) -> None:
    """Refuse layers sclora cannot read or write (:func:`sclora.layers.check_supported`) and a rank above a
    layer's, before any work."""
    check_supported(targets)
    for name, linear in targets.items():
        d_in, d_out = layer_dims(linear)
        if r > min(d_in, d_out):
            raise ValueError(
                f"r={r} exceeds min(d_in, d_out)={min(d_in, d_out)} of module {name!r} "
                f"({d_out} x {d_in}); choose r <= that, or leave the module out of target_modules."
            )


def lora_config_extra(targets: dict[str, nn.Module]) -> dict:
    """LoraConfig fields the layers need: ``fan_in_fan_out=True`` for transformers' Conv1D (weight stored (in, out),
    as in GPT-2), which PEFT would otherwise set itself, with a warning."""
    return {"fan_in_fan_out": True} if any(layer_kind(m) == "conv1d" for m in targets.values()) else {}


def require_coverage(model: nn.Module, config: SCLoRAConfig, stats, label: str) -> None:
    """Fail before the model is touched if the statistics miss a target module."""
    missing = [n for n in resolve_targets(model, config.target_modules) if n not in stats]
    if missing:
        raise ValueError(
            f"The {label} statistics do not cover {len(missing)} target module(s), e.g. {missing[0]!r}; collect "
            "them with target_modules that include these (or narrow the config's target_modules)."
        )


def lora_layers(peft_model: PeftModel, names) -> dict[str, LoraLayer]:
    inner = peft_model.base_model.model
    layers = {}
    for name in names:
        layer = inner.get_submodule(name)
        if not isinstance(layer, LoraLayer):
            raise RuntimeError(f"PEFT did not wrap {name!r} with a LoRA layer; report this with your target_modules.")
        layers[name] = layer
    return layers


@torch.no_grad()
def build_residual_adapter(
    model: nn.Module, config: SCLoRAConfig, factors: FactorFn, *, show_progress: bool = True, desc: str = "init"
) -> PeftModel:
    if isinstance(model, PeftModel):
        raise ValueError("The model already carries a PEFT adapter; initialize the untouched base model.")
    targets = resolve_targets(model, config.target_modules)
    check_rank(targets, config.r)
    world, me, spread = distributed.world_size(), distributed.rank(), distributed.is_distributed()
    if spread and any(is_quantized(m) for m in targets.values()):
        raise ValueError("Initializing a quantized (bitsandbytes) base across several processes is not supported: "
                         "its requantized residuals would have to be broadcast in bitsandbytes' packed format. "
                         "Initialize it in one process, save the adapter and the initial one, and train from there.")
    lora_config = config.to_lora_config(model, init_lora_weights=False, **lora_config_extra(targets))
    peft_model = get_peft_model(model, lora_config)
    layers = list(lora_layers(peft_model, targets).items())
    # Several processes: rank k decomposes modules k, k + world, ...; then each module's (A, B, W_res) is
    # broadcast from its owner, so every rank ends with the same bits. One process owns them all.
    mine = layers[me::world]
    error = None
    try:
        untrimmed = 0
        for name, layer in tqdm(mine, desc=desc, disable=not show_progress or me != 0):
            base = layer.get_base_layer()
            lora_a, lora_b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            a, b, w_res = factors(name, read_weight(base), layer.scaling[ADAPTER])
            lora_a.data = a.to(device=lora_a.device, dtype=lora_a.dtype).contiguous()
            lora_b.data = b.to(device=lora_b.device, dtype=lora_b.dtype).contiguous()
            # In place for float weights: a second copy of every target weight would double their memory (the
            # originals of a memory-mapped checkpoint stay resident until overwritten). Quantized: requantized.
            write_weight(base, w_res)
            del a, b, w_res
            d_in, d_out = layer_dims(base)
            untrimmed += 8 * d_in * d_out
            if untrimmed >= TRIM_AFTER_BYTES:  # the modules' temporaries: else glibc keeps them resident (memory.py)
                release_freed_memory()
                untrimmed = 0
    except Exception as err:
        if not spread:
            raise
        error = err
    if spread:
        distributed.fail_together(error, f"{desc} (decomposition)")
        for i, (_, layer) in enumerate(layers):
            tensors = [layer.lora_A[ADAPTER].weight.data, layer.lora_B[ADAPTER].weight.data,
                       layer.get_base_layer().weight.data]
            distributed.broadcast_tensors(tensors, src=i % world)
    remember_initial_adapter(peft_model)
    return peft_model


def pissa_factors(weight: torch.Tensor, rank: int, scaling: float, dtype=torch.float64,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, W_res) of PiSSA as PEFT computes it (``init_lora_weights="pissa"``): W = U S V^T, B = U_r sqrt(S_r / s),
    A = sqrt(S_r / s) V_r^T, W_res = W - s B A; here in ``dtype`` on the dense weight."""
    w = weight.to(dtype)
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    root = (sv[:rank] / scaling).sqrt()
    a, b = root[:, None] * vh[:rank], u[:, :rank] * root
    return a, b, w - scaling * b @ a


def get_pissa_model(model: nn.Module, config: SCLoRAConfig, *, show_progress: bool = True) -> PeftModel:
    """PiSSA through sclora's residual mechanism: the same adapter as PEFT's ``init_lora_weights="pissa"``, and
    also on quantized (bitsandbytes) bases, where PEFT refuses PiSSA: the SVD runs on the dequantized weight in
    ``config.dtype`` and W_res is requantized in the layer's own format."""
    return build_residual_adapter(model, config, lambda name, w, s: pissa_factors(w, config.r, s, config.torch_dtype),
                                  show_progress=show_progress, desc="PiSSA init")


#: what FSDP (auto-wrap) and activation checkpointing insert into module names
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def adapter_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
    """LoRA layers by their model names (also inside FSDP units, whose wrapper names are left out)."""
    inner = peft_model.base_model.model
    layers = {}
    for name, m in inner.named_modules():
        if isinstance(m, LoraLayer) and ADAPTER in m.lora_A:
            for prefix in _WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            layers[name] = m
    return layers


@torch.no_grad()
def remember_initial_adapter(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """Keep a copy of the adapter right after initialization (needed by :func:`export_lora`)."""
    state = {}
    for name, layer in adapter_layers(peft_model).items():
        state[f"{name}.lora_A"] = layer.lora_A[ADAPTER].weight.detach().clone()
        state[f"{name}.lora_B"] = layer.lora_B[ADAPTER].weight.detach().clone()
    peft_model.sclora_initial_adapter = state
    return state


