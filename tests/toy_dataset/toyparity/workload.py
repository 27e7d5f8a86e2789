"""The toy dataset's training workload: a one-hidden-layer MLP on the bits, log loss and |Δp| churn."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from toyparity.spec import BITS
from training import metrics
from training.data import ShardStream
from training.workloads import Workload, stateless


def build_model(config, dataset) -> nn.Module:
    return nn.Sequential(nn.Linear(BITS, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 1), nn.Flatten(0))


def eval_metrics(rows, dataset) -> dict[str, float]:
    return metrics.binary_metrics(rows["prob"], rows["label"]) | {"loss": metrics.log_loss(rows["prob"],
                                                                                            rows["label"])}


WORKLOAD = Workload(
    name="toyparity", binary=True, build_model=build_model,
    batches=lambda spec, config, train: ShardStream(spec), forward=stateless(("bits",)),
    targets=lambda batch: (batch["label"].float(), None),
    eval_rows=lambda logits, batch: {"prob": torch.sigmoid(logits).cpu().numpy(), "label": batch["label"]},
    eval_metrics=eval_metrics, describe=lambda m: f"log loss {m['loss']:.4f} ({m['rows']} rows)",
    churn=lambda a, b, threshold: metrics.churn(a["prob"], b["prob"], threshold),
    describe_churn=lambda c, threshold: f"mean |p_a - p_b| = {c['mean_abs_diff']:.4f}",
    row_terms=lambda rows: {"loss": (metrics.row_log_loss(rows["prob"], rows["label"]), np.ones(len(rows["prob"])))},
    churn_terms=lambda a, b: (np.abs(a["prob"].astype(np.float64) - b["prob"]), np.ones(len(a["prob"]))),
    ensemble=lambda members: members[0] | {"prob": np.mean([m["prob"] for m in members], axis=0)})
