"""SC-LoRA init of a Llama-2-7B-shaped model on one GPU: statistics, decomposition, memory, float64 check.

    python benchmarks/gpu_init.py                                  # 32 layers, 256 + 256 samples x 512 tokens
    python benchmarks/gpu_init.py --solver eigh                    # the full-eigh baseline
    python benchmarks/gpu_init.py --device cpu --layers 2 --tiny   # smoke check on CPU (seconds)

The model is LlamaForCausalLM built from a config (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab
32000; no download) with random bf16 weights; D+ and D- are random tokens from the two halves of the vocabulary,
so that their statistics differ. Steps, each timed with CUDA events (time.perf_counter on CPU):
  statistics     sclora.collect_covariances over D+ and over D- (float32 sums, the default)
  check          for the 7 modules of the first and last layer: the float64 eigh subspace from the same
                 statistics and pristine weights (the reference), timed against --solver on the same module
  decomposition  sclora.get_sclora_model (SCLoRAConfig r, beta, dtype float64, eigen_solver=--solver)
then the adapter actually built (lora_B) is compared with the reference: projector distance and R(S) loss.
Prints a table, writes JSON (--out); torch.cuda.max_memory_allocated is recorded per step.

Sizing for one H200 (projections, not measurements; the JSON holds the measured values):
  forward   Llama-2-7B has N = 6.7e9 parameters; 512 samples x 512 tokens = 262,144 tokens cost
            2 N tokens = 3.5e15 FLOPs (attention at 512 tokens adds ~2 %, the skipped LM head saves ~2 %);
            at ~400 TFLOP/s effective bf16 that is ~9 s.
  X^T X     the output-side plan stores 4 matrices of 4096^2 per layer (q/k/v share their input, o its
            output, gate/up share their input, down its output): 128 per set, each 2 * 4096^2 * 131,072 =
            4.4e12 FLOPs, 1.1e15 for both sets; in float32 without TF32 (~50 TFLOP/s) ~23 s.
  statistics  ~9 + 23 = ~32 s.
  eigh      224 modules (q/k/v/o/down at 4096, gate/up reduced through W0 to 4096): cuSOLVER float64 syevd
            of 4096^2 ~0.4-1.0 s each, 90-220 s for --solver eigh; LOBPCG (what auto picks at 4096, r=16)
            ~22-40 iterations of a few latency-bound small kernels (2-5 ms), ~0.05-0.2 s each, 10-45 s.
            The thin QR of gate/up (11008 x 4096, float64, ~6.5e11 FLOPs) adds 2-4 s over 64 modules.
  check     14 modules x (float64 eigh + --solver) ~10-20 s; model build (random init on the GPU) ~10 s.
  memory    bf16 weights 12.6 GiB + statistics 2 sets x 128 x 64 MiB = 16 GiB + activations (batch 8 x 512)
            < 1 GiB + float64 temporaries < 1 GiB: ~30 GiB peak.
  total     ~1.5-2.5 min with auto, ~3-5 min with eigh: within 8 minutes (docs/performance.md, section 3).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from _results import write_json

import sclora
from sclora.eigensolvers import SOLVERS, auto_solver
from sclora.subspace import delta_covariance, sc_subspace

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}
TINY = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 1024, "max_position_embeddings": 512}
PARAMS_7B = 6.74e9


class Clock:
    """Seconds of a block: CUDA events on a GPU (after a synchronize), time.perf_counter on CPU; also the peak
    memory allocated on the GPU during the block."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.times: dict[str, float] = {}
        self.peaks_gb: dict[str, float] = {}

    @contextmanager
    def __call__(self, key: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        yield
        if self.cuda:
            end.record()
            torch.cuda.synchronize()
            self.times[key] = self.times.get(key, 0.0) + start.elapsed_time(end) / 1000
            self.peaks_gb[key] = torch.cuda.max_memory_allocated() / 2**30
        else:
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - t0


def log(message: str) -> None:
    print(f"[gpu_init] {message}", file=sys.stderr, flush=True)


def build_model(args, device: torch.device):
    shape = dict(LLAMA2_7B, **(TINY if args.tiny else {}), num_hidden_layers=args.layers)
    config = transformers.LlamaConfig(**shape, tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # random init directly in bf16 on the device: no float32 copy
    try:
        with device:
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval(), shape


def token_batches(args, vocab: int, half: int, seed: int):
    """D+ from the lower half of the vocabulary, D- from the upper: random tokens, all real (mask of ones)."""
    g = torch.Generator().manual_seed(seed)
    low, high = (0, vocab // 2) if half == 0 else (vocab // 2, vocab)
    ids = torch.randint(low, high, (args.samples, args.seq_len), generator=g)
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(args.batch_size)]


def output_reward(q: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor | None) -> float:
    """tr(Q^T dCov_out Q) with dCov_out = delta, or W delta W^T for input-side statistics (never formed)."""
    q = q.to(torch.float64)
    if weight is None:
        return torch.einsum("ir,ij,jr->", q, delta, q).item()
    qw = q.T @ weight.to(torch.float64)
    return ((qw @ delta) * qw).sum().item()


def orthonormal(b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(b.detach().to(torch.float64)).Q


def projector_distance(q: torch.Tensor, q_ref: torch.Tensor) -> float:
    q, q_ref = orthonormal(q), orthonormal(q_ref)
    return math.sqrt(2) * torch.linalg.norm(q - q_ref @ (q_ref.T @ q)).item()


def reference_check(args, model, plus, minus, clock: Clock, names: list[str]) -> dict:
    """Before the init (pristine W0): float64 eigh subspace of each checked module, and the same call with
    --solver, both timed."""
    checks = {}
    for name in names:
        cp, w = plus.factor(name)
        cm, _ = minus.factor(name)
        kwargs = {"weight": w} if w is not None else {}
        with clock(f"check eigh {name}"):
            q_ref = sc_subspace(cp, cm, args.beta, args.r, dtype=torch.float64, solver="eigh", **kwargs)
        with clock(f"check {args.solver} {name}"):
            q_fast = sc_subspace(cp, cm, args.beta, args.r, dtype=torch.float64, solver=args.solver, **kwargs)
        delta = delta_covariance(cp.to(torch.float64), cm.to(torch.float64), args.beta)
        n = min(w.shape) if w is not None else cp.shape[0]
        checks[name] = {"q_ref": q_ref, "delta": delta, "weight": w, "n": n,
                        "eigh_s": clock.times.pop(f"check eigh {name}"),
                        "solver_s": clock.times.pop(f"check {args.solver} {name}"),
                        "solver_vs_eigh_distance": projector_distance(q_fast, q_ref),
                        "auto_choice": auto_solver(n, args.r, torch.float64)}
        log(f"check {name}: eigh {checks[name]['eigh_s']:.3f} s, {args.solver} {checks[name]['solver_s']:.3f} s "
            f"(distance {checks[name]['solver_vs_eigh_distance']:.1e})")
    return checks


def adapter_check(peft_model, checks: dict) -> list[dict]:
    """Projector distance and relative R(S) loss of the adapter actually built (lora_B) against the reference."""
    rows = []
    inner = peft_model.base_model.model
    for name, c in checks.items():
        b = inner.get_submodule(name).lora_B["default"].weight
        reward_ref = output_reward(c["q_ref"], c["delta"], c["weight"])
        reward_b = output_reward(orthonormal(b).to(c["delta"].device), c["delta"], c["weight"])
        rows.append({"module": name, "n": c["n"], "auto_choice": c["auto_choice"], "eigh_s": c["eigh_s"],
                     "solver_s": c["solver_s"], "solver_vs_eigh_distance": c["solver_vs_eigh_distance"],
                     "adapter_dtype": str(b.dtype).removeprefix("torch."),
                     "adapter_projector_distance": projector_distance(b, c["q_ref"]),
                     "adapter_reward_loss": (reward_ref - reward_b) / abs(reward_ref)})
    return rows


def projections(args, shape: dict) -> dict:
    """The docstring's arithmetic for these settings (projections for an H200, not measurements)."""
    d, layers = shape["hidden_size"], shape["num_hidden_layers"]
    tokens = 2 * args.samples * args.seq_len
    params = PARAMS_7B * layers / 32 if not args.tiny else None
    out = {"tokens": tokens, "xtx_flops": 4 * layers * 2 * d * d * tokens}
    if params:
        out.update(forward_flops=2 * params * tokens, forward_s_at_400tflops=2 * params * tokens / 400e12,
                   xtx_s_at_50tflops_fp32=out["xtx_flops"] / 50e12,
                   statistics_gb=2 * 4 * layers * d * d * 4 / 2**30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-2-7B: 32)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"smoke check: {TINY['hidden_size']}-dim layers and 8 + 8 samples x 64 tokens")
    parser.add_argument("--samples", type=int, help="samples per set, D+ and D- each (default 256; tiny 8)")
    parser.add_argument("--seq-len", type=int, help="tokens per sample (default 512; tiny 64)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--solver", choices=SOLVERS, default="auto", help="SCLoRAConfig.eigen_solver")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_init.json"))
    args = parser.parse_args()
    args.samples = args.samples or (8 if args.tiny else 256)
    args.seq_len = args.seq_len or (64 if args.tiny else 512)
    device = torch.device(args.device)
    warnings.simplefilter("ignore")  # ties / deprecations are not what this measures
    clock = Clock(device)
    start = time.perf_counter()

    with clock("model build"):
        model, shape = build_model(args, device)
    log(f"model {shape} on {device}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    config = sclora.SCLoRAConfig(r=args.r, beta=args.beta, eigen_solver=args.solver)
    stats = {}
    for half, label in enumerate(("D+", "D-")):
        data = token_batches(args, shape["vocab_size"], half, seed=half + 1)
        with clock(f"statistics {label}"):
            stats[label] = sclora.collect_covariances(model, data, config.target_modules, show_progress=False)
        log(f"statistics {label}: {clock.times[f'statistics {label}']:.2f} s")
    if device.type == "cuda":  # cuSOLVER's first call initializes it: not part of any module's time
        torch.linalg.eigh(torch.eye(8, dtype=torch.float64, device=device))
    last = args.layers - 1
    names = [n for n in stats["D+"] if n.startswith(("model.layers.0.", f"model.layers.{last}."))]
    checks = reference_check(args, model, stats["D+"], stats["D-"], clock, names)
    clock.times["check (before init)"] = sum(c["eigh_s"] + c["solver_s"] for c in checks.values())
    with clock("decomposition"):
        peft_model = sclora.get_sclora_model(model, config, stats["D+"], stats["D-"], show_progress=False)
    log(f"decomposition ({args.solver}): {clock.times['decomposition']:.2f} s")
    rows = adapter_check(peft_model, checks)
    times = clock.times
    statistics_s = times["statistics D+"] + times["statistics D-"]
    result = {
        "command": "python benchmarks/gpu_init.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor()})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sclora": sclora.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "model": shape,
        "modules": len(stats["D+"]), "stored_matrices_per_set": len(stats["D+"].sums),
        "statistics_s": statistics_s, "decomposition_s": times["decomposition"],
        "init_s": statistics_s + times["decomposition"], "times_s": times,
        "max_memory_allocated_gb": clock.peaks_gb or None,
        "max_memory_allocated_overall_gb": max(clock.peaks_gb.values()) if clock.peaks_gb else None,
        "float64_check": rows, "projections": projections(args, shape),
        "wall_s": time.perf_counter() - start,
    }
    print(f"\n{'step':<34}{'seconds':>10}{'peak GB':>10}")
    for key, seconds in times.items():
        peak = clock.peaks_gb.get(key)
        print(f"{key:<34}{seconds:>10.3f}{'' if peak is None else f'{peak:>10.2f}'}")
    print(f"{'init = statistics + decomposition':<34}{result['init_s']:>10.3f}")
    print(f"\nfloat64 check ({len(rows)} modules; reference: float64 eigh of the same statistics)")
    print(f"{'module':<36}{'n':>6}{'auto':>8}{'eigh s':>9}{args.solver + ' s':>10}{'solver dist':>13}"
          f"{'adapter dist':>14}{'R loss':>10}")
    for row in rows:
        print(f"{row['module']:<36}{row['n']:>6}{row['auto_choice']:>8}{row['eigh_s']:>9.3f}{row['solver_s']:>10.3f}"
              f"{row['solver_vs_eigh_distance']:>13.1e}{row['adapter_projector_distance']:>14.1e}"
              f"{row['adapter_reward_loss']:>10.1e}")
    out = write_json(args.out, result)
    log(f"wrote {out} in {result['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
