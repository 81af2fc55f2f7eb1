"""SaLoRA (Li et al., ICLR 2025, "Safety-alignment preserved low-rank adaptation"), as its authors' code
(github.com/homles11/SaLoRA, ``lora_train_act.py`` / ``process_lora.py``) computes it, from sclora's statistics.

For a layer h = W x, with D- the safety data (harmful requests answered with refusals) and D+ the task data:

    U_s = the top r_s eigenvectors of D-'s output covariance (the top right singular vectors of the
          safety output features W X_s, as the authors take them),
    C   = I - U_s U_s^T, the fixed safety module: the adapter's output is C B A x, so U_s^T h = U_s^T W x
          for every input x, at initialization and after any training of A and B;
    U_t = the top r_t eigenvectors of D+'s output covariance (task-specific initialization),
    W   = U S V^T, B0 = U_t U_t^T U_r S_r^(1/2), A0 = S_r^(1/2) V_r^T,
    W_res = W - s C B0 A0, so the initial model is the base model.

C acts through a torch parametrization of lora_B's weight (``weight = C @ B``): PEFT, the Trainer, merging
and :func:`sclora.export_lora` all see the effective C B. B starts at C B0 (C is a projector, so C (C B0) = C B0):
with the authors' raw B0 the model, the gradients and every optimizer step are the same (without weight decay).

Differences from the authors' code, both shared by every method in sclora's comparisons: the statistics count
every token of a sample (the authors record only the response tokens), and the decompositions are exact
(float64 eigh / SVD, where the authors use ``torch.svd_lowrank`` with 30 iterations). Eigenvectors do not
depend on a covariance's scale, so ``normalize="trace"`` gives the same SaLoRA as ``"none"``.
"""

from __future__ import annotations

import warnings

import torch
from peft import PeftModel
from torch import nn
from torch.nn.utils import parametrize

from ..config import SCLoRAConfig
from ..layers import read_weight
from ..statistics import CovarianceStats, require_finite_weight
from ..subspace import NonUniqueSubspaceWarning, sc_subspace
from ..targets import resolve_targets
from .residual import ADAPTER, adapter_layers, build_residual_adapter, check_rank, require_coverage


class SafetyProjection(nn.Module):
    """lora_B's weight seen through SaLoRA's fixed safety module: B -> (I - U U^T) B (U never trains)."""

    def __init__(self, u: torch.Tensor):
        super().__init__()
        self.register_buffer("u", u)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        u = self.u.to(b.dtype)
        return b - u @ (u.T @ b)


def top_directions(cov: torch.Tensor, k: int, *, weight: torch.Tensor | None = None, dtype=torch.float64,
                   solver: str = "eigh") -> torch.Tensor:
    """The top ``k`` eigenvectors (d_out x k) of an output covariance (or of W cov W^T given input-side ``cov``)."""
    return sc_subspace(cov, cov, 0.0, k, weight=weight, dtype=dtype, solver=solver)


def salora_factors(weight: torch.Tensor, u_safety: torch.Tensor, u_task: torch.Tensor, rank: int, scaling: float,
                   dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, W_res) of SaLoRA for a layer, given the orthonormal safety and task directions (d_out x r_s, x r_t).
    B is already C B0, the effective one; s B A = C U_t U_t^T U_r S_r V_r^T and W_res = W - s B A."""
    w = weight.to(dtype)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank] / scaling, vh[:rank]
    ut, us = u_task.to(dtype), u_safety.to(dtype)
    b = ut @ (ut.T @ (u * s.sqrt()))
    b = b - us @ (us.T @ b)
    a = vh * s.sqrt()[:, None]
    return a, b, w - scaling * b @ a


def get_salora_model(
    model: nn.Module,
    config: SCLoRAConfig,
    plus_stats: CovarianceStats,
    minus_stats: CovarianceStats,
    *,
    check_fingerprint: bool = True,
    show_progress: bool = True,
) -> PeftModel:
    """SaLoRA from D+ (task) and D- (safety) statistics, output- or input-side (any normalization without
    per-sample scaling gives the authors' directions)."""
    targets = resolve_targets(model, config.target_modules)
    check_rank(targets, config.r)  # unsupported layers and ranks before the statistics are bound
    plus = plus_stats.bind(model, check_fingerprint=check_fingerprint)
    minus = minus_stats.bind(model, check_fingerprint=check_fingerprint)
    require_coverage(model, config, plus, "D+")
    require_coverage(model, config, minus, "D-")
    for name, linear in targets.items():  # before any layer is rewritten
        require_finite_weight(name, read_weight(linear))

    tied: dict[str, list[str]] = {"safety": [], "task": []}

    def directions(stats: CovarianceStats, name: str, weight: torch.Tensor, k: int, which: str) -> torch.Tensor:
        cov, w = stats.factor(name, weight)  # w: None for output-side statistics, else the layer's W0
        k = min(k, weight.shape[0] if w is None else min(w.shape))  # a module cannot offer more directions than its rank
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NonUniqueSubspaceWarning)
            u = top_directions(cov, k, weight=w, dtype=config.torch_dtype, solver=config.eigen_solver)
        if any(issubclass(c.category, NonUniqueSubspaceWarning) for c in caught):
            tied[which].append(name)
        return u

    # Every process finds every layer's safety directions (under torch.distributed a layer's factors come from
    # one process, but each needs C for its own copy of the layer).
    safety = {name: directions(minus, name, read_weight(linear), config.salora_safety_rank, "safety")
              for name, linear in targets.items()}

    def factors(name, weight, scaling):
        u_t = directions(plus, name, weight, config.salora_task_rank, "task")
        return salora_factors(weight, safety[name], u_t, config.r, scaling, config.torch_dtype)

    peft_model = build_residual_adapter(model, config, factors, show_progress=show_progress, desc="SaLoRA init")
    for name, layer in adapter_layers(peft_model).items():
        lora_b = layer.lora_B[ADAPTER]
        u = safety[name].to(device=lora_b.weight.device, dtype=torch.float32)
        parametrize.register_parametrization(lora_b, "weight", SafetyProjection(u))
    # (the initial adapter build_residual_adapter remembered is already the effective one: B0 was stored as C B0)
    for which, names in tied.items():
        if names:
            field = f"salora_{which}_rank"
            warnings.warn(
                f"In {len(names)} module(s), e.g. {names[0]!r}, the {'D-' if which == 'safety' else 'D+'} data has fewer "
                f"than {field}={getattr(config, field)} output directions with distinct energy, so SaLoRA's last "
                f"{which} directions are an arbitrary pick among equal (usually zero-energy) ones. Use more / longer "
                f"samples or a smaller {field}.",
                NonUniqueSubspaceWarning,
                stacklevel=2,
            )
    return peft_model


def safety_directions(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """Each SaLoRA layer's fixed safety directions U_s (the columns C removes)."""
    out = {}
    for name, layer in adapter_layers(peft_model).items():
        lora_b = layer.lora_B[ADAPTER]
        if parametrize.is_parametrized(lora_b, "weight"):
            out[name] = lora_b.parametrizations.weight[0].u
    return out
