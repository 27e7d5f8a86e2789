"""Shared fixtures and helpers for the data-foundation and Criteo pipeline tests.

Everything here runs the real parts: Beam's in-process FnApiRunner (never the
default DirectRunner, which tries to download Prism), real fsspec file systems
(`tmp_path` and `memory://` with a unique root per test), real shard readers.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from codistill import storage
from codistill.config import StorageConfig, parse_experiment
from codistill.dataset import DatasetManifest, join, load_manifest
from pipelines.formats import read_shard
from tfrecord.reader import tfrecord_loader

# Every DeepSpeed process the tests start (directly or through `codistill train`) uses this environment's
# JIT cache, never the shared ~/.cache one (see training.launch.JIT_CACHE).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
RUNNER = "--runner=FnApiRunner"
INT_MISSING = -(2**63)

# --- shared sample data -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (relative to the repo root): the real samples the conformance tests read. Required
    under CI=true (.ci/run), where missing data fails every test that reads it; on a user's clone without it
    those tests are skipped, with one line in the summary saying why."""
    if not SHARED_DATA.is_dir():
        message = (f"shared sample data not found at {SHARED_DATA}: the conformance tests read the real "
                   "Criteo, Common Crawl and ImageNet samples from ../shared/data beside the repository")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(scope="session")
def criteo_samples(shared_data) -> dict[str, Path]:
    paths = {"tsv": shared_data / "criteo" / "paddlerec_sample_train.tsv",
             "csv": shared_data / "criteo" / "deepctr_criteo_sample.csv"}
    for path in paths.values():
        assert path.is_file(), f"missing shared sample file {path}"
    return paths


# --- file systems -------------------------------------------------------------------------------


@pytest.fixture
def memory_root():
    """A fresh `memory://` root for one test, removed afterwards."""
    root = f"memory://codistill-test-{uuid.uuid4().hex}"
    yield root
    fs, path = storage.url_to_fs(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(root: str) -> list[str]:
    """Every file under `root`, relative to it (hidden ones too), sorted."""
    fs, base = storage.url_to_fs(root)
    base = base.rstrip("/")
    return sorted(p[len(base) + 1:] for p in fs.find(base))


def read_bytes(url: str) -> bytes:
    with storage.open(url, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    with storage.open(url, "wb", auto_mkdir=True) as f:
        f.write(data)


# --- a dask.distributed cluster of 2 worker processes ----------------------------------------------


@pytest.fixture(scope="session")
def dask_cluster():
    from dask.distributed import LocalCluster

    # The workers' environment holds the test S3 credentials, as a deployment's workers would hold theirs;
    # which endpoint and which variables to use comes with the pipeline (`storage` rules).
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      env=S3_ENV) as cluster:
        yield cluster


def dask_args(cluster) -> list[str]:
    """Beam options that run a pipeline on `cluster` (started before the test set anything up)."""
    return ["--runner", "DaskRunner", "--dask_client_address", cluster.scheduler_address]


# --- a real S3 endpoint: moto's server on 127.0.0.1 ------------------------------------------------

S3_BUCKET = "codistill-test"
# Credentials reach s3fs only through the storage rule's `env`, as a user's secrets would.
S3_ENV = {"CODISTILL_TEST_S3_KEY": "testing", "CODISTILL_TEST_S3_SECRET": "testing"}


@dataclass(frozen=True)
class S3:
    endpoint: str
    rule: StorageConfig

    @property
    def manifest_value(self) -> str:
        """The rule as a `--set storage=...` value."""
        return json.dumps([{"prefix": self.rule.prefix, "options": self.rule.options, "env": self.rule.env}])

    def url(self, name: str = "") -> str:
        return f"s3://{S3_BUCKET}/{name or uuid.uuid4().hex}"


def _wait_for_port(proc: subprocess.Popen, port: int, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)  # polling interval, not a synchronisation delay
    raise TimeoutError(f"moto_server did not listen on port {port} within {timeout}s")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server for the session, its bucket, and a storage rule for it (installed only by `s3_storage`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "server.log"  # a file: a full pipe would stall the server
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_EC2_METADATA_DISABLED"]}
    try:
        _wait_for_port(proc, port, log)
        os.environ.update(S3_ENV, AWS_EC2_METADATA_DISABLED="true")  # never ask a cloud metadata service
        endpoint = f"http://127.0.0.1:{port}"
        s3 = S3(endpoint, StorageConfig(f"s3://{S3_BUCKET}", {"endpoint_url": endpoint},
                                        {"key": "CODISTILL_TEST_S3_KEY", "secret": "CODISTILL_TEST_S3_SECRET"}))
        storage.configure([s3.rule])
        storage.url_to_fs(f"s3://{S3_BUCKET}")[0].mkdir(S3_BUCKET)
        storage.configure(())
        yield s3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_storage(s3):
    """The S3 rule installed for one test."""
    storage.configure([s3.rule])
    yield s3
    storage.configure(())


# --- raw Criteo input with injected faults --------------------------------------------------------


def good_fields(rng: random.Random) -> list[str]:
    """One valid Kaggle train.txt row as 40 strings (empty = missing).

    Categorical values come from a small vocabulary per column so equal values
    recur (their bucket ids must then be equal too).
    """
    label = rng.choice("01")
    ints = []
    for _ in range(13):
        r = rng.random()
        ints.append("" if r < 0.2 else str(rng.choice([-2, -1, 0, 1, 7])) if r < 0.5 else str(rng.randint(0, 10**6)))
    edge_values = [0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0xDEADBEEF]
    cats = ["" if rng.random() < 0.15 else f"{rng.choice([*edge_values, rng.getrandbits(32)]):08x}" for _ in range(26)]
    return [label, *ints, *cats]


def _with(fields: list[str], index: int, value: str) -> list[str]:
    return fields[:index] + [value] + fields[index + 1:]


def _tsv(fields: list[str]) -> bytes:
    return "\t".join(fields).encode()


# name -> (make the bad line from a good row's fields, the reason it must be rejected with)
FAULTS = {
    "too_few_fields": (lambda f: _tsv(f[:39]), "field_count"),
    "too_many_fields": (lambda f: _tsv(f + ["1"]), "field_count"),
    "empty_line": (lambda f: b"", "field_count"),
    "spaces_only": (lambda f: b"   ", "field_count"),
    "non_integer": (lambda f: _tsv(_with(f, 3, "abc")), "bad_integer"),
    "fractional_integer": (lambda f: _tsv(_with(f, 1, "3.5")), "bad_integer"),
    "integer_too_long": (lambda f: _tsv(_with(f, 5, "1" * 25)), "bad_integer"),
    "bad_hex": (lambda f: _tsv(_with(f, 20, "zzzzzzzz")), "bad_categorical"),
    "short_hex": (lambda f: _tsv(_with(f, 14, "abc")), "bad_categorical"),
    "long_hex": (lambda f: _tsv(_with(f, 39, "0123456789")), "bad_categorical"),
    "bad_label": (lambda f: _tsv(_with(f, 0, "2")), "bad_label"),
    "missing_label": (lambda f: _tsv(_with(f, 0, "")), "bad_label"),
    "non_ascii": (lambda f: _tsv(_with(f, 15, "caf\u00e9babe")), "undecodable"),
    "latin1_byte": (lambda f: _tsv(f).replace(b"\t", b"\t\xff", 1), "undecodable"),
    "carriage_return": (lambda f: _tsv(f) + b"\r", "carriage_return"),
    "nul_in_integer": (lambda f: _tsv(_with(f, 2, "1\x002")), "bad_integer"),
    "cut_mid_row": (lambda f: _tsv(f)[:57], "field_count"),  # e.g. a file's last line, cut by a failed copy
}


@dataclass
class RawCriteo:
    """A raw Criteo file written for a test, and what the pipeline must make of it."""

    url: str
    name: str  # basename: the first half of every key
    lines: list[bytes]  # physical lines, without their newline
    rejected: dict[int, str] = field(default_factory=dict)  # 1-based line -> expected reason
    first_data_line: int = 1

    @property
    def good_lines(self) -> list[int]:
        return [n for n in range(self.first_data_line, len(self.lines) + 1) if n not in self.rejected]

    def key(self, line: int) -> str:
        return f"{self.name}:{line}"

    @property
    def good_keys(self) -> set[str]:
        return {self.key(n) for n in self.good_lines}

    def text(self, line: int) -> str:
        return self.lines[line - 1].decode()

    @property
    def rows(self) -> int:
        return len(self.lines) - (self.first_data_line - 1)


def make_criteo_file(url: str, rows: int, faults: dict[int, str] | None = None, seed: int = 0,
                     compress: bool = False, final_newline: bool = True) -> RawCriteo:
    """Write `rows` Kaggle-format lines to `url` with the named FAULTS at the given 1-based lines."""
    rng = random.Random(seed)
    faults = faults or {}
    lines, rejected = [], {}
    for number in range(1, rows + 1):
        fields = good_fields(rng)
        if number in faults:
            make, reason = FAULTS[faults[number]]
            lines.append(make(fields))
            rejected[number] = reason
        else:
            lines.append(_tsv(fields))
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    write_bytes(url, gzip.compress(data, mtime=0) if compress else data)
    return RawCriteo(url, url.rstrip("/").rsplit("/", 1)[-1], lines, rejected)


@pytest.fixture
def criteo_file():
    return make_criteo_file


# --- the reference feature transform (by hand, straight from the module docstring) ---------------


@dataclass(frozen=True)
class ExpectedRow:
    label: float
    dense: list[float]
    int_raw: list[int]
    cat_raw: list[int]

    @property
    def cat_missing(self) -> list[bool]:
        return [v == -1 for v in self.cat_raw]


def expected_row(line: str, delimiter: str = "\t") -> ExpectedRow:
    """label 0/1 float; dense = sign(x)*log1p(|x|), missing -> 0; raw ints (missing -> -2^63); raw cats."""
    fields = line.split(delimiter)
    assert len(fields) == 40, line
    ints = [int(float(v)) if v else None for v in fields[1:14]]  # the csv export writes `260.0`
    dense = [0.0 if v is None else math.copysign(math.log1p(abs(v)), v) for v in ints]
    return ExpectedRow(float(fields[0]), dense, [INT_MISSING if v is None else v for v in ints],
                       [int(v, 16) if v else -1 for v in fields[14:]])


def assert_row_matches(row: dict, expected: ExpectedRow, buckets: int, key: str = "") -> None:
    assert row["label"] == expected.label, key
    np.testing.assert_allclose(row["dense"], expected.dense, rtol=1e-6, atol=0, err_msg=key)
    cat = np.asarray(row["cat"])
    missing = np.array(expected.cat_missing)
    assert (cat[missing] == 0).all(), f"{key}: missing categoricals must map to id 0, got {cat}"
    assert ((cat[~missing] >= 1) & (cat[~missing] <= buckets - 1)).all(), \
        f"{key}: present categoricals must map into 1..{buckets - 1}, got {cat}"
    if "int_raw" in row:
        assert list(row["int_raw"]) == expected.int_raw, key
        assert list(row["cat_raw"]) == expected.cat_raw, key


# --- running the pipeline and reading what it wrote -------------------------------------------------


def criteo_config(input: str, output: str, **data):
    criteo = {"cat_buckets": [1000], **data.pop("criteo", {})}
    raw = {"name": "test", "data": {"input": input, "output": output, "groups": 2, "eval_fraction": 0.2,
                                    "shards_per_group": 2, "eval_shards": 1, "block_rows": 16, "seed": 5,
                                    "criteo": criteo, **data}}
    return parse_experiment(raw)


def run_criteo(input: str, output: str, beam_args=(RUNNER,), overwrite: bool = False, **data) -> DatasetManifest:
    """Run the Criteo pipeline end to end on the in-process runner (small defaults: 2 groups, 2 shards each)."""
    from pipelines.run import preprocess

    return preprocess(criteo_config(input, output, **data), list(beam_args), overwrite=overwrite)


@pytest.fixture
def run_pipeline():
    return run_criteo


def read_rows(root: str) -> dict[str, dict]:
    """key -> {feature: value, "split": ..., "group": ..., "shard": path}, checking each shard's sha256."""
    manifest = load_manifest(root)
    rows = {}
    for shard in manifest.shards:
        for block in read_shard(join(root, shard.path), manifest.features, manifest.format,
                                expect_sha256=shard.sha256):
            for i, raw_key in enumerate(block["key"].tolist()):
                key = raw_key.decode()
                assert key not in rows, f"key {key} is in {rows.get(key, {}).get('shard')} and {shard.path}"
                rows[key] = {name: block[name][i] for name in block if name != "key"}
                rows[key] |= {"split": shard.split, "group": shard.group, "shard": shard.path}
    return rows


def read_rejected(root: str) -> list[dict]:
    fs, base = storage.url_to_fs(root)
    out = []
    for path in sorted(fs.glob(f"{base.rstrip('/')}/rejected/*.jsonl")):
        with fs.open(path, "r") as f:
            out += [json.loads(line) for line in f]
    return out


def shard_bytes(root: str) -> dict[str, bytes]:
    """Relative path -> bytes of every shard and rejected file (the whole deterministic output)."""
    return {path: read_bytes(join(root, path)) for path in list_files(root)
            if path.startswith(("train/", "eval/", "rejected/"))}


def assert_tfrecord_package_agrees(url: str, features: dict) -> None:
    """The `tfrecord` package's reading of a shard equals `read_shard`'s, feature by feature."""
    description = {name: "float" if f.dtype == "float32" else "byte" for name, f in features.items()}
    ours = list(read_shard(url, features, "tfrecord"))
    theirs = list(tfrecord_loader(url, None, description))
    assert len(ours) == len(theirs)
    for record, block in zip(theirs, ours):
        rows = len(block["key"])
        for name, f in features.items():
            if f.dtype == "bytes":
                assert [bytes(k) for k in np.atleast_1d(record[name])] == block[name].tolist()
            elif f.dtype == "float32":
                np.testing.assert_array_equal(record[name].reshape(rows, *f.shape), block[name])
            else:
                raw = np.frombuffer(record[name], np.dtype(f.dtype).newbyteorder("<"))
                np.testing.assert_array_equal(raw.reshape(rows, *f.shape), block[name])
