"""Batched, deterministic generation: left padding, greedy by default, stop strings, chat template, and an
optional reuse of the keys/values of a token prefix all prompts share (few-shot examples)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.utils import ALL_CACHE_NAMES

from ...chat import build_prompt

__all__ = ["GenerationResult", "build_prompt", "generate"]

#: what model outputs and ``generate`` call the key/value cache (``cache`` in newer transformers)
_CACHE = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"


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
    reuse_prefix: bool = False,
) -> GenerationResult:
    """Greedy completions of ``prompts`` (wrapped in the chat template unless ``chat=False``), each cut
    at the first stop string. Prompts are sorted by length so batches pad little; results come back
    in input order. Left padding with position ids from the mask gives the same text as batch size 1.

    ``reuse_prefix``: the tokens every prompt starts with (a few-shot context) are run through the model once per
    batch size and their keys/values reused for every batch; each batch then computes only its own tokens, padded
    between the prefix and them. Positions and attention are those of the full prompts, so the answers are the
    same up to floating-point rounding."""
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
    prefix = _Prefix(model, tokenizer, texts, add_special_tokens=not chat) if reuse_prefix and texts else None
    try:
        bar = tqdm(total=len(texts), desc=desc, disable=not show_progress)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if prefix is not None:
                enc = prefix.batch(idx)
            else:
                enc = tokenizer([texts[j] for j in idx], return_tensors="pt", padding=True,
                                add_special_tokens=not chat)
            enc = {k: v.to(device) if torch.is_tensor(v) else v for k, v in enc.items()}
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


class _Prefix:
    """The keys/values of the longest token prefix all ``texts`` share, computed once per batch size; every text
    keeps at least its last token outside it, which the model then reads with the cache."""

    def __init__(self, model, tokenizer, texts: list[str], *, add_special_tokens: bool):
        self.model, self.pad = model, tokenizer.pad_token_id
        self.ids = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
        n = min(len(x) for x in self.ids) - 1
        first = self.ids[0]
        for x in self.ids[1:]:
            n = next((k for k in range(n) if x[k] != first[k]), n)
        self.tokens = first[:max(n, 0)]
        self._caches: dict[int, object] = {}

    def batch(self, idx: list[int]) -> dict:
        """``input_ids``/``attention_mask`` of the texts ``idx`` (prefix, left padding, own tokens) and a copy of the
        prefix's cache for this batch size."""
        device = next(self.model.parameters()).device
        n, rows = len(self.tokens), [self.ids[j][len(self.tokens):] for j in idx]
        width = max(len(r) for r in rows)
        prefix = torch.tensor([self.tokens] * len(idx), dtype=torch.long, device=device)
        own = torch.tensor([[self.pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
        if not n:
            return {"input_ids": own, "attention_mask": mask}
        if len(idx) not in self._caches:
            with torch.no_grad():
                self._caches[len(idx)] = self.model(input_ids=prefix, attention_mask=torch.ones_like(prefix),
                                                    use_cache=True)[_CACHE]
        return {"input_ids": torch.cat([prefix, own], 1), "attention_mask": torch.cat([torch.ones_like(prefix), mask], 1),
                _CACHE: copy.deepcopy(self._caches[len(idx)])}


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
