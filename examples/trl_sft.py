"""TRL: an SC-LoRA initialization trained with TRL's SFTTrainer, exported as a plain PEFT LoRA adapter.

    python examples/trl_sft.py --model DIR --data task.jsonl --preserve keep.jsonl --output out

sclora.init_model builds the SC-LoRA adapter from the statistics of --data (D+) and --preserve (D-); from
there the model is an ordinary PEFT model, and any trainer can train it. Here TRL's SFTTrainer trains it on
--data as chat rows ({"prompt", "response"} rows become user / assistant messages; {"messages"} rows are
used as they are). sclora.export_lora then writes OUTPUT/adapter, a plain LoRA adapter that reproduces the
trained model on the untouched base (SC-LoRA changes the frozen base weights at init; the export folds that
change into the adapter).
"""

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import sclora


def as_chat(row):
    if "messages" in row:
        return {"messages": row["messages"]}
    return {"messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["response"]}]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", required=True, help="what to learn (JSONL, prompt/response or messages rows)")
    parser.add_argument("--preserve", required=True, help="what to keep (JSONL)")
    parser.add_argument("--output", default="runs/trl_sft")
    parser.add_argument("--beta", type=float, default=0.8)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per example")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    args = parser.parse_args(argv)
    out = Path(args.output)

    model, tokenizer = sclora.models.load_model(args.model)
    rows = [as_chat(row) for row in sclora.load_examples(args.data)]
    keep = sclora.load_examples(args.preserve)
    model = sclora.init_model(model, sclora.SCLoRAConfig(r=args.r, beta=args.beta),
                              plus=sclora.statistics_batches(tokenizer, rows, seq_len=args.seq_len),
                              minus=sclora.statistics_batches(tokenizer, keep, seq_len=args.seq_len))

    config = SFTConfig(output_dir=str(out / "sft"), max_steps=args.max_steps, learning_rate=args.learning_rate,
                       per_device_train_batch_size=args.batch_size, max_length=args.seq_len,
                       logging_steps=1, save_strategy="no", report_to="none",
                       use_cpu=not torch.cuda.is_available())  # TRL trains in bf16 by default: on CPU, say so
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"trained {len(losses)} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    # the PEFT model itself, without the wrappers the trainer may have added (mixed precision)
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    adapter = sclora.export_lora(model, out / "adapter")
    print(f"wrote {adapter}: load it with PeftModel.from_pretrained(base_model, {str(out / 'adapter')!r})")
    return model, Path(adapter)


if __name__ == "__main__":
    main()
