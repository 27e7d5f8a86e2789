"""One small interface per workload (in the spirit of torchtitan's `TrainSpec`).

The trainer, the exchanger and the loss know nothing about any data set:
everything specific to one workload — its model, how a stored batch becomes
model inputs / targets / mask, decoding and augmentation in the loader,
evaluation metrics and churn — is one `Workload`, in the module that the
dataset's spec (`codistill.datasets`) names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor, nn

from codistill.config import ExperimentConfig
from codistill.dataset import DatasetManifest
from codistill.datasets import DATASETS
from codistill.shards import Block
from training.data import StreamSpec

Rows = dict[str, np.ndarray]  # per-row arrays with one leading length (eval outputs, predictions)


@dataclass(frozen=True)
class Workload:
    name: str  # the dataset manifest's `dataset`
    binary: bool  # Bernoulli outputs through a sigmoid (logits shaped like targets) vs a softmax over the last dim
    build_model: Callable[[Any, DatasetManifest], nn.Module]  # (model section, dataset) -> the model
    # (stream, config, train) -> numpy batches ready for the model: decoding and augmentation happen here,
    # inside the DataLoader workers when loader.workers > 0. Train streams repeat forever; eval streams end.
    batches: Callable[[StreamSpec, ExperimentConfig, bool], Iterable[Block]]
    # (model, torch batch, state) -> (logits, state). `state` is what one model carries from batch to batch
    # (None at the start and whenever the model's weights are replaced); stateless workloads return None.
    # The returned state is detached from the graph: callers carry it to the next batch as it is.
    forward: Callable[[nn.Module, dict[str, Tensor], Any], tuple[Tensor, Any]]
    # torch batch -> (targets, mask or None); mask False marks padding.
    targets: Callable[[dict[str, Tensor]], tuple[Tensor, Tensor | None]]
    # (logits, numpy batch) -> the per-row outputs of one eval batch that metrics and churn need.
    eval_rows: Callable[[Tensor, Block], Rows]
    # (all eval rows, dataset) -> metrics; always "loss" (the primary eval loss, in the floor's units) and
    # "rows", and "floor" when the data has a known one.
    eval_metrics: Callable[[Rows, DatasetManifest], dict[str, float]]
    describe: Callable[[dict], str]  # an eval record as one console line
    # (rows of run a, rows of run b, threshold for binary outputs) -> churn between two retrains: float
    # measures, the primary one first (reports compare conditions on it), and int counts
    churn: Callable[[Rows, Rows, float], dict[str, float]]
    describe_churn: Callable[[dict, float], str]
    # What reports compute with intervals, as per-row terms: a figure over any subset of the eval rows is
    # sum(numerator[subset]) / sum(denominator[subset]), so bootstrap replicates cost two gathers and sums.
    # rows -> {figure: (numerator, denominator)}: always "loss" (eval_metrics' "loss" on the same rows),
    # "floor" when the rows carry the generator's `truth`, and the workload's other figures (e.g. "top1").
    row_terms: Callable[[Rows], dict[str, tuple[np.ndarray, np.ndarray]]]
    # (rows of model a, rows of model b) -> per-row terms of the primary churn measure (`churn`'s first).
    churn_terms: Callable[[Rows, Rows], tuple[np.ndarray, np.ndarray]]
    # Rows of several models on the same eval rows -> the rows of their ensemble (predicted distributions
    # averaged), as far as the rows allow: every row term can be computed from them.
    ensemble: Callable[[list[Rows]], Rows]
    # (rows, temperature) -> the rows of the model with its logits divided by the temperature; None when the
    # rows do not carry the whole predicted distribution.
    calibrate: Callable[[Rows, float], Rows] | None = None
    # (dataset, eval keys) -> what the data's generator planted for each row (the true probability), or None
    # when the data was not generated or the generator cannot say.
    truth: Callable[[DatasetManifest, np.ndarray], np.ndarray | None] | None = None
    # (config, dataset) -> stored rows one example of a batch consumes (1; the stateful LM's stream windows
    # are window / row-length rows), for the passes over its split a run makes.
    records_per_example: Callable[[ExperimentConfig, DatasetManifest], float] = lambda config, dataset: 1.0
    # Keys -> the unit the eval split is halved by (validation / test): rows of one unit stay together.
    eval_unit: Callable[[np.ndarray], np.ndarray] = lambda keys: keys
    # (config, dataset) -> raises DatasetError when this run must not train on the dataset (the LM: a tokenizer
    # changed since preprocessing). `codistill train` calls it before it starts any rank.
    check_dataset: Callable[[ExperimentConfig, DatasetManifest], None] = lambda config, dataset: None


def workload_for(dataset: str) -> Workload:
    if dataset not in DATASETS:
        raise ValueError(f"no training workload for dataset {dataset!r} (known: {', '.join(DATASETS)})")
    return importlib.import_module(DATASETS[dataset].workload).WORKLOAD


def subset(rows: Rows, index: np.ndarray) -> Rows:
    """Rows at `index` (a boolean mask or indices) of every per-row array."""
    return {k: v[index] for k, v in rows.items()}


def stateless(inputs: tuple[str, ...]) -> Callable[[nn.Module, dict[str, Tensor], Any], tuple[Tensor, None]]:
    """`forward` for models that take batch columns as positional arguments and carry nothing."""

    def forward(model: nn.Module, batch: dict[str, Tensor], state: Any) -> tuple[Tensor, None]:
        return model(*(batch[name] for name in inputs)), None

    return forward
