"""Statistics of prompt/response examples, cached on disk under a name that says what made them.

``statistics_batches`` renders examples the way training does (chat template, then the response) and pads
them into batches; ``cached_statistics`` collects :class:`~sclora.statistics.CovarianceStats` over them once
and reloads them afterwards. The cache file's name carries a digest of everything that determines the
statistics (``statistics_path``), so a changed model, data, tokenizer, seq_len, target, side or dtype names
another file and a stale one is never read (docs/reliability.md).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .chat import render_example
from .fileio import digest, safe_name
from .statistics import (
    FORMAT_VERSION,
    RAW_SUM_NORMALIZATIONS,
    CovarianceStats,
    collect_covariances,
    model_fingerprint,
)
from .targets import resolve_targets

__all__ = ["Batches", "token_ids", "cached_statistics", "statistics_batches", "statistics_path"]


class Batches(list):
    """Padded token batches, with how many examples there were and how many were cut to ``seq_len``."""

    examples: int = 0
    truncated: int = 0


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` without special tokens: the Rust tokenizer's batch encoder without offsets when the
    tokenizer has one (the same ids as ``tokenizer(texts)``, about twice as fast), else ``tokenizer(texts)``."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    # transformers leaves the padding / truncation of its last call set on the backend: off for this call only
    padding, truncation = backend.padding, backend.truncation
    backend.no_padding()
    backend.no_truncation()
    try:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        if padding is not None:
            backend.enable_padding(**padding)
        if truncation is not None:
            backend.enable_truncation(**truncation)


def statistics_batches(tokenizer, examples: list[dict], seq_len: int = 256, batch_size: int = 8) -> Batches:
    """Examples rendered as training renders them (:func:`sclora.chat.render_example`: prompt + response through
    the chat template, a conversation through it, or plain text), right-padded / truncated to ``seq_len`` tokens.
    The number of truncated examples is counted (``.truncated``), never silent."""
    texts = [render_example(tokenizer, ex) for ex in examples]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = Batches()
    batches.examples = len(texts)
    ids = token_ids(tokenizer, texts)
    batches.truncated = sum(len(row) > seq_len for row in ids)
    left_cut = getattr(tokenizer, "truncation_side", "right") == "left"
    ids = [row[-seq_len:] if left_cut else row[:seq_len] for row in ids]
    left_pad, pad = tokenizer.padding_side == "left", tokenizer.pad_token_id
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    for i in range(0, len(ids), batch_size):
        rows, n = ids[i:i + batch_size], lengths[i:i + batch_size]
        width = int(n.max())
        input_ids = np.full((len(rows), width), pad, dtype=np.int64)
        for j, row in enumerate(rows):
            if left_pad:
                input_ids[j, width - len(row):] = row
            else:
                input_ids[j, :len(row)] = row
        positions = np.arange(width)
        mask = positions >= width - n[:, None] if left_pad else positions < n[:, None]
        batches.append({"input_ids": torch.from_numpy(input_ids),
                        "attention_mask": torch.from_numpy(mask.astype(np.int64))})
    return batches


def statistics_path(folder: Path, label: str, model, batches: list[dict], *, target_modules, normalize: str,
                    side: str, dtype: str | None = None) -> Path:
    """Where the statistics of ``batches`` live in ``folder``: the file name carries a digest of everything that
    determines them (the model's config and sampled weights, the token ids and masks of every batch, hence the
    data, tokenizer, seq_len and batch layout; the target modules, side, normalization, the model's dtype and
    the statistics format), so a changed setting never reads a stale file: it names another one. "none" and
    "trace" store the same raw sums and share one file."""
    targets = list(resolve_targets(model, target_modules))
    sums = "raw" if normalize in RAW_SUM_NORMALIZATIONS else normalize
    batch_digest = digest([[b["input_ids"].tolist(), b["attention_mask"].tolist()] for b in batches])
    key = {"format": FORMAT_VERSION, "model": model_fingerprint(model, targets), "targets": targets,
           "batches": batch_digest, "side": side, "sums": sums, "accumulate": "float32", "autocast": None,
           "model_dtype": str(dtype or next(model.parameters()).dtype)}
    return folder / f"{safe_name(label, 'statistics label')}-{side}-{sums}-{digest(key)}.safetensors"


def cached_statistics(folder: Path, label: str, model, tokenizer, examples: list[dict], *, seq_len: int,
                      batch_size: int, target_modules, normalize: str, side: str, show_progress: bool = True):
    """Statistics of ``examples``, cached in ``folder`` under :func:`statistics_path`: collected on first use,
    loaded afterwards. A file that cannot be read (truncated by a crash, edited) is collected again.

    Under torch.distributed every rank takes the same branch: the cache is read only if every rank sees it;
    otherwise each rank collects over its shard of ``examples``, the sums are all-reduced, and one process
    per node writes the file. The statistics stay on the model's device; they are read from the file as each
    module needs them (:meth:`CovarianceStats.offload`), so only one set is in memory while the next is collected."""
    every = statistics_batches(tokenizer, examples, seq_len, batch_size)  # all ranks name the file from all data
    if every.truncated and distributed.is_main_process():
        warnings.warn(f"{label} statistics: {every.truncated} of {every.examples} examples are longer than seq_len="
                      f"{seq_len} tokens and were cut to it.", stacklevel=2)
    path = statistics_path(folder, label, model, every,
                           target_modules=target_modules, normalize=normalize, side=side)
    device = str(next(model.parameters()).device)
    stats = None
    if path.exists():
        try:
            stats = CovarianceStats.load(path, device=device, lazy=True)  # matrices read when used
        except (ValueError, OSError) as err:  # written by a killed process before atomic writes, or damaged
            warnings.warn(f"{err}; collecting these statistics again.", stacklevel=2)
    if distributed.all_true(stats is not None):
        return stats.with_normalize(normalize)
    batches = (statistics_batches(tokenizer, distributed.shard(examples), seq_len, batch_size)
               if distributed.is_distributed() else every)  # one process: its shard is all of it, tokenized once
    stats = collect_covariances(model, batches, target_modules, normalize, side=side, show_progress=show_progress,
                                desc=f"{label} statistics")
    if distributed.local_rank() == 0:  # one writer per node (on a shared file system they write the same bytes)
        folder.mkdir(parents=True, exist_ok=True)
        stats.offload(path)  # saved, and its memory freed: the next set is collected with this one on disk
    distributed.barrier()
    return stats
