"""CorDA (Yang et al., 2024), as PEFT implements it but from sclora's batched statistics:
SVD of W0 C (C the damped input covariance), W0 = U S V'^T with V' = (V^T C^-1)^T; IPA adapts the
first r components (fine-tuning data), KPA the last r (knowledge to preserve)."""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import nn

from ..config import SCLoRAConfig
from ..statistics import CovarianceStats
from .residual import build_residual_adapter, require_coverage

MODES = ("ipa", "kpa")


def corda_factors(
    weight: torch.Tensor, cov_in: torch.Tensor, rank: int, scaling: float, mode: str, dtype=torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, W_res) of CorDA for a layer with input covariance ``cov_in``."""
    if mode not in MODES:
        raise ValueError(f"CorDA mode must be one of {MODES}, got {mode!r}.")
    w, c = weight.to(dtype), cov_in.to(dtype)
    eye = torch.eye(c.shape[0], dtype=dtype, device=c.device)
    damp = 0.01  # PEFT's schedule: add a multiple of mean(diag C) until C inverts accurately
    while True:
        c_fix = c + eye * c.diagonal().mean() * damp
        c_inv = torch.linalg.inv(c_fix)
        if torch.dist(c_fix @ c_inv, eye) < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(w @ c_fix, full_matrices=False)
    v = (vh @ c_inv).T
    keep = slice(0, rank) if mode == "ipa" else slice(s.numel() - rank, s.numel())
    u, s, v = u[:, keep], s[keep] / scaling, v[:, keep]
    a = v.T * s.sqrt()[:, None]
    b = u * s.sqrt()
    return a, b, w - scaling * b @ a


def get_corda_model(
    model: nn.Module,
    config: SCLoRAConfig,
    stats: CovarianceStats,
    mode: str,
    *,
    check_fingerprint: bool = True,
    show_progress: bool = True,
) -> PeftModel:
    """CorDA IPA (``stats`` of D+) or KPA (``stats`` of D-); ``stats`` must hold input covariances
    (``collect_covariances(..., side="input")``)."""
    stats = stats.bind(model, check_fingerprint=check_fingerprint)
    require_coverage(model, config, stats, "D+" if mode == "ipa" else "D-")

    def factors(name, weight, scaling):
        return corda_factors(weight, stats.input_covariance(name), config.r, scaling, mode, config.torch_dtype)

    return build_residual_adapter(model, config, factors, show_progress=show_progress, desc=f"CorDA {mode.upper()} init")
