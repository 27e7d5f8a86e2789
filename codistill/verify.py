"""`codistill verify DIR`: prove a dataset is what its manifest says, and that its splits are disjoint."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import numpy as np

from codistill import storage
from codistill.dataset import DatasetManifest, join, load_manifest
from pipelines.formats import ShardFormatError, iter_blocks, read_shard


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
    fs, base = storage.url_to_fs(root)
    digests, owners = [], []
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
        report.rows += rows
    rejected = sum(manifest.rejected.values())
    if manifest.input_rows != manifest.written_rows + rejected:
        report.problems.append(f"rows read {manifest.input_rows} != written {manifest.written_rows} "
                               f"+ rejected {rejected}")
    report.problems += _unindexed_files(fs, base, manifest)
    if digests:
        report.problems += _duplicate_keys(root, manifest, np.concatenate(digests), np.concatenate(owners))
    return report


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

