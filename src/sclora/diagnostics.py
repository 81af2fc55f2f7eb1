"""Subspace diagnostics before training: how much of each data set's output energy the adapter can reach.

After a residual-form init (SC-LoRA, PiSSA, CorDA) the adapter's output s B A x lies in the column space
S of B. For every LoRA layer, :func:`subspace_energy` reports the fraction tr(Q^T Cov Q) / tr(Cov) of
D+'s and each D-'s output energy E||h||^2 that S captures (Q an orthonormal basis of S): SC-LoRA should
capture much of D+ and little of D-.

The PEFT layer's base weight is then W_res, not W0, so the statistics (bound to the original weights;
input-side ones need W0 to form output covariances) cannot be bound to the PEFT model. Each layer's W0
is rebuilt as W_res + scaling * B A, checked against the statistics' fingerprint, and used directly. On a
quantized base (bitsandbytes) W_res is stored requantized, so that W0 is the original only up to the requantization
error: its shape is checked, not its fingerprint.

:func:`logit_drift` measures how far a model moved from a reference on the same tokens (e.g. a quantized base
before and after a residual init, where the requantization of W_res is the only change).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from peft import PeftModel

from .layers import is_quantized, read_weight
from .methods.residual import ADAPTER, adapter_layers
from .statistics import CovarianceStats, model_fingerprint
from .subspace import captured_energy

__all__ = ["logit_drift", "subspace_energy", "summarize_energy"]

#: Fields of a row that describe the module rather than an energy fraction.
ROW_KEYS = ("module", "layer", "kind")


@torch.no_grad()
def subspace_energy(
    peft_model: PeftModel,
    plus: CovarianceStats,
    minus: CovarianceStats | Sequence[CovarianceStats] | None = None,
) -> list[dict]:
    """One row per LoRA layer: ``{"module", "layer", "kind", "plus", "minus"}``, the energy fractions in
    [0, 1] (nan where a set has no energy in the layer). With a list of several D- statistics the
    fractions are ``"minus_0"``, ``"minus_1"``, ...; without ``minus`` only ``"plus"`` is reported.

    ``peft_model`` is a freshly initialized PEFT LoRA model with non-zero B, built on the model the
    statistics were collected on; module names are the original model's (as the statistics use them).
    """
    sets = _named_sets(plus, minus)
    if not isinstance(peft_model, PeftModel):
        raise TypeError("subspace_energy takes the PEFT model returned by sclora.init_model / get_sclora_model.")
    layers = adapter_layers(peft_model)
    if not layers:
        raise ValueError("The model has no LoRA layers with the 'default' adapter; nothing to diagnose.")
    inner = peft_model.base_model.model
    config_digest = model_fingerprint(inner, [])["config"]
    for label, stats in sets.items():
        if stats.fingerprint.get("config", config_digest) != config_digest:
            raise ValueError(
                f"The {label} statistics were collected on a model with a different configuration; use statistics "
                "of the model this adapter was initialized on."
            )
        missing = [n for n in layers if n not in stats]
        if missing:
            raise ValueError(
                f"The {label} statistics do not cover {len(missing)} adapted module(s), e.g. {missing[0]!r}; collect "
                "them with the target_modules of the adapter."
            )

    rows = []
    for name, layer in layers.items():
        a = layer.lora_A[ADAPTER].weight.detach().to(torch.float64)
        b = layer.lora_B[ADAPTER].weight.detach().to(torch.float64)
        q = _column_basis(b)
        if q is None:
            raise ValueError(
                f"The LoRA B of {name!r} is zero, so the adapter subspace is undefined at init (vanilla LoRA starts "
                "with B = 0). Diagnose a residual-form init (sc_lora, pissa, corda_ipa, corda_kpa) before training."
            )
        base = layer.get_base_layer()
        w0 = read_weight(base, torch.float64) + layer.scaling[ADAPTER] * b @ a
        exact = not is_quantized(base)
        row = {"module": name, "layer": _layer_index(name), "kind": name.rsplit(".", 1)[-1]}
        for label, stats in sets.items():
            cov, weight = stats.factor(name, weight=w0, check_probes=exact)
            row[label] = captured_energy(q.to(cov.device), cov, weight)
        rows.append(row)
    return rows


@torch.no_grad()
def logit_drift(
    before: torch.Tensor | Sequence[torch.Tensor],
    after: torch.Tensor | Sequence[torch.Tensor],
    attention_mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> dict[str, float]:
    """How far ``after``'s next-token distributions are from ``before``'s on the same tokens: ``{"max_abs_logit":
    max |Δ logit|, "kl": mean over real tokens of KL(p_before || p_after), "tokens": n}``, in float64.

    ``before`` / ``after`` are logits (batch, seq, vocab), or lists of them (one per batch); ``attention_mask``
    (batch, seq), or a list, marks the real tokens (None: all). E.g. the logits of a quantized base on a few
    batches before ``init_model`` and of the initialized model after: the requantized residual's drift."""
    befores = [before] if isinstance(before, torch.Tensor) else list(before)
    afters = [after] if isinstance(after, torch.Tensor) else list(after)
    masks = ([attention_mask] if isinstance(attention_mask, torch.Tensor) else
             [None] * len(befores) if attention_mask is None else list(attention_mask))
    if not befores or len(afters) != len(befores) or len(masks) != len(befores):
        raise ValueError(f"logit_drift needs as many logits after ({len(afters)}) as before ({len(befores)}), and "
                         f"one attention mask per batch ({len(masks)}), at least one.")
    max_abs, kl_sum, tokens = 0.0, 0.0, 0
    for p, q, mask in zip(befores, afters, masks):
        if p.shape != q.shape:
            raise ValueError(f"Logits before {tuple(p.shape)} and after {tuple(q.shape)} differ in shape: they must "
                             "come from the same batches.")
        p, q = p.detach().to(torch.float64), q.detach().to(device=p.device, dtype=torch.float64)
        keep = (torch.ones(p.shape[:-1], dtype=torch.bool, device=p.device) if mask is None
                else torch.as_tensor(mask, device=p.device).reshape(p.shape[:-1]).bool())
        p, q = p[keep], q[keep]  # (tokens, vocab)
        if not len(p):
            continue
        max_abs = max(max_abs, (p - q).abs().max().item())
        log_p, log_q = torch.log_softmax(p, dim=-1), torch.log_softmax(q, dim=-1)
        kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
        tokens += len(p)
    if not tokens:
        raise ValueError("Every token was masked out (attention_mask all zero): there is nothing to compare.")
    return {"max_abs_logit": max_abs, "kl": kl_sum / tokens, "tokens": tokens}


def summarize_energy(rows: list[dict]) -> dict:
    """``{"overall": {set: mean}, "by_kind": {kind: {set: mean}}}``: mean fractions over modules, all
    and per module kind (e.g. "q_proj"); nan fractions (no energy) are left out of the means."""
    fields = [k for k in (rows[0] if rows else {}) if k not in ROW_KEYS]
    kinds: dict[str, list[dict]] = {}
    for row in rows:
        kinds.setdefault(row["kind"], []).append(row)
    return {"overall": _means(rows, fields), "by_kind": {kind: _means(group, fields) for kind, group in kinds.items()}}


def _named_sets(plus, minus) -> dict[str, CovarianceStats]:
    minus_list = [] if minus is None else [minus] if isinstance(minus, CovarianceStats) else list(minus)
    sets = {"plus": plus}
    sets.update({"minus": minus_list[0]} if len(minus_list) == 1 else
                {f"minus_{i}": m for i, m in enumerate(minus_list)})
    for label, stats in sets.items():
        if not isinstance(stats, CovarianceStats):
            raise TypeError(f"{label} must be CovarianceStats from sclora.collect_covariances, got {type(stats).__name__}.")
    return sets


def _column_basis(b: torch.Tensor) -> torch.Tensor | None:
    """Orthonormal basis of the column space of B (thin SVD, numerical rank), or None when B = 0."""
    u, s, _ = torch.linalg.svd(b, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return None
    rank = int((s > s[0] * max(b.shape) * torch.finfo(b.dtype).eps).sum())
    return u[:, :rank]


def _layer_index(name: str) -> int | None:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def _means(rows: list[dict], fields: list[str]) -> dict[str, float]:
    out = {}
    for key in fields:
        values = [r[key] for r in rows if not math.isnan(r[key])]
        out[key] = sum(values) / len(values) if values else math.nan
    return out
