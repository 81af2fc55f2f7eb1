"""Few-shot exact match with the shared context's keys/values computed once vs the full prompt every batch.

    python benchmarks/fewshot_prefix.py [--config configs/lr-frontier-probe.yaml] [--n 200]
        [--adapter runs/frontier/runs/lora-lr0.002/adapter] [--json benchmarks/results/fewshot_prefix.json]

The items, shots and batch size are the config's ``knowledge_em`` evaluation (the first --n of its items) on its
model, the base and each --adapter (a PEFT LoRA adapter for that base). Each model answers every item both ways
(``knowledge_em(..., reuse_context=False / True)``); printed: seconds each way, their ratio, the number of items
whose greedy answer differs and the exact match each way. Run it alone (one torch process on the machine).
"""

from __future__ import annotations

import argparse
import time

import torch
from _results import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/lr-frontier-probe.yaml")
    parser.add_argument("--n", type=int, default=200, help="items (the first n of the config's knowledge_em set)")
    parser.add_argument("--adapter", action="append", default=[], help="a PEFT adapter folder for the config's model")
    parser.add_argument("--json", default="benchmarks/results/fewshot_prefix.json")
    args = parser.parse_args()

    from peft import PeftModel

    from sclora.experiments.evaluate.scores import knowledge_em
    from sclora.experiments.examples import build_examples, build_mixture, scorer_extras
    from sclora.experiments.spec import as_list, eval_spec, load_config
    from sclora.models import load_model

    config = load_config(args.config)
    spec, options = eval_spec(config.evaluate["knowledge_em"], "knowledge_em")
    items = build_examples(spec, config.seed)
    sets = {"plus": build_examples(config.plus, config.seed), "train": build_mixture(config.train_data, config.seed),
            **{f"minus{i}": build_examples(s, config.seed) for i, s in enumerate(as_list(config.minus))}}
    evals = {name: build_examples(eval_spec(s, name)[0], config.seed) for name, s in config.evaluate.items()}
    shots = scorer_extras(config.seed, evals, sets)["knowledge_em"]["shots"]  # the shots a run of the config uses
    items = items[:args.n]
    batch_size = options.get("batch_size", 8)

    result = {"config": args.config, "model": config.model, "items": len(items), "batch_size": batch_size,
              "threads": torch.get_num_threads(), "models": {}}
    for name in ["base", *args.adapter]:
        model, tokenizer = load_model(config.model, dtype=getattr(torch, config.dtype))
        if name != "base":
            model = PeftModel.from_pretrained(model, name)
        entry = {}
        for way, reuse in (("full", False), ("reused", True)):
            texts: list[str] = []
            start = time.perf_counter()
            scores = knowledge_em(model, tokenizer, items, batch_size=batch_size, shots=shots, outputs=texts,
                                  reuse_context=reuse)
            entry[way] = {"seconds": round(time.perf_counter() - start, 1), "texts": texts,
                          "knowledge_em": sum(scores["knowledge_em"]) / len(items)}
        differ = [i for i, (a, b) in enumerate(zip(entry["full"]["texts"], entry["reused"]["texts"])) if a != b]
        summary = {"full_seconds": entry["full"]["seconds"], "reused_seconds": entry["reused"]["seconds"],
                   "speedup": round(entry["full"]["seconds"] / entry["reused"]["seconds"], 2),
                   "answers_differ": len(differ), "differing_items": differ,
                   "em_full": entry["full"]["knowledge_em"], "em_reused": entry["reused"]["knowledge_em"]}
        result["models"][name] = summary
        print(f"{name}: full {summary['full_seconds']} s, reused {summary['reused_seconds']} s "
              f"({summary['speedup']}x); answers differ on {len(differ)} of {len(items)}; "
              f"EM {summary['em_full']:.2f} vs {summary['em_reused']:.2f}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
