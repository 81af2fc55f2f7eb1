"""Quickstart: fine-tune with SC-LoRA in one call, then use the adapter with plain PEFT.

    python examples/quickstart.py --model DIR --data task.jsonl --preserve keep.jsonl --output out

--data holds what to learn and --preserve the knowledge to keep, as JSONL rows {"prompt", "response"},
{"messages"} or {"text"}. sclora.finetune collects statistics of both sets, initializes the adapter in the
subspace that fits --data while staying away from --preserve (weighted by --beta), trains it and writes
OUTPUT/adapter: a plain PEFT LoRA adapter for the untouched base model. The script then loads that adapter
with PEFT alone on a fresh copy of the base and generates an answer to one prompt.
--model is a local model folder, a hub id, or smollm2-135m-instruct (the embedded model, offline).
"""

import argparse

from peft import PeftModel

import sclora


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", required=True, help="what to learn (JSONL)")
    parser.add_argument("--preserve", required=True, help="what to keep (JSONL)")
    parser.add_argument("--output", default="runs/quickstart")
    parser.add_argument("--beta", type=float, default=0.8, help="0 fits --data only, 1 avoids --preserve only")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per example")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (-1: chosen from the data)")
    parser.add_argument("--prompt", help="prompt to answer at the end (default: a --data prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    model, tokenizer = sclora.models.load_model(args.model)
    result = sclora.finetune(model, tokenizer, args.data, preserve=args.preserve,
                             config=sclora.SCLoRAConfig(r=args.r, beta=args.beta),
                             train_config={"max_steps": args.max_steps}, seq_len=args.seq_len,
                             output_dir=args.output)
    print(result.text)

    # The adapter needs nothing from sclora: PEFT loads it on the base model as it was before fine-tuning.
    base, tokenizer = sclora.models.load_model(args.model)
    tuned = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    prompt = args.prompt or sclora.load_examples(args.data)[0].get("prompt", "Hello!")  # rows come shuffled
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    output = tuned.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"\n{prompt!r} -> {answer!r}")
    return result


if __name__ == "__main__":
    main()
