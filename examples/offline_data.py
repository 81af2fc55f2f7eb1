"""Text for the init demo and the init-time benchmark, from sclora's data catalogue (pinned PyPI
wheels, sha256-checked, read offline after the first fetch)."""

from __future__ import annotations

from sclora.experiments import data

# Every general-knowledge list, so that 256 windows of 256 tokens fit (the default evaluation topics
# hold ~63k tokens).
TRIVIA_TOPICS = ("general", "geography", "worldcapitals", "uscapitals", "artandliterature", "entertainment",
                 "music", "sports", "elements", "greekmyth", "computers", "2015", "2016", "slogans", "worldcup",
                 "hockey", "nba", "mlb", "cars")


def paper_texts() -> list[str]:
    """Scientific prose (D+ stand-in): ACLSum training papers (abstract, introduction, conclusion)."""
    return [row["document"] for row in data.summarization("train")]


def trivia_texts() -> list[str]:
    """World-knowledge QA (D- stand-in): 'Question? Answer.' lines of the trivia lists."""
    return [f"{row['question']}? {row['answers'][0]}." for row in data.trivia(TRIVIA_TOPICS)]


def token_windows(tokenizer, texts: list[str], n: int, length: int) -> list[list[int]]:
    """n windows of exactly `length` tokens, from the texts concatenated in order."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text + "\n", add_special_tokens=False)["input_ids"]
        if len(stream) >= n * length:
            break
    if len(stream) < n * length:
        raise SystemExit(f"only {len(stream)} tokens of text, need {n * length}")
    return [stream[i * length:(i + 1) * length] for i in range(n)]
