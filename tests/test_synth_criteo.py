import gzip
import json
import re

import fsspec
import numpy as np
import pytest

from pipelines import synth_criteo
from pipelines.synth_criteo import CriteoParams, generate_criteo

ROWS = 20_000
HEX8 = re.compile(r"[0-9a-f]{8}")


def _read(path: str) -> bytes:
    with fsspec.open(path, "rb") as f:
        data = f.read()
    return gzip.decompress(data) if path.endswith(".gz") else data


def _concat(out: str, sidecar: dict) -> bytes:
    return b"".join(_read(f"{out}/{f['name']}") for f in sidecar["files"])


def _fields(data: bytes) -> list[list[str]]:
    assert data.endswith(b"\n") and b"\r" not in data
    return [line.split("\t") for line in data.decode("ascii").split("\n")[:-1]]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    sidecar = generate_criteo(out, ROWS, files=2, seed=7)
    return out, sidecar, _fields(_concat(out, sidecar))


def test_format(generated):
    _, _, rows = generated
    assert len(rows) == ROWS
    for r in rows:
        assert len(r) == 40
        assert r[0] in ("0", "1")
        for v in r[1:14]:
            if v:
                int(v)
        for v in r[14:]:
            assert v == "" or HEX8.fullmatch(v), v


def test_marginals(generated):
    _, sidecar, rows = generated
    p = CriteoParams()
    labels = np.array([r[0] == "1" for r in rows])
    assert 0.20 < labels.mean() < 0.30
    assert sidecar["positive_rate"] == pytest.approx(labels.mean())

    missing = np.array([[v == "" for v in r[1:]] for r in rows]).mean(0)
    np.testing.assert_allclose(missing, p.int_missing + p.cat_missing, atol=0.03)
    assert missing[:13].max() > 0.4 and missing[:13].min() < 0.01
    assert missing[13:].max() > 0.4 and missing[13:].min() < 0.01

    ints = [np.array([int(r[j]) for r in rows if r[j]]) for j in range(1, 14)]
    i2 = ints[p.negative_column]
    assert 0.05 < (i2 == -1).mean() < 0.15 and i2.min() >= -5
    assert all(v.min() >= 0 for j, v in enumerate(ints) if j != p.negative_column)
    assert ints[4].max() > 100 * np.median(ints[4])  # heavy tail (I5)

    distinct = [len({r[j] for r in rows} - {""}) for j in range(14, 40)]
    assert distinct[8] <= 3 and distinct[19] <= 4  # C9, C20
    assert distinct[2] > 2000  # C3: capped at rows / 2 but still huge


def test_sidecar(generated):
    out, sidecar, _ = generated
    with fsspec.open(f"{out}/synth.json") as f:
        assert json.load(f) == sidecar
    assert sidecar["generator"] == synth_criteo.GENERATOR and sidecar["version"] == synth_criteo.VERSION
    assert (sidecar["seed"], sidecar["rows"], sidecar["num_files"]) == (7, ROWS, 2)
    assert [f["name"] for f in sidecar["files"]] == ["train-00000-of-00002.txt", "train-00001-of-00002.txt"]
    assert sum(f["rows"] for f in sidecar["files"]) == ROWS
    assert sidecar["params"]["cat_cardinality"] == list(CriteoParams().cat_cardinality)
    assert 0.38 < sidecar["bayes_log_loss"] < sidecar["base_rate_log_loss"] - 0.05
    r = sidecar["positive_rate"]
    assert sidecar["base_rate_log_loss"] == pytest.approx(-(r * np.log(r) + (1 - r) * np.log(1 - r)))


def test_deterministic_and_split_independent(tmp_path, monkeypatch):
    # Small chunks so files start and end mid-chunk.
    monkeypatch.setattr(synth_criteo, "CHUNK_ROWS", 3000)
    a = generate_criteo(str(tmp_path / "a"), 10_000, files=1, seed=3)
    b = generate_criteo(str(tmp_path / "b"), 10_000, files=1, seed=3)
    assert a == b
    c = generate_criteo(str(tmp_path / "c"), 10_000, files=3, seed=3)
    d = generate_criteo(str(tmp_path / "d"), 10_000, files=1, seed=4)
    name = "train-00000-of-00001.txt"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert [f["rows"] for f in c["files"]] == [3333, 3333, 3334]
    assert _concat(str(tmp_path / "c"), c) == _concat(str(tmp_path / "a"), a)
    assert _concat(str(tmp_path / "d"), d) != _concat(str(tmp_path / "a"), a)
    assert a["bayes_log_loss"] == pytest.approx(c["bayes_log_loss"])
    assert a["positive_rate"] == c["positive_rate"]


def test_gzip_round_trip_and_memory_fs(tmp_path):
    plain = generate_criteo(str(tmp_path), 5_000, files=2, seed=1)
    gz = generate_criteo("memory://synth-test/gz", 5_000, files=2, seed=1, gzip=True)
    assert [f["name"] for f in gz["files"]] == ["train-00000-of-00002.txt.gz", "train-00001-of-00002.txt.gz"]
    assert _concat("memory://synth-test/gz", gz) == _concat(str(tmp_path), plain)
    first = "memory://synth-test/gz/train-00000-of-00002.txt.gz"
    with fsspec.open(first, "rb") as f:
        header = f.read(10)
    # A real gzip stream with no file name (FLG = 0) and no timestamp (MTIME = 0).
    assert header[:2] == b"\x1f\x8b" and header[3] == 0 and header[4:8] == bytes(4)
    again = generate_criteo("memory://synth-test/gz2", 5_000, files=2, seed=1, gzip=True)
    assert again["files"] == gz["files"]
    with fsspec.open(first, "rb") as f, fsspec.open(first.replace("/gz/", "/gz2/"), "rb") as g:
        assert f.read() == g.read()
    assert fsspec.filesystem("memory").exists("/synth-test/gz/synth.json")


def test_more_files_than_rows_and_bad_arguments(tmp_path):
    sidecar = generate_criteo(str(tmp_path), 2, files=3)
    assert [f["rows"] for f in sidecar["files"]] == [0, 1, 1]
    assert (tmp_path / "train-00000-of-00003.txt").read_bytes() == b""
    assert len(_fields(_concat(str(tmp_path), sidecar))) == 2
    with pytest.raises(ValueError, match="files"):
        generate_criteo(str(tmp_path), 10, files=0)
    with pytest.raises(ValueError, match="cat_missing"):
        CriteoParams(cat_missing=(0.0,) * 13)


def test_planted_signal_is_learnable(generated):
    """Ridge logistic regression on log1p integers and one-hot categories of the
    columns with planted effects clearly beats the base rate on held-out rows."""
    _, sidecar, rows = generated
    y = np.array([r[0] == "1" for r in rows], float)
    ints = np.array([[int(v) if v else -10 for v in r[1:14]] for r in rows])
    x = np.log1p(np.maximum(ints, 0))
    cols = [np.ones(len(rows)), *((x - x.mean(0)) / x.std(0)).T, *(ints == -10).T]
    for j, scale in enumerate(sidecar["params"]["cat_effect"]):
        if scale:  # one-hot of categories frequent enough to estimate
            column = np.array([r[14 + j] for r in rows])
            values, counts = np.unique(column, return_counts=True)
            cols += [column == v for v in values[counts >= 50]]
    features = np.stack(cols, 1).astype(float)
    X, Y = features[:15_000], y[:15_000]
    w, ridge = np.zeros(features.shape[1]), 10.0
    for _ in range(5):  # Newton steps
        q = 1 / (1 + np.exp(-X @ w))
        hessian = (X * (q * (1 - q))[:, None]).T @ X + ridge * np.eye(len(w))
        w -= np.linalg.solve(hessian, X.T @ (q - Y) + ridge * w)
    q = np.clip(1 / (1 + np.exp(-features[15_000:] @ w)), 1e-6, 1 - 1e-6)
    y_test = y[15_000:]
    log_loss = -np.mean(y_test * np.log(q) + (1 - y_test) * np.log(1 - q))
    assert sidecar["bayes_log_loss"] - 0.02 < log_loss < sidecar["base_rate_log_loss"] - 0.03


def test_the_planted_probabilities_of_the_rows_are_what_the_floor_was_computed_from(tmp_path):
    from pipelines.synth_criteo import planted_probabilities
    from training.metrics import binary_entropy

    sidecar = generate_criteo(str(tmp_path), 150_000, files=3, seed=5)  # 3 chunks of rows, split over 3 files
    keys = np.array([f"{f['name']}:{line}".encode() for f in sidecar["files"] for line in range(1, f["rows"] + 1)])
    probs = planted_probabilities(sidecar, keys)
    assert np.mean(binary_entropy(probs)) == pytest.approx(sidecar["bayes_log_loss"], rel=1e-9)
    labels = np.concatenate([np.loadtxt(tmp_path / f["name"], usecols=0, delimiter="\t") for f in sidecar["files"]])
    assert abs(probs.mean() - labels.mean()) < 0.01  # the labels were drawn from them
    changed = dict(sidecar, bias=sidecar["bias"] + 1)
    with pytest.raises(ValueError, match="generator has changed"):
        planted_probabilities(changed, keys[:3])

