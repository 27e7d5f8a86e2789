"""The dataset manifest: `<out>/manifest.json`, written last, so its presence means "complete".

Training finds its shards only through this file, and refuses a dataset whose
shards are missing or whose bytes do not hash to what the manifest says.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field

from codistill.config import DataConfig
from codistill.fields import ConfigError
from codistill.shards import Feature, Schema, ShardFormatError, open_regular_file
from codistill import storage
from codistill.storage import write_atomically

SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 28  # ~1M shard entries
# "object": variable-length bytes (e.g. JPEG images), stored as bytes and read back as bytes, never pickled.
FEATURE_DTYPES = ("bytes", "object", "float32", "int32", "int64", "uint8", "int8", "int16", "uint16", "float16")
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
    parameters: dict  # the data settings that produced it (`DataConfig.recorded()`) and its input files
    tokenizer_sha256: str | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)  # dataset-specific facts (e.g. the synth sidecar)
    # Input records written, when a row is not one input record (documents packed into token sequences);
    # None: one row per input record.
    kept: int | None = None

    @functools.cached_property
    def settings(self) -> DataConfig:
        """The data settings it was built with (`parameters` less the input files), typed as a manifest's."""
        try:
            return DataConfig.from_recorded(self.parameters, "parameters")
        except ConfigError as e:
            raise DatasetError(f"{self.dataset} dataset manifest: {e}") from None

    @property
    def input_rows(self) -> int:
        return sum(i["rows"] for i in self.inputs)

    @property
    def written_rows(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def kept_rows(self) -> int:
        """Input records that made it into the shards: inputs = kept + rejected."""
        return self.written_rows if self.kept is None else self.kept

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
            manifest = cls(**raw)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise DatasetError(f"{where}: not a valid dataset manifest: {str(e)[:200]}") from None
        problem = manifest._problem()
        if problem:
            raise DatasetError(f"{where}: not a valid dataset manifest: {problem}")
        return manifest

    def _problem(self) -> str | None:
        """What is wrong with the fields' types and values (the JSON may come from anyone), or None."""
        def count(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if self.features.get("key") is None or self.features["key"].dtype != "bytes" or self.features["key"].shape:
            return "features must hold `key` (bytes)"
        for name, feature in self.features.items():
            if feature.dtype not in FEATURE_DTYPES or not all(count(d) for d in feature.shape):
                return f"feature {name!r:.40}: dtype {feature.dtype!r:.40}, shape {feature.shape!r:.40}: not ours"
        if not (count(self.groups) and self.groups >= 1):
            return f"groups must be an integer >= 1, got {self.groups!r:.40}"
        if not all(isinstance(i, dict) and isinstance(i.get("source"), str) and count(i.get("rows"))
                   for i in self.inputs):
            return "inputs must be {source: name, rows: count} entries"
        if not all(isinstance(k, str) and count(v) for k, v in self.rejected.items()):
            return "rejected must map reasons to counts"
        for shard in self.shards:
            if not _is_relative_path(shard.path):
                return f"shard path {shard.path!r:.80} is not a relative path inside the dataset"
            if shard.split not in ("train", "eval") or not (shard.group is None or count(shard.group)):
                return f"{shard.path}: split {shard.split!r:.20} / group {shard.group!r:.20} are not a split and group"
            if not (count(shard.records) and count(shard.bytes)):
                return f"{shard.path}: records and bytes must be counts"
            if not (isinstance(shard.sha256, str) and len(shard.sha256) == 64
                    and all(c in "0123456789abcdef" for c in shard.sha256)):
                return f"{shard.path}: sha256 must be 64 hex digits"
        return None


def _is_relative_path(path) -> bool:
    """A path that stays inside the directory it is relative to (`../../dev/zero` does not)."""
    return (isinstance(path, str) and bool(path) and not path.startswith("/") and "\\" not in path
            and ":" not in path and all(part not in ("", ".", "..") for part in path.split("/")))


def join(root: str, relative: str) -> str:
    return f"{root.rstrip('/')}/{relative}"


def write_manifest(root: str, manifest: DatasetManifest) -> None:
    if manifest.input_rows != manifest.kept_rows + sum(manifest.rejected.values()):
        raise DatasetError(f"rows read ({manifest.input_rows}) != rows written ({manifest.kept_rows}) "
                           f"+ rows rejected ({sum(manifest.rejected.values())}): records were lost")
    write_atomically(join(root, MANIFEST_NAME), manifest.to_json())


def load_manifest(root: str) -> DatasetManifest:
    url = join(root, MANIFEST_NAME)
    try:
        with storage.explained(url), open_regular_file(url) as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise DatasetError(f"{root}: no {MANIFEST_NAME}; the dataset is missing or incomplete") from None
    except ShardFormatError as e:
        raise DatasetError(str(e)) from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise DatasetError(f"{url}: over {MAX_MANIFEST_BYTES} bytes, not a dataset manifest")
    return DatasetManifest.from_json(data.decode("utf-8", "replace"), url)


def check_shards_present(root: str, manifest: DatasetManifest) -> None:
    """Cheap check before training: every shard exists with the indexed size (hashes are checked on read)."""
    problems = []
    for shard in manifest.shards:
        url = join(root, shard.path)
        try:
            open_regular_file(url, shard.bytes).close()
        except FileNotFoundError:
            problems.append(f"missing shard {shard.path}")
        except ShardFormatError as e:
            problems.append(f"shard {shard.path}{str(e).removeprefix(url)}")
    if problems:
        raise DatasetError(f"{root}: " + "; ".join(problems))
