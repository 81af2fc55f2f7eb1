"""Batched, deterministic generation: left padding, greedy by default, stop strings, chat template."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from ...chat import build_prompt

__all__ = ["GenerationResult", "build_prompt", "generate"]


@dataclass
class GenerationResult:
    texts: list[str]
    new_tokens: int  # generated tokens, summed over prompts, up to each one's stop
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 128,
    stop: list[str] | None = None,
    batch_size: int = 8,
    chat: bool = True,
    system: str | None = None,
    show_progress: bool = True,
    desc: str = "generate",
) -> GenerationResult:
    """Greedy completions of ``prompts`` (wrapped in the chat template unless ``chat=False``), each cut
    at the first stop string. Prompts are sorted by length so batches pad little; results come back
    in input order. Left padding with position ids from the mask gives the same text as batch size 1."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [build_prompt(tokenizer, p, chat=chat, system=system) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outputs: list[str] = [""] * len(texts)
    new_tokens = 0
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        bar = tqdm(total=len(texts), desc=desc, disable=not show_progress)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            enc = tokenizer([texts[j] for j in idx], return_tensors="pt", padding=True, add_special_tokens=not chat)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([_StopStrings(stop, tokenizer, enc["input_ids"].shape[1])])
                if stop else None,
            )
            for j, row in zip(idx, out[:, enc["input_ids"].shape[1]:]):
                text = tokenizer.decode(row, skip_special_tokens=True)
                text = _cut_at_stop(text, stop)
                outputs[j] = text
                new_tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
            bar.update(len(idx))
        bar.close()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return GenerationResult(outputs, new_tokens, time.perf_counter() - start)


class _StopStrings(StoppingCriteria):
    """Finish a row once its decoded continuation contains a stop string. Decoding (rather than
    transformers' token-level stop_strings) works with any tokenizer."""

    def __init__(self, stop: list[str], tokenizer, prompt_length: int):
        self.stop, self.tokenizer, self.prompt_length = stop, tokenizer, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    for s in stop or []:
        pos = text.find(s)
        if pos >= 0:
            text = text[:pos]
    return text
