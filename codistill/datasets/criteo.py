"""Criteo Display Advertising Challenge: click logs (TSV or CSV) -> hashed features, trained by the paper's DNN."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

from codistill.datasets.spec import DatasetSpec, Flag
from codistill.fields import require

# Every categorical column gets an embedding table of cat_buckets rows: a typo must not size it beyond reason.
MAX_CAT_BUCKETS = 1 << 24


@dataclass(frozen=True)
class CriteoSynthConfig:
    """Generate raw Criteo-format input instead of reading `data.input`."""

    rows: int = 20_000
    files: int = 2
    seed: int = 0
    gzip: bool = False

    def validate(self, name: str) -> None:
        require(self.rows >= 1, f"{name}.rows", f"must be >= 1, got {self.rows}")
        require(self.files >= 1, f"{name}.files", f"must be >= 1, got {self.files}")


@dataclass(frozen=True)
class CriteoConfig:
    # "tsv": Kaggle train.txt (40 tab-separated fields, no header).
    # "csv": the header CSV export seen in the wild (label,I1..I13,C1..C26; ints may be "260.0").
    dialect: Literal["tsv", "csv"] = "tsv"
    # Hash buckets per categorical column: one number for all 26, or a list of 26.
    cat_buckets: tuple[int, ...] = (100_000,)
    keep_raw: bool = False
    # Input file names (globs such as `day_23*`, the MLPerf convention for the 1TB logs) whose rows all form the
    # eval split; the other files' rows all go to the train groups. Empty: `data.eval_fraction` of the rows,
    # picked by the keyed hash, is the eval split.
    eval_files: tuple[str, ...] = ()

    def validate(self, name: str) -> None:
        for pattern in self.eval_files:  # matched against base names: those are what record keys hold
            require(bool(pattern) and "/" not in pattern, f"{name}.eval_files",
                    f"each must be a file name or a glob of one (no folder), got {pattern!r}")
        require(len(self.cat_buckets) in (1, 26), f"{name}.cat_buckets",
                f"must hold 1 or 26 numbers, got {len(self.cat_buckets)}")
        for b in self.cat_buckets:  # each column's embedding table has this many rows
            require(2 <= b <= MAX_CAT_BUCKETS, f"{name}.cat_buckets", f"each must be in [2, 2^24], got {b}")

    def is_eval_file(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.eval_files)

    def buckets_per_column(self) -> tuple[int, ...]:
        return self.cat_buckets * 26 if len(self.cat_buckets) == 1 else self.cat_buckets


@dataclass(frozen=True)
class CriteoDNNConfig:
    kind: Literal["criteo_dnn"] = "criteo_dnn"
    embedding_dim: int = 16
    hidden: tuple[int, ...] = (256, 128)
    dropout: float = 0.0

    def parameter_count(self, data) -> int:
        """Parameters of `training.workloads.criteo.CriteoDNN` on `data` (sizes snapshots before any model exists)."""
        buckets = data.options.buckets_per_column()
        count, width = sum(buckets) * self.embedding_dim, 13 + len(buckets) * self.embedding_dim
        for hidden in (*self.hidden, 1):  # each Linear: weights and bias; the last gives the one logit
            count, width = count + width * hidden + hidden, hidden
        return count

    def validate(self, name: str) -> None:
        require(self.embedding_dim >= 1, f"{name}.embedding_dim", f"must be >= 1, got {self.embedding_dim}")
        require(all(h >= 1 for h in self.hidden), f"{name}.hidden", f"sizes must be >= 1, got {self.hidden}")
        require(0.0 <= self.dropout < 1.0, f"{name}.dropout", f"must be in [0, 1), got {self.dropout}")


SPEC = DatasetSpec(
    summary="Criteo click logs (Kaggle TSV or the header CSV, plain or gzip)",
    name="criteo", config=CriteoConfig, synth=CriteoSynthConfig, models=(CriteoDNNConfig,),
    pipeline="pipelines.criteo", workload="training.workloads.criteo",
    flags=(Flag("dialect", "tsv: Kaggle train.txt; csv: the header CSV export (label,I1..,C26)."),
           Flag("cat_buckets", "Hash buckets for every categorical column."),
           Flag("keep_raw", "Also store the raw integer and categorical values."),
           Flag("eval_files", "Input files (a name glob such as 'day_23*') whose rows are the whole eval split.")),
    synth_flags=(Flag("rows", "Rows in all files together.", required=True),
                 Flag("files", "Files to spread the rows over."),
                 Flag("seed"), Flag("gzip", "Write .txt.gz files.")))
