"""Exact reduction through W for d_out > d_in (gate/up projections) against a full d_out x d_out eigh.

    python benchmarks/subspace_reduction.py [--d-in 576 --d-out 1536 --rank 16 --repeats 5]

Both paths get the same statistics (input covariances of two token sets); accuracy is the
projector distance ||QQ^T - Q'Q'^T||_F to the full float64 eigh and the relative loss in R(S).
"""

import argparse
import json
import time
from pathlib import Path

import torch

from sclora.subspace import reward, sc_subspace


def timed(fn, repeats):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - t) / repeats, out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-out", type=int, default=1536)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "subspace_reduction.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    w = torch.randn(args.d_out, args.d_in, dtype=torch.float64) / args.d_in**0.5
    x_plus = torch.randn(4096, args.d_in, dtype=torch.float64) * torch.linspace(0.1, 2, args.d_in, dtype=torch.float64)
    x_minus = torch.randn(4096, args.d_in, dtype=torch.float64) * torch.linspace(2, 0.1, args.d_in, dtype=torch.float64)
    c_plus, c_minus = x_plus.T @ x_plus / 16, x_minus.T @ x_minus / 16
    out_plus, out_minus = w @ c_plus @ w.T, w @ c_minus @ w.T

    rows = {}
    for dtype in (torch.float64, torch.float32):
        name = str(dtype).split(".")[-1]
        t_full, q_full = timed(lambda: sc_subspace(out_plus, out_minus, args.beta, args.rank, dtype=dtype), args.repeats)
        t_red, q_red = timed(lambda: sc_subspace(c_plus, c_minus, args.beta, args.rank, weight=w, dtype=dtype),
                             args.repeats)
        rows[name] = (t_full, q_full, t_red, q_red)
    ref = rows["float64"][1].double()
    r_ref = reward(ref, out_plus, out_minus, args.beta)
    result = {"command": "python benchmarks/subspace_reduction.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"{'path':<28}{'time (ms)':>12}{'proj. dist':>14}{'R(S) loss':>12}")
    for name, (t_full, q_full, t_red, q_red) in rows.items():
        for label, t, q in ((f"full eigh {args.d_out}^2 {name}", t_full, q_full),
                            (f"reduced {args.d_in}^2 {name}", t_red, q_red)):
            q = q.double()
            dist = torch.linalg.norm(q @ q.T - ref @ ref.T).item()
            loss = ((r_ref - reward(q, out_plus, out_minus, args.beta)) / r_ref.abs()).item()
            print(f"{label:<28}{1000 * t:>12.1f}{dist:>14.2e}{loss:>12.2e}")
            result[label] = {"ms": round(1000 * t, 2), "projector_distance": dist, "relative_reward_loss": loss}
        result[f"speedup_{name}"] = round(t_full / t_red, 2)
        print(f"speed-up of the reduction ({name}): {t_full / t_red:.1f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
