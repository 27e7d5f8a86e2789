"""One DeepSpeed data-parallel step per ZeRO stage, run under `torchrun` by tests/test_training.py.

    torchrun --nproc-per-node 2 tests/ds_worker.py <work dir> <stage>:<grad accum> [...]

Reads `<work dir>/init.safetensors` (the starting weights) and `<work dir>/batches.npz`
(`dense_<rank>`, `cat_<rank>`, `label_<rank>`: a different batch per rank). For each
case: builds the CriteoDNN from those weights, the DeepSpeed engine with the
trainer's own `build_engine` (its DeepSpeed config; a torch SGD optimizer, lr 1,
no momentum, constant schedule), takes one optimizer step on this rank's batch
(split into `grad accum` equal micro-batches, each through the trainer's
`forward_backward`), and writes the weights every rank now holds to
`<work dir>/<case>-rank<r>.safetensors` (full weights gathered with the trainer's
`GroupTrainer.gathered_state` to `<case>-full.safetensors` on rank 0), where
<case> is `stage<s>-accum<a>`.
No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from codistill.config import CodistillConfig, load_experiment  # noqa: E402
from codistill.datasets.criteo import CriteoDNNConfig  # noqa: E402
from training.loss import codistillation_loss  # noqa: E402
from training.train import (GroupTrainer, build_engine, exit_finished_rank, forward_backward,  # noqa: E402
                            init_distributed)
from training.workloads.criteo import WORKLOAD, CriteoDNN  # noqa: E402

# hidden 1024: the first layer (117 x 1024 weights) is above DeepSpeed's stage3_param_persistence_threshold
# (1e5), so ZeRO-3 really partitions it and the gathering is exercised.
MODEL = CriteoDNNConfig(embedding_dim=4, hidden=(1024,))
BUCKETS = [50] * 26


def make_model() -> torch.nn.Module:
    return CriteoDNN(MODEL, BUCKETS)


def loss_of(model, dense, cat, label) -> torch.Tensor:
    logits = model(dense, cat).float()
    return codistillation_loss(logits, label, [], 0, CodistillConfig(), binary=True).total


def main() -> None:
    work, cases = Path(sys.argv[1]), [tuple(int(x) for x in c.split(":")) for c in sys.argv[2:]]
    rank, world = init_distributed()
    init = safetensors.torch.load_file(str(work / "init.safetensors"))
    with np.load(work / "batches.npz", allow_pickle=False) as data:
        dense = torch.from_numpy(data[f"dense_{rank}"])
        cat = torch.from_numpy(data[f"cat_{rank}"])
        label = torch.from_numpy(data[f"label_{rank}"])
    for stage, accum in cases:
        name = f"stage{stage}-accum{accum}"
        micro = len(label) // accum
        # Plain SGD, lr 1, constant: one step moves the weights by exactly minus the (averaged) gradient.
        config = load_experiment("criteo-tiny", [
            f"deepspeed.zero_stage={stage}", f"deepspeed.grad_accum={accum}", f"deepspeed.micro_batch_size={micro}",
            f"deepspeed.ranks_per_group={world}", "optimizer.name=sgd", "optimizer.lr=1.0", "optimizer.momentum=0.0",
            "schedule.warmup_steps=0", "schedule.decay=constant"])
        model = make_model()
        model.load_state_dict(init)
        engine = build_engine(model, config, world)  # the trainer's engine: its optimizer, schedule and DS config
        losses = []
        for i in range(accum):  # GroupTrainer.train_step: one forward_backward (backward + step) per micro-batch
            part = slice(i * micro, (i + 1) * micro)
            batch = {"dense": dense[part], "cat": cat[part], "label": label[part]}
            parts = forward_backward(engine, WORKLOAD, {}, batch, 0, CodistillConfig())
            losses.append(float(parts.total.item()))
        assert engine.global_steps == 1, f"{name}: {engine.global_steps} optimizer steps, expected 1"
        partitioned = [n for n, p in engine.module.named_parameters() if p.data.numel() < p.ds_numel] \
            if stage == 3 else []
        # The trainer's own gathering code, on a stand-in with just what it reads.
        trainer = SimpleNamespace(engine=engine, config=config, rank=rank)
        with GroupTrainer.gathered_state(trainer) as full:
            if rank == 0:
                assert full is not None
                safetensors.torch.save_file({k: v.clone().contiguous() for k, v in full.items()},
                                            str(work / f"{name}-full.safetensors"))
            else:
                assert full is None, "gathered_state must give None on ranks other than 0"
        if stage != 3:  # under ZeRO-3 a rank's module holds only placeholders; `full` is the check there
            local = {k: v.detach().float().clone().contiguous() for k, v in engine.module.state_dict().items()}
            safetensors.torch.save_file(local, str(work / f"{name}-rank{rank}.safetensors"))
        (work / f"{name}-rank{rank}.json").write_text(json.dumps({"world": world, "losses": losses,
                                                                   "partitioned": partitioned}))
        dist.barrier()
        engine.destroy()
        del engine, model
    dist.barrier()
    dist.destroy_process_group()
    exit_finished_rank()  # as the trainer does: gloo threads must not meet interpreter finalisation


if __name__ == "__main__":
    main()
