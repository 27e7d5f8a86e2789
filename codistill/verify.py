"""`codistill verify DIR`: prove a dataset is what its manifest says, and that its splits are disjoint."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

import fsspec
import numpy as np

from codistill.dataset import DatasetManifest, join, load_manifest
from pipelines.formats import (ShardFormatError, dali_index, dali_index_path, iter_blocks, read_shard,
                               tfrecord_offsets)


@dataclass
class VerifyReport:
    manifest: DatasetManifest
    rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _key_digests(keys: np.ndarray) -> np.ndarray:
    """128-bit digests of the keys, as rows of two uint64 (collisions are out of reach)."""
    joined = b"".join(hashlib.blake2b(k, digest_size=16).digest() for k in keys.tolist())
    return np.frombuffer(joined, np.uint64).reshape(-1, 2)


def verify_dataset(root: str) -> VerifyReport:
    manifest = load_manifest(root)
    report = VerifyReport(manifest)
    fs, base = fsspec.core.url_to_fs(root)
    digests, owners = [], []
    indexes = manifest.extra.get("indexes", {})
    dali = {s.path: dali_index_path(s.path) for s in manifest.shards} if "dali" in indexes else {}
    for index, shard in enumerate(manifest.shards):
        path = f"{base.rstrip('/')}/{shard.path}"
        if not fs.exists(path):
            report.problems.append(f"{shard.path}: missing")
            continue
        with fs.open(path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            report.problems.append(f"{shard.path}: sha256 does not match the manifest")
        rows = 0
        try:  # parse even a shard with the wrong hash: say what else is wrong with it
            for block in iter_blocks(io.BytesIO(data), manifest.features, manifest.format):
                rows += len(block["key"])
                digests.append(_key_digests(block["key"]))
                owners.append(np.full(len(block["key"]), index))
        except ShardFormatError as e:
            report.problems.append(f"{shard.path}: {e}")
        if len(data) != shard.bytes:
            report.problems.append(f"{shard.path}: {len(data)} bytes, manifest says {shard.bytes}")
        if rows != shard.records:
            report.problems.append(f"{shard.path}: {rows} rows, manifest says {shard.records}")
        if shard.path in dali and _text(fs, base, dali[shard.path]) != dali_index(tfrecord_offsets(data), len(data)):
            report.problems.append(f"{dali[shard.path]}: missing, or its record offsets do not match {shard.path}")
        report.rows += rows
    rejected = sum(manifest.rejected.values())
    if manifest.input_rows != manifest.written_rows + rejected:
        report.problems.append(f"rows read {manifest.input_rows} != written {manifest.written_rows} "
                               f"+ rejected {rejected}")
    report.problems += _unindexed_files(fs, base, manifest)
    report.problems += _wids_problems(fs, base, manifest, indexes.get("wids", []))
    if digests:
        report.problems += _duplicate_keys(root, manifest, np.concatenate(digests), np.concatenate(owners))
    return report


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


def _unindexed_files(fs, base: str, manifest: DatasetManifest) -> list[str]:
    indexed = {s.path for s in manifest.shards}
    found = set()
    for split in ("train", "eval"):
        for path in fs.find(f"{base.rstrip('/')}/{split}"):
            found.add(path[len(base.rstrip("/")) + 1:])
    return [f"{path}: shard file not in the manifest" for path in sorted(found - indexed)]


def _duplicate_keys(root: str, manifest: DatasetManifest, digests: np.ndarray, owners: np.ndarray) -> list[str]:
    order = np.lexsort((digests[:, 1], digests[:, 0]))
    sorted_digests = digests[order]
    same = (sorted_digests[1:] == sorted_digests[:-1]).all(axis=1)
    if not same.any():
        return []
    dup_rows = np.unique(np.concatenate([order[1:][same], order[:-1][same]]))
    wanted = {digests[i].tobytes(): set() for i in dup_rows}
    for i in dup_rows:
        wanted[digests[i].tobytes()].add(manifest.shards[owners[i]].path)
    names = _keys_for(root, manifest, wanted)
    problems = []
    for digest, paths in list(wanted.items())[:20]:
        where = ", ".join(sorted(paths)) if len(paths) > 1 else f"{next(iter(paths))} (twice)"
        problems.append(f"key {names.get(digest, digest.hex())!r} is in more than one place: {where}")
    if len(wanted) > 20:
        problems.append(f"... {len(wanted) - 20} more duplicated keys")
    return problems


def _keys_for(root: str, manifest: DatasetManifest, wanted: dict[bytes, set]) -> dict[bytes, str]:
    """Second pass over the shards involved, to name the duplicated keys."""
    paths = set().union(*wanted.values())
    names = {}
    for shard in manifest.shards:
        if shard.path in paths:
            for block in read_shard(join(root, shard.path), manifest.features, manifest.format):
                for key, digest in zip(block["key"].tolist(), _key_digests(block["key"])):
                    if digest.tobytes() in wanted:
                        names[digest.tobytes()] = key.decode(errors="backslashreplace")
    return names

