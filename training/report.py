"""Reading finished runs: eval metrics per group, prediction churn between runs, loss curves."""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path

import numpy as np

from codistill.rundir import GroupDir, RunDir
from training.workloads import Rows, Workload, workload_for

logger = logging.getLogger(__name__)


def eval_records(run_dir: str | Path, group: int) -> list[dict]:
    path = RunDir(run_dir).group(group).metrics
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics; did group {group} of this run train?")
    records = metric_records(path)
    # A resumed run repeats steps after its last checkpoint: the later record wins.
    by_step = {r["step"]: r for r in records if r["kind"] == "eval"}
    return [by_step[s] for s in sorted(by_step)]


def metric_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not one (torn by a kill mid-write) is skipped with a warning."""
    records, skipped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("kind"), str) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            skipped += 1
    if skipped:
        logger.warning("%s: skipped %d line(s) that are not metric records (torn by a kill mid-write?)", path, skipped)
    return records


def peer_coverage(records: list[dict], peers: int) -> float | None:
    """The share of a group's steps after burn-in (distillation weight > 0) on which it distilled from every one
    of its `peers` peers; None when there are no such steps (no peers, or burn-in to the end). One train record
    per step: a step written twice (metrics of an older run) counts once, the later record."""
    by_step = {r["step"]: r for r in records if r["kind"] == "train"}
    after = [r for r in by_step.values() if r["weight"] > 0]
    if not peers or not after:
        return None
    return sum(len(r["peers"]) == peers for r in after) / len(after)


def final_eval(run_dir: str | Path, group: int) -> dict:
    records = eval_records(run_dir, group)
    if not records:
        raise FileNotFoundError(f"{run_dir}: group {group} has no evaluation yet")
    return records[-1]


def save_predictions(group: GroupDir, workload: Workload, rows: Rows) -> None:
    """A group's eval rows, sorted by key, and the workload's name: what `predictions` reads."""
    order = np.argsort(rows["key"])
    np.savez(group.predictions, workload=np.array(workload.name),
             **{k: v[order] for k, v in rows.items()})


_EVAL_STEP = re.compile(r"^step-(\d{8,})\.npz$")


def save_eval_rows(group: GroupDir, workload: Workload, step: int, rows: Rows) -> None:
    """One eval step's rows, sorted by key; the keys once per group (every step has the same eval split)."""
    group.evals.mkdir(exist_ok=True)
    order = np.argsort(rows["key"])
    if not (group.evals / "keys.npy").exists():
        np.save(group.evals / "keys.npy", rows["key"][order])
    np.savez(group.evals / f"step-{step:08d}.npz", workload=np.array(workload.name),
             **{k: v[order] for k, v in rows.items() if k != "key"})


def read_eval_steps(run_dir: str | Path, group: int) -> np.ndarray:
    directory = RunDir(run_dir).group(group).evals
    steps = sorted(int(m.group(1)) for p in directory.glob("step-*.npz") if (m := _EVAL_STEP.match(p.name)))
    if not steps:
        raise FileNotFoundError(f"{directory}: no eval predictions; did group {group} of this run evaluate?")
    return np.array(steps)


def read_eval_keys(run_dir: str | Path, group: int) -> np.ndarray:
    return np.load(RunDir(run_dir).group(group).evals / "keys.npy", allow_pickle=False)


def read_eval_rows(run_dir: str | Path, group: int, step: int) -> Rows:
    """A group's eval rows at one step (sorted by key; the keys themselves: `read_eval_keys`)."""
    with np.load(RunDir(run_dir).group(group).evals / f"step-{step:08d}.npz", allow_pickle=False) as data:
        return {name: data[name] for name in data.files if name != "workload"}


def predictions(run_dir: str | Path, group: int) -> tuple[Workload, Rows]:
    """A finished group's eval rows (sorted by key) and the workload that wrote them."""
    path = RunDir(run_dir).group(group).predictions
    if not path.exists():
        raise FileNotFoundError(f"{path}: no eval predictions; did group {group} of this run finish?")
    try:
        with np.load(path, allow_pickle=False) as data:
            rows = {name: data[name] for name in data.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable eval predictions file ({type(e).__name__}: {e})") from None
    if "workload" not in rows:
        raise ValueError(f"{path}: names no workload (written before codistill recorded it): retrain the run")
    name = str(rows.pop("workload"))
    try:
        workload = workload_for(name)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    keys = rows.get("key")
    if keys is None or keys.dtype.kind != "S" or keys.ndim != 1:
        raise ValueError(f"{path}: expected a byte-string `key` array, got {None if keys is None else keys.dtype}")
    for column, array in rows.items():
        if array.shape[:1] != keys.shape or array.dtype.kind not in "biufS":
            raise ValueError(f"{path}: `{column}` ({array.dtype} {array.shape}) is not one value per key "
                             f"({keys.shape})")
    return workload, rows


def run_churn(run_a: str | Path, run_b: str | Path, group: int = 0, threshold: float = 0.5) -> tuple[Workload, dict]:
    workload, rows_a = predictions(run_a, group)
    other, rows_b = predictions(run_b, group)
    if other.name != workload.name:
        raise ValueError(f"{run_a} trained {workload.name}, {run_b} {other.name}: churn needs the same workload")
    if not np.array_equal(rows_a["key"], rows_b["key"]):
        raise ValueError(f"{run_a} and {run_b} were evaluated on different eval splits; churn needs the same one")
    try:
        return workload, workload.churn(rows_a, rows_b, threshold)
    except KeyError as e:
        files = " or ".join(str(RunDir(r).group(group).predictions) for r in (run_a, run_b))
        raise ValueError(f"{files}: no {e} array, which {workload.name} churn needs") from None
