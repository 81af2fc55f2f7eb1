"""Quantized base: SC-LoRA on a model loaded in 4-bit (or 8-bit) with bitsandbytes, QLoRA-style.

    python examples/quantized_base.py --model DIR --data task.jsonl --preserve keep.jsonl --output out

The base is loaded as transformers' BitsAndBytesConfig loads it (--load-in nf4, fp4 or int8). The statistics
come from the quantized model's own forward, the decomposition runs on the dequantized weights, the residual
W0 - B0 A0 is stored back in the layers' own format and the adapter trains in float32. Because of that
requantization the model at init is not exactly the base: result.init_drift says how far it moved (largest
logit change and KL on --data examples), of the order of what quantizing the base itself cost.
Needs bitsandbytes (pip install bitsandbytes).
"""

import argparse

import sclora


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", required=True, help="what to learn (JSONL)")
    parser.add_argument("--preserve", required=True, help="what to keep (JSONL)")
    parser.add_argument("--output", default="runs/quantized_base")
    parser.add_argument("--load-in", default="nf4", choices=["nf4", "fp4", "int8"])
    parser.add_argument("--beta", type=float, default=0.8)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per example")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (-1: chosen from the data)")
    args = parser.parse_args(argv)

    # the same as AutoModelForCausalLM.from_pretrained(DIR, quantization_config=BitsAndBytesConfig(
    #     load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    model, tokenizer = sclora.models.load_model(args.model, load_in=args.load_in)
    result = sclora.finetune(model, tokenizer, args.data, preserve=args.preserve,
                             config=sclora.SCLoRAConfig(r=args.r, beta=args.beta),
                             train_config={"max_steps": args.max_steps}, seq_len=args.seq_len,
                             output_dir=args.output)
    print(result.text)
    drift = result.init_drift
    print(f"\nmodel at init vs the {args.load_in} base: max |delta logit| {drift['max_abs_logit']:.3g}, "
          f"KL {drift['kl']:.3g} nats/token over {drift['tokens']} tokens")
    return result


if __name__ == "__main__":
    main()
