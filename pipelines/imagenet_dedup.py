"""Exact duplicate images over the whole ImageNet data set, decided by content before any copy is kept.

Real ILSVRC-2012 holds byte-identical images within train and between train
and val. Each image task reports, for every image it wrote, the sha256 of the
stored bytes (for the images kept byte for byte, the file's), a keyed
priority and its label; these facts (numpy blocks, never one element per
image) are bucketed by hash and shuffled, so all copies of one picture meet
in one bucket wherever they were read. There:

* copies under different labels are all quarantined (`conflicting_labels`):
  no label can be trusted;
* otherwise one copy is kept: a copy in the input's val/ split when there is
  one (so an eval image never enters train; the train copies are
  `duplicate_of_eval`), else the copy with the lowest keyed priority (a hash
  of its key and the seed, never the order of processing); the others are
  `duplicate`.

The kept copy goes where its own key's hash sends it, so which group or shard
holds it is decided as for any image. The image tasks' pieces that lost rows
are rewritten without them before the sink concatenates pieces into shards.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import apache_beam as beam
import numpy as np

from pipelines.formats import Block
from pipelines.sharding import mix64, partition
from pipelines.sinks import Rejected

DUPLICATE_REASONS = ("duplicate", "duplicate_of_eval", "conflicting_labels")
_SALT_COPY = np.uint64(0xD1B54A32D192ED03)


def copy_priority(key_hashes: np.ndarray) -> np.ndarray:
    """Which copy of a duplicate is kept (lowest wins): independent bits of the key's keyed hash."""
    return mix64(np.asarray(key_hashes, np.uint64) ^ _SALT_COPY)


def digest_words(digests: np.ndarray) -> np.ndarray:
    """uint64[n, 2]: the first 128 bits of each sha256 digest (`S32` array); collisions are out of reach."""
    return np.frombuffer(np.ascontiguousarray(digests, "S32").tobytes(), np.uint64).reshape(-1, 4)[:, :2]


def duplicate_losers(facts: Block) -> Iterator[tuple[int, str, str]]:
    """(row, reason, detail) of every row to drop. `facts` (columns digest, prio, val, label, synset, key)
    holds every copy of each digest in it."""
    words = digest_words(facts["digest"])
    order = np.lexsort((facts["prio"], ~facts["val"], words[:, 1], words[:, 0]))
    ordered = words[order]
    starts = np.flatnonzero(np.concatenate([[True], (ordered[1:] != ordered[:-1]).any(axis=1)]))
    sizes = np.diff(np.append(starts, len(order)))
    keys, synsets, val = facts["key"], facts["synset"], facts["val"]
    for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
        copies = order[start:start + size]
        labels = facts["label"][copies]
        if (labels != labels[0]).any():
            where = ", ".join(f"{keys[c].decode()} ({synsets[c].decode()})" for c in copies[:4])
            for row in copies.tolist():
                yield row, "conflicting_labels", f"the same bytes under {len(set(labels.tolist()))} labels: " \
                                                 f"{where}{', ...' if size > 4 else ''}"
            continue
        kept = copies[0]
        for row in copies[1:].tolist():
            reason = "duplicate_of_eval" if val[kept] and not val[row] else "duplicate"
            yield row, reason, f"the same bytes as {keys[kept].decode()}, which is kept"


_DECIDED_BY = ("key", "digest", "prio", "val", "label", "synset")  # the facts the shuffle carries


def _bucketed(task: tuple, facts: Block, buckets: int):
    """(bucket, facts with the task and row of each) for each bucket present: all copies of one digest meet."""
    rows = {**{name: facts[name] for name in _DECIDED_BY}, "task_dest": np.full(len(facts["key"]), task[0], np.int64),
            "task_index": np.full(len(facts["key"]), task[1], np.int64),
            "row": np.arange(len(facts["key"]), dtype=np.int64)}
    for bucket, picked in partition((digest_words(facts["digest"])[:, 0] % np.uint64(buckets)).astype(np.int64)):
        yield bucket, {name: column[picked] for name, column in rows.items()}


def _resolve(blocks) -> Iterator:
    """A bucket's facts -> (task, rows to drop) per task; quarantine records and counts aside."""
    blocks = list(blocks)
    facts = {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}
    drops, counts = collections.defaultdict(list), collections.Counter()
    for row, reason, detail in duplicate_losers(facts):
        drops[(int(facts["task_dest"][row]), int(facts["task_index"][row]))].append(int(facts["row"][row]))
        counts[reason] += 1
        yield beam.pvalue.TaggedOutput("rejected", [Rejected(facts["key"][row].decode(), 0, reason, detail, "")])
    if counts:
        yield beam.pvalue.TaggedOutput("stats", {"duplicates": dict(counts)})
    yield from drops.items()


class FindDuplicates(beam.PTransform):
    """(task, facts of the rows it wrote) -> `drops` (task, [row]) for each task that loses rows, `rejected`
    lists of one `Rejected` each, `stats` ({"duplicates": {reason: count}})."""

    def __init__(self, buckets: int):
        super().__init__()
        self.buckets = buckets

    def expand(self, facts):
        return (facts
                | "ByDigest" >> beam.FlatMapTuple(lambda task, block: _bucketed(task, block, self.buckets))
                | "GroupByDigest" >> beam.GroupByKey()
                | "Resolve" >> beam.FlatMapTuple(lambda _, blocks: _resolve(blocks)).with_outputs(
                    "rejected", "stats", main="drops"))
