"""kill -9 `sclora run` on the real model at chosen moments, rerun, and compare with an uninterrupted run.

    python benchmarks/kill_resume.py configs/demo.yaml --reference runs/demo-ref --output runs/demo-kill

The reference folder must hold a finished uninterrupted run of the same config (`sclora run CONFIG --output
REF`). Kills: (1) after --first-kill seconds (statistics or the base evaluation), (2) when the given run's
checkpoint appears (mid-training, between a checkpoint and the end). Prints what differs (timings excluded)
and writes a JSON summary to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sclora.fileio import atomic_write_json

TIMINGS = ("init_seconds", "train_seconds", "train_tokens_per_second")


def start(config: str, out: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sclora", "run", config, "--output", out, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(proc: subprocess.Popen, ready, what: str) -> float:
    t0 = time.perf_counter()
    while not ready():
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before {what}")
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.perf_counter() - t0


def rows(folder: Path) -> list[dict]:
    data = json.loads((folder / "results.json").read_text())
    return sorted(({k: v for k, v in r.items() if k not in TIMINGS and not k.endswith("_seconds")} for r in data),
                  key=lambda r: r["run"])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--first-kill", type=float, default=25.0)
    parser.add_argument("--checkpoint", default="runs/sc_lora-beta0.5/checkpoint-4/trainer_state.json")
    parser.add_argument("--json")
    args = parser.parse_args()
    out = Path(args.output)
    start_time = time.perf_counter()
    first = kill_when(start(args.config, args.output), lambda: time.perf_counter() - start_time > args.first_kill,
                      "the first kill")
    rows_after_first = len(json.loads((out / "results.json").read_text())) if (out / "results.json").exists() else 0
    second = kill_when(start(args.config, args.output), lambda: (out / args.checkpoint).exists(), "the checkpoint")
    rows_after_second = len(json.loads((out / "results.json").read_text()))
    final = subprocess.run([sys.executable, "-m", "sclora", "run", args.config, "--output", args.output, "--quiet"],
                           capture_output=True, text=True)
    total = time.perf_counter() - start_time
    ref, got = rows(Path(args.reference)), rows(out)
    same_samples = all((Path(args.reference) / "samples" / p.name).read_bytes() == p.read_bytes()
                       for p in (out / "samples").iterdir())
    differing = sorted({k for a, b in zip(ref, got) for k in set(a) | set(b) if a.get(k) != b.get(k)})
    summary = {"config": args.config, "kill_1_after_s": round(first, 1), "rows_after_kill_1": rows_after_first,
               "kill_2_after_s": round(second, 1), "rows_after_kill_2": rows_after_second,
               "final_exit": final.returncode, "wall_s_all_three": round(total, 1),
               "rows_equal_reference": ref == got, "samples_equal_reference": same_samples,
               "differing_keys": differing, "runs": [r["run"] for r in got]}
    print(json.dumps(summary, indent=2))
    if args.json:
        atomic_write_json(args.json, summary)
    return 0 if ref == got and same_samples and final.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
