"""Models, and the small per-dataset interface the trainer needs (a `Task`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from codistill.config import CriteoDNNConfig, ModelConfig
from codistill.dataset import DatasetManifest


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


@dataclass(frozen=True)
class Task:
    """What the trainer needs to know about a dataset: how to build the model and feed it."""

    binary: bool  # Bernoulli outputs (sigmoid) vs a softmax over classes
    inputs: tuple[str, ...]  # batch columns passed to the model, in order
    target: str

    def logits(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return model(*(batch[name] for name in self.inputs))


def build(config: ModelConfig, dataset: DatasetManifest) -> tuple[nn.Module, Task]:
    if config.kind == "criteo_dnn":
        buckets = list(dataset.parameters["criteo"]["cat_buckets"])
        buckets = buckets * 26 if len(buckets) == 1 else buckets
        return CriteoDNN(config, buckets), Task(binary=True, inputs=("dense", "cat"), target="label")
    raise ValueError(f"model.kind: unknown model {config.kind!r}")
