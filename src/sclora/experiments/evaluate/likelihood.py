"""Log-likelihoods of given continuations: smooth utility and knowledge signals that still move when
a small model's accuracy is near zero."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

__all__ = ["best_answer_logprobs", "continuation_logprobs"]


@torch.no_grad()
def continuation_logprobs(
    model, tokenizer, prompts: list[str], continuations: list[str], *, batch_size: int = 8,
    show_progress: bool = True, desc: str = "log-likelihood",
) -> list[tuple[float, int]]:
    """(sum of log p(token), number of tokens) of each continuation given its prompt.

    Tokenized as lm-eval does: the prompt and the continuation separately, concatenated, so the
    continuation's tokens are exactly those scored. Right padding; padding never scored."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations.")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    items = []
    for p, c in zip(prompts, continuations):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        if not c_ids:
            raise ValueError(f"Empty continuation for prompt {p[:60]!r}.")
        items.append((p_ids, c_ids))
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]) - len(items[i][1]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(items)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress):
        idx = order[start:start + batch_size]
        seqs = [items[i][0] + items[i][1] for i in idx]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logprobs = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        for row, i in enumerate(idx):
            n_prompt, n_cont = len(items[i][0]), len(items[i][1])
            targets = ids[row, n_prompt:n_prompt + n_cont].to(device)
            scores = logprobs[row, n_prompt - 1:n_prompt + n_cont - 1].gather(-1, targets[:, None])
            results[i] = (scores.sum().item(), n_cont)
    return results


def best_answer_logprobs(model, tokenizer, prompts: list[str], answers: list[list[str]], *, batch_size: int = 8,
                         show_progress: bool = True, desc: str = "answers") -> list[float]:
    """For each prompt, the highest log-probability of any of its accepted answers (each after a space)."""
    flat = [(i, a) for i, accepted in enumerate(answers) for a in accepted]
    scores = continuation_logprobs(model, tokenizer, [prompts[i] for i, _ in flat], [" " + a for _, a in flat],
                                   batch_size=batch_size, show_progress=show_progress, desc=desc)
    best = [float("-inf")] * len(prompts)
    for (i, _), (logprob, _) in zip(flat, scores):
        best[i] = max(best[i], logprob)
    return best
