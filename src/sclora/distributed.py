"""Several processes (``torchrun``, ``accelerate launch``): the few torch.distributed helpers sclora uses.

Everything here is trivial in a single process: ``rank() == 0``, ``world_size() == 1``, ``shard`` returns
the items, the reductions return their input. sclora counts as distributed when a default process group
exists (``torch.distributed`` is available and initialized); :func:`init_from_env` creates one from the
variables ``torchrun`` / ``accelerate launch`` set.

* Statistics: each rank passes its own shard of the data (``shard(examples)``) to
  :func:`sclora.collect_covariances`, which all-reduces the raw sums and counts before anything is
  normalized, so every rank ends with the statistics of the union of the shards.
* Residual inits (SC-LoRA, CorDA): module ``i`` is decomposed on rank ``i % world_size`` and its
  (A, B, W_res) broadcast from there, so every rank holds bit-identical adapters.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "all_reduce_sums",
    "all_true",
    "barrier",
    "broadcast_object",
    "broadcast_tensors",
    "device",
    "fail_together",
    "full_parameters",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "local_rank",
    "rank",
    "shard",
    "world_size",
]


def is_distributed() -> bool:
    """True when a default torch.distributed process group exists (even one of a single process)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``, set by torchrun / accelerate); 0 if unset."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0: the one process that writes result files, exports and prints."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(items: Sequence, rank: int | None = None, world_size: int | None = None) -> list:
    """This rank's strided share ``items[rank::world_size]`` of a list (all of it in a single process).

    Shards of all ranks are disjoint and cover ``items``; they differ in length by at most one. Use it on
    the examples (or batches) for the statistics: ``collect_covariances(model, batches_of(shard(examples)))``.
    """
    if rank is None:
        rank = dist.get_rank() if is_distributed() else 0
    if world_size is None:
        world_size = dist.get_world_size() if is_distributed() else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard needs 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    return list(items)[rank::world_size]


def init_from_env(timeout_minutes: float = 30.0) -> bool:
    """Create the default process group from the variables torchrun / accelerate launch set (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Returns True if it created one; nothing
    happens in a plain single process or when a group exists already.

    On GPUs each process takes ``cuda:LOCAL_RANK`` and the group carries CUDA tensors with NCCL and CPU
    tensors with gloo (as accelerate does for FSDP full state dicts); on CPUs it is gloo."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return True


def device() -> torch.device:
    """Where this rank's model should live: ``cuda:LOCAL_RANK`` on GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device() if is_distributed() else 0)
    return torch.device("cpu")


# --- collectives -----------------------------------------------------------------------------------


def _carrier(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if the process group can carry it where it lies, else a contiguous copy on a
    device it can (a CPU tensor under a pure NCCL group goes through the current GPU)."""
    backend = str(dist.get_backend()).lower()
    if tensor.device.type == "cpu" and "gloo" not in backend and "mpi" not in backend:
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _reduce_scalars(values: Sequence[int], op) -> list[int]:
    buf = _carrier(torch.tensor(list(values), dtype=torch.int64))
    dist.all_reduce(buf, op=op)
    return [int(v) for v in buf.cpu()]


def all_true(flag: bool) -> bool:
    """Collective: True only if ``flag`` is true on every rank (every rank must call it)."""
    if not is_distributed():
        return bool(flag)
    return bool(_reduce_scalars([int(bool(flag))], dist.ReduceOp.MIN)[0])


def fail_together(error: BaseException | None, what: str = "the step") -> None:
    """Collective: if any rank caught an error, raise on every rank instead of leaving the others waiting
    in the next collective. The failing rank re-raises its own error; the others a RuntimeError."""
    if all_true(error is None):
        return
    if error is not None:
        raise error
    raise RuntimeError(f"{what} failed on another rank (see its error); stopping this one too.")


def all_reduce_sums(sums: dict[str, torch.Tensor], *counts: int) -> tuple[int, ...]:
    """Collective: sum each tensor of ``sums`` in place over all ranks (in its own dtype, e.g. the float32 /
    float64 accumulators of the statistics) and return the summed ``counts``. Every rank must pass the same
    keys with the same shapes and dtypes, in the same order (checked)."""
    if not is_distributed():
        return tuple(int(c) for c in counts)
    layout = repr([(k, tuple(v.shape), str(v.dtype)) for k, v in sums.items()]).encode()
    digest = int.from_bytes(hashlib.sha256(layout).digest()[:7], "big")
    low, high = _reduce_scalars([digest, -digest], dist.ReduceOp.MIN)
    if low != -high:
        raise RuntimeError(
            "The ranks hold different statistics layouts (module names, shapes or dtypes): they did not load the "
            "same model or target_modules. Every rank must collect on the same model with the same settings."
        )
    for tensor in sums.values():
        buf = _carrier(tensor)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if buf is not tensor:
            tensor.copy_(buf)
    return tuple(_reduce_scalars(counts, dist.ReduceOp.SUM)) if counts else ()


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int) -> None:
    """Collective: overwrite ``tensors`` in place on every rank with rank ``src``'s (same shapes and dtypes
    everywhere)."""
    if not is_distributed():
        return
    for tensor in tensors:
        buf = _carrier(tensor)
        dist.broadcast(buf, src=src)
        if buf is not tensor:
            tensor.copy_(buf)


def broadcast_object(obj, src: int = 0):
    """Collective: rank ``src``'s picklable ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --- FSDP ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def full_parameters(model: nn.Module, rank0_only: bool = True) -> Iterator[None]:
    """Inside, the FSDP-sharded parameters of ``model`` are whole (on rank 0 only with ``rank0_only``), e.g.
    to export the adapter after an FSDP run; without FSDP it does nothing. Every rank must enter it.

    It unshards the FSDP units inside ``model`` (the decoder layers under auto-wrap, which hold every LoRA
    weight) and, after :func:`sclora.train`, the root unit around it."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - torch without distributed support
        yield
        return
    root = getattr(model, "_sclora_fsdp_root", None)
    target = root if root is not None else model
    if not any(isinstance(m, FSDP) for m in target.modules()):
        yield
        return
    # Offloading gathers GPU weights into CPU memory (rank 0 only); for weights on the CPU already it is not needed.
    offload = rank0_only and any(p.device.type != "cpu" for p in target.parameters())
    with FSDP.summon_full_params(target, writeback=False, rank0_only=rank0_only, offload_to_cpu=offload):
        yield
