"""The paper's "efficient fine-tuning" claim as the figure users choose by: the steps SC-LoRA needs to reach vanilla
LoRA's final training loss, divided by LoRA's steps (target <= 0.5), and the same for the held-out utility metric
(at the steps the experiment evaluated along training), read from an experiment's committed results.

    python benchmarks/convergence.py [results/knowledge-math-small] [--json benchmarks/results/convergence.json]

Training losses are per batch, so both sides are compared as trailing means of 5 steps (LoRA's final value: the
mean of its last 5). LoRA is taken at SC-LoRA's learning rate, else at
its own (the first LoRA row: the paper tunes LoRA's learning rate); seeds are averaged step by step (each seed sees the
same batches in every method, so the steps are comparable).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _results import write_json

TARGET = 0.5


def main() -> None:
    from sclora.experiments.evaluate.metrics import metric
    from sclora.experiments.report.claims import efficiency
    from sclora.experiments.report.groups import _several_lrs, group_runs, infer_layout, label
    from sclora.fileio import parse_yaml

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="?", default="results/knowledge-math-small")
    parser.add_argument("--json", default="benchmarks/results/convergence.json")
    args = parser.parse_args()
    folder = Path(args.results)
    rows = json.loads((folder / "results.json").read_text())
    config = parse_yaml((folder / "config.yaml").read_text())
    groups = group_runs(rows)
    layout = infer_layout(rows, config)
    utility = metric(layout.utility[0]) if layout.utility else None
    lr_methods = _several_lrs(groups)
    loras = [g for g in groups if g.method == "lora" and g.loss]
    entries = []
    for g in (g for g in groups if g.method == "sc_lora" and g.loss and not g.locked):
        ref = next((r for r in loras if r.lr == g.lr), loras[0] if loras else None)  # else LoRA at its own lr
        if ref is None:
            continue
        e = efficiency(g, ref, utility)
        entries.append({"run": label(g, lr_methods), "reference": label(ref, lr_methods), "runs": g.runs, **e})
    print(f"{folder}: steps to reach LoRA's final value / LoRA's steps (target <= {TARGET})")
    for e in entries:
        loss = "never" if e["loss_ratio"] is None else f"{e['loss_ratio']:.2f} (step {e['loss_step']} of {e['steps']})"
        held = ("not evaluated along training" if not e["utility_steps_evaluated"] else "never"
                if e["utility_ratio"] is None else f"{e['utility_ratio']:.2f} (step {e['utility_step']})")
        verdict = lambda r: "pass" if r is not None and r <= TARGET else "miss"  # noqa: E731
        held_verdict = verdict(e["utility_ratio"]) if e["utility_steps_evaluated"] else "-"
        print(f"  {e['run']:<34} training loss {loss:<22} {verdict(e['loss_ratio'])}   held-out "
              f"{utility.key if utility else '-'} {held:<16} {held_verdict}")
    write_json(args.json, {"results": str(folder), "target": TARGET, "utility_metric": utility.key if utility else None,
                           "entries": entries})


if __name__ == "__main__":
    main()
