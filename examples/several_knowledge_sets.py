"""Several knowledge sets: fine-tune while keeping two (or more) kinds of knowledge, each with its own beta.

    python examples/several_knowledge_sets.py --model DIR --data task.jsonl \
        --preserve keep_a.jsonl --beta 0.4 --preserve keep_b.jsonl --beta 0.4 --output out

Each --preserve file is one knowledge set D-_i and each --beta its weight (given in the same order, summing
to at most 1): SC-LoRA's initial subspace maximizes (1 - sum beta_i) Cov+ - sum beta_i Cov-_i, each set's
statistics normalized on their own, so a small set is not outweighed by a large one. The script prints how
much of each set's output energy the initial subspace holds.
"""

import argparse

import sclora


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", required=True, help="what to learn (JSONL)")
    parser.add_argument("--preserve", action="append", required=True, help="a knowledge set to keep (JSONL)")
    parser.add_argument("--beta", type=float, action="append", help="weight of each --preserve set (default 0.4)")
    parser.add_argument("--output", default="runs/several_knowledge_sets")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per example")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (-1: chosen from the data)")
    args = parser.parse_args(argv)
    betas = args.beta or [0.4] * len(args.preserve)
    if len(betas) != len(args.preserve):
        parser.error(f"{len(args.preserve)} --preserve sets need as many --beta values, got {len(betas)}")

    model, tokenizer = sclora.models.load_model(args.model)
    result = sclora.finetune(model, tokenizer, args.data, preserve=args.preserve,
                             config=sclora.SCLoRAConfig(r=args.r, beta=betas),
                             train_config={"max_steps": args.max_steps}, seq_len=args.seq_len,
                             output_dir=args.output)
    print(result.text)

    # result.energy: "plus" for --data, "minus_0", "minus_1", ... for the --preserve sets in their order
    print("\nshare of each set's output energy in the initial subspace (mean over modules):")
    print(f"  {'--data':<40} {result.energy['plus']:6.1%}")
    for i, (path, beta) in enumerate(zip(args.preserve, betas)):
        print(f"  {'--preserve ' + path + f' (beta {beta:g})':<40} {result.energy[f'minus_{i}']:6.1%}")
    return result


if __name__ == "__main__":
    main()
