"""ImageNet classification: ResNet on JPEG shards, top-1 / top-5 / cross-entropy, churn of the top-1 class.

The loader decodes and augments inside the DataLoader workers (`loader.workers`
processes do the JPEG work): each worker reads its share of the shards through
`ShardStream` (shards reshuffled every epoch, split over ranks x workers, a
sample shuffle buffer) and turns each batch of JPEG bytes into one uint8 NHWC
array (`training.image_transforms`). Normalisation runs on the batch in torch,
inside the model (`ImageClassifier`), so a peer sees exactly what the student sees.

A sample that fails to decode is skipped (its batch is one row shorter, so
every rank still yields the same number of batches), logged and counted; more
than `loader.max_decode_failures` in one worker stops training with an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import IterableDataset, get_worker_info

from codistill.config import ExperimentConfig
from codistill.datasets.imagenet import ResNetConfig
from codistill.dataset import DatasetManifest
from codistill.shards import Block
from training import image_transforms
from training.data import ShardStream, StreamSpec
from training.resnet import ResNet
from training.workloads import Rows, Workload, stateless

logger = logging.getLogger("codistill.imagenet")

# What a bad JPEG raises in Pillow: not an image (UnidentifiedImageError is an OSError), truncated or corrupt
# data (OSError, SyntaxError, ValueError), or more pixels than Image.MAX_IMAGE_PIXELS allows.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DecodeFailuresError(RuntimeError):
    """Too many samples of a stream failed to decode: the data set is damaged."""


def num_outputs(dataset: DatasetManifest) -> int:
    classes, offset = dataset.extra.get("classes"), dataset.extra.get("label_offset", 0)
    if not classes:
        raise ValueError("the imagenet dataset manifest has no extra.classes: rebuild it with "
                         "`codistill preprocess imagenet`")
    return len(classes) + offset


class ImageClassifier(nn.Module):
    """uint8 (N, H, W, 3) images -> logits (N, classes + label offset): normalisation, then the ResNet."""

    def __init__(self, config: ResNetConfig, outputs: int):
        super().__init__()
        self.resnet = ResNet(config, outputs)
        # NHWC inputs make every convolution run NHWC. The weights stay contiguous: DeepSpeed views each
        # parameter as bytes to broadcast it, which a channels_last weight refuses.
        self.channels_last = config.channels_last

    def forward(self, images: Tensor) -> Tensor:
        dtype = self.resnet.fc.weight.dtype  # fp32, or bf16 when DeepSpeed runs the student in bf16
        return self.resnet(image_transforms.normalize(images, dtype, self.channels_last))


def build_model(config: ResNetConfig, dataset: DatasetManifest) -> nn.Module:
    if not isinstance(config, ResNetConfig):
        raise ValueError(f"model.kind: the imagenet workload trains `resnet`, got {config.kind!r}")
    return ImageClassifier(config, num_outputs(dataset))


class ImageBatches(IterableDataset):
    """Batches of JPEG records from a shard stream -> {key, image: uint8 (N, size, size, 3), label}."""

    def __init__(self, spec: StreamSpec, size: int, train: bool, max_failures: int):
        super().__init__()
        self.stream, self.size, self.train, self.max_failures = ShardStream(spec), size, train, max_failures

    def __iter__(self) -> Iterator[Block]:
        failures = 0
        seed = self.stream.spec.seed
        for epoch, block in self.stream.epochs():
            keep, images = [], []
            for i, (key, data) in enumerate(zip(block["key"].tolist(), block["image"])):
                rng = image_transforms.sample_rng(seed, epoch, key) if self.train else None
                try:
                    images.append(image_transforms.crop(data, self.size, self.train, rng))
                except DECODE_ERRORS as e:
                    failures, last = failures + 1, (key, e)
                    logger.warning("skipped an image that does not decode: %s: %s: %s", key.decode(errors="replace"),
                                   type(e).__name__, e)
                    if failures > self.max_failures:
                        raise DecodeFailuresError(self._too_many(failures, *last)) from None
                    continue
                keep.append(i)
            if not images:  # an empty batch would desynchronise the ranks (and BatchNorm needs rows)
                raise DecodeFailuresError(self._too_many(failures, *last))
            yield {"key": block["key"][keep], "image": np.stack(images), "label": block["label"][keep]}

    def _too_many(self, failures: int, key: bytes, error: Exception) -> str:
        info = get_worker_info()
        where = f"rank {self.stream.spec.rank}, loader worker {info.id if info else 0}"
        return (f"{failures} images failed to decode in one loader stream ({where}; loader.max_decode_failures="
                f"{self.max_failures}, or a whole batch failed); the last: {key.decode(errors='replace')}: "
                f"{type(error).__name__}: {error}. The shards hold damaged images: `codistill preprocess imagenet` "
                "quarantines undecodable files, so rebuild the data set with it (and `codistill verify` it).")


def batches(spec: StreamSpec, config: ExperimentConfig, train: bool) -> ImageBatches:
    return ImageBatches(spec, config.model.image_size, train, config.loader.max_decode_failures)


def eval_rows(logits: Tensor, batch: Block) -> Rows:
    logits = logits.detach()
    labels = torch.from_numpy(batch["label"]).to(logits.device)
    log_probs = logits.float().log_softmax(-1)
    top5 = log_probs.topk(min(5, logits.shape[-1]), dim=-1)
    nll = F.nll_loss(log_probs, labels, reduction="none")
    return {"top1": top5.indices[:, 0].cpu().numpy(), "top5": top5.indices.cpu().numpy(),
            # the top-5 probabilities: enough to average members' predictions into an ensemble's top classes
            "top5_prob": top5.values.exp().cpu().numpy(), "nll": nll.cpu().numpy(), "label": batch["label"]}


def eval_metrics(rows: Rows, dataset: DatasetManifest) -> dict[str, float]:
    label = rows["label"]
    result = {"top1": float(np.mean(rows["top1"] == label)),
              "top5": float(np.mean((rows["top5"] == label[:, None]).any(axis=1))),
              "cross_entropy": float(np.mean(rows["nll"])), "rows": int(len(label))}
    result["loss"] = result["cross_entropy"]
    return result


def row_terms(rows: Rows) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ones, label = np.ones(len(rows["label"])), rows["label"]
    return {"loss": (rows["nll"].astype(np.float64), ones), "top1": ((rows["top1"] == label).astype(np.float64), ones),
            "top5": ((rows["top5"] == label[:, None]).any(axis=1).astype(np.float64), ones)}


def churn_terms(a: Rows, b: Rows) -> tuple[np.ndarray, np.ndarray]:
    return (a["top1"] != b["top1"]).astype(np.float64), np.ones(len(a["top1"]))


def ensemble(members: list[Rows]) -> Rows:
    """The label's probability is averaged exactly (from each member's nll); the top classes from the members'
    top-5 (a class outside a member's top 5 counts as 0 for it)."""
    nll = -np.log(np.mean([np.exp(-m["nll"].astype(np.float64)) for m in members], axis=0))
    ids = np.concatenate([m["top5"] for m in members], axis=1)
    probs = np.concatenate([m["top5_prob"] for m in members], axis=1) / len(members)
    score = ((ids[:, :, None] == ids[:, None, :]) * probs[:, None, :]).sum(-1)  # each candidate's summed prob
    top5, top5_prob = [], []
    for row_ids, row_score in zip(ids, score):
        order = np.argsort(-row_score, kind="stable")
        _, first = np.unique(row_ids[order], return_index=True)
        best = order[np.sort(first)][:members[0]["top5"].shape[1]]
        top5.append(row_ids[best])
        top5_prob.append(row_score[best])
    top5 = np.array(top5)
    return {"top1": top5[:, 0], "top5": top5, "top5_prob": np.array(top5_prob, np.float32),
            "nll": nll.astype(np.float32), "label": members[0]["label"]}


def describe(m: dict) -> str:
    return (f"top-1 {100 * m['top1']:.2f}% top-5 {100 * m['top5']:.2f}% cross-entropy {m['cross_entropy']:.4f} "
            f"({m['rows']} images)")


def churn(a: Rows, b: Rows, threshold: float) -> dict[str, float]:
    """Disagreement of the top-1 class between two retrains (threshold: binary workloads only)."""
    return {"top1_disagreement": float(np.mean(a["top1"] != b["top1"])), "rows": int(len(a["top1"]))}


def describe_churn(c: dict, threshold: float) -> str:
    return f"top-1 class differs on {100 * c['top1_disagreement']:.2f}% of {c['rows']} eval images"


WORKLOAD = Workload(
    name="imagenet", binary=False, build_model=build_model, batches=batches, forward=stateless(("image",)),
    targets=lambda batch: (batch["label"], None), eval_rows=eval_rows, eval_metrics=eval_metrics,
    describe=describe, churn=churn, describe_churn=describe_churn, row_terms=row_terms, churn_terms=churn_terms,
    ensemble=ensemble)
