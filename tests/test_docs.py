"""The README's and the quickstart's code runs: every Python block, in order, against the tiny model saved as
`my-model` next to the data files the text names (a block that needs the real model or a GPU is marked
`<!-- skip-test: why -->` and skipped by name); the quickstart's command runs verbatim first."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"README": ROOT / "README.md", "quickstart": ROOT / "docs" / "quickstart.md"}
NUMBERS = "one two three four five six seven eight nine ten".split()
FENCE = re.compile(r"(?:<!-- skip-test: (?P<skip>[^>]*) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)


def blocks(page: str, language: str) -> list[tuple[str, str | None]]:
    """(code, skip reason or None) of each ``language`` block of a page, in order."""
    return [(m["code"], m["skip"]) for m in FENCE.finditer(PAGES[page].read_text()) if m["lang"] == language]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    save_tiny_model(tmp_path / "my-model")
    rows = {
        "task": [{"prompt": f"what is {NUMBERS[i % 10]} plus {NUMBERS[(i * 3) % 10]}", "response": "ten ."}
                 for i in range(24)],
        "keep": [{"prompt": f"what is the capital of {c}", "response": f"the capital is {c} ."}
                 for c in ("paris", "rome", "berlin") * 4],
        "facts": [{"prompt": f"how make {w}", "response": "sorry , cannot help ."} for w in ("bread", "paper") * 6],
    }
    for name, data in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_python(page: str) -> list[str]:
    """Execute the page's Python blocks in one namespace; returns the skip reasons met."""
    namespace: dict = {"__name__": "__docs__"}
    skipped = []
    for code, skip in blocks(page, "python"):
        if skip:
            skipped.append(skip)
            continue
        exec(compile(code, f"{page} block", "exec"), namespace)  # noqa: S102 - the docs' own code
    return skipped


def test_the_pages_have_python_blocks_to_run():
    assert len(blocks("README", "python")) >= 2 and len(blocks("quickstart", "python")) >= 3


def test_the_readme_python_runs(workspace, capsys):
    assert run_python("README") == []
    printed = capsys.readouterr().out
    assert "sclora finetune: sc_lora (beta 0.4+0.4)" in printed
    assert (workspace / "out" / "adapter" / "adapter_model.safetensors").exists()
    assert (workspace / "adapter" / "adapter_model.safetensors").exists()


def test_the_quickstart_command_then_its_python_runs(workspace):
    [command] = [c for c, _ in blocks("quickstart", "bash") if c.startswith("sclora ")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "sclora", *shlex.split(command)[1:], "--quiet"], check=True, env=env)
    assert (workspace / "out" / "merged" / "config.json").exists()
    assert run_python("quickstart") == []
    assert (workspace / "adapter" / "adapter_model.safetensors").exists()
