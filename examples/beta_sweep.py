"""Beta sweep: collect the D+ / D- statistics once, then compare SC-LoRA initializations for several betas.

    python examples/beta_sweep.py --model DIR --data task.jsonl --preserve keep.jsonl --output out

The statistics (output covariances of every linear layer on --data (D+) and --preserve (D-)) are the only
step that runs the model on data; they are saved as safetensors and loaded back, and each beta's
initialization is a decomposition of them. For each beta the script prints the share of D+'s and of D-'s
output energy the initial adapter subspace holds (mean over modules): the D- share falls as beta grows.
Last, sclora.choose_beta finds the smallest beta that keeps the D- share within --budget.
"""

import argparse
from pathlib import Path

import sclora


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", required=True, help="D+: what to learn (JSONL)")
    parser.add_argument("--preserve", required=True, help="D-: what to keep (JSONL)")
    parser.add_argument("--output", default="runs/beta_sweep", help="where the statistics are saved")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.2, 0.5, 0.8, 0.95])
    parser.add_argument("--budget", type=float, default=0.05, help="largest share of D-'s energy to keep")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per example")
    parser.add_argument("--samples", type=int, default=256, help="examples per set for the statistics")
    args = parser.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = sclora.models.load_model(args.model)
    for name, source in (("plus", args.data), ("minus", args.preserve)):
        rows = sclora.load_examples(source)[:args.samples]
        batches = sclora.statistics_batches(tokenizer, rows, seq_len=args.seq_len)
        sclora.collect_covariances(model, batches, show_progress=False).save(out / f"{name}.safetensors")
    plus = sclora.CovarianceStats.load(out / "plus.safetensors")
    minus = sclora.CovarianceStats.load(out / "minus.safetensors")

    energies = {}
    for beta in args.betas:
        # SC-LoRA rewrites the base weights (W0 -> W0 - B0 A0), so each beta starts from a fresh copy
        fresh, _ = sclora.models.load_model(args.model)
        peft_model = sclora.get_sclora_model(fresh, sclora.SCLoRAConfig(r=args.r, beta=beta), plus, minus,
                                             show_progress=False)
        energies[beta] = sclora.summarize_energy(sclora.subspace_energy(peft_model, plus, minus))["overall"]
        print(f"beta {beta:<5g} initial subspace holds {energies[beta]['plus']:6.1%} of D+, "
              f"{energies[beta]['minus']:6.1%} of D- output energy")

    choice = sclora.choose_beta(model, plus, minus, r=args.r, budget=args.budget, show_progress=False)
    print(f"smallest beta keeping at most {args.budget:.1%} of D-: {choice.beta:.3f} "
          f"(D+ {choice.plus_energy:.1%}, D- {choice.minus_energy:.1%})")
    return energies, choice


if __name__ == "__main__":
    main()
