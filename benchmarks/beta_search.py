"""choose_beta's cost per β on real statistics: its reduced per-module matrices against evaluating each β on the
full matrices (sc_subspace + captured_energy per module, which is what every step of the search would cost
without the reduction), in one process, on the same statistics, one thread by default.

    python benchmarks/beta_search.py --model smollm2-135m-instruct-aligned \\
        --stats PLUS.safetensors MINUS_1.safetensors [MINUS_2.safetensors ...] --budget 0.05

Times (a) one full-matrix evaluation of every target module's shares, (b) the reduction (once per search),
(c) one reduced evaluation, at the same β; checks that (a) and (c) give the same shares; then runs the whole
choose_beta at ``--budget`` per set and counts its evaluations. Prints the ratios; writes JSON (default
benchmarks/results/beta_search.json).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from _results import peak_rss_mb, write_json

import sclora
from sclora.layers import read_weight
from sclora.methods.sc_lora import _module_covariances, _Reduced, mean_shares
from sclora.models import load_model
from sclora.targets import resolve_targets


def full_shares(targets, plus, minus, betas, r, solver) -> list[float]:
    """Mean share per set (D-_1.., D+) over modules, each β decomposed on the full matrices."""
    def module_shares(name, linear):
        covs, args = _module_covariances(plus, minus, name, read_weight(linear))
        q = sclora.sc_subspace(covs[0], covs[1:], betas, r, solver=solver, **args)
        weight = args.get("weight")
        return [sclora.captured_energy(q, cov.double(), None if weight is None else weight.double()) for cov in covs]

    return mean_shares(module_shares(name, linear) for name, linear in targets.items())


def reduced_shares(modules: dict[str, _Reduced], betas, r, solver) -> list[float]:
    return mean_shares(module.shares(betas, r, solver) for module in modules.values())


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct-aligned")
    parser.add_argument("--stats", nargs="+", required=True, metavar="FILE", help="D+ first, then each D- set")
    parser.add_argument("--budget", type=float, default=0.05, help="share of each D- set's energy to keep")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--solver", default="eigh")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-search", action="store_true", help="time one β each way, not the whole search")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "beta_search.json"))
    args = parser.parse_args()
    if len(args.stats) < 2:
        parser.error("--stats needs the D+ file and at least one D- file")
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    stats = [sclora.CovarianceStats.load(path, model) for path in args.stats]
    plus, minus = stats[0], stats[1:]
    targets = resolve_targets(model, None)
    betas = [0.5 / len(minus)] * len(minus)

    reference, full_s = timed(lambda: full_shares(targets, plus, minus, betas, args.r, args.solver))
    modules, reduce_s = timed(lambda: {name: _Reduced.of(*_reduce_args(plus, minus, name, linear), torch.float64)
                                       for name, linear in targets.items()})
    fast, reduced_s = timed(lambda: reduced_shares(modules, betas, args.r, args.solver))
    difference = max(abs(a - b) for a, b in zip(reference, fast))
    del modules
    result = {
        "command": "python benchmarks/beta_search.py " + shlex.join(sys.argv[1:]),
        "torch": torch.__version__, "threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "model": args.model, "modules": len(targets), "sets": len(args.stats), "r": args.r, "solver": args.solver,
        "full_evaluation_s": round(full_s, 2), "reduction_s": round(reduce_s, 2),
        "reduced_evaluation_s": round(reduced_s, 3),
        "per_beta_speedup": round(full_s / reduced_s, 1),
        "max_share_difference": difference,
    }
    if not args.no_search:
        several = len(minus) > 1
        budget = [args.budget] * len(minus) if several else args.budget
        choice, search_s = timed(lambda: sclora.choose_beta(model, plus, minus if several else minus[0], r=args.r,
                                                            budget=budget, solver=args.solver, show_progress=False))
        evaluations = len(choice.tried)
        result["search"] = {"budget": args.budget, "evaluations": evaluations, "seconds": round(search_s, 1),
                            "beta": choice.beta, "minus_energy": choice.minus_energy,
                            "plus_energy": choice.plus_energy,
                            "full_matrix_estimate_s": round(evaluations * full_s, 1),
                            "speedup_vs_estimate": round(evaluations * full_s / search_s, 1)}
    result["peak_rss_mb"] = peak_rss_mb()
    print(f"{len(targets)} modules, {len(args.stats)} sets (D+ and {len(minus)} D-), r={args.r}, {args.solver}, "
          f"{args.threads} thread(s)")
    print(f"one β on the full matrices:  {full_s:8.2f} s")
    print(f"reduction (once per search): {reduce_s:8.2f} s")
    print(f"one β on the reduced ones:   {reduced_s:8.3f} s   ({full_s / reduced_s:.1f}x; shares differ by at most "
          f"{difference:.1e})")
    if "search" in result:
        search = result["search"]
        print(f"choose_beta at budget {args.budget}: {search['evaluations']} evaluations in {search['seconds']} s; on "
              f"the full matrices ≈ {search['full_matrix_estimate_s']:.0f} s ({search['speedup_vs_estimate']}x)")
    print(f"wrote {write_json(args.out, result)}")


def _reduce_args(plus, minus, name, linear):
    covs, args = _module_covariances(plus, minus, name, read_weight(linear))
    return covs, args.get("weight")


if __name__ == "__main__":
    main()
