"""Common Crawl WET/WARC files -> cleaned, deduplicated, tokenised, packed per-group shards.

Steps (each a Beam transform below):

1. `StageFiles`: one element per input file. Read it (`pipelines.warc`), keep
   the configured languages and apply the line and page rules
   (`pipelines.cleaning`), fingerprint what is left (`pipelines.dedup`) and
   stage it under `<output>/.staged/<file>.npz`; then `<output>/.done/<file>.json`
   records the file's counts. A rerun finds the marker and reuses the staged
   file instead of reading the input again.
2. `Deduplicate`: over the whole data set, before any group assignment (a
   near-duplicate in two groups would break the disjointness codistillation
   relies on): URLs, exact texts, near-duplicates (MinHash LSH clusters), then
   repeated lines. Fingerprint rows are hash-partitioned into buckets (only
   numpy blocks cross the shuffle, never one element per document or line).
3. `EncodeDocuments`: assign each kept document to eval / group / shard by the
   keyed hash of its WARC-Record-ID, encode it with sentencepiece (model loaded
   once per worker), append end-of-document, write per-shard token pieces.
4. `PackShards`: per shard, the documents in a deterministic order (input file,
   then position in it) as ONE token stream cut into rows of
   `sequence_length`; the shard's last row holds the tail, padded (`length` <
   L). Rows go to the shared sink (`pipelines.sinks.WriteDataset`); each shard's
   documents are listed in `<output>/documents/<shard path>.jsonl`.

Features (per row = one packed sequence): `key` bytes `<WARC-Record-ID>#<token
offset>` of the document the row starts in; `tokens` int32[L]; `length` int32
(real tokens); `text_bytes` int64 (UTF-8 bytes the real tokens decode to).

Accounting: documents read (records that are documents, plus quarantined
records) = documents kept + documents dropped by reason; the manifest's
`kept` holds the documents written, `rejected` every dropped or quarantined
document by reason; dropped lines are counted in `extra["lines_dropped"]`.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import io
import itertools
import json
import posixpath
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from codistill import storage
from codistill.config import DataConfig
from codistill.datasets.commoncrawl import CommonCrawlConfig
from codistill.dataset import join
from codistill.shards import Block, Feature, Schema
from codistill.storage import write_atomically
from pipelines import dedup, progress
from pipelines.cleaning import Cleaner
from pipelines.commoncrawl_inputs import input_paths, sample
from pipelines.commoncrawl_records import SAMPLE_CHARS, clean_file, dedup_prio, document_hash
from pipelines.commoncrawl_tokenizer import train_tokenizer
from pipelines.run import DatasetChecks, DatasetPipeline, ValueCheck
from pipelines.sharding import ShardLayout, partition
from pipelines.sinks import PIECES, Rejected, WriteDataset, layout_for, write_pieces
from pipelines.transient import retrying
from pipelines.warc import WebDocument
from pipelines.worker import WorkerDoFn
from tokenizer.encode import Tokenizer, load_tokenizer

STAGED, DONE = ".staged", ".done"
METRICS = "commoncrawl"

# Dedup reason codes (Fingerprints.dropped); 0 = kept.
DEDUP_REASONS = ("", "duplicate_url", "duplicate_document", "near_duplicate", "short_after_line_dedup")
KEPT, DUPLICATE_URL, DUPLICATE_DOCUMENT, NEAR_DUPLICATE, SHORT_AFTER_LINE_DEDUP = range(len(DEDUP_REASONS))


def schema(sequence_length: int) -> Schema:
    return {"key": Feature("bytes"), "tokens": Feature("int32", (sequence_length,)), "length": Feature("int32"),
            "text_bytes": Feature("int64")}


UNDATED = -(2**62)  # older than any real capture, and still negatable in int64


def capture_seconds(date: str) -> int:
    """WARC-Date as seconds since the epoch (unparseable: UNDATED, so any dated capture of the URL wins)."""
    try:
        return int(datetime.datetime.fromisoformat(date.replace("Z", "+00:00")).timestamp())
    except (ValueError, AttributeError, TypeError):
        return UNDATED


# --- 1. read, clean, fingerprint, stage ------------------------------------------------------------


def fingerprint_documents(index: int, documents: list[WebDocument], options: CommonCrawlConfig,
                          seed: int) -> dedup.Fingerprints:
    d = options.dedup
    prio = dedup_prio(np.array([document_hash(doc.key, seed) for doc in documents], np.uint64))
    dates = np.array([capture_seconds(doc.date) for doc in documents], np.int64)
    return dedup.fingerprint(index, [doc.text for doc in documents], [doc.url for doc in documents], dates, prio,
                             d.shingle_words, d.num_perm, dedup.lsh_params(d.near_threshold, d.num_perm))


def _strings(values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [v.encode("utf-8", "surrogatepass") for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8), offsets


def _unstrings(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = data.tobytes()
    return [raw[offsets[i]:offsets[i + 1]].decode("utf-8", "surrogatepass") for i in range(len(offsets) - 1)]


def write_staged(url: str, documents: list[WebDocument], fingerprints: dedup.Fingerprints) -> None:
    """Kept documents and their fingerprints as one `.npz` (numpy only, no pickle)."""
    arrays = dict(fingerprints.arrays())
    for name in ("key", "url", "date", "text"):
        arrays[f"{name}_data"], arrays[f"{name}_offsets"] = _strings([getattr(doc, name) for doc in documents])
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with storage.open(url, "wb", auto_mkdir=True) as f:
        f.write(buffer.getvalue())


def _load_staged(url: str):
    with storage.open(url, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)  # each array is decoded when first used


def read_staged(url: str, index: int) -> dedup.Fingerprints:
    z = _load_staged(url)
    return dedup.Fingerprints(index, **{name: z[name] for name in dedup.Fingerprints.__dataclass_fields__
                                        if name != "file"})


def read_staged_documents(url: str) -> dict[str, list[str]]:
    """The staged documents' keys, URLs and texts (what encoding needs; not their fingerprints or dates)."""
    z = _load_staged(url)
    return {name: _unstrings(z[f"{name}_data"], z[f"{name}_offsets"]) for name in ("key", "url", "text")}


def parameters_digest(data: DataConfig) -> str:
    """What a staged file depends on: a marker made with other settings is not reused."""
    options = data.recorded()["commoncrawl"]
    relevant = {"clean": options["clean"], "seed": data.seed,
                "dedup": {k: v for k, v in options["dedup"].items()
                          if k in ("num_perm", "shingle_words", "near_threshold")}}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


class StageFiles(WorkerDoFn):
    """(file index, path) -> (file index, Fingerprints); counts, samples and quarantined records aside."""

    def __init__(self, data: DataConfig):
        super().__init__()
        self.data = data
        self.digest = parameters_digest(data)

    def setup(self):
        super().setup()
        self.cleaner = Cleaner(self.data.commoncrawl.clean)

    def process(self, element):
        index, path = element
        source = posixpath.basename(path)
        staged, marker_url = join(self.data.output, f"{STAGED}/{source}.npz"), join(self.data.output,
                                                                                   f"{DONE}/{source}.json")
        size = _size(path)
        progress.report(found_bytes=size)  # the total grows as the workers find each input's size
        marker = self._marker(marker_url, size)
        if marker is None:
            marker, fingerprints = self._stage(index, path, size, staged)
            write_atomically(marker_url, json.dumps(marker, sort_keys=True))  # only after the staged file is whole
        else:
            Metrics.counter(METRICS, "files_resumed").inc()
            fingerprints = read_staged(staged, index)
        # Per file (a resumed one counts as read): the expensive part of a run is reading and cleaning.
        progress.report(parts=1, bytes=marker["input_bytes"], rows=marker["records"], part_bytes=marker["input_bytes"])
        yield index, fingerprints
        yield beam.pvalue.TaggedOutput("inputs", (source, marker["records"]))
        if marker["dropped"]:
            yield beam.pvalue.TaggedOutput("reject_counts", marker["dropped"])
        if marker["quarantined"]:
            yield beam.pvalue.TaggedOutput("rejected", [Rejected(**r) for r in marker["quarantined"]])
        yield beam.pvalue.TaggedOutput("facts", {"lines_dropped": marker["lines_dropped"],
                                                 "skipped_records": marker["skipped"]})
        for reason, found in marker["samples"].items():
            yield beam.pvalue.TaggedOutput("samples", (reason, [tuple(s) for s in found]))

    def _marker(self, url: str, input_bytes: int) -> dict | None:
        fs, fs_path = storage.url_to_fs(url)
        if not fs.exists(fs_path):
            return None
        with fs.open(fs_path, "r") as f:
            marker = json.load(f)
        if marker.get("parameters") != self.digest or marker.get("input_bytes") != input_bytes:
            return None  # made with other settings or from another file of the same name
        return marker

    def _stage(self, index: int, path: str, input_bytes: int, staged: str) -> tuple[dict, dedup.Fingerprints]:
        options = self.data.commoncrawl
        cleaned = clean_file(path, self.cleaner, self.data.seed, options.samples_per_reason)
        fingerprints = fingerprint_documents(index, cleaned.documents, options, self.data.seed)
        write_staged(staged, cleaned.documents, fingerprints)
        Metrics.counter(METRICS, "documents_read").inc(cleaned.records)
        for reason, n in cleaned.dropped.items():
            Metrics.counter(METRICS, f"dropped_{reason}").inc(n)
        for reason, n in cleaned.lines_dropped.items():
            Metrics.counter(METRICS, f"lines_dropped_{reason}").inc(n)
        for rejected in cleaned.quarantined:
            Metrics.counter(METRICS, f"quarantined_{rejected.reason}").inc()
        marker = {"input": path, "input_bytes": input_bytes, "parameters": self.digest,
                  "records": cleaned.records, "kept": len(cleaned.documents), "dropped": cleaned.dropped,
                  "lines_dropped": cleaned.lines_dropped, "skipped": cleaned.skipped,
                  "quarantined": [dataclasses.asdict(r) for r in cleaned.quarantined], "samples": cleaned.samples}
        return marker, fingerprints


# --- 2. deduplication over the whole data set ------------------------------------------------------


def _bucketed(rows: Block, buckets: int):
    """(bucket, rows) for each bucket present; all rows sharing `hash` land in one bucket."""
    for bucket, picked in partition((rows["hash"] % np.uint64(buckets)).astype(np.int64)):
        yield bucket, {name: column[picked] for name, column in rows.items()}


def _concat(blocks) -> Block:
    blocks = list(blocks)
    return {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}


def _by_file(gids: np.ndarray, reason: int):
    """(file index, (reason, document indices)) for dropped documents given by gid."""
    files = (gids >> np.uint64(32)).astype(np.int64)
    for file, picked in partition(files):
        yield file, (reason, (gids[picked] & np.uint64(0xFFFFFFFF)).astype(np.int64))


def url_rows(fp: dedup.Fingerprints) -> Block:
    alive = fp.dropped == KEPT
    return {"hash": fp.url_hash[alive], "date": fp.date[alive], "prio": fp.prio[alive], "gid": fp.gid[alive]}


def resolve_urls(rows: Block):
    yield from _by_file(rows["gid"][dedup.url_losers(rows["hash"], rows["date"], rows["prio"])], DUPLICATE_URL)


def text_rows(fp: dedup.Fingerprints) -> Block:
    alive = fp.dropped == KEPT
    return {"hash": fp.text_hash[alive], "prio": fp.prio[alive], "gid": fp.gid[alive]}


def resolve_texts(rows: Block):
    yield from _by_file(rows["gid"][dedup.exact_losers(rows["hash"], rows["prio"])], DUPLICATE_DOCUMENT)


def band_rows(fp: dedup.Fingerprints) -> Block:
    alive = np.flatnonzero(fp.dropped == KEPT)
    bands = fp.bands.shape[1]
    return {"hash": fp.bands[alive].T.reshape(-1), "prio": np.tile(fp.prio[alive], bands),
            "gid": np.tile(fp.gid[alive], bands)}


def band_edges(rows: Block):
    """Edges (document -> the lowest-prio document sharing a band hash with it), with both prios."""
    members, heads = dedup.band_edges(rows["hash"], rows["prio"], rows["gid"])
    if len(members):
        yield {"member": rows["gid"][members], "head": rows["gid"][heads], "member_prio": rows["prio"][members],
               "head_prio": rows["prio"][heads]}


def resolve_clusters(edges):
    edges = list(edges)
    if edges:
        e = _concat(edges)
        yield from _by_file(dedup.cluster_losers(e["member"], e["member_prio"], e["head"], e["head_prio"]),
                            NEAR_DUPLICATE)


def line_rows(fp: dedup.Fingerprints) -> Block:
    alive = (fp.dropped[fp.line_doc] == KEPT) & (fp.line_words > 0)  # blank lines are not deduplicated
    positions = np.flatnonzero(alive)
    return {"hash": fp.line_hash[positions], "doc_prio": fp.prio[fp.line_doc[positions]],
            "gid": fp.gid[fp.line_doc[positions]], "position": positions.astype(np.int64)}


def resolve_lines(rows: Block):
    losers = dedup.line_losers(rows["hash"], rows["doc_prio"], rows["gid"], rows["position"])
    files = (rows["gid"][losers] >> np.uint64(32)).astype(np.int64)
    for file, picked in partition(files):
        yield file, ("lines", rows["position"][losers][picked])


def apply_drops(fp: dedup.Fingerprints, drops: list, min_words: int) -> dedup.Fingerprints:
    """Mark one deduplication step's drops: documents (reason code, indices) or lines ("lines", positions);
    after lines, a page left with too few words is dropped. A step reads only the documents the earlier
    steps kept, so none is marked twice. Returns a new Fingerprints (Beam's inputs are not to be mutated)."""
    fp = dataclasses.replace(fp, dropped=fp.dropped.copy(), line_dropped=fp.line_dropped.copy())
    for reason, indices in drops:
        if reason == "lines":
            fp.line_dropped[indices] = True
        else:
            fp.dropped[indices] = reason
    if any(reason == "lines" for reason, _ in drops):
        left = np.bincount(fp.line_doc, weights=np.where(fp.line_dropped, 0, fp.line_words), minlength=len(fp.prio))
        fp.dropped[(fp.dropped == KEPT) & (left < min_words)] = SHORT_AFTER_LINE_DEDUP
    return fp


def dedup_steps(options: CommonCrawlConfig) -> list[tuple]:
    """(name, rows, resolve, combine) of each enabled deduplication step, in order."""
    d = options.dedup
    steps = [("Urls", d.urls, url_rows, resolve_urls, None), ("Exact", d.exact, text_rows, resolve_texts, None),
             ("Near", d.near, band_rows, band_edges, resolve_clusters),
             ("Lines", d.lines, line_rows, resolve_lines, None)]
    return [(name, rows, resolve, combine) for name, enabled, rows, resolve, combine in steps if enabled]


def deduplicate_in_memory(fingerprints: dict[int, dedup.Fingerprints],
                          options: CommonCrawlConfig) -> dict[int, dedup.Fingerprints]:
    """The `Deduplicate` transform's decisions in one process, all rows in one bucket (benchmark, tests)."""
    for _, rows, resolve, combine in dedup_steps(options):
        found = list(resolve(_concat(rows(fp) for fp in fingerprints.values())))
        drops = collections.defaultdict(list)
        for file, drop in (combine(found) if combine else found):
            drops[file].append(drop)
        fingerprints = {file: apply_drops(fp, drops[file], options.dedup.min_words)
                        for file, fp in fingerprints.items()}
    return fingerprints


class Resolve(beam.PTransform):
    """(file, Fingerprints) -> (file, Fingerprints) with one deduplication step's drops applied.

    `rows` turns a file's fingerprints into rows with a `hash` column; rows are
    bucketed by hash, each bucket is resolved on its own (`resolve` yields
    `(file, drops)`), or, with `combine`, bucket results (e.g. LSH edges) are
    gathered and resolved together (`combine` yields `(file, drops)`).
    """

    def __init__(self, rows, resolve, buckets: int, min_words: int, combine=None):
        super().__init__()
        self.rows, self.resolve, self.buckets, self.min_words, self.combine = rows, resolve, buckets, min_words, combine

    def expand(self, fingerprints):
        buckets = (fingerprints
                   | "Rows" >> beam.FlatMap(lambda item: _bucketed(self.rows(item[1]), self.buckets))
                   | "ByBucket" >> beam.GroupByKey()
                   | "Resolve" >> beam.FlatMap(lambda item: self.resolve(_concat(item[1]))))
        if self.combine is not None:
            buckets = (buckets
                       | "Gather" >> beam.combiners.ToList()
                       | "Combine" >> beam.FlatMap(self.combine))
        return ({"fingerprints": fingerprints, "drops": buckets}
                | "ByFile" >> beam.CoGroupByKey()
                | "Apply" >> beam.MapTuple(lambda file, joined: (file, apply_drops(
                    joined["fingerprints"][0], list(joined["drops"]), self.min_words))))


class Deduplicate(beam.PTransform):
    """URLs, then exact and near-duplicate documents, then repeated lines, over the whole data set."""

    def __init__(self, options: CommonCrawlConfig):
        super().__init__()
        self.options = options

    def expand(self, fingerprints):
        d = self.options.dedup
        for name, rows, resolve, combine in dedup_steps(self.options):
            fingerprints = fingerprints | name >> Resolve(rows, resolve, d.buckets, d.min_words, combine)
        return fingerprints


# --- 3. encode -----------------------------------------------------------------------------------


def final_texts(fp: dedup.Fingerprints, texts: list[str]) -> list[str]:
    """Kept documents' texts without their dropped lines."""
    if not fp.line_dropped.any():
        return [texts[i] for i in np.flatnonzero(fp.dropped == KEPT)]
    line_start = np.concatenate([[0], np.cumsum(np.bincount(fp.line_doc, minlength=len(texts)))])
    out = []
    for i in np.flatnonzero(fp.dropped == KEPT):
        lines = texts[i].split("\n")
        gone = fp.line_dropped[line_start[i]:line_start[i + 1]]
        out.append("\n".join(line for line, drop in zip(lines, gone) if not drop))
    return out


@dataclass(frozen=True)
class DocumentPiece:
    """Encoded documents of one input file for one destination, in file order."""

    order: int  # input file index
    url: str
    documents: int
    tokens: int


def encode_documents(tokenizer: Tokenizer, texts: list[str], batch_bytes: int = 1 << 22) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """(flat int32 tokens, int64 tokens per document), each document followed by end-of-document."""
    chunks, lengths, start = [], [], 0
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and (size < batch_bytes or end == start):
            size += len(texts[end])
            end += 1
        for ids in tokenizer.encode(texts[start:end]):
            ids.append(tokenizer.eod_id)
            chunks.append(ids)
            lengths.append(len(ids))
        start = end
    lengths = np.array(lengths, np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(chunks), np.int32, count=int(lengths.sum()))
    return flat, lengths


class EncodeDocuments(WorkerDoFn):
    """(file, deduplicated Fingerprints) -> (destination, DocumentPiece); counts and samples aside."""

    def __init__(self, data: DataConfig, layout: ShardLayout, sources: list[str], tokenizer_url: str,
                 synth_documents: bool):
        super().__init__()
        self.data, self.layout, self.sources = data, layout, sources
        self.tokenizer_url, self.synth_documents = tokenizer_url, synth_documents

    def setup(self):
        super().setup()
        self.tokenizer = load_tokenizer(self.tokenizer_url)

    def process(self, element):
        index, fp = element
        data = self.data
        source = self.sources[index]
        staged = read_staged_documents(join(data.output, f"{STAGED}/{source}.npz"))
        kept = np.flatnonzero(fp.dropped == KEPT)
        texts, keys, urls = final_texts(fp, staged["text"]), [staged["key"][i] for i in kept], [
            staged["url"][i] for i in kept]
        yield from self._dropped(fp, staged, source)
        dest = self.layout.assign(np.array([document_hash(k, data.seed) for k in keys], np.uint64))
        facts = {"lines_dropped": {"repeated_line": int(fp.line_dropped.sum())},
                 "documents": collections.Counter(), "tokens": collections.Counter()}
        eval_keys = []
        for d, rows in partition(dest):
            tokens, lengths = encode_documents(self.tokenizer, [texts[i] for i in rows])
            url = join(data.output, f"{PIECES}/documents/{d:05d}/{source}.npz")
            buffer = io.BytesIO()
            np.savez(buffer, tokens=tokens, lengths=lengths, keys=np.array([keys[i].encode() for i in rows], "S"),
                     urls=np.array([urls[i].encode() for i in rows], "S"))
            with storage.open(url, "wb", auto_mkdir=True) as f:
                f.write(buffer.getvalue())
            split = self.layout.describe(d)[0]
            facts["documents"][split] += len(rows)
            facts["tokens"][split] += len(tokens)
            if split == "eval" and self.synth_documents:
                eval_keys += [keys[i] for i in rows]
            yield d, DocumentPiece(index, url, len(rows), len(tokens))
        Metrics.counter(METRICS, "documents_kept").inc(len(keys))
        yield beam.pvalue.TaggedOutput("kept", len(keys))
        yield beam.pvalue.TaggedOutput("facts", {k: dict(v) for k, v in facts.items()})
        if eval_keys:
            yield beam.pvalue.TaggedOutput("eval_keys", eval_keys)

    def _dropped(self, fp: dedup.Fingerprints, staged: dict, source: str):
        counts = collections.Counter(DEDUP_REASONS[r] for r in fp.dropped[fp.dropped != KEPT].tolist())
        for reason, n in counts.items():
            Metrics.counter(METRICS, f"dropped_{reason}").inc(n)
        Metrics.counter(METRICS, "lines_dropped_repeated_line").inc(int(fp.line_dropped.sum()))
        if counts:
            yield beam.pvalue.TaggedOutput("reject_counts", dict(counts))
        k = self.data.commoncrawl.samples_per_reason
        for code in range(1, len(DEDUP_REASONS)):
            picked = np.flatnonzero(fp.dropped == code)
            if k and len(picked):
                picked = picked[np.argsort(fp.prio[picked], kind="stable")[:k]]
                yield beam.pvalue.TaggedOutput("samples", (DEDUP_REASONS[code], [
                    (int(fp.prio[i]), {"reason": DEDUP_REASONS[code], "key": staged["key"][i],
                                       "url": staged["url"][i], "source": source,
                                       "text": staged["text"][i][:SAMPLE_CHARS]}) for i in picked]))


# --- 4. pack -------------------------------------------------------------------------------------


def pack_stream(pieces, length: int, pad_id: int, piece_bytes: np.ndarray, rows_per_block: int = 1 << 14):
    """Blocks of packed rows from (tokens, tokens per document, document keys) in stream order.

    Rows are consecutive, non-overlapping windows of the one stream; the last row holds the tail (fewer
    than `length` tokens, the rest `pad_id`).
    """
    carry, carry_key = np.zeros(0, np.int32), None
    for tokens, lengths, keys in pieces:
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        stream = np.concatenate([carry, tokens])
        rows = len(stream) // length
        positions = np.arange(rows + 1) * length - len(carry)  # row starts in this piece's tokens
        inside = (positions >= 0) & (positions < len(tokens))
        docs = np.searchsorted(starts, positions[inside], side="right") - 1
        offsets = positions[inside] - starts[docs]
        row_keys = np.full(len(positions), None, object)
        row_keys[inside] = [f"{keys[d].decode()}#{o}" for d, o in zip(docs.tolist(), offsets.tolist())]
        if positions[0] < 0:
            row_keys[0] = carry_key
        for first in range(0, rows, rows_per_block):
            last = min(rows, first + rows_per_block)
            block = stream[first * length:last * length].reshape(-1, length)
            yield _rows(block, row_keys[first:last], np.full(last - first, length, np.int32), piece_bytes)
        carry, carry_key = stream[rows * length:], row_keys[rows]
    if len(carry):
        row = np.full((1, length), pad_id, np.int32)
        row[0, :len(carry)] = carry
        yield _rows(row, [carry_key], np.array([len(carry)], np.int32), piece_bytes)


def _rows(tokens: np.ndarray, keys, lengths: np.ndarray, piece_bytes: np.ndarray) -> Block:
    # Padding and end-of-document are control pieces: 0 bytes.
    return {"key": np.array([k.encode() for k in keys], "S"), "tokens": tokens, "length": lengths,
            "text_bytes": piece_bytes[tokens].sum(axis=1).astype(np.int64)}


class PackShards(WorkerDoFn):
    """(destination, [DocumentPiece]) -> (destination, Piece) of packed rows for the shared sink.

    Also writes `<output>/documents/<shard path>.jsonl`: each document of the shard, in stream order, with
    the row and position in it where it starts and its token count (end-of-document included).
    """

    def __init__(self, output: str, layout: ShardLayout, schema: Schema, tokenizer_url: str, sequence_length: int):
        super().__init__()
        self.output, self.layout, self.schema = output, layout, schema
        self.tokenizer_url, self.length = tokenizer_url, sequence_length

    def setup(self):
        super().setup()
        self.tokenizer = load_tokenizer(self.tokenizer_url)

    def process(self, element):
        dest, pieces = element
        pieces = sorted(pieces, key=lambda p: p.order)

        index, position = [], 0

        def read():
            nonlocal position
            for piece in pieces:
                with storage.open(piece.url, "rb") as f:
                    z = np.load(io.BytesIO(f.read()), allow_pickle=False)
                starts = position + np.concatenate([[0], np.cumsum(z["lengths"])[:-1]])
                for key, url, start, size in zip(z["keys"].tolist(), z["urls"].tolist(), starts.tolist(),
                                                 z["lengths"].tolist()):
                    index.append(json.dumps({"key": key.decode(), "url": url.decode(), "row": start // self.length,
                                             "position": start % self.length, "tokens": size}) + "\n")
                position += int(z["lengths"].sum())
                yield z["tokens"], z["lengths"], z["keys"]

        rows = tail = pad = 0
        for part, block in enumerate(pack_stream(read(), self.length, self.tokenizer.pad_id,
                                                 self.tokenizer.piece_bytes)):
            rows += len(block["key"])
            short = block["length"] < self.length
            tail += int(short.sum())
            pad += int((self.length - block["length"][short]).sum())
            yield from write_pieces(self.output, self.schema, (dest, part), {dest: [block]})
        write_atomically(join(self.output, f"documents/{self.layout.relative_path(dest)}.jsonl"), "".join(index))
        for piece in pieces:
            fs, path = storage.url_to_fs(piece.url)
            fs.rm(path)
        yield beam.pvalue.TaggedOutput("facts", {"packing": {"rows": rows, "tail_rows": tail, "pad_tokens": pad}})


# --- manifest facts and samples ----------------------------------------------------------------------


class WriteSamples(WorkerDoFn):
    """(reason, [[(prio, sample)]]) -> `rejected/samples/<reason>.jsonl`, the k lowest-prio dropped documents."""

    def __init__(self, output: str, k: int):
        super().__init__()
        self.output, self.k = output, k

    def process(self, element):
        reason, found = element
        chosen = sorted((s for batch in found for s in batch), key=lambda s: (s[0], s[1]["key"]))[:self.k]
        write_atomically(join(self.output, f"rejected/samples/{reason}.jsonl"),
                         "".join(json.dumps(s, ensure_ascii=False, sort_keys=True) + "\n" for _, s in chosen))


def eval_floor(eval_keys: list[list[str]], documents: dict) -> dict:
    """The generator's Bayes floor (bits per byte) over the eval documents this dataset kept."""
    keys = [k for batch in eval_keys for k in batch if documents.get(k, {}).get("bits") is not None]
    bits = sum(documents[k]["bits"] for k in keys)
    end_bits = sum(documents[k]["end_bits"] or 0 for k in keys)
    size = sum(documents[k]["bytes"] for k in keys)
    return {"floor": {"metric": "bits_per_byte", "value": bits / max(1, size),
                      "value_with_end": (bits + end_bits) / max(1, size), "documents": len(keys), "bits": bits,
                      "bytes": size}}


class CommonCrawlToShards(beam.PTransform):
    """WET/WARC files -> `<output>` with packed token shards, `rejected/` and `manifest.json`.

    Without a tokenizer (argument or `data.commoncrawl.tokenizer`), one is trained first on a keyed-hash sample of
    `tokenizer_sample_files` inputs, on the pipeline's runner, into `<output>/tokenizer/spm.model`; a resumed run
    keeps the one it trained."""

    def __init__(self, paths: list[str], data: DataConfig, extra: dict | None = None, tokenizer: str | None = None):
        super().__init__()
        self.paths, self.data, self.extra = paths, data, dict(extra or {})
        self.tokenizer = tokenizer or data.commoncrawl.tokenizer

    def expand(self, pbegin):
        data, options = self.data, self.data.commoncrawl
        layout, features = layout_for(data), schema(options.sequence_length)
        tokenizer_url = self.tokenizer or self._trained_tokenizer(pbegin.pipeline.options)
        tokenizer = load_tokenizer(tokenizer_url)
        extra = {**self.extra, "tokenizer": tokenizer.manifest_entry(tokenizer_url)}
        # The inputs' sizes come from the workers: one request per input on the driver would hold a full crawl's
        # paths file (~90k inputs) for hours before the pipeline starts.
        progress.expect(parts=len(self.paths), bytes=0)
        documents = None
        if "synth" in extra:  # the per-document and per-line tables stay in raw/synth.json
            documents = extra["synth"]["documents"]
            extra["synth"] = {k: v for k, v in extra["synth"].items() if k not in ("documents", "repeated_lines")}
        staged = (pbegin
                  | "Files" >> beam.Create(list(enumerate(self.paths)))
                  | "Spread" >> beam.Reshuffle()
                  | "Stage" >> beam.ParDo(StageFiles(data)).with_outputs(
                      "inputs", "reject_counts", "rejected", "facts", "samples", main="fingerprints"))
        encode = EncodeDocuments(data, layout, [posixpath.basename(p) for p in self.paths], tokenizer_url,
                                 documents is not None)
        encoded = (staged.fingerprints
                   | "Deduplicate" >> Deduplicate(options)
                   | "Encode" >> beam.ParDo(encode).with_outputs("kept", "reject_counts", "facts", "samples",
                                                                  "eval_keys", main="pieces"))
        packed = (encoded.pieces
                  | "ByShard" >> beam.GroupByKey()
                  | "Pack" >> beam.ParDo(PackShards(data.output, layout, features, tokenizer_url,
                                                    options.sequence_length)).with_outputs("facts", main="pieces"))
        _ = ((staged.samples, encoded.samples)
             | "AllSamples" >> beam.Flatten()
             | "SamplesByReason" >> beam.GroupByKey()
             | "WriteSamples" >> beam.ParDo(WriteSamples(data.output, options.samples_per_reason)))
        datasets = {"pieces": packed.pieces, "rejected": staged.rejected, "inputs": staged.inputs,
                    "reject_counts": (staged.reject_counts, encoded.reject_counts) | "AllDropped" >> beam.Flatten(),
                    "kept": encoded.kept,
                    "stats": (staged.facts, encoded.facts, packed.facts) | "AllFacts" >> beam.Flatten()}
        if documents is not None:
            datasets["extra"] = (encoded.eval_keys
                                 | "EvalKeys" >> beam.combiners.ToList()
                                 | "Floor" >> beam.Map(eval_floor, documents))
        parameters = {"input": self.paths, **data.recorded()}
        return datasets | WriteDataset(
            output=data.output, layout=layout, schema=features, fmt=data.format, block_rows=data.block_rows,
            parameters=parameters, extra=extra, tokenizer_sha256=tokenizer.sha256)

    def _trained_tokenizer(self, beam_options) -> str:
        url, options = join(self.data.output, "tokenizer/spm.model"), self.data.commoncrawl
        # An output holding a model is a resumed one (`preprocess` starts only in an empty or new output).
        files = sample(self.paths, options.tokenizer_sample_files, self.data.seed)
        train_tokenizer(files, url, options.vocab_size, options.tokenizer_type, options.tokenizer_sample_docs,
                        options.clean, self.data.seed, beam_options, reuse=True, progress=progress.say)
        return url


def _size(url: str) -> int:
    fs, path = storage.url_to_fs(url)
    return retrying(lambda: fs.size(path), url)


def _generate(raw: str, synth) -> tuple[str, dict]:
    from pipelines.synth_commoncrawl import generate_commoncrawl

    sidecar = generate_commoncrawl(raw, synth.docs, files=synth.files, seed=synth.seed)
    return join(raw, "*.warc.wet.gz"), sidecar


def dataset_checks(manifest) -> DatasetChecks:
    """Token ids within the vocabulary, lengths within the row; keys `<WARC-Record-ID>#<token offset>`, assigned
    by the keyed hash of the record id."""
    vocab, seed = manifest.extra["tokenizer"]["vocab_size"], manifest.settings.seed
    length = manifest.features["tokens"].shape[0]

    def key_hashes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        documents, sep, offsets = np.strings.rpartition(keys, b"#")
        valid = (sep == b"#") & np.strings.isdigit(offsets) & (np.strings.str_len(documents) > 0)
        hashes = np.array([document_hash(d.decode("utf-8", "replace"), seed) if ok else 0
                           for d, ok in zip(documents.tolist(), valid.tolist())], np.uint64)
        return hashes, valid

    return DatasetChecks(values=(
        ValueCheck("tokens", lambda v: ((v >= 0) & (v < vocab)).all(axis=1), f"token ids in [0, {vocab})"),
        ValueCheck("length", lambda v: (v >= 1) & (v <= length), f"lengths in [1, {length}]"),
        ValueCheck("text_bytes", lambda v: v >= 0, "text byte counts >= 0"),
    ), key_hashes=key_hashes)


def describe_synth(sidecar: dict, out: str) -> str:
    kinds = ", ".join(f"{v} {k}" for k, v in sidecar["counts"]["kinds"].items())
    floor = sidecar["floor"]
    return (f"wrote {sidecar['docs']} records in {sidecar['num_files']} file(s) to {out}: {kinds}; Bayes floor over "
            f"the clean documents {floor['value']:.4f} bits per byte ({floor['bytes']} bytes of planted text)")


def describe(manifest) -> list[str]:
    floor = manifest.extra.get("floor")
    if not floor:
        return []
    return [f"generated data: Bayes floor over the eval documents {floor['value']:.4f} {floor['metric']}"]


PIPELINE = DatasetPipeline(
    transform=lambda source, data, extra: CommonCrawlToShards(input_paths(source, data.commoncrawl, data.seed), data,
                                                              extra),
    generate=_generate, describe_synth=describe_synth, describe=describe, checks=dataset_checks)
