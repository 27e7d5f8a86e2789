"""Streaming one split of a dataset into batches: split over ranks and loader workers, shuffled, by seed.

Work is divided among the `ranks x workers` consumers by whole shards when
they divide evenly (no byte is read twice), otherwise record by record (every
consumer reads every shard but decodes only its own records), so any shard
count works with any number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from codistill.dataset import DatasetManifest, ShardEntry, join
from codistill.shards import Block
from pipelines.formats import concat_blocks, read_shard, rebatch


@dataclass(frozen=True)
class StreamSpec:
    root: str
    manifest: DatasetManifest
    shards: tuple[ShardEntry, ...]
    batch_size: int
    rank: int = 0
    world: int = 1
    shuffle_buffer: int = 0  # rows; 0 = keep order (evaluation)
    repeat: bool = False  # cycle through epochs forever (training)
    seed: int = 0
    # Batches of the whole stream (all loader workers together; a multiple of their number) to pass over
    # unyielded: the data position on resume. Read but never decoded, which matters when decoding is the cost.
    skip: int = 0


class ShardStream(IterableDataset):
    """Yields batches as dicts of numpy arrays (`key` included), each exactly `batch_size` rows but the last."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[Block]:
        return (batch for _, batch in self.epochs())

    def epochs(self) -> Iterator[tuple[int, Block]]:
        """(epoch, batch) pairs: what per-epoch randomness (augmentation) is keyed by."""
        spec = self.spec
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        consumers, consumer = spec.world * workers, spec.rank * workers + worker
        skip = (spec.skip - worker + workers - 1) // workers  # the DataLoader takes batches from workers in turn
        epoch = 0
        while True:
            order = list(spec.shards)
            if spec.shuffle_buffer:
                np.random.default_rng([spec.seed, epoch]).shuffle(order)
            rows = self._rows(order, consumers, consumer)
            if spec.shuffle_buffer:
                rows = _shuffled(rows, spec.shuffle_buffer, np.random.default_rng([spec.seed, epoch, consumer]))
            batches = 0
            for batch in _batches(rows, spec.batch_size, drop_last=spec.repeat):
                batches += 1
                if skip > 0:
                    skip -= 1
                    continue
                yield epoch, batch
            epoch += 1
            if not spec.repeat:
                return
            if not batches:  # repeating an empty stream would spin forever
                raise ValueError(f"rank {spec.rank} worker {worker}: the shards hold less than one batch "
                                 f"({spec.batch_size} rows) for this consumer")

    def _rows(self, shards: list[ShardEntry], consumers: int, consumer: int) -> Iterator[Block]:
        spec = self.spec
        by_shard = len(shards) % consumers == 0
        mine = shards[consumer::consumers] if by_shard else shards
        record = 0
        for shard in mine:
            for block in read_shard(join(spec.root, shard.path), spec.manifest.features, spec.manifest.format,
                                    expect_sha256=shard.sha256, expect_bytes=shard.bytes):
                if by_shard or record % consumers == consumer:
                    yield block
                record += 1


def _shuffled(blocks: Iterator[Block], buffer_rows: int, rng: np.random.Generator) -> Iterator[Block]:
    """Shuffle rows through a pool: whenever it holds 2x the buffer, emit a random half of it."""
    pool: list[Block] = []
    held = 0
    for block in blocks:
        pool.append(block)
        held += len(block["key"])
        if held >= 2 * buffer_rows:
            rows = concat_blocks(pool)
            perm = rng.permutation(held)
            yield {k: v[perm[:held - buffer_rows]] for k, v in rows.items()}
            pool, held = [{k: v[perm[held - buffer_rows:]] for k, v in rows.items()}], buffer_rows
    if held:
        rows = concat_blocks(pool)
        perm = rng.permutation(held)
        yield {k: v[perm] for k, v in rows.items()}


def _batches(blocks: Iterator[Block], batch_size: int, drop_last: bool) -> Iterator[Block]:
    for batch in rebatch(blocks, batch_size):
        if len(batch["key"]) == batch_size or not drop_last:
            yield batch


def to_torch(batch: Block) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.items() if v.dtype.kind != "S"}


def loader(stream: StreamSpec | IterableDataset, workers: int = 0) -> DataLoader:
    """Batches of a shard stream (or of a workload's decoding stream built on one) from `workers` processes."""
    if isinstance(stream, StreamSpec):
        stream = ShardStream(stream)
    # batch_size=None: the stream already yields whole batches.
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                      collate_fn=_as_is)


def _as_is(batch: Block) -> Block:
    return batch
