"""The Gram update XᵀX of the statistics hooks: the full product vs the block upper triangle in row strips.

    python benchmarks/gram.py [--tokens 2048] [--dims 576 1536 4096] [--strips 96 128 192 256 384] [--threads 2]

XᵀX is symmetric, so ``sclora.statistics.add_gram_upper`` only computes the row strips' blocks on and above
the diagonal (k strips: (k+1)/2k of the flops) and the lower triangle is filled once at the end. Narrow strips
skip more work but make smaller, less efficient products; this measures which width wins on this machine.
Same inputs, float32, median of --repeats timings; every variant is checked against the full product.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics as stats_lib
import time
from pathlib import Path

import torch
from _results import write_json

from sclora.statistics import add_gram_upper, staircase_size, unpack_gram


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return stats_lib.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="rows of X: one batch of 8 x 256 tokens")
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 1536, 4096])
    parser.add_argument("--strips", type=int, nargs="+", default=[96, 128, 192, 256, 384])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gram.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for d in args.dims:
        x = torch.randn(args.tokens, d)
        acc = torch.zeros(d, d)
        full = median_time(functools.partial(acc.addmm_, x.T, x), args.repeats)
        reference = x.double().T @ x.double()
        row = {"dim": d, "full_ms": round(full * 1e3, 2), "strips": {}}
        for strip in args.strips:
            packed = torch.zeros(staircase_size(d, strip))
            add_gram_upper(packed, x, strip)
            error = float((unpack_gram(packed, d, strip).double() - reference).norm() / reference.norm())
            seconds = median_time(functools.partial(add_gram_upper, packed, x, strip), args.repeats)
            row["strips"][strip] = {"ms": round(seconds * 1e3, 2), "vs_full": round(seconds / full, 3),
                                    "rel_error": error}
        rows.append(row)
        best = min(row["strips"].items(), key=lambda kv: kv[1]["ms"])
        cells = "  ".join(f"{s}: {v['vs_full']:.2f}x" for s, v in row["strips"].items())
        print(f"d={d:5d}  full {full * 1e3:8.1f} ms   strips (time vs full) {cells}   best {best[0]}")
    result = {"command": "python benchmarks/gram.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "out"),
        "torch": torch.__version__, "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "tokens": args.tokens, "rows": rows}
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
