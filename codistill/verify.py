"""`codistill verify DIR`: prove a dataset is what its manifest says, and that its splits are what the seed says.

Beyond bytes and counts against the manifest (which whoever wrote the shards
could also have written), verify recomputes what does not depend on trusting
it: every key's destination from the manifest's seed (so a swapped eval and
train shard, two swapped shards or a foreign key are found), the whole shard
layout (so a dropped shard or group is found even with counts lowered to
match), the quarantined records behind every rejected count, and the values
each dataset declares checks for (labels, finite features, ids in range, and
columns that may hold no value twice: no ImageNet picture is stored twice).
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from codistill import storage
from codistill.config import MAX_GROUPS, MAX_SHARDS
from codistill.dataset import DatasetError, DatasetManifest, join, load_manifest
from codistill.datasets import DATASETS
from codistill.shards import ShardFormatError, open_regular_file
from codistill.units import duration, size, time_left
from pipelines.formats import EXTENSIONS, MAX_RECORD_BYTES, dali_index, dali_index_path, iter_blocks, read_shard
from pipelines.sharding import ShardLayout

READ_CHUNK_BYTES = 1 << 20


@dataclass
class VerifyReport:
    manifest: DatasetManifest
    rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _digests(values: np.ndarray) -> np.ndarray:
    """128-bit digests of byte values (keys, images), as rows of two uint64 (collisions are out of reach)."""
    joined = b"".join(hashlib.blake2b(k, digest_size=16).digest() for k in values.tolist())
    return np.frombuffer(joined, np.uint64).reshape(-1, 2)


class _HashingReader:
    """Hashes the bytes a parser reads, so a shard is read once, in bounded memory, however big it is."""

    def __init__(self, raw):
        self.raw, self.sha256, self.bytes = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(READ_CHUNK_BYTES):
            pass


@dataclass
class _Findings:
    """Rows of one shard that break a rule: how many, and the first one's key."""

    count: collections.Counter = field(default_factory=collections.Counter)
    example: dict = field(default_factory=dict)

    def add(self, rule: str, bad: np.ndarray, keys: np.ndarray) -> None:
        if bad.any():
            self.count[rule] += int(bad.sum())
            self.example.setdefault(rule, keys[np.flatnonzero(bad)[0]].decode("utf-8", "backslashreplace")[:100])

    def problems(self, path: str) -> list[str]:
        return [f"{path}: {n} row(s) {rule} (first: key {self.example[rule]!r})" for rule, n in self.count.items()]


class _Progress:
    """`verify: ...` lines to `write`: shards, rows and bytes read of the manifest's totals, with the rate and
    the time left, at most one every `every` seconds, and a last one when every shard has been read."""

    def __init__(self, manifest: DatasetManifest, write: Callable[[str], None] | None, every: float):
        self.write, self.every = write, every
        self.shards = len(manifest.shards)
        self.rows, self.bytes = sum(s.records for s in manifest.shards), sum(s.bytes for s in manifest.shards)
        self.start = time.monotonic()
        self.next_line = self.start + every

    def update(self, shards: int, rows: int, read: int) -> None:
        now = time.monotonic()
        if self.write is not None and now >= self.next_line:
            self.next_line = now + self.every
            fraction = min(1.0, read / self.bytes) if self.bytes else 0.0
            self.write(f"{self._counts(shards, rows, read, now)}, {time_left(fraction, now - self.start)}")

    def done(self, rows: int, read: int) -> None:
        if self.write is not None:
            now = time.monotonic()
            self.write(f"{self._counts(self.shards, rows, read, now)}, in {duration(now - self.start)}")

    def _counts(self, shards: int, rows: int, read: int, now: float) -> str:
        rate = rows / max(now - self.start, 1e-9)
        return (f"verify: {shards}/{self.shards} shards, {rows} of {self.rows} rows, {size(read)} of "
                f"{size(self.bytes)} read, {rate:,.0f} rows/s")


def verify_dataset(root: str, progress: Callable[[str], None] | None = None, every: float = 5.0) -> VerifyReport:
    """Check the dataset at `root`; with `progress`, a line goes to it every `every` seconds while the shards
    are read, and once when they all have been."""
    manifest = load_manifest(root)
    report = VerifyReport(manifest)
    shown = _Progress(manifest, progress, every)
    read = 0  # bytes of the shards before this one
    layout, problems = _layout(manifest)
    report.problems += problems
    checks, problems = _dataset_checks(manifest)
    report.problems += problems
    destination = {layout.relative_path(d): d for d in range(layout.destinations)} if layout else {}
    # column -> (digests, shard index of each row): keys, and the columns the dataset declares distinct
    seen = {column: ([], []) for column in ("key", *(checks.distinct if checks else ()))}
    indexes = manifest.extra.get("indexes", {})
    dali = {s.path: dali_index_path(s.path) for s in manifest.shards} if "dali" in indexes else {}
    for index, shard in enumerate(manifest.shards):
        url = join(root, shard.path)
        findings = _Findings()
        rows, offsets = 0, []
        try:
            with open_regular_file(url) as raw:
                stream = _HashingReader(raw)
                try:  # parse even a shard with the wrong hash: say what else is wrong with it
                    for block in iter_blocks(stream, manifest.features, manifest.format, tfrecord_offsets=offsets):
                        keys = block["key"]
                        rows += len(keys)
                        for column, (digests, owners) in seen.items():
                            digests.append(_digests(block[column]))
                            owners.append(np.full(len(keys), index))
                        _check_block(block, checks, layout, destination.get(shard.path), findings)
                        shown.update(index, report.rows + rows, read + stream.bytes)
                except ShardFormatError as e:
                    report.problems.append(f"{shard.path}: {e}")
                stream.drain()
        except FileNotFoundError:
            report.problems.append(f"{shard.path}: missing")
            continue
        except ShardFormatError as e:
            report.problems.append(f"{shard.path}: {str(e).removeprefix(url + ': ')}")
            continue
        if stream.sha256.hexdigest() != shard.sha256:
            report.problems.append(f"{shard.path}: sha256 does not match the manifest")
        if stream.bytes != shard.bytes:
            report.problems.append(f"{shard.path}: {stream.bytes} bytes, manifest says {shard.bytes}")
        if rows != shard.records:
            report.problems.append(f"{shard.path}: {rows} rows, manifest says {shard.records}")
        report.problems += findings.problems(shard.path)
        if shard.path in dali:
            report.problems += _dali_problems(root, shard.path, dali[shard.path], offsets, stream.bytes)
        report.rows += rows
        read += stream.bytes
        shown.update(index + 1, report.rows, read)
    shown.done(report.rows, read)
    rejected = sum(manifest.rejected.values())
    if manifest.input_rows != manifest.kept_rows + rejected:
        report.problems.append(f"rows read {manifest.input_rows} != written {manifest.kept_rows} "
                               f"+ rejected {rejected}")
    fs, base = storage.url_to_fs(root)
    report.problems += _unindexed_files(fs, base, manifest)
    report.problems += _quarantine_problems(root, fs, base, manifest)
    report.problems += _wids_problems(fs, base, manifest, indexes.get("wids", []))
    for column, (digests, owners) in seen.items():
        if digests:
            report.problems += _repeated(root, manifest, column, np.concatenate(digests), np.concatenate(owners))
    return report


def _layout(manifest: DatasetManifest) -> tuple[ShardLayout | None, list[str]]:
    """The layout the manifest's parameters give, and how the indexed shards differ from it."""
    try:
        p = manifest.settings
        layout = ShardLayout(manifest.dataset, EXTENSIONS[manifest.format], p.groups, p.shards_per_group,
                             p.eval_shards, p.eval_fraction)
        sizes_ok = (1 <= layout.groups <= MAX_GROUPS and 1 <= layout.shards_per_group <= MAX_SHARDS
                    and 1 <= layout.eval_shards <= MAX_SHARDS and 0 < layout.eval_fraction < 1)
    except (DatasetError, KeyError) as e:
        return None, [f"manifest parameters do not give the shard layout ({type(e).__name__}: {str(e)[:120]})"]
    if not sizes_ok:
        return None, ["manifest parameters give an impossible shard layout"]
    problems = [] if manifest.groups == layout.groups else [
        f"manifest says {manifest.groups} groups, its parameters {layout.groups}"]
    expected = {layout.relative_path(d): layout.describe(d)[:2] for d in range(layout.destinations)}
    for shard in manifest.shards:
        if shard.path not in expected:
            problems.append(f"{shard.path}: not a shard of the layout ({layout.groups} groups x "
                            f"{layout.shards_per_group} shards, {layout.eval_shards} eval shards)")
        elif expected[shard.path] != (shard.split, shard.group):
            problems.append(f"{shard.path}: indexed as {shard.split} group {shard.group}, its path says "
                            f"{expected[shard.path][0]} group {expected[shard.path][1]}")
    absent = sorted(set(expected) - {s.path for s in manifest.shards})
    if absent:
        problems.append(f"{len(absent)} shard(s) of the layout are not in the manifest: {', '.join(absent[:5])}"
                        + (", ..." if len(absent) > 5 else ""))
    return layout, problems


def _dataset_checks(manifest: DatasetManifest):
    from pipelines.run import dataset_pipeline

    if manifest.dataset not in DATASETS:
        return None, [f"unknown dataset {manifest.dataset!r:.40}: its keys and values cannot be checked"]
    declare = dataset_pipeline(manifest.dataset).checks
    try:
        return (declare(manifest) if declare else None), []
    except (KeyError, TypeError, ValueError) as e:  # DatasetError is a ValueError
        return None, [f"manifest parameters do not say how to check the values ({type(e).__name__}: {str(e)[:80]})"]


def _check_block(block, checks, layout: ShardLayout | None, destination: int | None, findings: _Findings) -> None:
    keys = block["key"]
    if checks is None:
        return
    for check in checks.values:
        findings.add(f"fail the check: {check.description}", ~check.ok(block[check.column]), keys)
    hashes, valid = checks.key_hashes(keys)
    findings.add("have a key that names no record of the inputs", ~valid, keys)
    if layout is not None and destination is not None:
        wanted = checks.destinations(keys, hashes, layout) if checks.destinations else layout.assign(hashes)
        findings.add("belong to another shard by the manifest's seed", valid & (wanted != destination), keys)


def _text(fs, base: str, relative: str) -> str | None:
    path = f"{base.rstrip('/')}/{relative}"
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return f.read()


def _wids_problems(fs, base: str, manifest: DatasetManifest, lists: list[str]) -> list[str]:
    """The wids shard lists together name every shard once, with its sample count."""
    listed, problems = {}, []
    for relative in lists:
        text = _text(fs, base, relative)
        try:
            listed |= {s["url"]: s["nsamples"] for s in json.loads(text)["shardlist"]}
        except (TypeError, ValueError, KeyError):
            problems.append(f"{relative}: missing or not a wids shard list")
    if lists and not problems and listed != {s.path: s.records for s in manifest.shards}:
        problems.append(f"{', '.join(lists)}: the shards or sample counts listed differ from the manifest")
    return problems


def _dali_problems(root: str, shard: str, index: str, offsets: list[int], shard_bytes: int) -> list[str]:
    """A DALI-style `.idx` must list the shard's record offsets (as found while the shard was read)."""
    fs, base = storage.url_to_fs(root)
    try:
        if _text(fs, base, index) == dali_index(tuple(offsets), shard_bytes):
            return []
    except OSError:
        pass
    return [f"{index}: missing, or its record offsets do not match {shard}"]


def _unindexed_files(fs, base: str, manifest: DatasetManifest) -> list[str]:
    """Files among the shards that the manifest does not index (a temp file of an interrupted write is none)."""
    indexed = {s.path for s in manifest.shards}
    found = set()
    for split in ("train", "eval"):
        for path in fs.find(f"{base.rstrip('/')}/{split}"):
            if not storage.is_temp(path.rsplit("/", 1)[-1]):
                found.add(path[len(base.rstrip("/")) + 1:])
    return [f"{path}: shard file not in the manifest" for path in sorted(found - indexed)]


def _quarantine_problems(root: str, fs, base: str, manifest: DatasetManifest) -> list[str]:
    """Every rejected count must be backed by that many records in `rejected/<input>.jsonl`, and no more."""
    sources = {i["source"] for i in manifest.inputs}
    counts, problems = collections.Counter(), []
    top = f"{base.rstrip('/')}/rejected/"
    for path in sorted(fs.find(top)) if fs.exists(top) else []:  # nested for inputs named by relative path
        name = path[len(top):]
        if name.startswith("samples/") or storage.is_temp(name.rsplit("/", 1)[-1]):
            continue  # a few examples of what each rule removed (Common Crawl), not quarantined records; temp files
        source = name.removesuffix(".jsonl")
        # An input is a file (Criteo) or a folder whose files each have a quarantine file (ImageNet).
        ancestors = {source, *("/".join(source.split("/")[:i]) for i in range(1, source.count("/") + 1))}
        if not name.endswith(".jsonl") or not ancestors & sources:
            problems.append(f"rejected/{name}: not the quarantine of an input of this dataset")
            continue
        try:
            with open_regular_file(join(root, f"rejected/{name}")) as f:
                for number, line in enumerate(iter(lambda: f.readline(MAX_RECORD_BYTES), b""), 1):
                    try:
                        record = json.loads(line)
                        assert record["source"] == source and isinstance(record["reason"], str)
                    except (ValueError, KeyError, TypeError, AssertionError):
                        problems.append(f"rejected/{name}: line {number} is not a rejected record of {source}")
                        break
                    counts[record["reason"]] += 1
        except ShardFormatError as e:
            problems.append(f"rejected/{name}: {str(e).rsplit(': ', 1)[-1]}")
    expected = collections.Counter(manifest.rejected)
    expected.subtract(manifest.extra.get("rejected_without_records", {}))  # counted by rule, with samples only
    if counts != +expected:
        problems.append(f"rejected/ holds {dict(sorted(counts.items()))} records, the manifest counts "
                        f"{dict(sorted((+expected).items()))}")
    return problems


def _repeated(root: str, manifest: DatasetManifest, column: str, digests: np.ndarray,
              owners: np.ndarray) -> list[str]:
    """A problem for each value of `column` found more than once (a key, or an image stored twice)."""
    order = np.lexsort((digests[:, 1], digests[:, 0]))
    sorted_digests = digests[order]
    same = (sorted_digests[1:] == sorted_digests[:-1]).all(axis=1)
    if not same.any():
        return []
    dup_rows = np.unique(np.concatenate([order[1:][same], order[:-1][same]]))
    wanted = {digests[i].tobytes(): set() for i in dup_rows}
    for i in dup_rows:
        wanted[digests[i].tobytes()].add(manifest.shards[owners[i]].path)
    names = _keys_for(root, manifest, wanted, column)
    problems = []
    for digest, paths in list(wanted.items())[:20]:
        where = ", ".join(sorted(paths)) if len(paths) > 1 else f"{next(iter(paths))} (twice)"
        keys = names.get(digest, [digest.hex()])
        if column == "key":
            problems.append(f"key {keys[0]!r} is in more than one place: {where}")
        else:
            problems.append(f"the same {column} is stored under keys {', '.join(repr(k) for k in keys[:4])}"
                            f"{', ...' if len(keys) > 4 else ''}: {where}")
    if len(wanted) > 20:
        problems.append(f"... {len(wanted) - 20} more repeated {column} values")
    return problems


def _keys_for(root: str, manifest: DatasetManifest, wanted: dict[bytes, set], column: str) -> dict[bytes, list]:
    """Second pass over the shards involved: the keys of the rows holding each repeated value."""
    paths = set().union(*wanted.values())
    names = collections.defaultdict(list)
    for shard in manifest.shards:
        if shard.path in paths:
            for block in read_shard(join(root, shard.path), manifest.features, manifest.format):
                for key, digest in zip(block["key"].tolist(), _digests(block[column])):
                    if digest.tobytes() in wanted:
                        names[digest.tobytes()].append(key.decode(errors="backslashreplace"))
    return names
