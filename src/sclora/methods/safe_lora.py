"""Safe LoRA (Hsu et al., NeurIPS 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks when Finetuning Large
Language Models"), applied after training, as its authors' code (IBM/SafeLoRA) and PEFT's example
(``peft.utils.safelora``) compute it.

For each adapted layer, with W_aligned / W_unaligned the layer's weights in an aligned chat model and its unaligned
base (same architecture):

    V = W_aligned - W_unaligned,       C = V V^T / ||V||_F        (d_out x d_out; *not* a projector: C C != C)
    cos = cosine(vec(C B A), vec(B A))
    B <- C B   where cos <= tau,       else B unchanged

``tau`` is a given threshold (``threshold=``), or the ``num_proj_layers``-th smallest cosine over the layers (the
authors' "number" mode, 10 by default), so that the layers whose update leaves the alignment subspace most are
projected. C is used as the authors define it, scaled by 1 / ||V||_F rather than normalized into an orthogonal
projector; the tests check that rule, including C's non-idempotence, against a float64 rewrite.

The rule applies to the trained low-rank update itself, so to adapters whose update is B A (vanilla LoRA, MiCA,
EVA); a residual-form adapter (SC-LoRA, PiSSA, CorDA) is refused: its update is B A - B0 A0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["SafeLoRAResult", "apply_safe_lora", "safe_lora_matrix", "safe_lora_project"]


def safe_lora_matrix(aligned: torch.Tensor, unaligned: torch.Tensor) -> torch.Tensor:
    """C = V V^T / ||V||_F with V = aligned - unaligned (the authors' "alignment matrix"), in float64."""
    if aligned.shape != unaligned.shape:
        raise ValueError(f"The aligned and unaligned weights differ in shape ({tuple(aligned.shape)} vs "
                         f"{tuple(unaligned.shape)}): Safe LoRA needs two models of the same architecture.")
    v = aligned.to(torch.float64) - unaligned.to(torch.float64)
    norm = torch.linalg.matrix_norm(v)
    if norm == 0:
        raise ValueError("The aligned and unaligned weights are equal in a layer: Safe LoRA needs the aligned model "
                         "and the base it was aligned from, which differ.")
    return v @ v.T / norm


@dataclass
class SafeLoRAResult:
    """What :func:`safe_lora_project` did: the new B of every layer, the cosines, the threshold, the layers projected."""

    lora_b: dict[str, torch.Tensor]
    cosines: dict[str, float]
    threshold: float
    projected: list[str] = field(default_factory=list)


def safe_lora_project(adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                      matrices: Mapping[str, torch.Tensor], *, threshold: float | None = None,
                      num_proj_layers: int = 10) -> SafeLoRAResult:
    """Safe LoRA's rule on ``adapters`` (layer name -> (A, B)) with ``matrices`` (layer name -> C): B <- C B in the
    layers whose cosine between vec(C B A) and vec(B A) is at most ``threshold``, or, without one, at most the
    ``num_proj_layers``-th smallest cosine. Returns the new B of every layer (in B's dtype)."""
    missing = sorted(set(adapters) - set(matrices))
    if missing:
        raise ValueError(f"No Safe LoRA matrix for {len(missing)} adapted layer(s), e.g. {missing[0]!r}.")
    if threshold is None and (not isinstance(num_proj_layers, int) or num_proj_layers < 1):
        raise ValueError(f"num_proj_layers must be a positive integer, got {num_proj_layers!r}.")
    projected_b, cosines = {}, {}
    for name, (a, b) in adapters.items():
        a64, b64, c = a.to(torch.float64), b.to(torch.float64), matrices[name].to(torch.float64)
        projected_b[name] = c @ b64
        update, moved = b64 @ a64, projected_b[name] @ a64
        denominator = torch.linalg.vector_norm(update) * torch.linalg.vector_norm(moved)
        cosines[name] = float((update * moved).sum() / denominator) if denominator > 0 else 1.0
    if threshold is None:
        threshold = sorted(cosines.values())[min(num_proj_layers, len(cosines)) - 1]
    projected = [name for name, cos in cosines.items() if cos <= threshold]
    lora_b = {name: (projected_b[name] if name in projected else b.to(torch.float64)).to(b.dtype)
              for name, (_, b) in adapters.items()}
    return SafeLoRAResult(lora_b, cosines, float(threshold), projected)


@torch.no_grad()
def apply_safe_lora(peft_model: nn.Module, aligned: nn.Module, unaligned: nn.Module, *,
                    threshold: float | None = None, num_proj_layers: int = 10) -> SafeLoRAResult:
    """Safe LoRA on a trained PEFT LoRA model, in place: each adapted layer's C from the same layer of ``aligned``
    and ``unaligned`` (e.g. a chat model and its base), then :func:`safe_lora_project`. The model's B weights are
    replaced where projected."""
    from ..layers import read_weight
    from .residual import ADAPTER, adapter_layers

    initial = getattr(peft_model, "sclora_initial_adapter", None) or {}
    if any(key.endswith(".lora_B") and value.any() for key, value in initial.items()):
        raise ValueError("Safe LoRA applies to an adapter whose update is B A (vanilla LoRA, MiCA, EVA); this one "
                         "started from a non-zero B (a residual init such as SC-LoRA, PiSSA or CorDA), so its update "
                         "is B A - B0 A0. Apply it to a LoRA-initialized model.")
    layers = adapter_layers(peft_model)
    if not layers:
        raise ValueError("The model has no LoRA layers to project.")
    aligned_modules, unaligned_modules = dict(aligned.named_modules()), dict(unaligned.named_modules())
    matrices, adapters = {}, {}
    for name, layer in layers.items():
        if name not in aligned_modules or name not in unaligned_modules:
            raise ValueError(f"Layer {name!r} is not in both the aligned and the unaligned model: they must have the "
                             "architecture of the adapted model.")
        matrices[name] = safe_lora_matrix(read_weight(aligned_modules[name], torch.float64),
                                          read_weight(unaligned_modules[name], torch.float64))
        adapters[name] = (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
    result = safe_lora_project(adapters, matrices, threshold=threshold, num_proj_layers=num_proj_layers)
    for name in result.projected:
        layers[name].lora_B[ADAPTER].weight.copy_(result.lora_b[name])
    return result
