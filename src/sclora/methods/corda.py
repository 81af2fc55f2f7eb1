"""CorDA (Yang et al., 2024), as PEFT implements it but from sclora's batched statistics:
SVD of W0 C (C the damped input covariance), W0 = U S V'^T with V' = (V^T C^-1)^T; IPA adapts the
first r components (fine-tuning data), KPA the last r (knowledge to preserve)."""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import nn

from ..config import SCLoRAConfig
from ..layers import read_weight
from ..statistics import CovarianceStats, require_finite_weight
from ..targets import resolve_targets
from .residual import build_residual_adapter, check_rank, require_coverage

MODES = ("ipa", "kpa")
#: the damping doubles at most this often (0.01 -> 0.01 * 2**30 of mean(diag C)) before CorDA gives up
MAX_DAMPING_DOUBLINGS = 30


def corda_factors(
    weight: torch.Tensor, cov_in: torch.Tensor, rank: int, scaling: float, mode: str, dtype=torch.float64,
    *, name: str = "this layer",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, W_res) of CorDA for a layer (``name``, for error messages) with input covariance ``cov_in``."""
    if mode not in MODES:
        raise ValueError(f"CorDA mode must be one of {MODES}, got {mode!r}.")
    if not torch.isfinite(cov_in).all():
        raise ValueError(f"The input covariance of {name} is non-finite (NaN or inf): the statistics are damaged. "
                         "Collect them again (in float32, or with normalize='max_abs').")
    if not torch.isfinite(weight).all():
        raise ValueError(f"The weight of {name} holds NaN or inf values, so its adapter would be NaN. The "
                         "checkpoint is damaged: load an intact one.")
    w, c = weight.to(dtype), cov_in.to(dtype)
    eye = torch.eye(c.shape[0], dtype=dtype, device=c.device)
    damp = 0.01  # PEFT's schedule: add a multiple of mean(diag C) until C inverts accurately
    for _ in range(MAX_DAMPING_DOUBLINGS + 1):
        c_fix = c + eye * c.diagonal().mean() * damp
        try:
            c_inv = torch.linalg.inv(c_fix)
        except torch.linalg.LinAlgError:  # exactly singular, e.g. C = 0, where damping adds nothing
            c_inv = None
        if c_inv is not None and torch.dist(c_fix @ c_inv, eye) < 0.05:
            break
        damp *= 2
    else:
        raise ValueError(
            f"The input covariance of {name} cannot be inverted accurately even when damped by 0.01 * 2**"
            f"{MAX_DAMPING_DOUBLINGS} x mean(diag C) (mean(diag C) = {c.diagonal().mean().item():g}): no activation "
            "reached the layer, or the statistics are degenerate. Collect them on more / other data, or leave the "
            "module out of target_modules."
        )
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
    targets = resolve_targets(model, config.target_modules)
    check_rank(targets, config.r)  # unsupported layers and ranks before the statistics are bound
    stats = stats.bind(model, check_fingerprint=check_fingerprint)
    require_coverage(model, config, stats, "D+" if mode == "ipa" else "D-")
    for name, linear in targets.items():  # before any layer is rewritten
        require_finite_weight(name, read_weight(linear))

    def factors(name, weight, scaling):
        return corda_factors(weight, stats.input_covariance(name), config.r, scaling, mode, config.torch_dtype,
                             name=repr(name))

    return build_residual_adapter(model, config, factors, show_progress=show_progress, desc=f"CorDA {mode.upper()} init")
