"""The layout of a run directory (`train.run_dir`, default `runs/<name>`), in one place:

    <run_dir>/run.json                  the run's nonce (`training.launch.agree_run_nonce`)
    <run_dir>/.codistill.lock           the lock `codistill train` holds while the run lives (`--group`: shared)
    <run_dir>/.complete                 `codistill experiment`'s mark of a finished run
    <run_dir>/store/                    the default snapshot store (`train.store`)
    <run_dir>/group-<g>/.codistill.lock the lock `codistill train --group g` holds while the group lives
    <run_dir>/group-<g>/metrics.jsonl   train and eval records, one JSON a line
    <run_dir>/group-<g>/eval/                every eval step's rows (keys.npy, step-<s:08d>.npz)
    <run_dir>/group-<g>/eval_predictions.npz, model.safetensors, best.safetensors, checkpoints/, tensorboard/,
                        attempt

An ensemble of finished models is written as a one-group run (`group-0/`), so everything that reads runs
reads it too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from codistill import storage


@dataclass(frozen=True)
class GroupDir:
    """One group's directory: `<run_dir>/group-<g>`."""

    path: Path

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def predictions(self) -> Path:
        """The final eval rows, sorted by key (`training.report.save_predictions`)."""
        return self.path / "eval_predictions.npz"

    @property
    def weights(self) -> Path:
        """The final weights, what ensembles of finished runs load."""
        return self.path / "model.safetensors"

    @property
    def best_weights(self) -> Path:
        """The weights of the eval step best on the validation half so far."""
        return self.path / "best.safetensors"

    @property
    def evals(self) -> Path:
        """The eval rows of every eval step: `keys.npy` once, `step-<step:08d>.npz` each (`training.report`)."""
        return self.path / "eval"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def attempt(self) -> Path:
        """How often the group has started in this run directory (`training.launch.next_attempt`)."""
        return self.path / "attempt"


@dataclass(frozen=True)
class RunDir:
    path: Path  # or a str

    LOCK = ".codistill.lock"
    RUN_FILE = "run.json"
    COMPLETE = ".complete"
    STORE = "store"
    GROUP = re.compile(r"group-\d+")
    # What a run directory holds; `--overwrite` deletes nothing else.
    _ENTRIES = re.compile(rf"{GROUP.pattern}|{STORE}|{re.escape(RUN_FILE)}|{re.escape(LOCK)}|{re.escape(COMPLETE)}")

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # a str is taken too

    def group(self, group: int) -> GroupDir:
        return GroupDir(self.path / f"group-{group}")

    def groups(self) -> list[GroupDir]:
        """The group directories there are (none if the run directory is not there)."""
        found = sorted(self.path.glob("group-*")) if self.path.is_dir() else []
        return [GroupDir(p) for p in found if self.GROUP.fullmatch(p.name)]

    @property
    def run_file(self) -> Path:
        return self.path / self.RUN_FILE

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    @property
    def complete(self) -> Path:
        return self.path / self.COMPLETE

    @property
    def default_store(self) -> str:
        return str(self.path / self.STORE)

    @classmethod
    def is_entry(cls, name: str) -> bool:
        """Whether a name in a run directory is one of a run's (a temp file of an interrupted write too)."""
        return bool(cls._ENTRIES.fullmatch(name)) or storage.is_temp(name)
