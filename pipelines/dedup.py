"""Fingerprints of web documents and the decisions of whole-data-set deduplication, in numpy.

Nothing here knows Beam: the pipeline hash-partitions the fingerprint rows of
all files into buckets and calls the same `*_losers` functions per bucket
that a single-process loop calls on everything at once.

Hashing is vectorised over a whole block of documents: words and lines are
byte spans of the block's UTF-8 text, hashed with a polynomial hash computed
from prefix sums (one numpy pass, no Python loop per word). MinHash uses
multiply-shift hashing of the 64-bit shingle hashes, `num_perm` at a time, and
LSH bands of the signature: measured against datasketch 2.0.0 in
`bench/commoncrawl_preprocess.py` (datasketch hashes shingle by shingle in
Python).

Which copy of a duplicate is kept is decided by `prio`, a keyed hash of the
WARC-Record-ID (lowest wins), so the choice is deterministic and independent
of input order, runner and bucket count.
"""

from __future__ import annotations

import functools
import hashlib
import urllib.parse
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipelines.sharding import mix64

_P = np.uint64(0x100000001B3)  # odd multiplier of the polynomial hash (FNV's prime)
_P_INVERSE = np.uint64(pow(int(_P), -1, 2**64))
_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True
_SALT_SHINGLE = np.uint64(0x2545F4914F6CDD1D)
_SALT_LINE_CHOICE = np.uint64(0x9FB21C651E98DF25)


def normalize_url(url: str) -> str:
    """Lower-case scheme and host, no `www.`, default port, fragment or trailing slash; query keys sorted."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        host = (parts.hostname or "").removeprefix("www.")
        port = parts.port
    except ValueError:  # a malformed URL is its own normal form
        return url.strip()
    scheme = parts.scheme.lower()
    if port and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    query = urllib.parse.urlencode(sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True)))
    path = parts.path.rstrip("/") or "/"
    return urllib.parse.urlunsplit(("http" if scheme == "https" else scheme, host, path, query, ""))


def span_hashes(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """64-bit hashes of the byte spans data[starts[i]:ends[i]] (bytes widened to uint64), all at once.

    h = sum_j data[s + j] * P^j mod 2^64, from prefix sums of data[i] * P^i divided
    by P^s (P is odd, so invertible mod 2^64); then the length and an avalanche mix.
    """
    n = len(data)
    powers, inverse = _power_tables(n + 1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(n + 1, np.uint64)
        np.cumsum(data * powers[:n], out=prefix[1:])
        poly = (prefix[ends] - prefix[starts]) * inverse[starts]
        return mix64(poly ^ mix64(ends - starts))


_POWERS = (np.ones(1, np.uint64), np.ones(1, np.uint64))


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^i and P^-i mod 2^64 for i < n, computed once per process and grown when needed."""
    global _POWERS
    if len(_POWERS[0]) < n:
        size = max(n, 2 * len(_POWERS[0]))
        tables = []
        for base in (_P, _P_INVERSE):
            table = np.full(size, base, np.uint64)
            table[0] = 1
            with np.errstate(over="ignore"):
                np.cumprod(table, out=table)
            tables.append(table)
        _POWERS = tuple(tables)
    return _POWERS


def word_spans(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the maximal runs of non-whitespace bytes (ASCII whitespace separates words)."""
    space = np.concatenate([[True], _WHITESPACE[data], [True]])
    edges = np.flatnonzero(space[1:] != space[:-1])
    return edges[0::2], edges[1::2]


@dataclass(frozen=True)
class LSHParams:
    bands: int
    rows: int


@functools.cache
def lsh_params(threshold: float, num_perm: int) -> LSHParams:
    """Bands x rows minimising false positives below and false negatives above the threshold (equal
    weights), as datasketch's MinHashLSH chooses them."""
    best, best_error = None, np.inf
    below, above = np.linspace(0.0, threshold, 200), np.linspace(threshold, 1.0, 200)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_positive = np.trapezoid(1 - (1 - below**rows) ** bands, below)
            false_negative = np.trapezoid((1 - above**rows) ** bands, above)
            if false_positive + false_negative < best_error:
                best, best_error = LSHParams(bands, rows), false_positive + false_negative
    return best


def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(0x5EED))  # fixed: signatures must not depend on the data seed
    a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    return a, b


def minhash_signatures(shingles: np.ndarray, doc_of: np.ndarray, docs: int, num_perm: int,
                       chunk: int = 1 << 14) -> np.ndarray:
    """uint32[docs, num_perm]: per document, the minimum over its shingle hashes of num_perm multiply-shift
    hashes (a document without shingles: all 2^32-1). Shingles of a document are contiguous.

    Permutation-major blocks (num_perm x chunk) keep the reduction over each document's shingles on
    contiguous memory: ~25x faster than shingle-major.
    """
    a, b = _permutations(num_perm)
    signature = np.full((num_perm, docs), np.iinfo(np.uint32).max, np.uint64)
    block = np.empty((num_perm, chunk), np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, len(shingles), chunk):
            values = shingles[start:start + chunk]
            out = block[:, :len(values)]
            np.multiply(a[:, None], values[None, :], out=out)
            out += b[:, None]
            out >>= np.uint64(32)
            owner = doc_of[start:start + chunk]
            firsts = np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1]]))
            owners = owner[firsts]
            signature[:, owners] = np.minimum(signature[:, owners], np.minimum.reduceat(out, firsts, axis=1))
    return signature.T.astype(np.uint32)


def band_hashes(signature: np.ndarray, params: LSHParams) -> np.ndarray:
    """uint64[docs, bands]: a hash of each band of rows; equal band hash = LSH candidate pair."""
    used = signature[:, :params.bands * params.rows].astype(np.uint64)
    bands = used.reshape(len(signature), params.bands, params.rows)
    weights = mix64(np.arange(1, params.rows + 1, dtype=np.uint64))
    with np.errstate(over="ignore"):
        return mix64((bands * weights).sum(axis=2, dtype=np.uint64) + np.arange(params.bands, dtype=np.uint64))


@dataclass
class Fingerprints:
    """Dedup facts of one input file's cleaned documents (`file` = its index among the inputs).

    `dropped` holds a reason code per document (0 = kept), `line_dropped` a flag per line;
    the deduplication steps fill them in.
    """

    file: int
    prio: np.ndarray  # uint64[docs]
    url_hash: np.ndarray  # uint64[docs]
    date: np.ndarray  # int64[docs], seconds since the epoch (capture time)
    text_hash: np.ndarray  # uint64[docs]
    bands: np.ndarray  # uint64[docs, bands]
    line_doc: np.ndarray  # int32[lines]: the document of each line
    line_hash: np.ndarray  # uint64[lines]
    line_words: np.ndarray  # int32[lines]
    dropped: np.ndarray  # uint8[docs]
    line_dropped: np.ndarray  # bool[lines]

    @property
    def gid(self) -> np.ndarray:
        """Document ids unique over the data set: file index in the high 32 bits."""
        return (np.uint64(self.file) << np.uint64(32)) | np.arange(len(self.prio), dtype=np.uint64)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in vars(self).items() if k != "file"}


def fingerprint(file: int, texts: list[str], urls: list[str], dates: np.ndarray, prio: np.ndarray,
                shingle_words: int, num_perm: int, params: LSHParams, chunk_bytes: int = 1 << 20) -> Fingerprints:
    """Hashes of the documents, their lines and their word shingles (lower-cased): numpy passes over chunks of
    about `chunk_bytes` of text (memory stays bounded whatever the file's size)."""
    url_hash = np.array([int.from_bytes(_blake(normalize_url(u)), "little") for u in urls], np.uint64)
    parts, start = [], 0
    sizes = np.cumsum([len(t) for t in texts])
    while start < len(texts):
        end = max(start + 1, int(np.searchsorted(sizes, (sizes[start - 1] if start else 0) + chunk_bytes)))
        parts.append(_fingerprint_chunk(texts[start:end], prio[start:end], shingle_words, num_perm, params))
        start = end
    text_hash, bands, line_doc, line_hash, line_words = (
        [np.concatenate([p[i] for p in parts]) for i in range(5)] if parts else
        [np.zeros(0, np.uint64), np.zeros((0, params.bands), np.uint64), np.zeros(0, np.int32),
         np.zeros(0, np.uint64), np.zeros(0, np.int32)])
    first_doc = np.cumsum([0] + [len(p[0]) for p in parts])[:-1]
    line_doc = line_doc + np.repeat(first_doc, [len(p[2]) for p in parts]).astype(np.int32)
    docs = len(texts)
    return Fingerprints(file, prio, url_hash, dates, text_hash, bands, line_doc, line_hash, line_words,
                        np.zeros(docs, np.uint8), np.zeros(len(line_doc), bool))


def _fingerprint_chunk(texts: list[str], prio: np.ndarray, shingle_words: int, num_perm: int,
                       params: LSHParams) -> tuple[np.ndarray, ...]:
    """(text_hash, bands, line_doc, line_hash, line_words) of some documents (line_doc counted from 0)."""
    docs = len(texts)
    joined = "\n".join(texts)
    raw, lower = joined.encode(), joined.lower().encode()
    # Documents are joined by "\n", so every document is a run of lines: split lines once for all.
    data, lower_data = np.frombuffer(raw, np.uint8), np.frombuffer(lower, np.uint8)
    wide, lower_wide = data.astype(np.uint64), lower_data.astype(np.uint64)
    newlines = np.flatnonzero(data == 10)
    line_starts = np.concatenate([[0], newlines + 1])
    line_ends = np.concatenate([newlines, [len(data)]])
    lines_per_doc = np.array([t.count("\n") + 1 for t in texts], np.int64)
    line_doc = np.repeat(np.arange(docs, dtype=np.int32), lines_per_doc)
    line_hash = span_hashes(wide, line_starts, line_ends)

    word_starts, word_ends = word_spans(lower_data)
    # lower() can change byte lengths (rarely); words are located in the lower-cased bytes, so map them
    # to documents through the lower-cased text's own line starts.
    lower_newlines = np.flatnonzero(lower_data == 10)
    word_line = np.searchsorted(lower_newlines, word_starts)
    line_words = np.bincount(word_line, minlength=len(line_starts)).astype(np.int32)
    word_doc = line_doc[word_line]
    word_hash = span_hashes(lower_wide, word_starts, word_ends)
    shingles, shingle_doc = _shingles(word_hash, word_doc, docs, shingle_words)
    doc_words = np.bincount(word_doc, minlength=docs)
    # Normalised text: the lower-cased words, whitespace collapsed.
    text_hash = _sequence_hash(word_hash, word_doc, docs, doc_words)
    bands = band_hashes(minhash_signatures(shingles, shingle_doc, docs, num_perm), params)
    # A document without words has no shingles: give it bands of its own, not the shared empty signature's.
    wordless = doc_words == 0
    bands[wordless] = mix64(prio[wordless, None] + np.arange(params.bands, dtype=np.uint64) + _SALT_SHINGLE)
    return text_hash, bands, line_doc, line_hash, line_words


def _blake(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def _shingles(word_hash: np.ndarray, word_doc: np.ndarray, docs: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every k consecutive words within a document (a document of fewer words: one shingle)."""
    n = len(word_hash)
    doc_start = np.searchsorted(word_doc, np.arange(docs))
    doc_end = np.searchsorted(word_doc, np.arange(docs), side="right")
    ends = doc_end[word_doc]  # end of each word's document
    starts_ok = (np.arange(n) + k <= ends) | ((np.arange(n) == doc_start[word_doc]) & (ends - doc_start[word_doc] < k))
    first = np.flatnonzero(starts_ok)
    total = np.zeros(len(first), np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            position = first + j
            inside = position < ends[first]
            salted = mix64(word_hash[np.minimum(position, n - 1)] + np.uint64(j) * _SALT_SHINGLE)
            total += np.where(inside, salted, np.uint64(0))
    return mix64(total), word_doc[first]


def _sequence_hash(word_hash: np.ndarray, word_doc: np.ndarray, docs: int, doc_words: np.ndarray) -> np.ndarray:
    """An order-sensitive hash of each document's word sequence."""
    position = np.arange(len(word_hash)) - np.searchsorted(word_doc, word_doc)
    with np.errstate(over="ignore"):
        terms = mix64(word_hash ^ mix64(position.astype(np.uint64)))
        total = np.zeros(docs, np.uint64)
        np.add.at(total, word_doc, terms)
        return mix64(total ^ doc_words.astype(np.uint64))


# --- decisions ---------------------------------------------------------------------------------
# Each takes the rows of one bucket (all rows sharing a hash are in the same bucket) and returns
# which rows lose.


def url_losers(url_hash: np.ndarray, date: np.ndarray, prio: np.ndarray) -> np.ndarray:
    """Mask of captures that are not the newest of their URL (ties: lowest prio wins)."""
    order = np.lexsort((prio, -date, url_hash))
    return _not_first(url_hash, order)


def exact_losers(text_hash: np.ndarray, prio: np.ndarray) -> np.ndarray:
    """Mask of documents with the same normalised text as one of lower prio."""
    return _not_first(text_hash, np.lexsort((prio, text_hash)))


def _not_first(key: np.ndarray, order: np.ndarray) -> np.ndarray:
    ordered = key[order]
    later = np.concatenate([[False], ordered[1:] == ordered[:-1]])
    losers = np.zeros(len(key), bool)
    losers[order[later]] = True
    return losers


def band_edges(band_key: np.ndarray, prio: np.ndarray, gid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (member, head): every row sharing its band hash with a lower-prio row, and the lowest-prio
    row of that band hash."""
    order = np.lexsort((gid, prio, band_key))
    ordered = band_key[order]
    head = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    head_of = np.repeat(head, np.diff(np.concatenate([head, [len(order)]])))
    member = np.arange(len(order)) != head_of
    return order[member], order[head_of[member]]


def cluster_losers(member: np.ndarray, member_prio: np.ndarray, head: np.ndarray,
                   head_prio: np.ndarray) -> np.ndarray:
    """gids of every document of an LSH cluster (documents connected through shared band hashes) but its
    lowest-prio one. The edges (member -> head) come from `band_edges` of every bucket."""
    gids = np.concatenate([member, head])
    nodes, first, index = np.unique(gids, return_index=True, return_inverse=True)
    if not len(nodes):
        return nodes
    edges = len(member)
    graph = coo_matrix((np.ones(edges, np.int8), (index[:edges], index[edges:])), shape=(len(nodes), len(nodes)))
    _, label = connected_components(graph, directed=False)
    prio = np.concatenate([member_prio, head_prio])[first]
    return nodes[_not_first(label, np.lexsort((nodes, prio, label)))]


def line_losers(line_hash: np.ndarray, doc_prio: np.ndarray, gid: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Mask of line occurrences that are not the one kept: each distinct line survives once, in the document
    its keyed choice picks (first occurrence there); every other occurrence anywhere is dropped."""
    with np.errstate(over="ignore"):
        choice = mix64(line_hash ^ doc_prio ^ _SALT_LINE_CHOICE)
    order = np.lexsort((position, gid, choice, line_hash))
    return _not_first(line_hash, order)
