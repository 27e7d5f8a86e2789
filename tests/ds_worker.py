"""One DeepSpeed data-parallel step per ZeRO stage, run under `torchrun` by tests/test_training.py.

    torchrun --nproc-per-node 2 tests/ds_worker.py <work dir> <stage>:<grad accum> [...]

Reads `<work dir>/init.safetensors` (the starting weights) and `<work dir>/batches.npz`
(`dense_<rank>`, `cat_<rank>`, `label_<rank>`: a different batch per rank). For each
case: builds the CriteoDNN from those weights, `deepspeed.initialize` with the
trainer's own `deepspeed_config` and a torch SGD optimizer (lr 1, no momentum),
takes one optimizer step on this rank's batch (split into `grad accum` equal
micro-batches), and writes the weights every rank now holds to
`<work dir>/<case>-rank<r>.safetensors` (full weights gathered with the trainer's
`GroupTrainer.full_state_dict` to `<case>-full.safetensors` on rank 0), where
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

from codistill.config import ModelConfig, load_experiment  # noqa: E402
from training.loss import DistillConfig, codistillation_loss  # noqa: E402
from training.models import CriteoDNN  # noqa: E402
from training.train import GroupTrainer, deepspeed_config  # noqa: E402

MODEL = ModelConfig(embedding_dim=4, hidden=(16,))
BUCKETS = [50] * 26


def make_model() -> torch.nn.Module:
    return CriteoDNN(MODEL, BUCKETS)


def loss_of(model, dense, cat, label) -> torch.Tensor:
    logits = model(dense, cat).float()
    return codistillation_loss(logits, label, [], 0, DistillConfig(), binary=True).total


def main() -> None:
    import deepspeed

    work, cases = Path(sys.argv[1]), [tuple(int(x) for x in c.split(":")) for c in sys.argv[2:]]
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    init = safetensors.torch.load_file(str(work / "init.safetensors"))
    with np.load(work / "batches.npz", allow_pickle=False) as data:
        dense = torch.from_numpy(data[f"dense_{rank}"])
        cat = torch.from_numpy(data[f"cat_{rank}"])
        label = torch.from_numpy(data[f"label_{rank}"])
    for stage, accum in cases:
        name = f"stage{stage}-accum{accum}"
        micro = len(label) // accum
        config = load_experiment("criteo-tiny", [f"deepspeed.zero_stage={stage}", f"deepspeed.grad_accum={accum}",
                                                 f"deepspeed.micro_batch_size={micro}",
                                                 f"deepspeed.ranks_per_group={world}"])
        model = make_model()
        model.load_state_dict(init)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(config))
        losses = []
        for i in range(accum):  # exactly as GroupTrainer.train_step: backward + step per micro-batch
            part = slice(i * micro, (i + 1) * micro)
            loss = loss_of(engine, dense[part], cat[part], label[part])
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.item()))
        assert engine.global_steps == 1, f"{name}: {engine.global_steps} optimizer steps, expected 1"
        # The trainer's own gathering code, on a stand-in with just what it reads.
        trainer = SimpleNamespace(engine=engine, config=config, rank=rank)
        full = GroupTrainer.full_state_dict(trainer)
        if rank == 0:
            assert full is not None
            safetensors.torch.save_file({k: v.contiguous() for k, v in full.items()},
                                        str(work / f"{name}-full.safetensors"))
        else:
            assert full is None, "full_state_dict must return None on ranks other than 0"
        if stage != 3:  # under ZeRO-3 a rank's module holds only placeholders; `full` is the check there
            local = {k: v.detach().float().clone().contiguous() for k, v in engine.module.state_dict().items()}
            safetensors.torch.save_file(local, str(work / f"{name}-rank{rank}.safetensors"))
        (work / f"{name}-rank{rank}.json").write_text(json.dumps({"world": world, "losses": losses}))
        dist.barrier()
        engine.destroy()
        del engine, optimizer, model
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
