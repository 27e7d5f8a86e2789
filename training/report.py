"""Reading finished runs: eval metrics per group, prediction churn between runs, loss curves."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np

from training.metrics import churn

logger = logging.getLogger(__name__)


def eval_records(run_dir: str | Path, group: int) -> list[dict]:
    path = Path(run_dir) / f"group-{group}" / "metrics.jsonl"
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


def final_eval(run_dir: str | Path, group: int) -> dict:
    records = eval_records(run_dir, group)
    if not records:
        raise FileNotFoundError(f"{run_dir}: group {group} has no evaluation yet")
    return records[-1]


def predictions(run_dir: str | Path, group: int) -> tuple[np.ndarray, np.ndarray]:
    path = Path(run_dir) / f"group-{group}" / "eval_predictions.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no eval predictions; did group {group} of this run finish?")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, probs = data["key"], data["prob"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable eval predictions file ({type(e).__name__}: {e})") from None
    if keys.dtype.kind != "S" or probs.dtype.kind != "f" or keys.shape != probs.shape:
        raise ValueError(f"{path}: expected byte-string `key` and float `prob` arrays of one length, "
                         f"got {keys.dtype} {keys.shape} and {probs.dtype} {probs.shape}")
    return keys, probs


def run_churn(run_a: str | Path, run_b: str | Path, group: int = 0, threshold: float = 0.5) -> dict:
    keys_a, probs_a = predictions(run_a, group)
    keys_b, probs_b = predictions(run_b, group)
    if not np.array_equal(keys_a, keys_b):
        raise ValueError(f"{run_a} and {run_b} were evaluated on different eval splits; churn needs the same one")
    return churn(probs_a, probs_b, threshold)


def groups_of(run_dir: str | Path) -> list[int]:
    return sorted(int(p.name.split("-", 1)[1]) for p in Path(run_dir).glob("group-*") if p.is_dir())


def plot_eval_loss(runs: dict[str, str | Path], path: str | Path, floor: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run_dir in runs.items():
        for group in groups_of(run_dir):
            records = eval_records(run_dir, group)
            ax.plot([r["step"] for r in records], [r["log_loss"] for r in records], marker="o", markersize=3,
                    label=f"{label} group {group}")
    if floor is not None:
        ax.axhline(floor, color="gray", linestyle="--", label="Bayes-optimal log loss")
    ax.set_xlabel("step")
    ax.set_ylabel("eval log loss")
    ax.set_title("Criteo-format data: baseline vs 2-way codistillation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
