"""An ensemble of finished models, evaluated on the shared eval split by averaging their predicted
distributions (the ceiling codistillation is compared with; it trains nothing of its own).

Each member is a group directory of a finished run (`<run_dir>/group-<g>/model.safetensors`). The
result is written like a one-group run (`<out>/group-0/metrics.jsonl` with one eval record and
`eval_predictions.npz`), so reports and churn read it as they read any run.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from codistill import storage
from codistill.config import ExperimentConfig
from codistill.dataset import load_manifest
from codistill.rundir import GroupDir, RunDir
from training.data import StreamSpec
from training.evaluation import evaluate
from training.loss import average_peer_probs
from training.report import save_predictions
from training.workloads import workload_for


def evaluate_ensemble(config: ExperimentConfig, members: list[Path], out: Path, step: int) -> dict:
    if config.eval.max_rows is not None:
        raise ValueError("eval.max_rows is set: an ensemble is evaluated on the whole eval split, so its "
                         "members' metrics would not be comparable")
    storage.configure(config.storage)  # the eval split may be on an object store
    dataset = load_manifest(config.data.output)
    workload = workload_for(dataset.dataset)
    models = []
    for member in members:
        model = workload.build_model(config.model, dataset)
        model.load_state_dict(safetensors.torch.load_file(str(GroupDir(member).weights)))
        models.append(model.eval())

    def forward(batch, states):
        states = list(states or [None] * len(models))

        def member_logits():
            for i, model in enumerate(models):
                logits, states[i] = workload.forward(model, batch, states[i])
                yield logits.float()

        mean = average_peer_probs(member_logits(), temperature=1.0, binary=workload.binary)
        # Back to logits of the averaged distribution, so the workload's own eval code applies unchanged.
        logits = torch.logit(mean.double(), eps=1e-12).float() if workload.binary else mean.clamp_min(1e-30).log()
        return logits, states

    spec = StreamSpec(config.data.output, dataset, tuple(dataset.shards_of("eval")), config.eval.batch_size)
    rows, metrics = evaluate(workload, forward, workload.batches(spec, config, False), dataset)
    metrics = {"step": step, "group": 0, "members": [str(m) for m in members], **metrics}
    group = RunDir(out).group(0)
    group.path.mkdir(parents=True, exist_ok=True)
    group.metrics.write_text(json.dumps({"kind": "eval", **metrics}) + "\n")
    save_predictions(group, workload, rows)
    return metrics
