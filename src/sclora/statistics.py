"""Activation covariances of a model's linear layers (Algorithm 1, steps 1-4).

``collect_covariances`` runs the model over batches and returns, for each target linear layer (``nn.Linear``,
transformers' ``Conv1D``, bitsandbytes' 4-bit / 8-bit layers: :mod:`sclora.layers`),
Cov = (1/B) sum_samples sum_tokens h h^T of its output h (padding excluded). Two savings keep
it cheap, both exact:

* A bias-free layer with d_in < d_out (gate/up projections) has Cov_out = W Cov_in W^T, so the
  smaller d_in x d_in input statistic is accumulated instead and the output one derived on demand.
* Layers that read the very same input tensor (q/k/v; gate/up) share one input statistic.

Each sum is symmetric, so only its block upper triangle is computed and stored: the row strips of
:func:`add_gram_upper`, packed one after the other in a flat buffer ("staircase", :func:`unpack_gram`
rebuilds the d x d matrix when a module is used). At the default strip widths that is 58% of the full
matrix at d = 576, in memory and on disk.

The result, :class:`CovarianceStats`, saves to safetensors so that a beta sweep never runs the
model again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from itertools import chain

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .fileio import atomic_path
from .layers import check_supported, layer_dims, read_weight, without_cpu_repacking
from .memory import release_freed_memory
from .targets import find_linear_modules, resolve_targets

__all__ = ["CovarianceStats", "FileSums", "ModuleStat", "collect_covariances", "find_linear_modules", "model_fingerprint",
           "unpack_gram"]

NORMALIZATIONS = ("none", "max_abs", "abs_of_max", "trace")
#: normalizations applied at read time: their stored sums are the same, so they convert freely
RAW_SUM_NORMALIZATIONS = ("none", "trace")
#: normalizations that scale each sample while collecting: "max_abs" by 1 / max|x|, "abs_of_max" by 1 / |max x|
#: (the CorDA authors' and PEFT's ``input / torch.max(input).abs()``)
PER_SAMPLE_NORMALIZATIONS = ("max_abs", "abs_of_max")
SIDES = ("output", "input")
#: 2: the sums stored as packed staircases (header "strips": key -> strip width); 1: full d x d matrices (still read)
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
_PROBES_PER_MODULE = 8


@dataclass(frozen=True)
class ModuleStat:
    """Where the statistic of one module lives: ``key`` names the accumulated matrix, ``side`` says
    whether it is the module's input (d_in x d_in) or output (d_out x d_out) second moment."""

    key: str
    side: str
    d_in: int
    d_out: int


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class FileSums(Mapping):
    """The stored matrices of a statistics file, read from it one at a time on access instead of held in memory
    (:meth:`CovarianceStats.offload`, ``CovarianceStats.load(..., lazy=True)``). The file stays open, so replacing
    or deleting it afterwards does not change what these statistics read. Read with ``os.pread`` into a fresh
    tensor rather than through safetensors' memory map: mapped pages count in the process's resident memory
    (measured on SmolLM2's init: docs/performance.md), copies are freed as soon as a module is done."""

    def __init__(self, path: str, device: str = "cpu"):
        self.path, self.device = path, device
        self._fd = os.open(path, os.O_RDONLY)
        try:
            (length,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, length, 8))
        except Exception:
            os.close(self._fd)
            raise
        header.pop("__metadata__", None)
        self._start = 8 + length
        self._entries = {k: (_SAFETENSORS_DTYPES[v["dtype"]], tuple(v["shape"]), tuple(v["data_offsets"]))
                         for k, v in header.items()}

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __getitem__(self, key: str) -> torch.Tensor:
        dtype, shape, (begin, end) = self._entries[key]
        data = bytearray(end - begin)
        if os.preadv(self._fd, [data], self._start + begin) != len(data):
            raise ValueError(f"{self.path} ended before the tensor {key!r}: the file is truncated.")
        return torch.frombuffer(data, dtype=dtype).reshape(shape).to(self.device)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class CovarianceStats(Mapping):
    """Second-moment statistics of many modules, collected over one data set.

    ``stats[name]`` is the OUTPUT covariance (d_out x d_out) of the module ``name`` (as in
    ``model.named_modules()``), normalized as requested at collection. Input-side statistics
    need the module weight to produce it; stats returned by :func:`collect_covariances` are bound
    to their model, loaded ones are bound with :meth:`bind`.
    """

    def __init__(
        self,
        sums: dict[str, torch.Tensor],
        modules: dict[str, ModuleStat],
        *,
        n_samples: int,
        n_tokens: int,
        normalize: str,
        side: str,
        fingerprint: dict,
        strips: dict[str, int] | None = None,
    ):
        self.sums = sums  # key -> stored sum: packed staircase (1-D) where ``strips`` names a width, else d x d
        self.strips = dict(strips or {})
        self.modules = modules
        self.dims = {m.key: m.d_in if m.side == "input" else m.d_out for m in modules.values()}  # key -> d of its sum
        self.n_samples = n_samples
        self.n_tokens = n_tokens
        self.normalize = normalize
        self.side = side
        self.fingerprint = fingerprint
        self._bound: dict[str, nn.Module] = {}
        self._bound_probes: dict[str, list[float]] = {}

    # --- Mapping interface: name -> output covariance -------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        cov, weight = self.factor(name)
        return cov if weight is None else weight @ cov @ weight.T

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def __contains__(self, name: object) -> bool:
        return name in self.modules

    def __repr__(self) -> str:
        n_input = sum(m.side == "input" for m in self.modules.values())
        return (
            f"CovarianceStats({len(self)} modules, {len(self.sums)} stored matrices ({n_input} modules "
            f"input-side), samples={self.n_samples}, tokens={self.n_tokens}, normalize={self.normalize!r})"
        )

    # --- views ---------------------------------------------------------------------------------
    def factor(self, name: str, weight: torch.Tensor | None = None, *,
               check_probes: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cov, weight): the output covariance is ``cov`` if weight is None, else weight @ cov @ weight.T.

        This is the form :func:`sclora.sc_subspace` takes, so input-side statistics never need a
        d_out x d_out matrix. ``weight`` gives the module's original W0 explicitly instead of the bound
        one (e.g. W_res + scaling * B A after a residual init); it must match the collection fingerprint
        (``check_probes=False``: its shape only, for a W0 rebuilt only up to a quantization error).
        """
        info = self._info(name)
        if weight is not None:
            self._check_weight(name, info, weight, check_probes)
        cov = self.matrix(info.key) / self.n_samples
        if info.side == "output":
            weight = None
        else:
            weight = (self._bound_weight(name) if weight is None else weight.detach()).to(cov.device, cov.dtype)
            require_finite_weight(name, weight)
        if self.normalize == "trace":
            trace = cov.trace() if weight is None else ((weight @ cov) * weight).sum()
            cov = cov / trace.clamp_min(torch.finfo(cov.dtype).tiny)
        return cov, weight

    def matrix(self, key: str) -> torch.Tensor:
        """The raw d x d sum stored under ``key`` (a ``ModuleStat.key``), unpacked from its staircase: exactly
        symmetric, not divided by the sample count."""
        stored = self.sums[key]
        strip = self.strips.get(key)
        return stored if strip is None else unpack_gram(stored, self.dims[key], strip)

    def input_covariance(self, name: str) -> torch.Tensor:
        """(1/B) sum x x^T of the module's input (d_in x d_in); needs ``side="input"`` collection
        or a module whose input side was stored."""
        info = self._info(name)
        if info.side != "input":
            raise ValueError(
                f"The statistics of {name!r} were stored on the output side; collect them with "
                "collect_covariances(..., side='input') to get input covariances (CorDA needs these)."
            )
        cov = self.matrix(info.key) / self.n_samples
        if self.normalize == "trace":
            cov = cov / cov.trace().clamp_min(torch.finfo(cov.dtype).tiny)
        return cov

    # --- model binding -------------------------------------------------------------------------
    def bind(self, model: nn.Module, *, check_fingerprint: bool = True) -> CovarianceStats:
        """Check that ``model`` is the model these statistics were collected on and keep references
        to the weights that input-side statistics need. Returns self."""
        linears = dict(find_linear_modules(model))
        missing = [n for n in self.modules if n not in linears]
        if missing:
            raise ValueError(
                f"The statistics cover {len(missing)} module(s) this model does not have as linear layers, "
                f"e.g. {missing[0]!r}. They were collected on another model; recollect them on this one."
            )
        for name, info in self.modules.items():
            d_in, d_out = layer_dims(linears[name])
            if (d_out, d_in) != (info.d_out, info.d_in):
                raise ValueError(
                    f"Module {name!r} has weight shape {(d_out, d_in)} (out, in) here but {(info.d_out, info.d_in)} "
                    "in the statistics: they come from another model. Recollect them on this model."
                )
        if check_fingerprint:
            theirs = self.fingerprint
            ours = model_fingerprint(model, list(self.modules))
            if theirs.get("config") != ours["config"]:
                raise ValueError(
                    "These statistics were collected on a model with a different configuration "
                    f"(config fingerprint {theirs.get('config')} here {ours['config']}). Recollect them on "
                    "this model, or pass check_fingerprint=False if you know they match."
                )
            for name in self.modules:
                if _probes_differ(theirs["probes"][name], ours["probes"][name]):
                    raise ValueError(
                        f"The weights of {name!r} differ from those the statistics were collected on. Either "
                        "they come from another checkpoint, or this model was already initialized with an "
                        "adapter (its base weights were replaced by residuals). Load the untouched model, or "
                        "recollect the statistics; pass check_fingerprint=False to override."
                    )
        # Keep the modules, not their weights: no copy stays alive, and a weight that changes later
        # (e.g. replaced by an SC-LoRA residual) is caught by its probe instead of silently used.
        self._bound = {n: linears[n] for n, info in self.modules.items() if info.side == "input"}
        self._bound_probes = model_fingerprint(model, list(self._bound))["probes"]
        return self

    def _bound_weight(self, name: str) -> torch.Tensor:
        if name not in self._bound:
            raise ValueError(
                f"The statistics of {name!r} are stored on the input side; the output covariance needs the "
                "module weight. Call stats.bind(model) with the model they were collected on."
            )
        weight = read_weight(self._bound[name])
        if _probe(weight) != self._bound_probes[name]:
            raise ValueError(
                f"The weight of {name!r} changed since these statistics were bound to it (was the model "
                "initialized with an adapter since?). Bind them to the untouched model: stats.bind(model)."
            )
        return weight

    def _check_weight(self, name: str, info: ModuleStat, weight: torch.Tensor, check_probes: bool = True) -> None:
        if tuple(weight.shape) != (info.d_out, info.d_in):
            raise ValueError(
                f"The weight given for {name!r} has shape {tuple(weight.shape)} but the statistics were collected "
                f"on a {(info.d_out, info.d_in)} module: they come from another model."
            )
        probes = self.fingerprint.get("probes", {}) if check_probes else {}
        if name in probes and _probes_differ(probes[name], _probe(weight)):
            raise ValueError(
                f"The weight given for {name!r} differs from the one the statistics were collected on: they "
                "come from another model or checkpoint. Recollect them on this model."
            )

    def _info(self, name: str) -> ModuleStat:
        if name not in self.modules:
            sample = ", ".join(list(self.modules)[:3])
            raise KeyError(f"No statistics for module {name!r}; these stats cover e.g. {sample}.")
        return self.modules[name]

    def with_normalize(self, normalize: str) -> CovarianceStats:
        """The same statistics read with another normalization, without a new pass over the data: "none"
        and "trace" store the same raw sums ("trace" divides at read time). "max_abs" and "abs_of_max" scale each
        sample during collection, so they cannot be converted to or from."""
        if normalize == self.normalize:
            return self
        if {normalize, self.normalize} - set(RAW_SUM_NORMALIZATIONS):
            raise ValueError(f"Statistics collected with normalize={self.normalize!r} cannot be read as "
                             f"{normalize!r}: {sorted(PER_SAMPLE_NORMALIZATIONS)} scale each sample during "
                             "collection. Collect them again.")
        other = CovarianceStats(self.sums, self.modules, n_samples=self.n_samples, n_tokens=self.n_tokens,
                                normalize=normalize, side=self.side, fingerprint=self.fingerprint,
                                strips=self.strips)
        other._bound, other._bound_probes = dict(self._bound), dict(self._bound_probes)
        return other

    # --- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (tensors + a JSON header in its metadata), atomically."""
        header = {
            "format": FORMAT_VERSION,
            "n_samples": self.n_samples,
            "n_tokens": self.n_tokens,
            "normalize": self.normalize,
            "side": self.side,
            "fingerprint": self.fingerprint,
            "modules": {n: asdict(m) for n, m in self.modules.items()},
            "strips": self.strips,
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.sums.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"sclora": json.dumps(header)})

    def offload(self, path: str | os.PathLike) -> CovarianceStats:
        """Write these statistics to ``path`` (:meth:`save`) and from then on read each stored matrix from it when
        used, freeing their memory: collect D+, offload it, then collect D- with only one set resident (the
        statistics of a 7B model are GBs per set). Returns self, still bound to its model."""
        self.save(path)
        self.sums = FileSums(os.fspath(path), device=_device_of(self.sums))
        return self

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None, device: str = "cpu",
             lazy: bool = False) -> CovarianceStats:
        """Read statistics written by :meth:`save`; with ``model`` they are also bound to it. ``lazy=True``
        leaves the matrices in the file and reads each when used (:class:`FileSums`): memory for one at a time.

        A file that is truncated, corrupt, inconsistent (missing tensors, wrong shapes, a broken header)
        or holds NaN / inf raises a ValueError naming it, before anything uses the statistics (a lazy load
        checks every matrix once, one at a time)."""
        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt", device=device) as f:
                meta = f.metadata() or {}
                sums = ({} if "sclora" not in meta else FileSums(path, device) if lazy
                        else {k: f.get_tensor(k) for k in f.keys()})
        except FileNotFoundError:
            raise
        except Exception as err:  # safetensors' errors do not name the file
            raise ValueError(
                f"{path} cannot be read as statistics ({type(err).__name__}: {err}); it is truncated or corrupt "
                "(e.g. an interrupted copy). Delete it and collect the statistics again."
            ) from err
        if "sclora" not in meta:
            raise ValueError(f"{path} is a safetensors file but not sclora statistics (no 'sclora' header).")
        try:
            header = json.loads(meta["sclora"])
        except ValueError as err:
            raise ValueError(f"{path} has a corrupt statistics header ({err}). Delete it and collect the "
                             "statistics again.") from err
        if not isinstance(header, dict) or header.get("format") not in READABLE_FORMATS:
            found = header.get("format") if isinstance(header, dict) else None
            raise ValueError(f"{path} has statistics format {found}, expected one of {READABLE_FORMATS}: another "
                             "sclora version wrote it. Collect the statistics again.")
        cls._validate(path, header, sums)
        stats = cls(
            sums,
            {n: ModuleStat(**m) for n, m in header["modules"].items()},
            n_samples=header["n_samples"],
            n_tokens=header["n_tokens"],
            normalize=header["normalize"],
            side=header["side"],
            fingerprint=header["fingerprint"],
            strips=header.get("strips", {}),  # format 1 stored full matrices
        )
        return stats.bind(model) if model is not None else stats

    @staticmethod
    def _validate(path: str, header: dict, sums: dict[str, torch.Tensor]) -> None:
        """Check a loaded header against its tensors: counts, choices, every module's matrix present with
        the shape of its side, every value finite. Raises a ValueError naming ``path`` and the problem."""

        def bad(problem: str) -> ValueError:
            return ValueError(f"{path}: {problem}. The statistics file is corrupt or inconsistent; delete it "
                              "and collect the statistics again.")

        missing = [k for k in ("n_samples", "n_tokens", "normalize", "side", "fingerprint", "modules")
                   if k not in header]
        if missing:
            raise bad(f"the header lacks the field(s) {missing}")
        for key in ("n_samples", "n_tokens"):
            count = header[key]
            if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
                raise bad(f"{key} is {count!r}, not a positive integer")
        for key, allowed in (("normalize", NORMALIZATIONS), ("side", SIDES)):
            if header[key] not in allowed:
                raise bad(f"{key} is {header[key]!r}, not one of {allowed}")
        modules, fingerprint = header["modules"], header["fingerprint"]
        if not isinstance(modules, dict) or not modules:
            raise bad("the header lists no modules")
        if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("probes"), dict):
            raise bad("the header has no model fingerprint")
        strips = header.get("strips", {})  # format 1 has none: full matrices
        if not isinstance(strips, dict) or not all(
                isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in strips.values()):
            raise bad(f"the strip widths {strips!r} are not positive integers")
        # One read of each matrix (a lazy file holds one at a time): its shape, and whether it is finite floats.
        shapes, unusable = {}, []
        for key in sums:  # noqa: PLC0206 -- not .items(): a lazy file is read one matrix at a time
            tensor = sums[key]
            shapes[key] = tuple(tensor.shape)
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                unusable.append(key)
        fields = {"key", "side", "d_in", "d_out"}
        for name, m in modules.items():
            if not isinstance(m, dict) or set(m) != fields:
                raise bad(f"module {name!r} has the entry {m!r}, expected the fields {sorted(fields)}")
            if m["side"] not in SIDES or (header["side"] == "input" and m["side"] != "input"):
                raise bad(f"module {name!r} has side {m['side']!r} in statistics collected with "
                          f"side={header['side']!r}")
            dims = (m["d_in"], m["d_out"])
            if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
                raise bad(f"module {name!r} has dimensions d_in, d_out = {dims}")
            if m["key"] not in shapes:
                raise bad(f"the tensor {m['key']!r} of module {name!r} is missing")
            d = m["d_in"] if m["side"] == "input" else m["d_out"]
            shape = shapes[m["key"]]
            expected = (d, d) if m["key"] not in strips else (staircase_size(d, strips[m["key"]]),)
            if shape != expected:
                raise bad(f"the {m['side']}-side tensor {m['key']!r} of module {name!r} has shape {shape}, "
                          f"expected {expected}")
            if name not in fingerprint["probes"]:
                raise bad(f"the model fingerprint lacks module {name!r}")
        if unusable:
            raise bad(f"the tensor {unusable[0]!r} holds NaN / inf values or is not floating point")


def require_finite_weight(name: str, weight: torch.Tensor) -> None:
    """Raise if the weight of module ``name`` holds NaN or inf: its adapter would silently be NaN."""
    # A sum is one pass without a temporary and is NaN / inf whenever an entry is; only when it overflows (or the
    # weight really is non-finite) is the exact elementwise check needed.
    if not torch.isfinite(weight.sum()) and not torch.isfinite(weight).all():
        raise ValueError(
            f"The weight of module {name!r} holds NaN or inf values, so its adapter would be NaN. The checkpoint "
            "is damaged (or was overflowed, e.g. by a float16 cast): load an intact one."
        )


# --- collection ----------------------------------------------------------------------------------


@torch.no_grad()
def collect_covariances(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    target_modules: list[str] | str | None = None,
    normalize: str = "none",
    *,
    side: str = "output",
    dtype: torch.dtype = torch.float32,
    autocast: torch.dtype | None = None,
    show_progress: bool = True,
    desc: str = "covariances",
) -> CovarianceStats:
    """Covariances of the target linear layers' outputs (``side="output"``) or inputs
    (``side="input"``, as CorDA needs) over ``batches``.

    ``batches`` yields dicts with ``input_ids`` and ``attention_mask`` (any batch size, any
    padding side; padding tokens are excluded). ``target_modules`` follows PEFT: a list of name
    suffixes or one regex; ``None`` means every linear layer but the output head. ``normalize``:
    ``"none"`` (Algorithm 1 literally), ``"max_abs"`` (each sample's activations divided by their
    largest absolute value, max|x|), ``"abs_of_max"`` (divided by the absolute value of their largest value,
    |max x|: exactly what the CorDA authors' code and PEFT's ``preprocess_corda`` do, the default for CorDA),
    ``"trace"`` (each covariance scaled to unit trace). Sums are accumulated in ``dtype`` (float32 or float64), never in the model's dtype.
    ``autocast`` (``torch.bfloat16`` or ``torch.float16``) runs the forward passes under
    ``torch.autocast`` — faster where the hardware has fast half-precision matmuls — while the
    activations are still summed in ``dtype`` (benchmarks/stats_precision.py measures speed and the
    effect on the subspace).

    Several processes (``torch.distributed`` initialized): each rank passes ITS OWN shard of the data
    (e.g. ``sclora.distributed.shard(examples)``; the caller shards, this function does not) and every
    rank must call it with the same model and settings. The raw sums and the sample / token counts are
    all-reduced before anything is normalized, so every rank returns the statistics of the union of
    the shards, as one process would over all the data (up to float rounding).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}.")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}.")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"Accumulate in torch.float32 or torch.float64, not {dtype}.")
    if autocast not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, not {autocast}.")
    targets = resolve_targets(model, target_modules)
    check_supported(targets)
    iterator = iter(batches)
    first = next(iterator, None)
    reduce = distributed.is_distributed()
    if reduce:  # every rank must reach the all-reduce below, so they fail together
        distributed.fail_together(None if first is not None else ValueError(
            f"Rank {distributed.rank()} got no batches for the statistics: give every rank a non-empty shard "
            f"(at least {distributed.world_size()} samples in all)."), "collecting the statistics")
    if first is None:
        raise ValueError("No batches: the data set for the statistics is empty. Pass at least one sample.")
    total = len(batches) if hasattr(batches, "__len__") else None

    device = next(model.parameters()).device
    plan = _plan(model, targets, side, normalize, _to_device(first, device))

    sums: dict[str, torch.Tensor] = {}
    strips: dict[str, int] = {}
    modules: dict[str, ModuleStat] = {}
    state: dict[str, torch.Tensor] = {}
    handles = []
    groups = {leader: members for leader, (_, members) in plan.items()}
    for leader, (stored, members) in plan.items():
        linear = targets[leader]
        d_in, d_out = layer_dims(linear)
        d = d_in if stored == "input" else d_out
        strips[leader] = gram_strip(d)
        sums[leader] = torch.zeros(staircase_size(d, strips[leader]), dtype=dtype, device=device)
        for name in members:
            modules[name] = ModuleStat(leader, stored, *layer_dims(targets[name]))
        scale_from = "input" if side == "input" else "output"
        handles.append(linear.register_forward_hook(_accumulator(leader, sums[leader], strips[leader], stored,
                                                                 scale_from, normalize, state, dtype)))

    forward = _forward_fn(model, targets, autocast)
    n_samples = n_tokens = 0
    was_training = model.training
    model.eval()
    error = None
    try:
        for i, batch in enumerate(tqdm(chain([first], iterator), total=total, desc=desc,
                                       disable=not show_progress or not distributed.is_main_process())):
            batch = _to_device(batch, device)
            state["mask"] = batch["attention_mask"].bool()
            state["dense"] = bool(state["mask"].all())
            forward(batch)
            release_freed_memory()  # the forward's freed temporaries, else glibc keeps them resident (performance.md)
            n_samples += int(state["mask"].any(dim=1).sum())
            n_tokens += int(state["mask"].sum())
            if (i + 1) % FINITE_CHECK_EVERY == 0:  # non-finite sums stay non-finite: checking now and then fails early
                _check_finite(sums, groups)
        _check_finite(sums, groups)
    except Exception as err:
        if not reduce:
            raise
        error = err
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if reduce:  # raw sums and counts over all ranks' shards, before any normalization
        distributed.fail_together(error, "collecting the statistics")
        n_samples, n_tokens = distributed.all_reduce_sums(sums, n_samples, n_tokens)
        _check_finite(sums, groups)
    if n_samples <= 0 or n_tokens <= 0:
        raise ValueError("Every token of the data was padding (attention_mask all zero); there is nothing to count.")

    stats = CovarianceStats(
        sums,
        modules,
        n_samples=n_samples,
        n_tokens=n_tokens,
        normalize=normalize,
        side=side,
        fingerprint=model_fingerprint(model, list(modules)),
        strips=strips,
    )
    return stats.bind(model, check_fingerprint=False)


def _accumulator(key, acc, strip, stored_side, scale_from, normalize, state, dtype):
    def hook(module, args, output):
        mask = state["mask"]
        act = args[0] if stored_side == "input" else output
        if act.shape[:-1] != mask.shape:
            raise ValueError(
                f"Module {key!r} saw activations of shape {tuple(act.shape)} that do not line up with the "
                f"attention mask {tuple(mask.shape)}; only token-aligned (batch, seq, features) layers can be hooked."
            )
        # Without padding the tokens are a free view; a boolean gather would copy every activation.
        x = (act.reshape(-1, act.shape[-1]) if state["dense"] else act[mask]).to(dtype)
        if normalize in PER_SAMPLE_NORMALIZATIONS:
            source = (args[0] if scale_from == "input" else output).detach()
            if normalize == "max_abs":  # the largest |value| of the sample's real tokens
                per_sample = source.abs().amax(dim=-1).masked_fill(~mask, 0).amax(dim=-1)
            else:  # |largest value| of the sample's real tokens: CorDA's torch.max(input).abs() at batch size 1
                per_sample = source.amax(dim=-1).masked_fill(~mask, -torch.inf).amax(dim=-1).abs()
            per_sample = per_sample.to(dtype).clamp_min(torch.finfo(dtype).tiny)
            token_scale = (1.0 / per_sample)[:, None].expand_as(mask)[mask]
            x = x * token_scale[:, None]
        add_gram_upper(acc, x, strip)

    return hook


#: Width of the row strips in ``add_gram_upper``; None: ``gram_strip(d)``, the width measured fastest.
GRAM_STRIP: int | None = None


def gram_strip(d: int) -> int:
    """Strip width for a d x d Gram: narrow strips skip more of the lower triangle, wide ones make more
    efficient products. d // 6 within [96, 384] is the fastest width measured at d = 576, 1536 and 4096
    (benchmarks/gram.py; the timings are in docs/performance.md)."""
    return GRAM_STRIP or max(96, min(384, d // 6))


def staircase_blocks(packed: torch.Tensor, d: int, strip: int) -> list[tuple[int, torch.Tensor]]:
    """(first row, view) of each row strip of a packed staircase: strip i holds rows s..s+w of the d x d
    matrix from column s on (a w x (d - s) block), the strips laid one after the other in ``packed``."""
    blocks, offset = [], 0
    for start in range(0, d, strip):
        rows, cols = min(strip, d - start), d - start
        blocks.append((start, packed[offset:offset + rows * cols].view(rows, cols)))
        offset += rows * cols
    return blocks


def staircase_size(d: int, strip: int) -> int:
    """Entries of a d x d staircase with row strips of ``strip``: (k + 1) / 2k of d^2 for k equal strips."""
    return sum(min(strip, d - start) * (d - start) for start in range(0, d, strip))


def add_gram_upper(packed: torch.Tensor, x: torch.Tensor, strip: int) -> None:
    """``packed += xᵀx`` on the staircase only: XᵀX is symmetric, so the blocks below the diagonal are neither
    computed nor stored (a d x d Gram with k strips costs (k+1)/2k of the full product).
    :func:`unpack_gram` rebuilds the full matrix."""
    for start, block in staircase_blocks(packed, x.shape[1], strip):
        block.addmm_(x[:, start:start + block.shape[0]].T, x[:, start:])


def unpack_gram(packed: torch.Tensor, d: int, strip: int) -> torch.Tensor:
    """The d x d symmetric matrix of a staircase: its upper triangle, mirrored (exactly symmetric)."""
    full = packed.new_empty(d, d)
    for start, block in staircase_blocks(packed, d, strip):
        end = start + block.shape[0]
        diagonal = block[:, :end - start].triu()
        full[start:end, start:end] = diagonal + diagonal.triu(1).T
        full[start:end, end:] = block[:, end - start:]
        full[end:, start:end] = block[:, end - start:].T
    return full


def _plan(model, targets, side, normalize, batch) -> dict[str, tuple[str, list[str]]]:
    """leader -> (stored side, members): which matrix holds each module's statistic.

    Input side: one d_in x d_in matrix per group of siblings. Output side: a bias-free sibling group
    takes its shared input statistic when d_in^2 < the sum of its members' d_out^2 (q/k/v, gate/up),
    otherwise each module keeps its own output one (Cov_out = W Cov_in W^T needs no bias). Under
    per-sample scaling each module scales by its own output, so nothing is shared."""
    dims = {n: layer_dims(m) for n, m in targets.items()}  # (d_in, d_out)
    if side == "output" and normalize in PER_SAMPLE_NORMALIZATIONS:
        return {n: ("input" if m.bias is None and dims[n][0] < dims[n][1] else "output", [n])
                for n, m in targets.items()}
    plan: dict[str, tuple[str, list[str]]] = {}
    for members in _siblings(model, targets, batch):
        if side == "input":
            plan[members[0]] = ("input", members)
            continue
        shared = [n for n in members if targets[n].bias is None]
        d_in = dims[members[0]][0]
        if shared and d_in**2 < sum(dims[n][1] ** 2 for n in shared):
            plan[shared[0]] = ("input", shared)
        else:
            shared = []
        for n in members:
            if n not in shared:
                plan[n] = ("output", [n])
    return plan


def _siblings(model, targets, batch) -> list[list[str]]:
    """Groups of target modules that read the identical input tensor object (e.g. q/k/v), found
    with hooks on a one-sample probe forward pass; in model order."""
    seen: dict[str, torch.Tensor] = {}

    def recorder(name):
        def hook(module, args, output):
            seen.setdefault(name, args[0])

        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in targets.items()]
    probe = {k: v[:1, :8] for k, v in batch.items()}
    try:
        _forward_fn(model, targets)(probe)
    finally:
        for h in handles:
            h.remove()
    groups: dict[int | str, list[str]] = {}
    for name in targets:  # `seen` keeps the tensors alive, so their ids cannot be reused
        groups.setdefault(id(seen[name]) if name in seen else name, []).append(name)
    return list(groups.values())


def _forward_fn(model: nn.Module, targets: dict[str, nn.Module], autocast: torch.dtype | None = None):
    # The causal LM's body (without the vocabulary projection) is enough when no target lies outside it.
    body = getattr(model, "base_model", model)
    body_modules = {id(m) for m in body.modules()} if body is not model else set()
    runner = body if body_modules and all(id(m) in body_modules for m in targets.values()) else model

    takes_positions = "position_ids" in inspect.signature(runner.forward).parameters

    def forward(batch):
        mask = batch["attention_mask"]
        kwargs = {}
        if takes_positions:  # positions count real tokens only, so left padding changes nothing (as in generate)
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        half = torch.autocast(batch["input_ids"].device.type, dtype=autocast) if autocast else nullcontext()
        with half, without_cpu_repacking(model):  # 4-bit layers keep their storage layout (sclora.layers)
            runner(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False, **kwargs)

    return forward


def _to_device(batch: Mapping[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            "Each batch must be a dict with 'input_ids' (and 'attention_mask') tensors, e.g. from a DataLoader "
            f"with a padding collator; got {type(batch).__name__}."
        )
    ids = torch.as_tensor(batch["input_ids"])
    if ids.ndim == 1:
        ids = ids[None]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


#: batches between two finiteness checks of the running sums (each check reads every stored matrix)
FINITE_CHECK_EVERY = 16


def _check_finite(sums: dict[str, torch.Tensor], groups: dict[str, list[str]]) -> None:
    for key, acc in sums.items():
        if not torch.isfinite(acc).all():
            raise ValueError(
                f"NaN or inf activations reached module(s) {groups[key]}: the model produced non-finite values "
                "on this data. Check the inputs, run the statistics in float32 instead of float16, or use "
                "normalize='max_abs'."
            )


# --- module discovery and fingerprints ---------------------------------------------------------


def model_fingerprint(model: nn.Module, module_names: list[str]) -> dict:
    """A config hash plus a few sampled weights per module: tells statistics of another model apart
    while tolerating a dtype cast of the same one."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items()
               if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures")}
        digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
    else:
        digest = "no-config"
    modules = dict(model.named_modules())
    return {"config": digest, "probes": {name: _probe(read_weight(modules[name])) for name in module_names}}


def _probes_differ(theirs: list[float], ours: list[float]) -> bool:
    """Sampled weights that differ beyond a dtype cast (1% of their largest magnitude)."""
    a, b = torch.tensor(theirs, dtype=torch.float64), torch.tensor(ours, dtype=torch.float64)
    return bool((a - b).abs().max() > 1e-2 * a.abs().max().clamp_min(1e-12))


def _device_of(sums: Mapping[str, torch.Tensor]) -> str:
    if isinstance(sums, FileSums):
        return sums.device
    return str(next(iter(sums.values())).device) if sums else "cpu"


def _probe(weight: torch.Tensor) -> list[float]:
    """A few entries of a dense (out, in) weight (:func:`sclora.layers.read_weight`), evenly spaced."""
    flat = weight.detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, _PROBES_PER_MODULE, device=flat.device).long()
    return flat[idx].double().cpu().tolist()
