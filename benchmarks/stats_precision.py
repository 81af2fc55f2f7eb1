"""Statistics forward in bf16 autocast (and bf16 Gram products) vs fp32: speed and what it does to the subspace.

    python benchmarks/stats_precision.py [--samples 32] [--seq-len 128] [--beta 0.5] [--r 16]

Same model, same D+ (papers) / D- (trivia) windows as benchmarks/init_speed.py. Three statistics are collected
(fp32 forward; bf16 autocast forward; bf16 autocast forward with gram_dtype=bf16 products; sums float32 in all),
alternating order over --repeats rounds so a drift of the machine's load hits all alike; the best time of each. Accuracy, per module:
the projector distance ||QQ^T - Q'Q'^T||_F between the subspace built from fp32 statistics (Q) and from the
other ones (Q'), and the relative loss in R(S) = tr(Q^T dCov Q) that Q' has on the fp32 dCov (0 = as good as Q).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from _results import write_json
from init_speed import batches, setup

import sclora
from sclora.subspace import delta_covariance, sc_subspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="path, the embedded model, or 'tiny'")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "stats_precision.json"))
    args = parser.parse_args()
    model, plus, minus = setup(args)
    targets = list(sclora.LLAMA_TARGET_MODULES)
    variants = {"fp32": {}, "bf16": {"autocast": torch.bfloat16},
                "bf16_gram": {"autocast": torch.bfloat16, "gram_dtype": torch.bfloat16}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    stats = {}
    for round_ in range(args.repeats):
        for name in (list(variants) if round_ % 2 == 0 else list(variants)[::-1]):
            start = time.perf_counter()
            stats[name] = [sclora.collect_covariances(model, batches(rows, args.batch_size), targets,
                                                      show_progress=False, **variants[name]) for rows in (plus, minus)]
            times[name].append(time.perf_counter() - start)
    rows = {name: [] for name in variants if name != "fp32"}
    for module, linear in sclora.targets.resolve_targets(model, targets).items():
        weight = linear.weight.detach().double()
        covs = {name: [s.bind(model, check_fingerprint=False).factor(module) for s in pair]
                for name, pair in stats.items()}
        qs, delta = {}, None
        for name, ((cp, wp), (cm, _)) in covs.items():
            kwargs = {"weight": weight} if wp is not None else {}
            qs[name] = sc_subspace(cp.double(), cm.double(), args.beta, args.r, **kwargs)
            if name == "fp32":
                d = delta_covariance(cp.double(), cm.double(), args.beta)
                delta = weight @ d @ weight.T if wp is not None else d
        q = qs["fp32"]
        best = torch.trace(q.T @ delta @ q)
        for name, q2 in qs.items():
            if name != "fp32":
                rows[name].append({"module": module,
                                   "projector_distance": torch.linalg.norm(q @ q.T - q2 @ q2.T).item(),
                                   "reward_loss": ((best - torch.trace(q2.T @ delta @ q2)) / best.abs()).item()})
    result = {
        "command": "python benchmarks/stats_precision.py " + " ".join(sys.argv[1:]),
        "settings": vars(args), "threads": torch.get_num_threads(), "times": times,
        "variants": {"bf16": "forwards under bf16 autocast, activations summed in float32",
                     "bf16_gram": "forwards under bf16 autocast and each batch's XᵀX in bf16 matmuls, summed in "
                                  "float32"},
        "fp32_s": min(times["fp32"]),
    }
    print(f"statistics, D+ and D- ({args.samples} + {args.samples} x {args.seq_len} tokens): "
          f"fp32 {result['fp32_s']:.1f} s")
    for name, entries in rows.items():
        distances = sorted(r["projector_distance"] for r in entries)
        losses = sorted(r["reward_loss"] for r in entries)
        result.update({f"{name}_s": min(times[name]), f"{name}_vs_fp32": min(times[name]) / min(times["fp32"]),
                       f"{name}_projector_distance": {"median": distances[len(distances) // 2], "max": distances[-1]},
                       f"{name}_reward_loss": {"median": losses[len(losses) // 2], "max": losses[-1]},
                       f"{name}_modules": entries})
        print(f"{name}: {result[f'{name}_s']:.1f} s -> {result[f'{name}_vs_fp32']:.2f}x fp32; subspace vs fp32 over "
              f"{len(entries)} modules (beta {args.beta}, r {args.r}): projector distance median "
              f"{distances[len(distances) // 2]:.2e} max {distances[-1]:.2e}; R(S) loss median "
              f"{losses[len(losses) // 2]:.2e} max {losses[-1]:.2e}")
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
