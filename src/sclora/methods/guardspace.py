"""GuardSpace (arXiv 2510.14301), as its authors' code (github.com/zhangNopainsNogains/GuardSpace: ``build_subspace.py``,
``cordalib/act_aware_utils.py``, ``cordalib/decomposition_Null.py``, ``run.sh``) computes it, from sclora's
statistics.

The authors build every linear layer but the output head from two sets of harmful prompts (``run.sh``: AdvBench for
the decomposition, real-toxicity-prompts for the null space, 520 prompts each, batch size 1):

    C   = (1/n) sum over prompts of X^T X, X the layer's input tokens divided by |max X| (the CorDA hook,
          ``calib_cov_distribution``; sclora's ``normalize="abs_of_max"``), on the decomposition set;
    C'  = C + damp * mean(diag C) * I, damp = 0.01, doubled until ||C' C'^-1 - I||_F < 0.05 (CorDA's damping);
    W C' = U S V^T, V <- C'^-1 V (so W = U S V^T exactly): the covariance-preconditioned SVD;
          the first components (large S: the directions the harmful prompts' activations use) are the
          "safety-relevant" ones and stay in the frozen residual; the LAST r components (U_r, S_r, V_r, the
          "safety-irrelevant" ones; ``run.sh`` passes no ``--first_eigen``) become the adapter,
          B = U_r S_r^(1/2) (``ALinear``), A = S_r^(1/2) V_r^T (``BLinear``), the ``sigma_fuse="UV"`` split;
    N   = the same covariance on the null-space set (``Null_Space_cov_distribution``), symmetrized;
          N = Q diag(e) Q^T (eigh); the null space is the eigenvectors with e <= max(1e-8, 1e-6 * max|e|),
          re-orthonormalized by QR into Q_0, and P = Q_0 Q_0^T (P = 0 where no eigenvalue is that small);
    the layer: y = B A P x + W_res x with W_res = W - U_r S_r V_r^T P, P fixed (``CorDA_adapter_Null``).

So P projects the adapter's INPUT onto the null space of the harmful activations: B A P x_h = 0 for every harmful
input x_h, at initialization and after any update of A and B (nothing is projected per step: the projection is part
of the layer, and A's gradient is the effective one times P). The initial layer is W x exactly.

Here P acts through a torch parametrization of lora_A's weight (``weight = A @ P``, P = Q_0 Q_0^T kept as the
basis Q_0): PEFT, the Trainer, merging and :func:`sclora.export_lora` all see the effective A P. A starts at A0 P
(P is a projector, so (A0 P) P = A0 P): with the authors' raw A0 the model, the gradients and every optimizer step
are the same (without weight decay). PEFT's scaling s = lora_alpha / r is divided out of B and A, so s B A P is
the authors' U_r S_r V_r^T P at any alpha. D- is the harmful data: ``minus=`` one set serves both covariances;
``minus=[decomposition_set, null_space_set]`` gives the authors' two sets.

Differences from the authors' code:

* their training script (``Train.py``) reloads the saved model through ``mapping/modeling_oursvd_llama.py``,
  whose ``CovSVDLinear`` has no ``PLinear``: the saved P is dropped, the reloaded layer is
  (W - U_r S_r V_r^T P + U_r S_r V_r^T) x, not W x, and A and B then train without the projection. sclora builds
  the layer ``decompose_to_adapter_Null`` builds (with P), the method the paper describes; the released
  reload path is not reproduced;
* the decompositions run in ``config.dtype`` (float64 by default; the authors' float32), so which eigenvalues of N
  fall under the threshold can differ where they sit near it;
* the statistics: sclora excludes padding tokens (the authors' batches of one prompt have none) and divides N by the
  null-space set's sample count (the authors divide it by the decomposition set's, ``calib_loader_size``, equal in
  ``run.sh``); only the absolute tolerance 1e-8 sees this scale;
* ``config.target_modules`` chooses the layers (the authors: every ``nn.Linear`` but ``lm_head``: sclora's default);
  ``lora_dropout`` (default 0) acts on x before A, where the authors have none.
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
from ..targets import resolve_targets
from .corda import corda_factors
from .residual import ADAPTER, adapter_layers, build_residual_adapter, check_rank, require_coverage

#: the authors' null-space threshold: eigenvalues <= max(NULL_ATOL, NULL_RTOL * max|eigenvalue|)
NULL_ATOL = 1e-8
NULL_RTOL = 1e-6


class NullSpaceProjection(nn.Module):
    """lora_A's weight seen through GuardSpace's fixed projector: A -> A Q Q^T (Q never trains)."""

    def __init__(self, q: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        q = self.q.to(a.dtype)
        return (a @ q) @ q.T


def null_space_basis(cov: torch.Tensor, dtype=torch.float64, *, atol: float = NULL_ATOL,
                     rtol: float = NULL_RTOL) -> torch.Tensor:
    """Q_0 (d x k, orthonormal): the eigenvectors of the symmetrized covariance whose eigenvalues are at most
    max(atol, rtol * max|eigenvalue|), re-orthonormalized by QR as the authors do; k = 0 where there are none."""
    c = cov.to(dtype)
    c = 0.5 * (c + c.T)
    evals, evecs = torch.linalg.eigh(c)
    threshold = max(atol, rtol * evals.abs().max().item())
    q = evecs[:, evals <= threshold]
    if q.shape[1] == 0:
        return q
    return torch.linalg.qr(q, mode="reduced")[0]


def guardspace_factors(
    weight: torch.Tensor, cov_in: torch.Tensor, null_basis: torch.Tensor, rank: int, scaling: float,
    dtype=torch.float64, *, name: str = "this layer",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, W_res) of GuardSpace for a layer: CorDA's last ``rank`` components of W C' (``cov_in``, the
    decomposition set's input covariance), A already A0 P (the effective one, P = Q_0 Q_0^T), W_res = W - s B A."""
    a, b, _ = corda_factors(weight, cov_in, rank, scaling, "kpa", dtype, name=name)
    q = null_basis.to(device=a.device, dtype=a.dtype)
    a = (a @ q) @ q.T
    return a, b, weight.to(dtype) - scaling * b @ a


def get_guardspace_model(
    model: nn.Module,
    config: SCLoRAConfig,
    stats: CovarianceStats,
    null_stats: CovarianceStats | None = None,
    *,
    check_fingerprint: bool = True,
    show_progress: bool = True,
) -> PeftModel:
    """GuardSpace from input-side statistics of harmful data: ``stats`` for the decomposition, ``null_stats`` (None:
    ``stats``) for the null space (``collect_covariances(..., side="input")``)."""
    targets = resolve_targets(model, config.target_modules)
    check_rank(targets, config.r)  # unsupported layers and ranks before the statistics are bound
    stats = stats.bind(model, check_fingerprint=check_fingerprint)
    null_stats = stats if null_stats is None else null_stats.bind(model, check_fingerprint=check_fingerprint)
    require_coverage(model, config, stats, "D-")
    require_coverage(model, config, null_stats, "D- (null space)")
    for name, linear in targets.items():  # before any layer is rewritten
        require_finite_weight(name, read_weight(linear))

    # Every process finds every layer's null space (under torch.distributed a layer's factors come from one
    # process, but each needs P for its own copy of the layer).
    bases = {name: null_space_basis(null_stats.input_covariance(name), config.torch_dtype) for name in targets}

    def factors(name, weight, scaling):
        return guardspace_factors(weight, stats.input_covariance(name), bases[name], config.r, scaling,
                                  config.torch_dtype, name=repr(name))

    peft_model = build_residual_adapter(model, config, factors, show_progress=show_progress, desc="GuardSpace init")
    for name, layer in adapter_layers(peft_model).items():
        lora_a = layer.lora_A[ADAPTER]
        q = bases[name].to(device=lora_a.weight.device, dtype=torch.float32)
        parametrize.register_parametrization(lora_a, "weight", NullSpaceProjection(q))
    # (the initial adapter build_residual_adapter remembered is already the effective one: A0 was stored as A0 P)
    empty = [name for name, q in bases.items() if q.shape[1] == 0]
    if empty:
        warnings.warn(
            f"In {len(empty)} module(s), e.g. {empty[0]!r}, the harmful activations span every input direction (no "
            f"eigenvalue of their covariance is <= max({NULL_ATOL:g}, {NULL_RTOL:g} x the largest)), so P = 0 there "
            "and the adapter cannot change those layers, as in the authors' code. Use fewer / shorter null-space "
            "samples to leave the adapter room.",
            stacklevel=2,
        )
    return peft_model


def null_space_bases(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """Each GuardSpace layer's null-space basis Q_0 (P = Q_0 Q_0^T acts on the adapter's input)."""
    out = {}
    for name, layer in adapter_layers(peft_model).items():
        lora_a = layer.lora_A[ADAPTER]
        if parametrize.is_parametrized(lora_a, "weight"):
            out[name] = lora_a.parametrizations.weight[0].q
    return out
