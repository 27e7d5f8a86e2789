"""Criteo click-through prediction: the paper's DNN, log loss / AUC / calibration, churn of |Δp|."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from codistill.config import ExperimentConfig
from codistill.datasets.criteo import CriteoDNNConfig
from codistill.dataset import DatasetManifest
from codistill.shards import Block
from training import metrics
from training.data import ShardStream, StreamSpec
from training.workloads import Rows, Workload, stateless


class CriteoDNN(nn.Module):
    """The paper's Criteo DNN: an embedding per hashed categorical + the dense features, into an MLP.

    Returns one logit per row (click probability = sigmoid(logit)).
    """

    def __init__(self, config: CriteoDNNConfig, cat_buckets: list[int], dense_features: int = 13):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(b, config.embedding_dim) for b in cat_buckets)
        layers: list[nn.Module] = []
        width = dense_features + len(cat_buckets) * config.embedding_dim
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, dense: Tensor, cat: Tensor) -> Tensor:
        embedded = [emb(cat[:, i]) for i, emb in enumerate(self.embeddings)]
        return self.mlp(torch.cat([dense, *embedded], dim=1)).squeeze(1)


def build_model(config: CriteoDNNConfig, dataset: DatasetManifest) -> nn.Module:
    if not isinstance(config, CriteoDNNConfig):
        raise ValueError(f"model.kind: the criteo workload trains `criteo_dnn`, got {config.kind!r}")
    return CriteoDNN(config, list(dataset.settings.criteo.buckets_per_column()))


def batches(spec: StreamSpec, config: ExperimentConfig, train: bool) -> ShardStream:
    return ShardStream(spec)  # stored rows are model-ready: nothing to decode


def eval_rows(logits: Tensor, batch: Block) -> Rows:
    return {"prob": torch.sigmoid(logits).cpu().numpy(), "label": batch["label"]}


def eval_metrics(rows: Rows, dataset: DatasetManifest) -> dict[str, float]:
    result = metrics.binary_metrics(rows["prob"], rows["label"])
    result["loss"] = result["log_loss"]
    synth = dataset.extra.get("synth")
    if synth:
        result["floor"] = result["bayes_log_loss"] = synth["bayes_log_loss"]
    return result


def row_terms(rows: Rows) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ones = np.ones(len(rows["prob"]))
    terms = {"loss": (metrics.row_log_loss(rows["prob"], rows["label"]), ones)}
    if "truth" in rows:  # the Bayes floor of these rows (expected log loss of p*), and the distance to p*
        terms["floor"] = (metrics.binary_entropy(rows["truth"]), ones)
        terms["truth_gap"] = (np.abs(rows["prob"].astype(np.float64) - rows["truth"]), ones)
    return terms


def churn_terms(a: Rows, b: Rows) -> tuple[np.ndarray, np.ndarray]:
    return np.abs(a["prob"].astype(np.float64) - b["prob"]), np.ones(len(a["prob"]))


def ensemble(members: list[Rows]) -> Rows:
    return members[0] | {"prob": np.mean([m["prob"] for m in members], axis=0, dtype=np.float64).astype(np.float32)}


def calibrate(rows: Rows, temperature: float) -> Rows:
    p = np.clip(rows["prob"].astype(np.float64), 1e-7, 1 - 1e-7)
    return rows | {"prob": (1 / (1 + np.exp(-np.log(p / (1 - p)) / temperature))).astype(np.float32)}


def truth(dataset: DatasetManifest, keys: np.ndarray) -> np.ndarray | None:
    """The planted click probabilities, when the data came from the project's generator."""
    from pipelines.synth_criteo import GENERATOR, planted_probabilities

    synth = dataset.extra.get("synth")
    return planted_probabilities(synth, keys) if synth and synth.get("generator") == GENERATOR else None


def describe(m: dict) -> str:
    return f"log loss {m['log_loss']:.4f} AUC {m['auc']:.4f} calibration {m['calibration']:.3f} ({m['rows']} rows)"


def churn(a: Rows, b: Rows, threshold: float) -> dict[str, float]:
    return metrics.churn(a["prob"], b["prob"], threshold)


def describe_churn(c: dict, threshold: float) -> str:
    return (f"mean |p_a - p_b| = {c['mean_abs_diff']:.4f}, "
            f"thresholded at {threshold}: {100 * c['disagreement']:.2f}% differ")


WORKLOAD = Workload(
    name="criteo", binary=True, build_model=build_model, batches=batches, forward=stateless(("dense", "cat")),
    targets=lambda batch: (batch["label"].float(), None), eval_rows=eval_rows, eval_metrics=eval_metrics,
    describe=describe, churn=churn, describe_churn=describe_churn, row_terms=row_terms, churn_terms=churn_terms,
    ensemble=ensemble, calibrate=calibrate, truth=truth)
