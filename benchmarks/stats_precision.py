"""Statistics forward in bf16 autocast vs fp32: speed and what it does to the SC-LoRA subspace.

    python benchmarks/stats_precision.py [--samples 32] [--seq-len 128] [--beta 0.5] [--r 16]

Same model, same D+ (papers) / D- (trivia) windows as benchmarks/init_speed.py. Both statistics are collected
(fp32 forward, then bf16 autocast forward; sums float32 in both), alternating order over --repeats rounds so
a drift of the machine's load hits both alike; the table gives the best time of each. Accuracy, per module:
the projector distance ||QQ^T - Q'Q'^T||_F between the subspace built from fp32 statistics (Q) and from bf16
ones (Q'), and the relative loss in R(S) = tr(Q^T dCov Q) that Q' has on the fp32 dCov (0 = as good as Q).
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
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    stats = {}
    for round_ in range(args.repeats):
        for name in (("fp32", "bf16") if round_ % 2 == 0 else ("bf16", "fp32")):
            start = time.perf_counter()
            stats[name] = [sclora.collect_covariances(model, batches(rows, args.batch_size), targets,
                                                      autocast=torch.bfloat16 if name == "bf16" else None,
                                                      show_progress=False) for rows in (plus, minus)]
            times[name].append(time.perf_counter() - start)
    rows = []
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
        q, q2 = qs["fp32"], qs["bf16"]
        best = torch.trace(q.T @ delta @ q)
        rows.append({"module": module,
                     "projector_distance": torch.linalg.norm(q @ q.T - q2 @ q2.T).item(),
                     "reward_loss": ((best - torch.trace(q2.T @ delta @ q2)) / best.abs()).item()})
    distances = sorted(r["projector_distance"] for r in rows)
    losses = sorted(r["reward_loss"] for r in rows)
    result = {
        "command": "python benchmarks/stats_precision.py " + " ".join(sys.argv[1:]),
        "settings": vars(args), "threads": torch.get_num_threads(),
        "fp32_s": min(times["fp32"]), "bf16_s": min(times["bf16"]), "times": times,
        "bf16_vs_fp32": min(times["bf16"]) / min(times["fp32"]),
        "projector_distance": {"median": distances[len(distances) // 2], "max": distances[-1]},
        "reward_loss": {"median": losses[len(losses) // 2], "max": losses[-1]},
        "modules": rows,
    }
    print(f"statistics, D+ and D- ({args.samples} + {args.samples} x {args.seq_len} tokens): "
          f"fp32 {result['fp32_s']:.1f} s, bf16 autocast {result['bf16_s']:.1f} s -> {result['bf16_vs_fp32']:.2f}x")
    print(f"subspace from bf16 vs fp32 statistics over {len(rows)} modules (beta {args.beta}, r {args.r}): "
          f"projector distance median {result['projector_distance']['median']:.2e} max "
          f"{result['projector_distance']['max']:.2e}; R(S) loss median {result['reward_loss']['median']:.2e} max "
          f"{result['reward_loss']['max']:.2e}")
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
