"""Evaluation metrics for binary predictions, and prediction churn between two models."""

from __future__ import annotations

import hashlib

import numpy as np


def row_log_loss(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    return -(labels * np.log(p) + (1 - labels) * np.log1p(-p))


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(row_log_loss(probs, labels)))


def binary_entropy(probs: np.ndarray) -> np.ndarray:
    """Expected log loss of predicting p when the outcome is Bernoulli(p): the Bayes floor of a row."""
    p = np.clip(probs.astype(np.float64), 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log1p(-p))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum statistic, ties given their average rank."""
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    average_rank = first + (counts + 1) / 2.0  # 1-based average rank of each distinct score
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(average_rank, counts)
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def binary_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    positive_rate = float(labels.mean()) if len(labels) else float("nan")
    return {
        "log_loss": log_loss(probs, labels),
        "auc": auc(probs, labels),
        # mean prediction over the positive rate: 1.0 is calibrated on average
        "calibration": float(probs.mean() / positive_rate) if positive_rate else float("nan"),
        "positive_rate": positive_rate,
        "rows": int(len(labels)),
    }


def churn(probs_a: np.ndarray, probs_b: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Mean |p_a - p_b|, and the fraction of examples whose thresholded prediction differs."""
    return {
        "mean_abs_diff": float(np.mean(np.abs(probs_a - probs_b))),
        "disagreement": float(np.mean((probs_a > threshold) != (probs_b > threshold))),
        "rows": int(len(probs_a)),
    }


def validation_half(units: np.ndarray) -> np.ndarray:
    """True for the eval rows of the validation half, False for the test half, by a fixed keyed hash of each
    row's unit (its key, or its document): every run halves the eval split the same way, so the step chosen
    on validation is never measured on a row it was chosen by."""
    digests = b"".join(hashlib.blake2b(u, digest_size=8, key=b"codistill-validation").digest()
                       for u in units.tolist())
    return (np.frombuffer(digests, "<u8") & 1) == 0

