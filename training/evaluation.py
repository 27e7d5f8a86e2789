"""The trainer's eval loop: batches -> forward -> the workload's eval rows -> all rows -> the workload's
metrics, on the whole eval split and on each of its halves (validation selects a model's reported step, test
measures it). Reports build ensembles and every other figure from the rows saved here (`codistill.analysis`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from codistill.dataset import DatasetManifest
from codistill.shards import Block
from pipelines.formats import concat_blocks
from training.data import to_torch
from training.metrics import validation_half
from training.workloads import Rows, Workload, subset

# (torch batch, state) -> (logits, state): a model's forward, the state carried from one batch to the next.
Forward = Callable[[dict[str, Tensor], Any], tuple[Tensor, Any]]


def evaluate(workload: Workload, forward: Forward, batches: Iterable[Block], dataset: DatasetManifest,
             placeholder: Block | None = None,
             gather: Callable[[list[Rows]], list[Rows] | None] | None = None) -> tuple[Rows, dict] | None:
    """The eval rows of every batch and the workload's metrics of them (and, as "validation" and "test", of
    each half of them).

    A `placeholder` batch is run through `forward` but its rows are dropped (a rank out of eval rows keeps in
    step with the others under ZeRO-3). `gather` takes this process's rows to the process that computes the
    metrics: it returns every rank's rows there, and None elsewhere (where this returns None too).
    """
    parts, state = [], None
    with torch.no_grad():
        for batch in batches:
            logits, state = forward(to_torch(batch), state)
            if batch is not placeholder:
                parts.append({"key": batch["key"], **workload.eval_rows(logits.float(), batch)})
    if gather is not None:
        parts = gather(parts)
        if parts is None:
            return None
    if not parts:
        raise ValueError("the eval split holds no rows")
    rows = concat_blocks(parts)
    halves = validation_half(workload.eval_unit(rows["key"]))
    return rows, workload.eval_metrics(rows, dataset) | {
        half: workload.eval_metrics(subset(rows, mask), dataset)
        for half, mask in (("validation", halves), ("test", ~halves))}
