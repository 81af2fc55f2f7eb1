"""Initializing on a base the user already loaded quantized (bitsandbytes nf4 / fp4 / int8) on SmolLM2-135M-Instruct:
how far the model at init is from that quantized base (it cannot be exact: W_res is stored back in the layer's own
format), next to how far the quantized base itself is from full precision, and what merely writing the unchanged
weights back through the same format costs.

    python benchmarks/quantized_base.py [--samples 32] [--json benchmarks/results/quantized_base.json]

Drift: max |delta logit| and mean KL(reference || model) of the next-token distributions over the real tokens of
16 held-out prompts (8 math, 8 trivia), float64 (:func:`sclora.diagnostics.logit_drift`).
"""

from __future__ import annotations

import argparse
import time

import torch
from _results import peak_rss_mb, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=32, help="examples per statistics set")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--formats", nargs="+", default=["nf4", "fp4", "int8"])
    parser.add_argument("--methods", nargs="+", default=["sc_lora", "corda_kpa", "pissa"])
    parser.add_argument("--json", default="benchmarks/results/quantized_base.json")
    args = parser.parse_args()

    import sclora
    from sclora.diagnostics import logit_drift
    from sclora.experiments.examples import build_examples
    from sclora.experiments.spec import DataSpec
    from sclora.layers import read_weight, without_cpu_repacking, write_weight
    from sclora.models import load_model
    from sclora.registry import method_spec
    from sclora.statistics_cache import statistics_batches
    from sclora.targets import resolve_targets

    plus_rows = build_examples(DataSpec("math", args.samples), 0)
    minus_rows = build_examples(DataSpec("trivia", args.samples), 0)
    held_out = build_examples(DataSpec("math", 8, split="heldout"), 0) + build_examples(DataSpec("trivia", 8, 512), 0)
    full, tokenizer = load_model("smollm2-135m-instruct")
    probe = statistics_batches(tokenizer, held_out, 128, 8)

    def logits(model) -> list[torch.Tensor]:
        with torch.no_grad(), without_cpu_repacking(model):
            return [model(**b).logits.float() for b in probe]

    def drift(reference, model) -> dict:
        return logit_drift(reference, logits(model), [b["attention_mask"] for b in probe])

    full_logits = logits(full)
    del full
    results = {"model": "smollm2-135m-instruct", "r": args.r, "samples": args.samples, "formats": {}}
    for fmt in args.formats:
        base, _ = load_model("smollm2-135m-instruct", load_in=fmt)
        base_logits = logits(base)
        row = {"quantized_vs_full_precision": drift(full_logits, base)}
        targets = resolve_targets(base, None)
        with torch.no_grad():  # write every unchanged dequantized weight back through the same format
            for layer in targets.values():
                write_weight(layer, read_weight(layer, torch.float64))
        row["rewrite_unchanged_weights"] = drift(base_logits, base)
        del base
        for method in args.methods:
            base, _ = load_model("smollm2-135m-instruct", load_in=fmt)
            spec = method_spec(method)
            config = sclora.SCLoRAConfig(method=method, r=args.r, beta=0.5)
            data = {}
            start = time.perf_counter()
            if spec.side is not None:
                with without_cpu_repacking(base):
                    for label, rows in (("plus", plus_rows), ("minus", minus_rows)):
                        if label in spec.needs:
                            data[label] = sclora.collect_covariances(
                                base, statistics_batches(tokenizer, rows, 128, 8), None,
                                config.resolved_normalize, side=spec.side, show_progress=False)
            model = sclora.init_model(base, config, show_progress=False, **data)
            seconds = time.perf_counter() - start
            row[method] = {"init_vs_quantized_base": drift(base_logits, model), "seconds": round(seconds, 1)}
            print(fmt, method, row[method], flush=True)
            del base, model
        results["formats"][fmt] = row
        print(fmt, {k: v for k, v in row.items() if k not in args.methods}, flush=True)
    results["peak_rss_mb"] = peak_rss_mb()
    print(write_json(args.json, results))


if __name__ == "__main__":
    main()
