"""Which layers an adapter targets, by PEFT's rules (``target_modules``: a list of name suffixes or one
full-match regex; None: PEFT's "all-linear", every linear layer but the output head). One place, used by the
statistics, every init method and the statistics cache, so they always agree on the layers."""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from .layers import layer_kind

__all__ = ["find_linear_modules", "peft_target_modules", "resolve_targets"]


def find_linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every linear layer PEFT's LoRA can wrap, by name: ``nn.Linear`` (bitsandbytes' Linear4bit / Linear8bitLt
    among them) and transformers' ``Conv1D``; not the factor layers inside a LoRA wrapper (``lora_A``, ...)."""
    for name, module in model.named_modules():
        if layer_kind(module) is not None and not any(part.startswith("lora_") for part in name.split(".")):
            yield name, module


def resolve_targets(model: nn.Module, target_modules: list[str] | str | None) -> dict[str, nn.Module]:
    """Target linear layers by PEFT's rules: a list matches name suffixes, a string is a full regex;
    None means all linear layers except the output head."""
    linears = dict(find_linear_modules(model))
    if not linears:
        raise ValueError("The model has no linear layers to adapt (nn.Linear, transformers' Conv1D, bitsandbytes' "
                         "Linear4bit / Linear8bitLt).")
    if target_modules is None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return {n: m for n, m in linears.items() if m is not head}
    if isinstance(target_modules, str):
        found = {n: m for n, m in linears.items() if re.fullmatch(target_modules, n)}
        if not found:
            raise ValueError(f"target_modules regex {target_modules!r} matches no linear module; e.g. {next(iter(linears))!r}.")
        return found
    found = {}
    for suffix in target_modules:
        hits = {n: m for n, m in linears.items() if n == suffix or n.endswith("." + suffix)}
        if not hits:
            kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"Target module {suffix!r} not found among the model's linear layers; they are named {kinds}.")
        found.update(hits)
    return dict(sorted(found.items(), key=lambda kv: list(linears).index(kv[0])))


def peft_target_modules(model: nn.Module, target_modules: list[str] | str | None) -> list[str] | str:
    """``target_modules`` for PEFT's LoraConfig that wraps exactly :func:`resolve_targets`' layers: the layers' leaf
    names when those select the same layers (a readable adapter config such as ``["q_proj", "v_proj"]``), else
    their full names. PEFT's own default for ``None`` differs by model family, so the resolved layers are passed."""
    if isinstance(target_modules, str):
        return target_modules
    targets = resolve_targets(model, target_modules)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in targets})
    every = dict(find_linear_modules(model))
    if {n for n in every if n.rsplit(".", 1)[-1] in leaves} == set(targets):
        return leaves
    return list(targets)
