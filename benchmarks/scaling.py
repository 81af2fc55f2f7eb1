"""How SC-LoRA's init cost grows with the tokens and the model width, against a flop model of its limit.

    python benchmarks/scaling.py            # widths 288 / 576 / 1152 (4 layers) at 32k tokens; 16k / 32k / 64k at 576
    python benchmarks/scaling.py --quick    # tiny sizes: checks the script in ~1 min

Each point runs in a fresh subprocess (peak RSS per point) on a random Llama of the SmolLM2 family's shape (head
dim 64, 3 query heads per KV head, MLP 8/3 of the width, a small vocabulary so the embedding does not dominate),
on random token ids (the cost does not depend on the text): plain forwards of the same tokens (the floor),
``collect_covariances`` on D+ and D-, then ``get_sclora_model``. The flop model per token: the forward's
2 x (linear parameters) + attention 2 x seq x width per layer, and the statistics' Gram products d(d+1) per stored
matrix (what ``stats.sums`` holds: XᵀX is symmetric, so d(d+1)/2 multiply-adds is the least any implementation
does; the row strips of ``add_gram_upper`` do somewhat more, counted as well); the decomposition sum d^3 over the
modules' eigenproblems. The fit gives each phase's effective throughput (GFLOP/s) — constant across points when the
flop model explains the cost — and the limit statistics / forwards = 1 + Gram flops / forward flops that no
implementation can beat in the same precision (at equal throughput).
Writes benchmarks/results/scaling.json and scaling.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from _results import current_rss_mb, peak_rss_mb, write_json

import sclora
from sclora.statistics import gram_strip, staircase_size

VOCAB = 1024
SEQ = 256
BATCH = 8


def llama(width: int, layers: int) -> transformers.LlamaForCausalLM:
    heads = max(1, width // 64)
    config = transformers.LlamaConfig(hidden_size=width, intermediate_size=(8 * width // 3 + 31) // 32 * 32,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=max(1, heads // 3), vocab_size=VOCAB,
                                      max_position_embeddings=SEQ)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def strip_flops(d: int) -> int:
    """Flops per token of ``add_gram_upper`` on a d x d sum: a multiply-add per entry of its staircase."""
    return 2 * staircase_size(d, gram_strip(d))


def measure(width: int, layers: int, tokens: int, r: int) -> dict:
    """One point, in this process: floor, statistics, decomposition, memory and the flop model."""
    model = llama(width, layers)
    loaded = current_rss_mb()
    samples = max(1, tokens // SEQ)
    g = torch.Generator().manual_seed(1)
    sets = [torch.randint(lo, hi, (samples, SEQ), generator=g) for lo, hi in ((0, VOCAB // 2), (VOCAB // 2, VOCAB))]
    batches = [[{"input_ids": ids[i:i + BATCH], "attention_mask": torch.ones_like(ids[i:i + BATCH])}
                for i in range(0, samples, BATCH)] for ids in sets]
    start = time.perf_counter()
    with torch.no_grad():
        for part in batches:
            for batch in part:
                model.model(**batch)
    floor = time.perf_counter() - start
    config = sclora.SCLoRAConfig(r=r, beta=0.5)
    start = time.perf_counter()
    stats = [sclora.collect_covariances(model, part, config.target_modules, show_progress=False) for part in batches]
    statistics = time.perf_counter() - start
    stats_bytes = sum(t.numel() * t.element_size() for s in stats for t in s.sums.values())
    # per token: XᵀX is symmetric, so d(d+1)/2 multiply-adds are the least any implementation must do (a full GEMM
    # does 2d²; add_gram_upper's row strips do (k+1)/2k of that)
    widths_stored = list(stats[0].dims.values())
    gram_flops = sum(d * (d + 1) for d in widths_stored)
    gram_flops_executed = sum(strip_flops(d) for d in widths_stored)
    start = time.perf_counter()
    sclora.get_sclora_model(model, config, *stats, show_progress=False)
    decomposition = time.perf_counter() - start
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    forward_flops = 2 * linear + 2 * SEQ * width * layers  # per token (attention: causal half of 2 x 2 x seq x d)
    eig_flops = sum(d ** 3 for d in widths_stored)
    return {"width": width, "layers": layers, "tokens_per_set": samples * SEQ, "r": r,
            "floor_s": floor, "statistics_s": statistics, "decomposition_s": decomposition,
            "init_s": statistics + decomposition, "loaded_rss_mb": loaded,
            "peak_rss_mb": peak_rss_mb(),
            "stats_mb": stats_bytes / 2**20, "model_mb": sum(p.numel() * 4 for p in model.parameters()) / 2**20,
            "forward_flops_per_token": forward_flops, "gram_flops_per_token": gram_flops,
            "gram_flops_executed_per_token": gram_flops_executed,
            "eig_flops": eig_flops, "widths_stored": widths_stored}


def fit(points: list[dict]) -> dict:
    """Effective throughputs (GFLOP/s) of the floor, the statistics pass and the decomposition, per point and as a
    least-squares rate through the origin over all points; and the flop limit of init / floor per point."""
    def rate(work, seconds):
        return sum(w * s for w, s in zip(work, seconds)) / sum(s * s for s in seconds) / 1e9

    tokens = [2 * p["tokens_per_set"] for p in points]
    fwd = [t * p["forward_flops_per_token"] for t, p in zip(tokens, points)]
    stat = [t * (p["forward_flops_per_token"] + p["gram_flops_per_token"]) for t, p in zip(tokens, points)]
    eig = [p["eig_flops"] for p in points]
    for p, f, s, e in zip(points, fwd, stat, eig):
        p["floor_gflops"] = f / p["floor_s"] / 1e9
        p["statistics_gflops"] = s / p["statistics_s"] / 1e9
        p["decomposition_gflops"] = e / p["decomposition_s"] / 1e9
        p["statistics_vs_forwards"] = p["statistics_s"] / p["floor_s"]
        p["statistics_vs_forwards_limit"] = 1 + p["gram_flops_per_token"] / p["forward_flops_per_token"]
        p["statistics_vs_forwards_strips"] = 1 + p["gram_flops_executed_per_token"] / p["forward_flops_per_token"]
        p["stats_mb_predicted"] = 2 * 4 * sum(d * d for d in p["widths_stored"]) / 2**20  # two sets of fp32 d x d
    return {"floor_gflops": rate(fwd, [p["floor_s"] for p in points]),
            "statistics_gflops": rate(stat, [p["statistics_s"] for p in points]),
            "decomposition_gflops": rate(eig, [p["decomposition_s"] for p in points])}


def plot(points: list[dict], rates: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    time_ax, ratio_ax, mem_ax = fig.subplots(1, 3)
    work = [2 * p["tokens_per_set"] * (p["forward_flops_per_token"] + p["gram_flops_per_token"]) / 1e12 for p in points]
    for p, w in zip(points, work):
        time_ax.plot(w, p["statistics_s"], "o", label=f"d={p['width']}, {p['tokens_per_set'] // 1024}k tokens/set")
    top = max(work) * 1.05
    time_ax.plot([0, top], [0, top * 1e3 / rates["statistics_gflops"]], "k--", lw=1,
                 label=f"flop model at {rates['statistics_gflops']:.1f} GFLOP/s")
    time_ax.set(xlabel="forward + Gram TFLOP (both sets)", ylabel="statistics seconds", title="Time against the flop model")
    time_ax.legend(fontsize=6)
    xs = range(len(points))
    names = [f"d={p['width']}\n{p['tokens_per_set'] // 1024}k" for p in points]
    ratio_ax.bar([x - 0.27 for x in xs], [p["statistics_vs_forwards"] for p in points], 0.27, label="measured")
    ratio_ax.bar(list(xs), [p["statistics_vs_forwards_strips"] for p in points], 0.27,
                 label="flop model of the row strips")
    ratio_ax.bar([x + 0.27 for x in xs], [p["statistics_vs_forwards_limit"] for p in points], 0.27,
                 label="flop limit 1 + d(d+1) / forward")
    ratio_ax.set_xticks(list(xs), names, fontsize=7)
    ratio_ax.set(ylabel="statistics / plain forwards", title="The statistics pass against the forwards")
    ratio_ax.legend(fontsize=7)
    mem_ax.plot([p["stats_mb_predicted"] for p in points], [p["peak_rss_mb"] - p["loaded_rss_mb"] for p in points],
                "o", label="measured: peak − loaded RSS")
    top = max(p["stats_mb_predicted"] for p in points) * 1.05
    mem_ax.plot([0, top], [0, top], "k--", lw=1, label="the statistics alone (2 sets, fp32 d×d)")
    mem_ax.set(xlabel="predicted statistics MB", ylabel="MB above the loaded model", title="Memory")
    mem_ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (checks the script)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scaling.json"))
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure(**json.loads(args.point))))
        return
    if args.quick:
        grid = [(64, 2048), (128, 2048), (256, 2048), (128, 1024), (128, 4096)]
    else:
        grid = [(288, 32768), (576, 32768), (1152, 32768), (576, 16384), (576, 65536)]
    points = []
    for width, tokens in grid:
        spec = json.dumps({"width": width, "layers": args.layers if not args.quick else 2, "tokens": tokens, "r": args.r})
        done = subprocess.run([sys.executable, __file__, "--point", spec], capture_output=True, text=True, check=True)
        points.append(json.loads(done.stdout.strip().splitlines()[-1]))
        p = points[-1]
        print(f"d={width:5d} tokens/set={p['tokens_per_set']:6d}: floor {p['floor_s']:.2f}s, statistics "
              f"{p['statistics_s']:.2f}s, decomposition {p['decomposition_s']:.2f}s, statistics/forwards {p['statistics_s'] / p['floor_s']:.3f}"
              f", peak RSS {p['peak_rss_mb']:.0f} MB (loaded {p['loaded_rss_mb']:.0f})", flush=True)
    rates = fit(points)
    out = Path(args.out)
    plot(points, rates, out.with_suffix(".png"))
    write_json(out, {"command": "python benchmarks/scaling.py" + (" --quick" if args.quick else ""),
                     "threads": torch.get_num_threads(), "torch": torch.__version__, "rates_gflops": rates,
                     "points": points})
    print(json.dumps(rates, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
