"""SC-LoRA on a 4-bit base against plain QLoRA on SmolLM2-135M-Instruct: memory, the function's error at init,
and the 4-bit quantization error of the weight each method stores (W0 for QLoRA, W_res for the residual inits).

    python benchmarks/qlora_init.py [--samples 32] [--json benchmarks/results/qlora_init.json]

Statistics and decompositions in float32/float64 first, then the frozen weights in NF4 (bitsandbytes, CPU).
Init error: mean over held-out prompts' tokens of KL(base || model) of the next-token distribution and the mean
|logit difference|, against the full-precision base. LoftQ's and PiSSA's argument is that a residual init has
less left to lose in 4 bits; this measures it for SC-LoRA's data-chosen subspace.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _results import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=32, help="examples per statistics set")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--json", default="benchmarks/results/qlora_init.json")
    args = parser.parse_args()

    import sclora
    from sclora.experiments.examples import build_examples
    from sclora.experiments.spec import DataSpec
    from sclora.models import load_model
    from sclora.quantize import quantization_error
    from sclora.statistics_cache import statistics_batches

    base, tokenizer = load_model("smollm2-135m-instruct")
    plus_rows = build_examples(DataSpec("math", args.samples), 0)
    minus_rows = build_examples(DataSpec("trivia", args.samples), 0)
    held_out = build_examples(DataSpec("math", 8, split="heldout"), 0) + build_examples(DataSpec("trivia", 8, 512), 0)
    plus = sclora.collect_covariances(base, statistics_batches(tokenizer, plus_rows, 128, 8), show_progress=False)
    minus = sclora.collect_covariances(base, statistics_batches(tokenizer, minus_rows, 128, 8), show_progress=False)
    probe = statistics_batches(tokenizer, held_out, 128, 8)
    with torch.no_grad():
        reference = [base(**b).logits for b in probe]

    def init_error(model) -> dict:
        kl, diff, tokens = 0.0, 0.0, 0
        with torch.no_grad():
            for b, ref in zip(probe, reference):
                logits, mask = model(**b).logits, b["attention_mask"].bool()
                p = torch.log_softmax(ref[mask].double(), -1)
                q = torch.log_softmax(logits[mask].double(), -1)
                kl += (p.exp() * (p - q)).sum().item()
                diff += (logits[mask] - ref[mask]).abs().mean(-1).sum().item()
                tokens += int(mask.sum())
        return {"kl": kl / tokens, "mean_abs_logit_diff": diff / tokens}

    results = {}
    for method in ("lora", "pissa", "sc_lora"):
        model, _ = load_model("smollm2-135m-instruct")
        start = time.perf_counter()
        fp = sclora.init_model(model, method=method, r=args.r, beta=args.beta, plus=plus, minus=minus,
                               show_progress=False)
        stored = [m.base_layer.weight.detach() for m in fp.modules() if hasattr(m, "base_layer")
                  and hasattr(m.base_layer, "weight") and m.base_layer.weight.ndim == 2]
        q_error = sum(quantization_error(w) for w in stored) / len(stored)
        fp_error = init_error(fp)
        from sclora.quantize import quantize_frozen_linears

        info = quantize_frozen_linears(fp, "nf4")
        results[method] = {"init_error_fp32": fp_error, "init_error_nf4": init_error(fp),
                           "relative_nf4_error_of_stored_weight": q_error, "modules": len(stored),
                           "weights_mb_before": info["bytes_before"] / 2**20,
                           "weights_mb_after": info["bytes_after"] / 2**20,
                           "seconds": round(time.perf_counter() - start, 1)}
        print(method, json.dumps(results[method]))
    lora = results["lora"]["init_error_nf4"]["kl"]
    summary = {m: {"kl_ratio_vs_qlora": r["init_error_nf4"]["kl"] / lora,
                   "stored_weight_error_ratio_vs_qlora": r["relative_nf4_error_of_stored_weight"]
                   / results["lora"]["relative_nf4_error_of_stored_weight"]} for m, r in results.items()}
    out = {"model": "SmolLM2-135M-Instruct", "r": args.r, "beta": args.beta, "samples": args.samples,
           "quant_type": "nf4 (bitsandbytes, no double quantization)", "results": results, "ratios": summary,
           "command": f"python benchmarks/qlora_init.py --samples {args.samples}"}
    print(json.dumps(summary, indent=2))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
