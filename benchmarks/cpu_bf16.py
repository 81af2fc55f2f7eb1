"""bf16 against fp32 on this CPU, at SmolLM2-135M's linear-layer shapes for a batch of 8 x 256 tokens.

    python benchmarks/cpu_bf16.py            # one thread; --threads N for more

Prints whether torch sees bf16 instructions (AVX512-BF16, AMX), the seconds per matmul in each precision and
their ratio, and the forward + backward of one SmolLM2-sized MLP block. Writes benchmarks/results/cpu_bf16.json.
`TrainConfig(bf16=True)` warns on a CPU where this ratio is large (sclora.train.cpu_has_native_bf16).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from _results import write_json

from sclora.train import cpu_has_native_bf16

SHAPES = {"q_proj / o_proj": (576, 576), "gate_proj / up_proj": (576, 1536), "down_proj": (1536, 576)}
TOKENS = 8 * 256


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def mlp_step(dtype: torch.dtype) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, 576, generator=g)
    up = torch.nn.Linear(576, 1536, bias=False)
    down = torch.nn.Linear(1536, 576, bias=False)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = down(torch.nn.functional.silu(up(x))).float().pow(2).mean()
        loss.backward()

    step()  # warm-up
    return best_of(step, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_bf16.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, (d_in, d_out) in SHAPES.items():
        seconds = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(TOKENS, d_in, dtype=dtype), torch.randn(d_in, d_out, dtype=dtype)
            a @ b
            seconds[str(dtype).removeprefix("torch.")] = best_of(lambda a=a, b=b: a @ b, 3)
        rows.append({"layer": name, "tokens": TOKENS, "d_in": d_in, "d_out": d_out, **seconds,
                     "bf16_over_fp32": seconds["bfloat16"] / seconds["float32"]})
    step = {"float32": mlp_step(torch.float32), "bfloat16_autocast": mlp_step(torch.bfloat16)}
    step["bf16_over_fp32"] = step["bfloat16_autocast"] / step["float32"]
    flags = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported(),
             "avx512": torch.cpu._is_avx512_supported(), "avx2": torch.cpu._is_avx2_supported()}
    result = {"command": "python benchmarks/cpu_bf16.py " + shlex.join(sys.argv[1:]), "torch": torch.__version__,
              "machine": platform.machine(), "cpu": _cpu_name(), "threads": args.threads, "flags": flags,
              "native_bf16": cpu_has_native_bf16(), "matmul": rows, "mlp_forward_backward": step}
    print(f"{result['cpu']}: {flags}; native bf16: {result['native_bf16']}; {args.threads} thread(s)")
    for row in rows:
        print(f"{row['layer']:<20} {TOKENS} x {row['d_in']} x {row['d_out']}: fp32 {row['float32'] * 1e3:8.1f} ms, "
              f"bf16 {row['bfloat16'] * 1e3:8.1f} ms, ratio {row['bf16_over_fp32']:.1f}x")
    print(f"MLP block forward + backward: fp32 {step['float32'] * 1e3:.1f} ms, bf16 autocast "
          f"{step['bfloat16_autocast'] * 1e3:.1f} ms, ratio {step['bf16_over_fp32']:.1f}x")
    print(f"wrote {write_json(args.out, result)}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
