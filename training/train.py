"""Train one group of a codistillation run. One DeepSpeed job per group:

    deepspeed --num_gpus R --module training.train --manifest M --group g [--set k=v] [--resume]

(or `torchrun --nproc-per-node R -m training.train ...`; `codistill train M` starts every group).

Each step: adopt any newer verified peer snapshots (rank 0 decides, every rank
follows, so ranks never disagree), run the student and the usable peers on
the student's own batch, take the codistillation loss, step. Every
`exchange_every` steps rank 0 publishes the full weights (in `codistill.snapshot_dtype`). The store is
only touched by background threads: training never waits on it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist

from codistill import storage
from codistill.config import CodistillConfig, ExperimentConfig, OptimizerConfig, ScheduleConfig, load_experiment
from codistill.dataset import check_shards_present, load_manifest
from codistill.extras import missing_extra
from codistill.rundir import RunDir
from codistill.units import duration
from training import evaluation
from training.data import StreamSpec, loader, to_torch
from training.exchange import (SNAPSHOT_DTYPES, PeerWatcher, SnapshotPublisher, check_store_run, group_dir,
                               model_signature, snapshot_bytes)
from training.precision import group_precision, local_precision
from training.launch import agree_run_nonce, exit_when_launcher_dies, next_attempt, run_identity
from training.loss import LossParts, codistillation_loss, distill_weight
from training.report import metric_records, peer_coverage, save_eval_rows, save_predictions
from training.workloads import Workload, workload_for

logger = logging.getLogger("codistill.train")


class RunFailed(RuntimeError):
    """A group that must not end as a success (it did not codistill); `main` prints it as one line."""


def init_distributed() -> tuple[int, int]:
    """DeepSpeed's process group (NCCL with CUDA, gloo without); returns (rank, world size).

    First makes this rank end when its launcher does (a SIGKILLed launcher cannot stop its ranks itself).
    """
    import deepspeed

    exit_when_launcher_dies()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not torch.cuda.is_available():
        # DeepSpeed's CPU all-reduce maps a ~70 MB /dev/shm segment per rank and never unlinks
        # it: every run would leak that much RAM until /dev/shm is full. Once every rank has
        # mapped every segment (the barrier), the names can go; the mappings stay valid.
        dist.barrier()
        port = os.environ.get("MASTER_PORT", "*")
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
            os.unlink(path)
    return rank, world


def deepspeed_config(config: ExperimentConfig, tensorboard_dir: Path | None = None) -> dict:
    ds = config.deepspeed
    out = {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "zero_optimization": {"stage": ds.zero_stage},
        # torch SGD is fine under ZeRO; DeepSpeed only vouches for Adam(W)/Adagrad.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves
    }
    # Always written: left out, DeepSpeed would clip at its default norm of 1.0.
    out["gradient_clipping"] = float(ds.gradient_clipping)
    precision = local_precision(ds.precision)[0]  # GroupTrainer has resolved `auto` for its group already
    if precision != "fp32":
        out[precision] = {"enabled": True}
    if tensorboard_dir is not None:  # DeepSpeed's monitor (rank 0) writes to output_path/job_name
        out["tensorboard"] = {"enabled": True, "output_path": str(tensorboard_dir.parent),
                              "job_name": tensorboard_dir.name}
    return out


def make_optimizer(params, config: OptimizerConfig) -> torch.optim.Optimizer:
    # torch optimizers, not DeepSpeed's fused/CPU ones: those JIT-compile C++ on first use.
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.name == "adagrad":
        return torch.optim.Adagrad(params, lr=config.lr, weight_decay=config.weight_decay)
    cls = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)


def build_engine(model: torch.nn.Module, config: ExperimentConfig, world: int, tensorboard_dir: Path | None = None):
    """The DeepSpeed engine for one group's model, optimizer and LR schedule."""
    import deepspeed

    optimizer = make_optimizer(model.parameters(), config.optimizer)
    scheduler = Schedule(optimizer, config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(config, tensorboard_dir))
    if world == 1 and config.deepspeed.zero_stage == 0:
        # Nothing to average, yet DeepSpeed would flatten every gradient, all-reduce it with
        # itself over gloo and copy it back: ~10% of a small model's step.
        engine.enable_backward_allreduce = False
    return engine


def forward_backward(engine, workload: Workload, peers: dict[int, torch.nn.Module], batch: dict[str, torch.Tensor],
                     step: int, distill: CodistillConfig, states: dict | None = None, label_smoothing: float = 0.0,
                     label_prior: float = 0.5) -> LossParts:
    """One micro-step: the student on its batch, the frozen peers on the same batch, the loss, backward, step.

    `states` holds what each model ("student", or a peer's group) carries from batch to batch (the LM's
    hidden state in its stateful layout); it is updated in place (`Workload.forward` returns it detached).
    """
    states = {} if states is None else states
    logits, student_state = workload.forward(engine, batch, states.get("student"))

    def peer_logits():
        # One peer at a time, as the loss asks for it (not at all while w(step) is 0), each released
        # before the next runs: peak memory does not grow with the number of peers.
        for group, peer in peers.items():
            with torch.no_grad():
                out, states[group] = workload.forward(peer, batch, states.get(group))  # in the training dtype
            yield out.float()
            del out

    targets, mask = workload.targets(batch)
    parts = codistillation_loss(logits.float(), targets, peer_logits(), step, distill, binary=workload.binary,
                                mask=mask, label_smoothing=label_smoothing, label_prior=label_prior)
    engine.backward(parts.total)
    engine.step()
    states["student"] = student_state
    return parts


def usable_peers(peer_steps: dict[int, int | None], step: int, max_staleness: int | None, stale: set[int],
                 warn: bool = True) -> list[int]:
    """The peer groups to distill from at `step`: those whose adopted snapshot (`peer_steps`, None before the
    first) is at most `max_staleness` steps old. `stale` (updated in place) holds the groups left out, so a
    group going stale is warned about once (if `warn`), not at every step."""
    usable = []
    for g, at in peer_steps.items():
        if at is not None and (max_staleness is None or step - at <= max_staleness):
            usable.append(g)
            stale.discard(g)
            continue
        if at is not None and g not in stale and warn:
            logger.warning("peer group %d left out: its snapshot (step %d) is %d steps old, max_staleness %d",
                           g, at, step - at, max_staleness)
        stale.add(g)
    return usable


def lr_factor(schedule: ScheduleConfig):
    def factor(step: int) -> float:
        if step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        if schedule.decay == "constant":
            return 1.0
        progress = min(1.0, (step - schedule.warmup_steps) / max(1, schedule.steps - schedule.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule.decay == "cosine" else 1 - progress
        return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * shape

    return factor


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """The LR schedule, and `optimizer.weight_decay_schedule` set on the param groups for each step."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: ExperimentConfig):
        # Plain numbers, not closures: DeepSpeed checkpoints pickle the scheduler's state.
        self.weight_decays = (config.optimizer.weight_decay, config.optimizer.weight_decay_schedule)
        super().__init__(optimizer, lr_factor(config.schedule))

    def step(self, epoch=None) -> None:
        super().step(epoch)
        decay, schedule = self.weight_decays
        for at, value in schedule:
            if self.last_epoch >= at:
                decay = value
        for group in self.optimizer.param_groups:
            group["weight_decay"] = decay


class FlatPeer:
    """A frozen peer model in the training precision, its float tensors views into one flat buffer per dtype.

    Parameters are cast to `dtype` and float buffers stay fp32, as DeepSpeed casts the student, so a peer runs
    the student's batch at the student's speed. Adopting a snapshot (whatever its `codistill.snapshot_dtype`)
    is then one copy of each tensor straight into its place in the buffer, cast on the way (no temporary: a
    bf16 snapshot's fp32 copies would cost the step their page faults), and one broadcast of each buffer on
    every rank. The few non-float buffers (BatchNorm's `num_batches_tracked`, unused by a peer in eval mode)
    are copied apart.
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype = torch.float32):
        self.module = module
        parameters = dict(module.named_parameters())
        tensors = parameters | dict(module.named_buffers())
        names = list(module.state_dict())
        if any(tensors[n].is_floating_point() and tensors[n].dtype != torch.float32 for n in names):
            raise ValueError("FlatPeer needs an fp32 model")
        floats = {n: dtype if n in parameters else torch.float32 for n in names if tensors[n].is_floating_point()}
        by_dtype = {d: [n for n, nd in floats.items() if nd == d] for d in dict.fromkeys(floats.values())}
        self.others = {n: tensors[n] for n in names if not tensors[n].is_floating_point()}
        self.flats, self.places = {}, {}  # places: each float tensor's slice of its flat buffer
        for d, group in by_dtype.items():
            flat = torch.cat([tensors[n].detach().reshape(-1).to(d) for n in group])
            offset = 0
            for name in group:
                tensor = tensors[name]
                self.places[name] = flat[offset:offset + tensor.numel()]
                tensor.data = self.places[name].view_as(tensor)
                offset += tensor.numel()
            self.flats[d] = flat

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for name, place in self.places.items():
            place.copy_(state[name].reshape(-1))
        for name, tensor in self.others.items():
            tensor.copy_(state[name])


class GroupTrainer:
    def __init__(self, config: ExperimentConfig, group: int, run_nonce: str | None = None, resume: bool = False):
        self.config, self.group, self.resume = config, group, resume
        self.identity = run_identity(config)
        self.rank, self.world = init_distributed()
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        self.out = RunDir(config.run_dir).group(group)
        self.out.path.mkdir(parents=True, exist_ok=True)

        self.dataset = load_manifest(config.data.output)
        check_shards_present(config.data.output, self.dataset)
        if not 0 <= group < self.dataset.groups:
            raise ValueError(f"--group {group}: the dataset has groups 0..{self.dataset.groups - 1}")
        if group not in config.trained_groups:
            raise ValueError(f"--group {group}: train.groups is {list(config.trained_groups)}")

        # `auto` resolved once for the group; peers, batches and the DeepSpeed config all follow it. A resumed group
        # keeps the precision its checkpoints were trained in: `auto` may pick another on other hardware.
        requested = config.deepspeed.precision
        trained = checkpoint_precision(self.out.checkpoints) if resume else None
        if trained and requested not in ("auto", trained):
            raise RunFailed(f"--resume: the checkpoints in {self.out.checkpoints} were trained in {trained}, this "
                            f"configuration sets {requested}: resume with --set deepspeed.precision={trained}")
        precision, self.precision_reason = ((trained, "as its checkpoints were trained (--resume)") if trained else
                                            group_precision(requested, self.device, self.world))
        self.config = config = dataclasses.replace(
            config, deepspeed=dataclasses.replace(config.deepspeed, precision=precision))
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        if self.rank == 0:
            print(f"group {group}: training in {precision} ({self.precision_reason})", flush=True)

        self.workload = workload_for(self.dataset.dataset)
        torch.manual_seed(config.train.seed * 1000 + group)  # every rank the same: one model per group
        model = self.workload.build_model(config.model, self.dataset)
        # The model as its snapshots are published (codistill.snapshot_dtype), whatever the training precision.
        published = SNAPSHOT_DTYPES[config.codistill.snapshot_dtype]
        self.signature = model_signature(model.state_dict(), published)
        self.snapshot_size = snapshot_bytes(model.state_dict(), published)
        self.engine = build_engine(model, config, self.world,
                                   self.out.tensorboard if config.train.tensorboard else None)

        cod = config.codistill
        self.peer_groups = [g for g in config.trained_groups if g != group] if cod.enabled else []
        self.peers = {g: self._frozen_copy() for g in self.peer_groups}
        self.peer_steps: dict[int, int | None] = {g: None for g in self.peer_groups}
        self.stale: set[int] = set()
        self.incoming: dict[int, tuple[int, dict]] = {}
        self.states: dict = {}  # what each model carries between batches: "student", and each peer's group
        self.placeholder = None  # one eval row, for the forwards of a rank out of eval rows (ZeRO-3)
        self.publisher = self.watcher = None
        if cod.enabled:
            nonce = self.check_store(run_nonce)
        if cod.enabled and self.rank == 0:
            self.publisher = SnapshotPublisher(config.store, config.run_id, group, keep=cod.keep_snapshots,
                                               run_nonce=nonce, attempt=next_attempt(self.out.attempt),
                                               snapshot_dtype=cod.snapshot_dtype)
            if self.peer_groups:
                # The tokenizer's sha256 (None without one): a peer trained on other tokens is never adopted.
                self.watcher = PeerWatcher(config.store, config.run_id, group, self.peer_groups, self.signature,
                                           self.snapshot_size, snapshot_dtype=cod.snapshot_dtype,
                                           poll_interval=cod.poll_seconds, vocab_hash=self.dataset.tokenizer_sha256,
                                           run_nonce=nonce, max_step=config.schedule.steps, poll=not cod.lockstep)
        self.best_validation = math.inf
        self.label_prior = 0.5  # the binary label smoothing's target: the training base rate (fit measures it)
        self.step = 0
        self.step_seconds: list[float] = []
        self.metrics_file = None

    def check_store(self, run_nonce: str | None) -> str | None:
        """Rank 0 agrees on the run's nonce (unless given: `codistill train` gives it) and checks the snapshot
        store: no other run's snapshots, and writable (a store that cannot take this group's snapshots fails now,
        not as a warning on every publish); returns the nonce on rank 0. Every rank raises the same StoreError,
        so none is left waiting in a collective for a rank 0 that is gone."""
        config = self.config
        problem = [None]
        if self.rank == 0:
            try:
                with storage.explained(config.store):
                    run_nonce = run_nonce or agree_run_nonce(config.run_dir, config.store, config.run_id,
                                                             self.identity)
                    check_store_run(config.store, config.run_id, range(self.dataset.groups), run_nonce)
                storage.check_writable(group_dir(config.store, config.run_id, self.group))
            except (storage.StoreError, ValueError) as err:
                problem = [str(err)]
            except Exception as err:  # e.g. no client for the store's scheme: still every rank's error, not a hang
                logger.debug("checking the store failed", exc_info=True)
                problem = [missing_extra(err) or f"{config.store}: {type(err).__name__}: {err}"]
        if self.world > 1:
            dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise storage.StoreError(problem[0])
        return run_nonce

    def _frozen_copy(self) -> FlatPeer:
        peer = self.workload.build_model(self.config.model, self.dataset)
        return FlatPeer(peer.to(self.device).eval().requires_grad_(False), self.dtype)

    # --- peers -------------------------------------------------------------------------------------

    def sync_peers(self) -> None:
        """Adopt newer peer snapshots: rank 0 decides and sends the weights, so every rank uses the same peers."""
        if not self.peer_groups:
            return
        if self.config.codistill.lockstep:
            self.lockstep_peers()
            return
        if self.watcher is not None:
            self.incoming.update(self.watcher.take_updates())
        decision = torch.tensor([self.incoming[g][0] if g in self.incoming else -1 for g in self.peer_groups],
                                device=self.device)  # NCCL collectives take device tensors
        if self.world > 1:
            dist.broadcast(decision, src=0)
        for g, step in zip(self.peer_groups, decision.tolist()):
            if step >= 0:
                self._adopt(g, step, self.incoming.pop(g, (step, None))[1])

    def lockstep_peers(self) -> None:
        """Exactly the peers' snapshots of step s - (s mod exchange_every): rank 0 waits for each (bounded) and
        sends it; every rank knows the step, so no decision needs sending. A snapshot from before the burn-in
        ended is never distilled from (until the first exchange after it, the group trains on its labels)."""
        needed = self.step - self.step % self.config.codistill.exchange_every
        if needed < self.config.codistill.burn_in_steps:
            return
        for g in self.peer_groups:
            if self.peer_steps[g] != needed:
                state = self.watcher.wait_for(g, needed, self.config.codistill.lockstep_timeout) if self.rank == 0 \
                    else None
                self._adopt(g, needed, state)

    def _adopt(self, group: int, step: int, state: dict | None) -> None:
        peer = self.peers[group]
        if self.rank == 0:
            peer.load(state)
        if self.world > 1:  # one flat broadcast from rank 0, straight into every rank's peer weights
            for flat in peer.flats.values():
                dist.broadcast(flat, src=0)
            for tensor in peer.others.values():
                dist.broadcast(tensor, src=0)
        self.peer_steps[group] = step
        self.states.pop(group, None)  # new weights start from a fresh state

    @contextlib.contextmanager
    def gathered_state(self, fp32: bool = True) -> Iterator[dict[str, torch.Tensor] | None]:
        """The full weights on rank 0 while the context lasts (gathered from every rank
        under ZeRO-3, so every rank must enter it), floats in fp32 (`fp32=False`: in the
        training precision, as they are); None on the other ranks."""
        import deepspeed

        module = self.engine.module
        gather = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
                  if self.config.deepspeed.zero_stage == 3 else contextlib.nullcontext())
        with gather:
            # Floats as fp32 (bf16/fp16 training); the rest as they are (BatchNorm's int64 num_batches_tracked).
            yield {k: v.detach().float() if fp32 and v.is_floating_point() else v.detach()
                   for k, v in module.state_dict().items()} if self.rank == 0 else None

    def publish(self) -> None:
        if self.publisher is not None and self.config.codistill.lockstep:
            self.publisher.wait()  # lockstep peers wait for every snapshot: none may be skipped
        # As they are: the publisher casts to the snapshot dtype as it copies (no fp32 copy first in bf16 training).
        with self.gathered_state(fp32=False) as state:
            if self.publisher is not None:  # serialises a copy before returning, inside the gather
                self.publisher.publish_async(self.step, state, vocab_hash=self.dataset.tokenizer_sha256)

    def save_weights(self, path: Path) -> None:
        """The full weights as a safetensors file (every rank takes part: ZeRO-3 gathers them)."""
        with self.gathered_state() as state:
            if state is not None:
                safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    def save_final(self) -> None:
        """The final weights (`model.safetensors`, what ensembles of finished runs load) and, synchronously,
        the last snapshot for the peers."""
        self.save_weights(self.out.weights)
        with self.gathered_state(fp32=False) as state:
            if self.publisher is not None:
                self.publisher.publish(self.step, state, vocab_hash=self.dataset.tokenizer_sha256)

    # --- training ------------------------------------------------------------------------------------

    def batch_to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in batch.items()}

    def train_step(self, batches) -> dict:
        usable = usable_peers(self.peer_steps, self.step, self.config.codistill.max_staleness, self.stale,
                              warn=self.rank == 0)
        for g in set(self.states) - {"student", *usable}:
            del self.states[g]  # a peer left out for a step restarts its state when it is used again
        for _ in range(self.config.deepspeed.grad_accum):
            batch = self.batch_to_device(to_torch(next(batches)))
            parts = forward_backward(self.engine, self.workload, {g: self.peers[g].module for g in usable}, batch,
                                     self.step, self.config.codistill, self.states, self.config.train.label_smoothing,
                                     self.label_prior)
            # One device-to-host copy per micro-step.
            loss, label_loss, distill_loss = torch.stack([parts.total, parts.label_loss, parts.distill_loss]).tolist()
            if not math.isfinite(loss):
                # Stop before this model is checkpointed or published: peers would distill from NaN.
                raise FloatingPointError(
                    f"group {self.group} rank {self.rank}: non-finite loss {loss} at step {self.step} "
                    f"(label loss {label_loss}, distill loss {distill_loss}); stopping. "
                    "Check the data (codistill verify), the learning rate and the loss scale.")
        return {"loss": loss, "label_loss": label_loss, "distill_loss": distill_loss,
                "peers": {str(g): self.step - self.peer_steps[g] for g in usable}}

    def fit(self) -> None:
        config = self.config
        skip = self.load_checkpoint() if self.resume else 0
        if self.rank == 0:  # what this attempt trains in, beside its metrics
            self.write_metrics("setup", {"step": self.step, "group": self.group,
                                         "precision": config.deepspeed.precision, "why": self.precision_reason})
        # The data position on resume (the stream is deterministic): whole rounds of the loader workers are
        # passed over inside the stream (read, never decoded), the rest of a round is taken from the loader.
        rounds = skip - skip % max(1, config.loader.workers)
        spec = StreamSpec(config.data.output, self.dataset, self.train_shards(),
                          config.deepspeed.micro_batch_size, self.rank, self.world,
                          shuffle_buffer=config.loader.shuffle_buffer, repeat=True,
                          seed=config.train.seed * 1000 + self.group, skip=rounds)
        if config.train.label_smoothing and self.workload.binary:
            self.label_prior = self.base_rate(dataclasses.replace(spec, skip=0))
        batches = iter(loader(self.workload.batches(spec, config, True), config.loader.workers))
        for _ in range(skip - rounds):
            next(batches)
        total = config.schedule.steps
        self.started = (time.perf_counter(), self.step)  # for the time left
        while self.step < total:
            start = time.perf_counter()
            self.sync_peers()
            record = self.train_step(batches)
            self.step += 1
            # The last step is published once, synchronously, after the loop.
            if config.codistill.enabled and self.step % config.codistill.exchange_every == 0 and self.step < total:
                self.publish()
            self.step_seconds.append(time.perf_counter() - start)
            self.log_train(record)
            if self.step % config.eval.every == 0 or self.step in config.eval.steps or self.step == total:
                self.keep_best(self.evaluate(final=self.step == total))
            if self.step % config.train.checkpoint_every == 0 or self.step == total:
                self.save_checkpoint()
        self.save_final()
        failure = self.summarize()
        self.close()
        if failure:
            raise RunFailed(failure)

    def summarize(self) -> str | None:
        """Rank 0 writes the group's summary record (its peer coverage, from every train record of the run,
        resumes included) and returns why the run failed: codistillation that reached its peers on less than
        `codistill.min_peer_coverage` of the steps after burn-in did not codistill, whatever the loss says."""
        if self.rank != 0:
            return None
        if self.metrics_file is not None:
            self.metrics_file.flush()
        records = metric_records(self.out.metrics) if self.out.metrics.exists() else []
        coverage = peer_coverage(records, len(self.peer_groups))
        least = self.config.codistill.min_peer_coverage
        self.write_metrics("summary", {"step": self.step, "group": self.group, "peer_coverage": coverage,
                                       "min_peer_coverage": least})
        if coverage is None:
            return None
        print(f"group {self.group}: distilled from its peers on {100 * coverage:.0f}% of the steps after burn-in",
              flush=True)
        if coverage < least:
            return (f"distilled from its peers on only {100 * coverage:.0f}% of the steps after "
                    f"burn-in (codistill.min_peer_coverage {least:g}): this run did not codistill. See the warnings "
                    f"about the snapshot store ({self.config.store}) and peer staleness above.")
        return None

    def base_rate(self, spec: StreamSpec, batches: int = 64) -> float:
        """The mean binary target of the first `batches` training batches of every rank (label smoothing's prior)."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in itertools.islice(iter(self.workload.batches(spec, self.config, True)), batches):
            targets, _ = self.workload.targets(to_torch(batch))
            total += torch.tensor([float(targets.float().sum()), targets.numel()], dtype=torch.float64,
                                  device=self.device)
        if self.world > 1:
            dist.all_reduce(total)
        if self.rank == 0:
            print(f"label smoothing {self.config.train.label_smoothing} toward the training base rate "
                  f"{float(total[0] / total[1]):.4f}", flush=True)
        return float(total[0] / total[1])

    def train_shards(self) -> tuple:
        reads = self.config.train.reads
        if reads == "union":
            return tuple(shard for g in range(self.dataset.groups) for shard in self.dataset.shards_of("train", g))
        return tuple(self.dataset.shards_of("train", self.group if reads == "own" else self.config.trained_groups[0]))

    def log_train(self, record: dict) -> None:
        """Every step to metrics.jsonl (peers used and their staleness included); every log_every to the console."""
        if self.rank != 0:
            return
        record |= {"step": self.step, "group": self.group, "lr": self.engine.get_lr()[0],
                   "weight": self.distill_weight(), "ms": 1000 * self.step_seconds[-1]}
        self.write_metrics("train", record)
        self.write_tensorboard("Train", {k: record[k] for k in ("loss", "label_loss", "distill_loss", "weight", "lr",
                                                                "ms")}
                               | {f"staleness/group-{g}": age for g, age in record["peers"].items()})
        if self.step % self.config.train.log_every == 0:
            recent = 1000 * float(np.mean(self.step_seconds[-self.config.train.log_every:]))
            peers = ", ".join(f"g{g}:{age}" for g, age in record["peers"].items()) or "none"
            # Wall time per step so far (evaluations and checkpoints included) times the steps to go.
            started, first_step = self.started
            left = (time.perf_counter() - started) / (self.step - first_step) * (self.config.schedule.steps - self.step)
            print(f"step {self.step}/{self.config.schedule.steps} loss {record['loss']:.4f} "
                  f"(label {record['label_loss']:.4f} distill {record['distill_loss']:.4f} x{record['weight']:.2f}) "
                  f"peers[staleness] {peers}  {recent:.1f} ms/step, {duration(left)} left", flush=True)

    def distill_weight(self) -> float:
        # The step just logged computed its loss before the counter moved on: w(step - 1).
        return distill_weight(self.step - 1, self.config.codistill) if self.peer_groups else 0.0

    def write_tensorboard(self, section: str, scalars: dict[str, float]) -> None:
        if self.engine.monitor.enabled:  # train.tensorboard
            self.engine.monitor.write_events([(f"{section}/{k}", v, self.step) for k, v in scalars.items()])

    def write_metrics(self, kind: str, record: dict) -> None:
        if self.metrics_file is None:
            self.metrics_file = open(self.out.metrics, "a", buffering=1)  # line-buffered: readable live
        self.metrics_file.write(json.dumps({"kind": kind, **record}) + "\n")

    # --- evaluation --------------------------------------------------------------------------------

    def evaluate(self, final: bool) -> dict | None:
        config = self.config
        spec = StreamSpec(config.data.output, self.dataset, tuple(self.dataset.shards_of("eval")),
                          config.eval.batch_size, self.rank, self.world)
        batches = iter(self.workload.batches(spec, config, False))  # streamed: decoded batch by batch
        if config.eval.max_rows is not None:
            batches = itertools.islice(batches, max(1, config.eval.max_rows // (config.eval.batch_size * self.world)))
        padding = 0
        if self.world > 1 and config.deepspeed.zero_stage == 3:
            # Every forward is a collective: all ranks run as many as the rank with the most batches.
            batches = list(batches)
            count = torch.tensor(len(batches), device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            padding = int(count) - len(batches)
            if padding and self.placeholder is None:
                self.placeholder = eval_placeholder(self.workload, spec, config)
        self.engine.eval()
        result = evaluation.evaluate(self.workload, self.eval_forward,
                                     itertools.chain(batches, [self.placeholder] * padding), self.dataset,
                                     placeholder=self.placeholder, gather=self.gather_rows)
        self.engine.train()
        if result is None:
            return None
        rows, metrics = result
        metrics = {"step": self.step, "group": self.group, **metrics}
        self.write_metrics("eval", metrics)
        self.write_tensorboard("Eval", {k: v for k, v in metrics.items()
                                        if k not in ("step", "group") and isinstance(v, (int, float))}
                               | {f"{half}_loss": metrics[half]["loss"] for half in ("validation", "test")})
        print(f"eval step {self.step}: {self.workload.describe(metrics)}; validation loss "
              f"{metrics['validation']['loss']:.4f}, test {metrics['test']['loss']:.4f}", flush=True)
        save_eval_rows(self.out, self.workload, self.step, rows)  # reports select and measure from these
        if final:
            save_predictions(self.out, self.workload, rows)
        return metrics

    def keep_best(self, metrics: dict | None) -> None:
        """`best.safetensors`: the weights of the eval step best on validation so far (rank 0 decides)."""
        better = torch.tensor(int(metrics is not None and metrics["validation"]["loss"] < self.best_validation),
                              device=self.device)
        if self.world > 1:
            dist.broadcast(better, src=0)
        if better:
            if metrics is not None:
                self.best_validation = metrics["validation"]["loss"]
            self.save_weights(self.out.best_weights)

    def eval_forward(self, batch: dict[str, torch.Tensor], state):
        return self.workload.forward(self.engine, self.batch_to_device(batch), state)

    def gather_rows(self, parts: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]] | None:
        """Every rank's eval rows on rank 0 (None on the others)."""
        gathered = [parts]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, parts)  # our own ranks' arrays, inside one job
        return [p for rank_parts in gathered for p in rank_parts] if self.rank == 0 else None

    # --- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        directory = self.out.checkpoints
        tag = f"step-{self.step:08d}"
        peers = {str(g): s for g, s in self.peer_steps.items()}
        # The precision (`auto` resolved): a resume elsewhere must train on in it (`checkpoint_precision`).
        client = {"step": self.step, "peer_steps": peers, "precision": self.config.deepspeed.precision}
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client)
        dist.barrier()
        if self.rank == 0:  # keep the newest two, and the newest one every group has: where a resume starts
            shared = self.shared_checkpoint_steps()
            for old in stale_checkpoints(directory, max(shared) if shared else None):
                shutil.rmtree(old, ignore_errors=True)

    def shared_checkpoint_steps(self) -> set[int] | None:
        """The checkpoint steps every codistilling group of this run directory has (a group's directory without
        checkpoints has step 0: it would start afresh); None when the groups do not codistill or a group's
        directory is not here (run directories on different machines)."""
        if not self.peer_groups:
            return None
        run_dir = RunDir(self.config.run_dir)
        shared = None
        for g in self.config.trained_groups:
            if not run_dir.group(g).path.is_dir():
                return None
            steps = {0} | {int(p.name.split("-")[1]) for p in checkpoint_dirs(run_dir.group(g).checkpoints)}
            shared = steps if shared is None else shared & steps
        return shared

    def load_checkpoint(self) -> int:
        """Restore model, optimizer, scheduler, step and peers; returns how many batches to skip.

        Loads the checkpoint `latest` names, or the newest earlier one when that is
        empty, missing or unloadable (every rank sees the same files, so every rank
        makes the same choice). Never unpickles code: see `load_weights_only`.
        """
        directory = self.out.checkpoints
        tags = self.resumable_tags(checkpoint_tags(directory))
        if not tags:
            if self.rank == 0:
                print(f"--resume: no checkpoint to resume from in {directory}, starting from step 0", flush=True)
                truncate_metrics(self.out.metrics, 0)
            return 0
        for tag in tags:
            problem = checkpoint_problem(directory / tag)
            if problem is None:
                break
            if self.rank == 0:
                logger.warning("checkpoint %s cannot be loaded (%s); trying an earlier one", directory / tag, problem)
        else:
            raise ValueError(f"--resume: none of the checkpoints in {directory} can be loaded ({', '.join(tags)}); "
                             "see the warnings above, or start afresh with --overwrite")
        self.engine.checkpoint_engine.load = load_weights_only
        path, client = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise ValueError(f"--resume: DeepSpeed found no checkpoint files in {directory / tag}")
        self.step = int(client["step"])
        for g, step in client.get("peer_steps", {}).items():
            if step is not None and int(g) in self.peers:
                state = self.watcher.fetch(int(g), step) if self.watcher is not None else None
                if self.world > 1:
                    found = torch.tensor(int(state is not None), device=self.device)
                    dist.broadcast(found, src=0)
                    if not found:
                        continue
                elif state is None:
                    continue
                self._adopt(int(g), step, state)
        if self.rank == 0:
            truncate_metrics(self.out.metrics, self.step)
            print(f"resumed at step {self.step} (peers {self.peer_steps})", flush=True)
        return self.step * self.config.deepspeed.grad_accum

    def resumable_tags(self, tags: list[str]) -> list[str]:
        """The checkpoints to resume from: with peers, none past the newest step every group has, so the groups
        restart together. Each resuming from its own newest would leave them up to a checkpoint interval apart
        for the rest of the run, and a group ahead by more than max_staleness would never distill again."""
        shared = self.shared_checkpoint_steps()
        if shared is None:
            if self.peer_groups and self.rank == 0:
                logger.warning("--resume: the other groups' checkpoints are not in %s, so this group resumes from "
                               "its own newest; groups that resume up to train.checkpoint_every (%d) steps apart "
                               "may leave each other out (codistill.max_staleness %s)", self.config.run_dir,
                               self.config.train.checkpoint_every, self.config.codistill.max_staleness)
            return tags
        newest = max(shared)
        kept = [tag for tag in tags if int(tag.split("-")[1]) <= newest]
        if tags and kept[:1] != tags[:1] and self.rank == 0:
            print(f"--resume: from step {newest}, the newest checkpoint every group has ({tags[0]} is this group's "
                  "newest)", flush=True)
        return kept

    def close(self) -> None:
        """Close files and threads and leave the process group; `exit_finished_rank` then ends the process."""
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.watcher is not None:
            self.watcher.close()
        if self.publisher is not None:
            self.publisher.wait()
        dist.barrier()
        dist.destroy_process_group()


_CHECKPOINT_TAG = re.compile(r"^step-\d{8,}$")


def eval_placeholder(workload: Workload, spec: StreamSpec, config: ExperimentConfig) -> dict[str, np.ndarray]:
    """The first row of the eval split, as the batch of a forward that a rank out of eval rows runs in step with
    the others (ZeRO-3). An eval batch takes the others' path through the model; a training batch may not (the
    stateful LM's `history` would add a warm-up forward, and the collectives would fall out of step)."""
    first_row = StreamSpec(spec.root, spec.manifest, spec.shards, batch_size=1)
    return next(iter(workload.batches(first_row, config, False)))


def checkpoint_tags(directory: Path) -> list[str]:
    """Checkpoint tags to try, best first: the one `latest` names (if it names one), then the others, newest first."""
    found = [p.name for p in reversed(checkpoint_dirs(directory))]
    try:
        named = (directory / "latest").read_text()[:64].strip()
    except OSError:
        named = ""
    if named not in found:
        if found and dist.get_rank() == 0:
            logger.warning("%s names no checkpoint (%r): using the newest one there", directory / "latest", named)
        return found
    return [named] + [tag for tag in found if tag != named]


def truncate_metrics(path: Path, step: int) -> None:
    """Cut a metrics.jsonl back to the records of steps up to `step`, the checkpoint a resume starts from: the
    steps after it are trained (and logged) again, and a step logged twice would count twice in every curve and
    report. Summaries (written again at the end) and lines torn by a kill go too; the rest stays as written."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and record.get("kind") not in (None, "summary") \
                and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
        else:
            dropped += line.strip() != ""
    if dropped:
        storage.write_atomically(str(path), "".join(kept))
        print(f"--resume: {path}: {dropped} record(s) after step {step} dropped (they are trained again)",
              flush=True)


def stale_checkpoints(directory: Path, shared_step: int | None) -> list[Path]:
    """The checkpoint directories a group may delete: all but its newest two and the one of `shared_step`."""
    keep = f"step-{shared_step:08d}" if shared_step is not None else None
    return [p for p in checkpoint_dirs(directory)[:-2] if p.name != keep]


def checkpoint_dirs(directory: Path) -> list[Path]:
    """The checkpoint directories in `directory`, oldest first."""
    return sorted(p for p in directory.glob("step-*") if p.is_dir() and _CHECKPOINT_TAG.match(p.name))


def checkpoint_safe_globals() -> list[type]:
    """What DeepSpeed pickles into a checkpoint besides tensors and plain containers (ZeRO optimizer state).

    Plain data classes and enums: building them runs no code of the file's choosing.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, map_location=None):
    """DeepSpeed's checkpoint read with `weights_only=True`: a planted pickle cannot run code (DeepSpeed's own
    loader passes weights_only=False)."""
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def checkpoint_precision(directory: Path) -> str | None:
    """The precision a group's checkpoints were trained in (the client state of the newest that records it; a
    resume keeps it, so all of a group's checkpoints share it); None if none records it."""
    for tag in checkpoint_tags(directory):
        for path in sorted((directory / tag).glob("*model_states.pt"))[:1]:
            try:
                with torch.serialization.safe_globals(checkpoint_safe_globals()):
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no tensor read
            except Exception:  # unloadable: load_checkpoint says why, and falls back to an earlier one
                continue
            if state.get("precision") in ("fp32", "bf16", "fp16"):
                return state["precision"]
    return None


def checkpoint_problem(tag_dir: Path) -> str | None:
    """Why the checkpoint in `tag_dir` cannot be loaded (None if it can): missing files, not a torch zip
    archive (e.g. truncated), or a pickle that names anything but tensors and `checkpoint_safe_globals`.

    Reads only each file's zip directory and pickle, not the tensor data.
    """
    files = sorted(tag_dir.glob("*.pt"))
    if not any("model_states" in f.name for f in files):
        return "no model states file"
    allowed = {f"{cls.__module__}.{cls.__qualname__}" for cls in checkpoint_safe_globals()}
    for f in files:
        try:
            refused = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f))) - allowed)
        except Exception as err:
            return f"{f.name}: not a readable torch checkpoint ({type(err).__name__}: {err})"
        if refused:
            return f"{f.name}: its pickle refers to {', '.join(refused[:3])}, which only code could build"
    return None


def exit_finished_rank() -> None:
    """End a rank that finished its work, with exit code 0, without interpreter finalisation.

    gloo's worker threads outlive `destroy_process_group()` in this torch build. One
    that frees a finished collective's Python-held tensors while the interpreter is
    finalising needs the GIL, gets killed by pthread_exit, and the unwind through a
    noexcept destructor aborts the process ("terminate called without an active
    exception", exit code 134 or 250 after the launcher) although all work was done.
    So flush what Python buffers (logging, stdio; files of ours are closed by then)
    and leave with `os._exit`, which runs no finalisers and no thread teardown.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train one codistillation group (launch with deepspeed/torchrun).")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--group", type=int, required=True)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-dir", help="Overrides train.run_dir.")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--run-nonce", help="This run's nonce, as `codistill train` agrees on it (default: agreed "
                                            "here the same way, through <store>/<run>/run.json).")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sets = args.sets + ([f"train.run_dir={args.run_dir}"] if args.run_dir else [])
    config = load_experiment(args.manifest, sets)
    storage.configure(config.storage)
    try:
        GroupTrainer(config, args.group, run_nonce=args.run_nonce, resume=args.resume).fit()
    except (RunFailed, storage.StoreError) as err:  # the user's to fix: one line, not a traceback per rank
        if int(os.environ.get("RANK", "0")) == 0:  # every rank meets a store error: rank 0 says it
            print(f"error: group {args.group}: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    exit_finished_rank()  # only after a complete run: an exception exits through the interpreter as usual


if __name__ == "__main__":
    main()
