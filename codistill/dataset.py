"""The dataset manifest: `<out>/manifest.json`, written last, so its presence means "complete".

Training finds its shards only through this file, and refuses a dataset whose
shards are missing or whose bytes do not hash to what the manifest says.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field

from codistill import storage

from pipelines.formats import Feature, Schema

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


class DatasetError(ValueError):
    """A dataset directory is incomplete, inconsistent or not a codistill dataset."""


@dataclass(frozen=True)
class ShardEntry:
    path: str  # relative to the dataset directory
    split: str  # "train" or "eval"
    group: int | None  # None for eval
    records: int  # rows
    bytes: int
    sha256: str


@dataclass(frozen=True)
class DatasetManifest:
    dataset: str
    format: str
    features: Schema
    groups: int
    shards: tuple[ShardEntry, ...]
    inputs: tuple[dict, ...]  # {"source": name, "rows": rows read}
    rejected: dict[str, int]  # reason -> rows
    parameters: dict  # the pipeline parameters that produced it
    tokenizer_sha256: str | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)  # dataset-specific facts (e.g. the synth sidecar)

    @property
    def input_rows(self) -> int:
        return sum(i["rows"] for i in self.inputs)

    @property
    def written_rows(self) -> int:
        return sum(s.records for s in self.shards)

    def shards_of(self, split: str, group: int | None = None) -> list[ShardEntry]:
        return [s for s in self.shards if s.split == split and s.group == group]

    def to_json(self) -> str:
        raw = dataclasses.asdict(self)
        raw["features"] = {name: f.to_json() for name, f in self.features.items()}
        return json.dumps(raw, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "DatasetManifest":
        try:
            raw = json.loads(text)
            if raw.get("schema_version") != SCHEMA_VERSION:
                raise DatasetError(f"{where}: schema_version {raw.get('schema_version')!r}, "
                                   f"this codistill reads {SCHEMA_VERSION}")
            raw["features"] = {name: Feature.from_json(f) for name, f in raw["features"].items()}
            raw["shards"] = tuple(ShardEntry(**s) for s in raw["shards"])
            raw["inputs"] = tuple(raw["inputs"])
            return cls(**raw)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise DatasetError(f"{where}: not a valid dataset manifest: {e}") from None


def join(root: str, relative: str) -> str:
    return f"{root.rstrip('/')}/{relative}"


def write_atomically(url: str, text: str) -> None:
    """Temp file + rename on file systems with renames; one PUT (atomic anyway) on object stores."""
    fs, path = storage.url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "w") as f:
        f.write(text)
    fs.mv(tmp, path)


def write_manifest(root: str, manifest: DatasetManifest) -> None:
    if manifest.input_rows != manifest.written_rows + sum(manifest.rejected.values()):
        raise DatasetError(f"rows read ({manifest.input_rows}) != rows written ({manifest.written_rows}) "
                           f"+ rows rejected ({sum(manifest.rejected.values())}): records were lost")
    write_atomically(join(root, MANIFEST_NAME), manifest.to_json())


def load_manifest(root: str) -> DatasetManifest:
    url = join(root, MANIFEST_NAME)
    try:
        with storage.open(url, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise DatasetError(f"{root}: no {MANIFEST_NAME}; the dataset is missing or incomplete") from None
    return DatasetManifest.from_json(text, url)


def check_shards_present(root: str, manifest: DatasetManifest) -> None:
    """Cheap check before training: every shard exists with the indexed size (hashes are checked on read)."""
    fs, base = storage.url_to_fs(root)
    problems = []
    for shard in manifest.shards:
        path = f"{base.rstrip('/')}/{shard.path}"
        if not fs.exists(path):
            problems.append(f"missing shard {shard.path}")
        elif fs.size(path) != shard.bytes:
            problems.append(f"shard {shard.path} has {fs.size(path)} bytes, manifest says {shard.bytes}")
    if problems:
        raise DatasetError(f"{root}: " + "; ".join(problems))
