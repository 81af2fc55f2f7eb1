"""Which linear layers an adapter targets, by PEFT's rules (``target_modules``: a list of name suffixes or one
full-match regex; None: every linear layer but the output head). One place, used by the statistics, every init
method and the statistics cache, so they always agree on the layers."""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

__all__ = ["find_linear_modules", "resolve_targets"]


def find_linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module


def resolve_targets(model: nn.Module, target_modules: list[str] | str | None) -> dict[str, nn.Linear]:
    """Target linear layers by PEFT's rules: a list matches name suffixes, a string is a full regex;
    None means all linear layers except the output head."""
    linears = dict(find_linear_modules(model))
    if not linears:
        raise ValueError("The model has no nn.Linear modules to adapt.")
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
