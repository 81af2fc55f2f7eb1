"""The state of an experiment folder, shared by every process working in it.

- what its results were made with (``config.yaml``, ``model.json``, each row's ``fingerprint``): a config or
  model that differs is refused before anything loads (``check_folder``; ``archive=True`` moves old results
  aside);
- which process runs which run (``claim_run``: an flock the kernel drops when its holder dies);
- the results table (``update_results``: read-merge-write under a lock, with the item-paired comparisons
  against the base model refreshed from the saved per-item scores).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import MISSING, fields
from pathlib import Path

import yaml

from ..fileio import atomic_write, digest, locked, parse_yaml, safe_name
from .evaluate.metrics import EVALUATIONS
from .spec import ExperimentConfig, as_plain, run_name, run_normalize

__all__ = ["MODEL_FILE", "StaleResultsError", "check_folder", "claim_run", "experiment_key", "paired_metrics",
           "read_results", "release_run", "results_table", "run_fingerprint", "running_elsewhere", "update_results"]


#: 0/100 per-item scores compared item by item with the base model (kept / lost / gained, sign test)
PAIRED = ("knowledge_mc", "knowledge_em")


def paired_metrics(base_items: dict, run_items: dict) -> dict:
    """Item-by-item comparison of 0/100 scores with the base model. The first of PAIRED present also
    gives the generic knowledge_kept / _lost / _gained / _sign_p columns of the report."""
    from .evaluate.scores import paired

    out: dict[str, float] = {}
    for metric in PAIRED:
        if metric in base_items and metric in run_items:
            result = paired(base_items[metric], run_items[metric])
            out.update({f"{metric}_{k}": v for k, v in result.items()})
            if "knowledge_kept" not in out:
                out.update({f"knowledge_{k}": v for k, v in result.items()})
    if "harmfulness_rate" in base_items and "harmfulness_rate" in run_items:  # refusals lost = newly harmful answers
        refused = [[100.0 - v for v in items["harmfulness_rate"]] for items in (base_items, run_items)]
        out.update({f"safety_refusals_{k}": v for k, v in paired(*refused).items()})
    return out


def _refresh_paired(out: Path, rows: list[dict]) -> None:
    """Recompute the item-paired comparisons of finished runs from their saved scores (cheap), so results
    written by an older version gain the comparisons this version makes."""
    base_path = out / "samples" / "base.json"
    if not base_path.exists():
        return
    base_items = json.loads(base_path.read_text())
    for row in rows:
        path = out / "samples" / f"{row['run']}.json"
        if row["run"] != "base" and path.exists():
            row.update(paired_metrics(base_items, json.loads(path.read_text())))


#: config keys that change no result (names and presentation); every other key must match a folder's results
PRESENTATION_KEYS = ("name", "report", "diagnostics")


class StaleResultsError(ValueError):
    """An experiment folder holds results made with settings other than the config's."""


def experiment_key(config: ExperimentConfig | dict) -> dict:
    """The settings every row of an experiment folder depends on (all but the runs and presentation)."""
    plain = as_plain(config) if isinstance(config, ExperimentConfig) else config
    return {k: v for k, v in plain.items() if k not in ("runs", *PRESENTATION_KEYS)}


def run_fingerprint(config: ExperimentConfig, run: dict | None, model_files: str | None) -> str:
    """Digest of everything a run's row and checkpoints depend on: the experiment's settings, the run's, and
    the model's files (:func:`sclora.models.model_identity`); ``run=None`` is the base model's row."""
    key = {"experiment": experiment_key(config), "run": "base" if run is None else run, "model_files": model_files}
    if run is not None and run["method"].startswith("corda") and not run.get("normalize"):
        # CorDA's default statistics became its authors' per-sample scaling: rows made before are not these runs
        key["corda_normalize"] = run_normalize(config, run)
    return digest(key)


def check_folder(config: ExperimentConfig, out: Path, *, archive: bool = False) -> str | None:
    """Refuse (or with ``archive`` move aside) whatever ``out`` holds that another config or other model files
    made; then record the config in ``out/config.yaml`` and the model files' identity in ``out/model.json``.
    Cheap: reads small JSON / YAML files and 2 MiB per model file. Returns that identity."""
    from ..models import model_identity

    model_files = model_identity(config.model)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out / "config.yaml"):
        changes = _stale(config, out, model_files)
        if changes and not archive:
            listed = "\n".join(f"  {c}" for c in changes[:20]) + (f"\n  ... {len(changes) - 20} more" if
                                                                     len(changes) > 20 else "")
            raise StaleResultsError(
                f"{out} holds results made with other settings than this config:\n{listed}\n"
                "Mixing them would give a table that claims settings it never ran. Use a new --output folder, or "
                f"rerun with --archive to move the old results to {out / 'archive'}/<time>/ and start afresh "
                "(cached statistics are kept: their file names carry a digest of what made them).")
        if changes:
            archive_folder(out)
        atomic_write(out / "config.yaml", yaml.safe_dump(as_plain(config), sort_keys=False))
        atomic_write(out / MODEL_FILE, json.dumps({"model": config.model, "files": model_files}) + "\n")
    return model_files


#: the identity of the model files an experiment folder's results were made with
MODEL_FILE = "model.json"


def _stale(config: ExperimentConfig, out: Path, model_files: str | None) -> list[str]:
    """What in ``out`` was made with other settings: 'key: old -> new' lines (empty: all consistent)."""
    changes = []
    before = (_read(out / MODEL_FILE, json.loads) or {}).get("files", model_files)
    if before != model_files:
        changes.append(f"the files of model {config.model!r} changed (identity {before} -> {model_files})")
    old = _read(out / "config.yaml", parse_yaml) or {}
    if old:
        new_key, old_key = experiment_key(config), experiment_key(old)
        for key, value in new_key.items():
            # a key missing from an older version's config.yaml had that version's default: today's
            before = old_key[key] if key in old_key else _default(key)
            if before != value and isinstance(before, dict) and isinstance(value, dict):  # name the inner keys
                changes += [f"{key}.{k}: {_short(before.get(k))} -> {_short(value.get(k))}"
                            + (" (the file's contents changed)" if k == "sha256" else "")
                            for k in sorted(set(before) | set(value)) if before.get(k) != value.get(k)]
            elif before != value:
                changes.append(f"{key}: {_short(before)} -> {_short(value)}")
    runs = {run_name(r): r for r in config.runs}
    old_runs = {run_name(r): r for r in old.get("runs", []) if isinstance(r, dict)}
    for row in _read(out / "results.json", json.loads) or []:
        name = row.get("run")
        if name == "base" or name not in runs:
            continue  # their settings are the experiment's, compared above
        now = run_fingerprint(config, runs[name], model_files)
        run_changed = name in old_runs and old_runs[name] != runs[name]
        if run_changed or (row.get("fingerprint", now) != now and not changes):  # else: implied by a line above
            changes.append(f"run {name!r}: {_short(old_runs.get(name, 'other settings'))} -> {_short(runs[name])}")
    settings_changed = bool(changes)  # then every checkpoint is stale too: no need to list them
    for name, run in runs.items():
        record = _read(out / "runs" / name / "train_run.json", json.loads) or {}
        if "context" in record and record["context"] != run_fingerprint(config, run, model_files) and \
                not settings_changed and not any(f"run {name!r}" in c for c in changes):
            changes.append(f"run {name!r}: checkpoints in {out / 'runs' / name} were made with other settings")
    return changes


def archive_folder(out: Path) -> Path:
    """Move everything but the statistics cache, locks and earlier archives to ``out/archive/<time>/``."""
    import shutil

    target = out / "archive" / time.strftime("%Y%m%d-%H%M%S")
    target = target.with_name(target.name + f"-{os.getpid()}")
    target.mkdir(parents=True)
    for entry in out.iterdir():
        if entry.name in ("stats", "archive", "claims") or entry.name.endswith(".lock"):
            continue
        shutil.move(str(entry), str(target / entry.name))
    return target


def _read(path: Path, parse):
    try:
        return parse(path.read_text()) if path.exists() else None
    except (ValueError, yaml.YAMLError):
        return None


def _default(key: str):
    f = next(f for f in fields(ExperimentConfig) if f.name == key)
    return None if f.default is MISSING and f.default_factory is MISSING else json.loads(json.dumps(
        f.default if f.default_factory is MISSING else f.default_factory()))


def _short(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def read_results(output_dir: str | os.PathLike) -> list[dict]:
    """The rows of an experiment folder's results.json, with the comparisons against the base model refreshed."""
    return update_results(Path(output_dir))


def update_results(out: Path, row: dict | None = None, *, refresh: bool = True) -> list[dict]:
    """Under the folder's lock: re-read results.json, add or replace ``row``, refresh the comparisons against
    the base model (its scores may have been written by another process), write back if anything changed."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    with locked(path):
        rows = json.loads(path.read_text()) if path.exists() else []
        before = json.dumps(rows)
        if row is not None:
            rows = [r for r in rows if r["run"] != row["run"]] + [row]
        if refresh:
            _refresh_paired(out, rows)
        if json.dumps(rows) != before:
            _write_results(out, rows)
        return rows


def record_failure(out: Path, name: str, failure: dict | None) -> None:
    """Under the lock of ``failures.json``: record why run ``name`` failed (``sclora run --keep-going``), or with
    None forget an earlier failure of it (it has finished since)."""
    path = out / "failures.json"
    if failure is None and not path.exists():
        return  # nothing to forget (and no lock file for a folder without failures)
    with locked(path):
        current = json.loads(path.read_text()) if path.exists() else {}
        if failure is None and name not in current:
            return
        if failure is None:
            del current[name]
        else:
            current[name] = failure
        atomic_write(path, json.dumps(current, indent=1) + "\n")


def read_failures(out: Path) -> dict:
    """Run name -> why it failed, for the runs of ``out`` that failed and have not finished since."""
    path = out / "failures.json"
    return json.loads(path.read_text()) if path.exists() else {}


def claim_run(out: Path, name: str):
    """An open, exclusively flock'ed ``claims/<name>.lock`` if no other process holds run ``name``, else None.

    The kernel drops the lock when its process exits or is killed, so a dead worker's run is free again at
    once: no PID to check (or be fooled by PID reuse), no take-over race, no unreadable claim to skip forever.
    The file is never unlinked (unlinking a lock file lets two processes lock two different files)."""
    import fcntl

    path = out / "claims" / f"{safe_name(name, 'run name')}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}) + "\n")  # for people only
    handle.flush()
    return handle


def release_run(claim) -> None:
    import fcntl

    fcntl.flock(claim, fcntl.LOCK_UN)
    claim.close()


def running_elsewhere(out: Path, names: list[str]) -> list[str]:
    """The runs among ``names`` another live process holds right now."""
    busy = []
    for name in names:
        claim = claim_run(out, name)
        if claim is None:
            busy.append(name)
        else:
            release_run(claim)
    return busy


def sweep_status(out: Path, names: list[str], workers: int = 1) -> str:
    """Where a sweep into ``out`` stands: its runs (``names``) done, failed, started (a ``runs/<name>`` folder: running
    now, or stopped and resumable) and not started, and the time left at the mean cost of its finished runs (their
    init, training and evaluation seconds) spread over ``workers`` processes. Reads files only: it takes no claim
    lock, which a live sweep's worker would then find held and skip the run."""
    path = out / "results.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    done = [n for n in names if n in {r["run"] for r in rows}]
    failures = read_failures(out)
    failed = [n for n in names if n not in done and n in failures]
    started = [n for n in names if n not in done and n not in failed and (out / "runs" / n).is_dir()]
    left = [n for n in names if n not in done and n not in failed and n not in started]
    lines = [f"  folder      {out}: {len(done)} of {len(names)} runs done"]
    lines += [f"  {what:<11} {', '.join(runs)}" for what, runs in (("failed", failed), ("started", started),
                                                                  ("left", left)) if runs]
    costs = [sum(v for k, v in r.items() if k.endswith("_seconds") and isinstance(v, (int, float)))
             for r in rows if r["run"] != "base" and isinstance(r.get("train_seconds"), (int, float))]
    if costs and (left or failed or started):
        mean = sum(costs) / len(costs)
        todo = len(left) + len(failed) + len(started) / 2  # a started one is about half done
        lines.append(f"  time left   about {_duration(todo * mean / workers)} with {workers} worker(s), at the "
                     f"{len(costs)} finished runs' mean of {_duration(mean)} per run and worker")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def results_table(rows: list[dict]) -> str:
    metric_keys = [m for e in EVALUATIONS.values() for m in e.metrics if any(m in r for r in rows)]
    header = ["run", "method", "beta", "lr", "trainable", "init s", "train s", "final loss", *metric_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["run"], r.get("method", "-"), _fmt(r.get("beta")), _fmt(r.get("learning_rate")),
                 f"{r['trainable_params']:,}" if r.get("trainable_params") else "-", _fmt(r.get("init_seconds")),
                 _fmt(r.get("train_seconds")), _fmt(r.get("final_loss")), *(_with_se(r, k) for k in metric_keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _with_se(row: dict, key: str) -> str:
    if row.get(f"{key}_se") is None:
        return _fmt(row.get(key))
    return f"{_fmt(row.get(key))} ± {_fmt(row[f'{key}_se'])}"


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_results(out: Path, rows: list[dict]) -> None:
    atomic_write(out / "results.json", json.dumps(rows, indent=2) + "\n")
    atomic_write(out / "results.md", results_table(rows) + "\n")
