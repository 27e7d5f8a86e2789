"""Keyed-hash assignment of records to the eval split, a train group and a shard.

Every record has a stable key. A 64-bit hash of it, keyed by the manifest's
seed, decides (with independent bits) eval vs train, then the train group,
then the shard. Everything is vectorised over numpy uint64 arrays, so a block
of a million rows is assigned in milliseconds, and the answer depends only on
the key and the seed: the same on every runner, worker count and block size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

# Salts give independent hash streams for the three decisions.
_SALT_SPLIT, _SALT_GROUP, _SALT_SHARD = (np.uint64(s) for s in (0x5851F42D4C957F2D, 0x14057B7EF767814F,
                                                                  0x9E3779B97F4A7C15))


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche mix of uint64 values."""
    x = np.array(x, dtype=np.uint64)  # a copy, then updated in place: no temporaries the size of x but one
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def string_hash(text: str | bytes, seed: int) -> int:
    """64-bit keyed hash of a string key (BLAKE2b keyed by the seed)."""
    data = text.encode() if isinstance(text, str) else text
    digest = hashlib.blake2b(data, digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little")


def line_key_hashes(source: str, lines: np.ndarray, seed: int) -> np.ndarray:
    """Hashes of the keys `source:line` for many lines of one file at once.

    The file name is hashed once with the keyed string hash; each line then adds
    its number and goes through the avalanche mix, which is as good a keyed hash
    of (source, line) and runs at numpy speed.
    """
    with np.errstate(over="ignore"):
        return mix64(np.uint64(string_hash(source, seed)) + np.asarray(lines, dtype=np.uint64))


@dataclass(frozen=True)
class ShardLayout:
    """Where each split/group/shard lives: `<out>/<split>/<group>/<dataset>-<s>-of-<n>.<ext>`.

    Destinations are numbered: eval shards first (0..eval_shards-1), then the
    shards of train group 0, group 1, ...
    """

    dataset: str
    extension: str
    groups: int
    shards_per_group: int
    eval_shards: int
    eval_fraction: float

    @property
    def destinations(self) -> int:
        return self.eval_shards + self.groups * self.shards_per_group

    def assign(self, key_hashes: np.ndarray) -> np.ndarray:
        """Destination index of each key hash: eval for a keyed-hash `eval_fraction`, else a train group."""
        h = np.asarray(key_hashes, dtype=np.uint64)
        unit = (mix64(h ^ _SALT_SPLIT) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        shard_bits = mix64(h ^ _SALT_SHARD)  # picks the shard in eval and in a group alike: mixed once
        return np.where(unit < self.eval_fraction, self._eval_shard(shard_bits), self._train_shard(h, shard_bits))

    def train_destination(self, key_hashes: np.ndarray) -> np.ndarray:
        """A train shard for every key (when the eval split comes from elsewhere, e.g. a separate folder)."""
        h = np.asarray(key_hashes, dtype=np.uint64)
        return self._train_shard(h, mix64(h ^ _SALT_SHARD))

    def eval_destination(self, key_hashes: np.ndarray) -> np.ndarray:
        h = np.asarray(key_hashes, dtype=np.uint64)
        return self._eval_shard(mix64(h ^ _SALT_SHARD))

    def _train_shard(self, h: np.ndarray, shard_bits: np.ndarray) -> np.ndarray:
        group = (mix64(h ^ _SALT_GROUP) % np.uint64(self.groups)).astype(np.int64)
        shard = (shard_bits % np.uint64(self.shards_per_group)).astype(np.int64)
        return self.eval_shards + group * self.shards_per_group + shard

    def _eval_shard(self, shard_bits: np.ndarray) -> np.ndarray:
        return (shard_bits % np.uint64(self.eval_shards)).astype(np.int64)

    def describe(self, dest: int) -> tuple[str, int | None, int]:
        """(split, group or None for eval, shard index) of a destination."""
        if dest < self.eval_shards:
            return "eval", None, dest
        group, shard = divmod(dest - self.eval_shards, self.shards_per_group)
        return "train", group, shard

    def relative_path(self, dest: int) -> str:
        split, group, shard = self.describe(dest)
        count = self.eval_shards if group is None else self.shards_per_group
        name = f"{self.dataset}-{shard:05d}-of-{count:05d}.{self.extension}"
        return f"eval/{name}" if group is None else f"train/{group}/{name}"


def partition(dest: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(destination, row indices in input order) for every destination present."""
    order = np.argsort(dest, kind="stable")
    values, starts = np.unique(dest[order], return_index=True)
    return [(int(d), rows) for d, rows in zip(values, np.split(order, starts[1:]))]
