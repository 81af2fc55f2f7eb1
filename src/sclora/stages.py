"""Continual fine-tuning: a chain of :func:`sclora.finetune` stages, each learning a new task on the model the
earlier ones left, and keeping what they learned.

Every finetune output folder holds ``stage.json``: the base model's identity, the earlier stages it was trained
after (each with a digest of its adapter and data), its own task and knowledge sets (copied into ``data/`` as
JSONL, so the folder is self-contained) and, when it has finished, ``"status": "done"``. A later stage
(``finetune(..., after=out_a)``)

* rebuilds its starting model: the base with every earlier stage's adapter merged in, in order (each adapter is a
  plain PEFT LoRA adapter for the model its stage started from);
* adds the earlier stages' knowledge sets and, with ``keep_earlier``, their tasks to D-, with their statistics
  collected again on that model (training changed its activations);
* can replay a share of each earlier task's examples (``replay``) or keep the new adapter orthogonal to the earlier
  ones (O-LoRA's penalty, :attr:`sclora.TrainConfig.orthogonal_penalty`).

A stage whose earlier stages changed since it was started (another adapter, other data) is stale: resuming it is
refused with :class:`StaleStageError`, naming the stage that changed.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .fileio import atomic_write, atomic_write_json, digest

__all__ = ["STAGE_FILE", "StaleStageError", "apply_chain", "check_not_stale", "earlier_lora_A", "finished_stage", "inherited_sets",
           "read_chain", "replay_examples", "stage_digest", "write_examples", "write_stage"]

STAGE_FILE = "stage.json"
#: the name under which an earlier stage's task joins D-
TASK_PREFIX = "task of "
FORMAT = 1


class StaleStageError(ValueError):
    """A stage was started after earlier stages that have changed since."""


def _output_dir(stage) -> Path:
    """A FinetuneResult's output folder, or the folder given."""
    return Path(getattr(stage, "output_dir", stage))


def read_stage(folder: str | Path) -> dict:
    """The record of a finished stage in ``folder``; a ValueError saying what is missing otherwise."""
    folder = Path(folder)
    path = folder / STAGE_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"after={str(folder)!r}: no {STAGE_FILE} there; give the output folder of an earlier "
                         "`sclora finetune` (or its FinetuneResult).") from None
    except ValueError as err:
        raise ValueError(f"after={str(folder)!r}: {path} cannot be read ({err}); rerun that stage.") from None
    if record.get("format") != FORMAT:
        raise ValueError(f"after={str(folder)!r}: {path} has format {record.get('format')!r}, this sclora reads "
                         f"{FORMAT}; rerun that stage with this version.")
    if record.get("status") != "done":
        raise ValueError(f"after={str(folder)!r}: that stage has not finished; rerun its command to complete it "
                         "first (it resumes).")
    if not record.get("adapter"):
        raise ValueError(f"after={str(folder)!r}: that stage has no adapter (full fine-tuning); a later stage "
                         "starts from an adapter stage.")
    return record


def stage_digest(folder: str | Path) -> str:
    """The fingerprint of a finished stage: its adapter's bytes and the data and config it was made from."""
    folder = Path(folder)
    record = read_stage(folder)
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = folder / record["adapter"] / name
        if not path.exists():
            raise ValueError(f"after={str(folder)!r}: {path} is missing; rerun that stage.")
        data = path.read_bytes()
        if name.endswith(".json"):  # its content, not its layout (PEFT writes target_modules in a set's order)
            config = json.loads(data)
            if isinstance(config.get("target_modules"), list):
                config["target_modules"] = sorted(config["target_modules"])
            data = json.dumps(config, sort_keys=True).encode()
        h.update(name.encode() + b"\0" + data)
    h.update(json.dumps({k: record[k] for k in ("config", "task", "preserved", "chain")}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def read_chain(after) -> list[dict]:
    """The stages a new stage trained after ``after`` starts from, oldest first: ``{"output_dir", "digest",
    "record"}`` each. Refuses a chain whose stages changed after a later one was trained on them."""
    if after is None:
        return []
    folder = _output_dir(after).resolve()
    record = read_stage(folder)
    chain = []
    for link in record["chain"]:  # the stages before ``after``, as ``after`` recorded them
        earlier = Path(link["output_dir"])
        now = stage_digest(earlier)
        if now != link["digest"]:
            raise StaleStageError(f"after={str(folder)!r} was trained after {earlier}, which has changed since "
                                  f"(digest {link['digest']} -> {now}): {folder} is stale. Rerun it (delete its "
                                  "folder or give another --output) before training after it.")
        chain.append({"output_dir": str(earlier), "digest": now, "record": read_stage(earlier)})
    chain.append({"output_dir": str(folder), "digest": stage_digest(folder), "record": record})
    return chain


def check_not_stale(out: Path, chain: list[dict]) -> None:
    """Refuse to resume the stage in ``out`` when it was started after other (or changed) stages."""
    try:
        before = json.loads((out / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return  # nothing started there yet
    was = [(c["output_dir"], c["digest"]) for c in before.get("chain", [])]
    now = [(c["output_dir"], c["digest"]) for c in chain]
    if was != now:
        changed = [d for d, h in was if (d, h) not in now] or [d for d, _ in now]
        raise StaleStageError(f"{out} was started after {', '.join(changed) or 'no earlier stage'} as they were "
                              f"then; the chain given now differs ({', '.join(d for d, _ in now) or 'none'}, digests "
                              f"{[h for _, h in now]} vs {[h for _, h in was]}): its checkpoints are stale. Delete "
                              f"{out} or give another output folder.")


def check_base(model: nn.Module, chain: list[dict], fingerprint: dict) -> None:
    """Refuse a model other than the one the chain's first stage started from."""
    from .statistics import _probes_differ

    if not chain:
        return
    first = chain[0]["record"]["base"]["fingerprint"]
    same = first.get("config") == fingerprint.get("config") and first["probes"].keys() == fingerprint["probes"].keys() \
        and not any(_probes_differ(first["probes"][k], fingerprint["probes"][k]) for k in first["probes"])
    if not same:
        raise ValueError(f"after=: the model given is not the base {chain[0]['output_dir']} started from (its "
                         "weights differ). Pass that base model: sclora merges the earlier stages' adapters into it "
                         "itself.")


def base_fingerprint(model: nn.Module, target_modules) -> dict:
    """Identity of a base model: its config and sampled weights of its first and last target modules."""
    from .statistics import model_fingerprint
    from .targets import resolve_targets

    names = list(resolve_targets(model, target_modules))
    return model_fingerprint(model, sorted({names[0], names[-1]}) if names else [])


def apply_chain(model: nn.Module, chain: list[dict]) -> nn.Module:
    """``model`` (the base) with each stage's adapter merged in, in order: the model the last stage left."""
    from peft import PeftModel

    for stage in chain:
        adapter = Path(stage["output_dir"]) / stage["record"]["adapter"]
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_examples(out: Path, name: str, examples: list[dict]) -> dict:
    """``examples`` as ``out/data/NAME.jsonl`` (atomically); their entry of the stage record."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    atomic_write(out / "data" / f"{name}.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
    return {"file": f"data/{name}.jsonl", "n": len(examples), "sha256": digest(examples)}


def _examples(stage: dict, entry: dict) -> list[dict]:
    rows = _read_jsonl(Path(stage["output_dir"]) / entry["file"])
    if digest(rows) != entry["sha256"]:
        raise StaleStageError(f"{stage['output_dir']}/{entry['file']} has changed since that stage was trained; "
                              "rerun it.")
    return rows


def inherited_sets(chain: list[dict], keep_earlier: bool = True) -> list[tuple[str, list[dict]]]:
    """The knowledge sets a stage after ``chain`` keeps: the last stage's knowledge sets (which hold the ones
    before it) and, with ``keep_earlier``, the last stage's task: ``(name, examples)`` each, no set twice. Without
    ``keep_earlier`` no earlier task is kept, also none an earlier stage kept."""
    if not chain:
        return []
    last = chain[-1]
    sets = [(e["name"], _examples(last, e)) for e in last["record"]["preserved"] if keep_earlier or not e["task"]]
    if keep_earlier:
        sets.append((f"{TASK_PREFIX}{Path(last['output_dir']).name}", _examples(last, last["record"]["task"])))
    return distinct(sets)


def distinct(sets: list[tuple[str, list[dict]]]) -> list[tuple[str, list[dict]]]:
    """``sets`` without the repeats of a set of the same examples (the first name kept)."""
    seen, unique = set(), []
    for name, rows in sets:
        key = digest(rows)
        if key not in seen:
            seen.add(key)
            unique.append((name, rows))
    return unique


def replay_examples(chain: list[dict], fraction: float, seed: int) -> list[dict]:
    """``fraction`` of each earlier stage's own task examples (at least one each), drawn with ``seed``."""
    if not fraction:
        return []
    rng = random.Random(seed)
    picked = []
    for stage in chain:
        rows = _examples(stage, stage["record"]["task"])
        picked += rng.sample(rows, max(1, round(fraction * len(rows))))
    return picked


def earlier_lora_A(chain: list[dict]) -> dict[str, torch.Tensor]:
    """Module name -> the earlier stages' LoRA A matrices stacked (rows: their input directions), for O-LoRA's
    penalty on the new adapter."""
    from safetensors.torch import load_file

    stacked: dict[str, list[torch.Tensor]] = {}
    for stage in chain:
        path = Path(stage["output_dir"]) / stage["record"]["adapter"] / "adapter_model.safetensors"
        for key, value in load_file(str(path)).items():
            if key.endswith(".lora_A.weight"):
                name = key[len("base_model.model."):-len(".lora_A.weight")]
                stacked.setdefault(name, []).append(value.float())
    return {name: torch.cat(values, dim=0) for name, values in stacked.items()}


def is_task(name: str) -> bool:
    return name.startswith(TASK_PREFIX)


def finished_stage(out: Path, inputs: str) -> dict | None:
    """The record of the stage finished in ``out`` from the same ``inputs`` (their digest), with its adapter and
    summary on disk; None when nothing has finished there. A stage finished there from other inputs is refused:
    training into its folder would overwrite what later stages may have been trained after."""
    try:
        record = json.loads((out / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if record.get("format") != FORMAT or record.get("status") != "done" or "inputs" not in record:
        return None
    if record["inputs"] != inputs:
        raise ValueError(f"{out} holds a finished stage made from other inputs (model, data, init or training "
                         f"settings): give another output folder, or delete {out} to train it again.")
    if not record.get("adapter") or not (out / "summary.json").exists():
        return None
    return record


def write_stage(out: Path, record: Mapping) -> None:
    atomic_write_json(out / STAGE_FILE, {"format": FORMAT, **record})
