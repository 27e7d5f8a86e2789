"""Synthetic Criteo Display Advertising Challenge data with a planted model.

Writes files in the Kaggle ``train.txt`` format (label, I1..I13, C1..C26,
tab-separated, empty field = missing, categoricals as 8 lowercase hex digits)
whose marginals resemble the real data: ~25% positives, per-column missing
rates, heavy-tailed counts, Zipf categoricals with cardinalities from 3 to
millions. Labels come from a known logistic model, so the sidecar can report
the Bayes log loss: the floor no model can beat on this data.

Every row depends only on (seed, rows, global row index): rows are generated
in fixed-size chunks, each from its own RNG stream, so the output does not
depend on how it is split into files.
"""

from __future__ import annotations

import dataclasses
import gzip as gziplib
import json
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from codistill import storage

GENERATOR = "codistill.synth_criteo"
VERSION = 1
CHUNK_ROWS = 1 << 16
# Calibrating the bias on a fixed-size sample keeps it independent of how the
# output is chunked and costs a fraction of a second.
CALIBRATION_ROWS = 1 << 17
N_INT, N_CAT = 13, 26
COLUMNS = ["label"] + [f"I{i}" for i in range(1, N_INT + 1)] + [f"C{i}" for i in range(1, N_CAT + 1)]
# Separate RNG streams: [seed, stream, index].
_PARAMS, _CALIBRATION, _ROWS = 0, 1, 2
_WRITE_OPTIONS = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
_NIBBLE_SHIFTS = np.arange(28, -1, -4, dtype=np.uint32)


@dataclass(frozen=True)
class CriteoParams:
    """Generating parameters. Defaults follow the 45M-row Kaggle train set."""

    positive_rate: float = 0.25  # target; the bias is calibrated to hit it
    # Integer features: v = floor(expm1(max(0, mean + std * z))), z ~ N(0, 1).
    int_missing: tuple[float, ...] = (
        0.454, 0.0, 0.215, 0.217, 0.026, 0.224, 0.043, 0.0005, 0.043, 0.454, 0.043, 0.765, 0.217)
    int_log_mean: tuple[float, ...] = (
        0.7, 2.0, 2.0, 1.7, 7.5, 3.2, 1.6, 1.9, 3.7, 0.4, 0.9, -0.3, 1.7)
    int_log_std: tuple[float, ...] = (
        1.3, 2.2, 1.2, 0.9, 2.9, 1.8, 1.5, 1.2, 1.5, 0.6, 1.0, 0.8, 1.0)
    int_correlation: float = 0.3  # loading on a shared latent: real counts move together
    negative_column: int = 1  # I2 is the one column with -1 (and rarely -2, -3)
    negative_rate: float = 0.1
    # Categorical features: Zipf ranks over min(cardinality, cap_fraction * rows).
    cat_missing: tuple[float, ...] = (
        0.0, 0.0, 0.034, 0.034, 0.0, 0.121, 0.0, 0.0, 0.0, 0.0, 0.0, 0.034, 0.0,
        0.0, 0.0, 0.034, 0.0, 0.0, 0.44, 0.44, 0.034, 0.762, 0.0, 0.034, 0.44, 0.44)
    cat_cardinality: tuple[int, ...] = (
        1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
        27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
    cap_fraction: float = 0.5  # no column has more categories than half the rows
    zipf_exponent: float = 1.1
    # Planted model on x_j = standardized log1p(I_j) (0 when missing):
    # logit = bias + sum_j tanh_j * tanh(x_j) - square_j * x_j^2
    #         + product of one integer pair + per-category effects
    #         + an effect per (category, category) cell of one column pair.
    int_tanh: tuple[float, ...] = (0.3, 0.5, 0.0, 0.0, -0.6, 0.0, 0.4, 0.0, 0.0, 0.0, 0.7, 0.0, 0.4)
    int_square: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0)
    int_pair: tuple[int, int, float] = (6, 10, 0.4)  # I7 x I11
    cat_effect: tuple[float, ...] = (
        0.3, 0.25, 0.0, 0.0, 0.3, 0.4, 0.0, 0.25, 0.3, 0.25, 0.0, 0.0, 0.25,
        0.3, 0.0, 0.0, 0.3, 0.0, 0.0, 0.25, 0.0, 0.0, 0.25, 0.0, 0.25, 0.0)
    cat_pair: tuple[int, int, float] = (5, 13, 0.4)  # C6 x C14

    def __post_init__(self):
        for name, n in [("int_missing", N_INT), ("int_log_mean", N_INT), ("int_log_std", N_INT),
                        ("int_tanh", N_INT), ("int_square", N_INT), ("cat_missing", N_CAT),
                        ("cat_cardinality", N_CAT), ("cat_effect", N_CAT)]:
            if len(getattr(self, name)) != n:
                raise ValueError(f"CriteoParams.{name} needs {n} values, got {len(getattr(self, name))}")
        if not 0 < self.positive_rate < 1:
            raise ValueError(f"CriteoParams.positive_rate must be in (0, 1), got {self.positive_rate}")
        if self.zipf_exponent <= 1:
            raise ValueError(f"CriteoParams.zipf_exponent must be > 1, got {self.zipf_exponent}")


@dataclass(frozen=True)
class Planted:
    """The realized model: capped vocabularies, effect tables, calibrated bias."""

    vocab: np.ndarray  # (26,) categories per column actually used
    effects: list[np.ndarray]  # effect by category rank, per categorical column
    pair_effects: np.ndarray  # (vocab_a, vocab_b) for the categorical pair
    bias: float


def _sample_features(rng: np.random.Generator, n: int, p: CriteoParams, vocab: np.ndarray):
    """Integer values, their missing mask, and categorical ranks (-1 = missing)."""
    mean, std = np.array(p.int_log_mean), np.array(p.int_log_std)
    c = p.int_correlation
    z = c * rng.standard_normal((n, 1)) + np.sqrt(1 - c * c) * rng.standard_normal((n, N_INT))
    ints = np.floor(np.expm1(np.maximum(0.0, mean + std * z))).astype(np.int64)
    # -1 and rarely -2, -3, as in real I2.
    neg = rng.random(n) < p.negative_rate
    col = p.negative_column
    ints[:, col] = np.where(neg, -rng.geometric(0.97, n), ints[:, col])
    int_missing = rng.random((n, N_INT)) < np.array(p.int_missing)

    # Bounded Zipf by inverting the continuous power-law CDF on [1, vocab + 1):
    # O(1) per draw, unlike a search over a per-column CDF table.
    e = 1.0 - p.zipf_exponent
    top = (vocab + 1.0) ** e - 1.0
    u = rng.random((n, N_CAT))
    ranks = np.minimum(np.floor((1.0 + u * top) ** (1.0 / e)).astype(np.int64) - 1, vocab - 1)
    ranks[rng.random((n, N_CAT)) < np.array(p.cat_missing)] = -1
    return ints, int_missing, ranks


def _logit(ints, int_missing, ranks, p: CriteoParams, m: Planted) -> np.ndarray:
    """Logit of the planted model, including the bias."""
    mean, std = np.array(p.int_log_mean), np.array(p.int_log_std)
    x = np.where(int_missing, 0.0, (np.log1p(np.maximum(ints, 0)) - mean) / std)
    logit = m.bias + np.tanh(x) @ np.array(p.int_tanh) - x**2 @ np.array(p.int_square)
    i, j, w = p.int_pair
    logit += w * x[:, i] * x[:, j]
    for col, table in enumerate(m.effects):
        if table.size:  # missing categories (rank -1) get no effect
            r = ranks[:, col]
            logit += np.where(r >= 0, table[np.maximum(r, 0)], 0.0)
    a, b, _ = p.cat_pair
    ra, rb = ranks[:, a], ranks[:, b]
    logit += np.where((ra >= 0) & (rb >= 0), m.pair_effects[np.maximum(ra, 0), np.maximum(rb, 0)], 0.0)
    return logit


def plant(p: CriteoParams, rows: int, seed: int) -> Planted:
    """Draw the effect tables and calibrate the bias to p.positive_rate."""
    vocab = np.minimum(np.array(p.cat_cardinality), max(1, int(p.cap_fraction * rows)))
    rng = np.random.default_rng([seed, _PARAMS, 0])
    effects = [scale * rng.standard_normal(v if scale else 0) for scale, v in zip(p.cat_effect, vocab)]
    a, b, w = p.cat_pair
    m = Planted(vocab, effects, w * rng.standard_normal((vocab[a], vocab[b])), bias=0.0)

    logit = _logit(*_sample_features(np.random.default_rng([seed, _CALIBRATION, 0]),
                                     CALIBRATION_ROWS, p, vocab), p, m)
    lo, hi = -20.0, 20.0  # mean sigmoid is monotone in the bias: bisect
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _sigmoid(mid + logit).mean() < p.positive_rate else (lo, mid)
    return dataclasses.replace(m, bias=(lo + hi) / 2)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def _hex_column(column: int, ranks: np.ndarray) -> pa.StringArray:
    """8-hex-digit strings ("" when missing), fixed per (column, rank)."""
    present = ranks >= 0
    # murmur3's fmix32 is a bijection on 32 bits: no two ranks of a column collide.
    h = ranks[present].astype(np.uint32) + np.uint32((0x9E3779B9 * (column + 1)) & 0xFFFFFFFF)
    h ^= h >> 16
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> 13
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> 16
    chars = _HEX[(h[:, None] >> _NIBBLE_SHIFTS) & 0xF]  # (present, 8) ASCII bytes
    offsets = np.zeros(len(ranks) + 1, np.int32)
    np.cumsum(present * 8, out=offsets[1:])
    return pa.StringArray.from_buffers(len(ranks), pa.py_buffer(offsets), pa.py_buffer(chars))


def _chunk(index: int, n: int, p: CriteoParams, m: Planted, seed: int):
    """Rows [index * CHUNK_ROWS, index * CHUNK_ROWS + n) as a table, labels, entropy of p."""
    rng = np.random.default_rng([seed, _ROWS, index])
    ints, int_missing, ranks = _sample_features(rng, n, p, m.vocab)
    logit = _logit(ints, int_missing, ranks, p, m)
    prob = _sigmoid(logit)
    labels = (rng.random(n) < prob).astype(np.int8)
    entropy = prob * np.logaddexp(0, -logit) + (1 - prob) * np.logaddexp(0, logit)
    arrays = [pa.array(labels)]
    arrays += [pa.array(ints[:, j], mask=int_missing[:, j]) for j in range(N_INT)]
    arrays += [_hex_column(j, ranks[:, j]) for j in range(N_CAT)]
    return pa.Table.from_arrays(arrays, names=COLUMNS), labels, entropy


def _schema() -> pa.Schema:
    return pa.schema([("label", pa.int8())] + [(c, pa.int64()) for c in COLUMNS[1:1 + N_INT]]
                     + [(c, pa.string()) for c in COLUMNS[1 + N_INT:]])


def generate_criteo(out: str, rows: int, files: int = 1, seed: int = 0, gzip: bool = False,
                    params: CriteoParams | None = None) -> dict:
    """Write `files` Criteo TSV files with `rows` rows in total, plus `synth.json`, under `out`.

    Returns the sidecar dict (also written to `<out>/synth.json`).
    """
    if rows < 0 or files < 1:
        raise ValueError(f"need rows >= 0 and files >= 1, got rows={rows} files={files}")
    p = params or CriteoParams()
    m = plant(p, rows, seed)
    fs, root = storage.url_to_fs(out)
    storage.make_dirs(fs, root)
    bounds = [rows * k // files for k in range(files + 1)]
    cached = (-1, None)  # a chunk straddling two files is generated once
    positives, entropy_sum, written = 0, 0.0, []
    for k in range(files):
        name = f"train-{k:05d}-of-{files:05d}.txt" + (".gz" if gzip else "")
        start, stop = bounds[k], bounds[k + 1]
        # gzip level 1: 3x faster than level 6 for files only ~13% bigger.
        with fs.open(f"{root}/{name}", "wb") as raw, (
            gziplib.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="", compresslevel=1)
            if gzip else nullcontext(raw)
        ) as sink:
            writer = pacsv.CSVWriter(sink, _schema(), write_options=_WRITE_OPTIONS)
            i = start
            while i < stop:
                c, lo = divmod(i, CHUNK_ROWS)
                if cached[0] != c:
                    cached = (c, _chunk(c, min(CHUNK_ROWS, rows - c * CHUNK_ROWS), p, m, seed))
                table, labels, entropy = cached[1]
                hi = min(len(labels), stop - c * CHUNK_ROWS)
                writer.write_table(table.slice(lo, hi - lo))
                positives += int(labels[lo:hi].sum())
                entropy_sum += float(entropy[lo:hi].sum())
                i += hi - lo
            writer.close()
        written.append({"name": name, "rows": stop - start})

    rate = positives / rows if rows else 0.0
    base = -(rate * np.log(rate) + (1 - rate) * np.log1p(-rate)) if 0 < rate < 1 else 0.0
    sidecar = {
        "generator": GENERATOR,
        "version": VERSION,
        "format": "criteo-kaggle-train-tsv",
        "seed": seed,
        "rows": rows,
        "num_files": files,
        "chunk_rows": CHUNK_ROWS,  # rows depend on it: part of what makes them reproducible
        "gzip": gzip,
        "files": written,
        "params": dataclasses.asdict(p),
        "vocab": m.vocab.tolist(),
        "bias": m.bias,
        "positive_rate": rate,
        "bayes_log_loss": entropy_sum / rows if rows else 0.0,
        "base_rate_log_loss": float(base),
    }
    text = json.dumps(sidecar, indent=2)
    with fs.open(f"{root}/synth.json", "w") as f:
        f.write(text)
    return json.loads(text)  # exactly what readers of synth.json will see


def planted_probabilities(sidecar: dict, keys: np.ndarray) -> np.ndarray:
    """The planted click probability p* of each row named by a `<file name>:<line>` key of the files this
    generator wrote (`sidecar`: their synth.json). Rows are regenerated chunk by chunk, features only."""
    p = CriteoParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in sidecar["params"].items()})
    m = plant(p, sidecar["rows"], sidecar["seed"])
    if m.bias != sidecar["bias"] or m.vocab.tolist() != sidecar["vocab"]:
        raise ValueError("the Criteo generator has changed since these files were written: cannot recompute p*")
    first_row, start = {}, 0
    for f in sidecar["files"]:
        first_row[f["name"]], start = start, start + f["rows"]
    sources, _, lines = np.strings.rpartition(np.asarray(keys, dtype="S"), b":")
    rows = np.array([first_row[s] for s in sources.astype(str).tolist()], np.int64) + lines.astype(np.int64) - 1
    probs = np.empty(len(rows))
    chunks = rows // CHUNK_ROWS
    for c in np.unique(chunks).tolist():
        n = min(CHUNK_ROWS, sidecar["rows"] - c * CHUNK_ROWS)
        ints, int_missing, ranks = _sample_features(np.random.default_rng([sidecar["seed"], _ROWS, c]), n, p, m.vocab)
        here = chunks == c
        probs[here] = _sigmoid(_logit(ints, int_missing, ranks, p, m))[rows[here] - c * CHUNK_ROWS]
    return probs

