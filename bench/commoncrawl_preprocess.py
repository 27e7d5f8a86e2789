"""Common Crawl preprocessing: the Beam pipeline vs a plain single-process loop, same run, same data.

    .venv/bin/python bench/commoncrawl_preprocess.py [--docs 4000] [--files 4] [--workdir DIR]

Figures, all in this one run on generated WET files:

* MB of WET text (the conversion records' payloads) per second for the Beam
  pipeline (FnApiRunner, one worker) and for a plain loop doing the same read,
  clean, dedup (all four steps), encode, pack and write with the same functions
  but no Beam; wall time and CPU time of this process (the in-process runner
  runs its worker here), so "per core" holds on a loaded machine too. The
  shards of both are compared byte for byte.
* sentencepiece batch encoding of the cleaned text alone: the ceiling.
* MinHash signatures + LSH candidates: this project's numpy implementation vs
  datasketch 2.0.0 (MinHash.update_batch + MinHashLSH), documents per second.
* WARC with HTML extraction (the real CC-MAIN-2020-34 sample from
  ../shared/data, read repeatedly): response pages per second.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import apache_beam as beam
import numpy as np

from codistill.config import DataConfig
from codistill.datasets.commoncrawl import CommonCrawlConfig, DedupConfig
from codistill.dataset import join, load_manifest
from pipelines import commoncrawl as cc
from pipelines.cleaning import Cleaner
from pipelines.dedup import lsh_params
from pipelines.formats import rebatch, write_shard
from pipelines.run import pipeline_options
from pipelines.sharding import partition
from pipelines.sinks import layout_for
from pipelines.synth_commoncrawl import generate_commoncrawl
from pipelines.textfiles import expand_inputs
from pipelines.warc import WebDocument, read_web_documents
from tokenizer.encode import load_tokenizer
from pipelines.commoncrawl_tokenizer import train_tokenizer

from harness import Clock

REAL_WARC = Path(__file__).resolve().parents[2] / "shared/data/commoncrawl/resiliparse_CC-MAIN-2020-34_warcfile.warc.gz"


def plain_loop(paths: list[str], data: DataConfig, tokenizer_url: str) -> dict[str, str]:
    """The pipeline's work, file after file in one process: the same functions, no Beam."""
    options, layout = data.commoncrawl, layout_for(data)
    tokenizer, cleaner = load_tokenizer(tokenizer_url), Cleaner(options.clean)
    documents, fingerprints = {}, {}
    for index, path in enumerate(paths):
        cleaned = cc.clean_file(path, cleaner, data.seed, options.samples_per_reason)
        documents[index] = cleaned.documents
        fingerprints[index] = cc.fingerprint_documents(index, cleaned.documents, options, data.seed)
    fingerprints = cc.deduplicate_in_memory(fingerprints, options)
    streams = collections.defaultdict(list)
    for index, fp in fingerprints.items():
        kept = np.flatnonzero(fp.dropped == cc.KEPT)
        texts = cc.final_texts(fp, [d.text for d in documents[index]])
        keys = [documents[index][i].key for i in kept]
        dest = layout.assign(np.array([cc.document_hash(k, data.seed) for k in keys], np.uint64))
        for d, rows in partition(dest):
            tokens, lengths = cc.encode_documents(tokenizer, [texts[i] for i in rows])
            streams[d].append((tokens, lengths, np.array([keys[i].encode() for i in rows], "S")))
    hashes, features = {}, cc.schema(options.sequence_length)
    for dest in range(layout.destinations):
        blocks = list(cc.pack_stream(streams[dest], options.sequence_length, tokenizer.pad_id,
                                     tokenizer.piece_bytes))
        relative = layout.relative_path(dest)
        hashes[relative] = write_shard(join(data.output, relative), rebatch(blocks, data.block_rows), features,
                                       "tfrecord", "").sha256
    return hashes


def beam_pipeline(paths: list[str], data: DataConfig, tokenizer_url: str) -> dict[str, str]:
    with beam.Pipeline(options=pipeline_options(["--runner=FnApiRunner", "--direct_num_workers=1"])) as p:
        _ = p | cc.CommonCrawlToShards(paths, data, {}, tokenizer_url)
    return {s.path: s.sha256 for s in load_manifest(data.output).shards}


def datasketch_lsh(texts: list[str], threshold: float, num_perm: int, shingle_words: int) -> int:
    from datasketch import MinHash, MinHashLSH

    lsh, candidates = MinHashLSH(threshold=threshold, num_perm=num_perm), 0
    for i, text in enumerate(texts):
        words = text.lower().split()
        shingles = [" ".join(words[j:j + shingle_words]).encode()
                    for j in range(max(1, len(words) - shingle_words + 1))]
        m = MinHash(num_perm=num_perm)
        m.update_batch(shingles)
        candidates += len(lsh.query(m))
        lsh.insert(i, m)
    return candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="codistill-bench-cc-")
    generate_commoncrawl(f"{workdir}/raw", args.docs, files=args.files, seed=3)
    paths = expand_inputs(f"{workdir}/raw/*.warc.wet.gz")
    tokenizer_url = f"{workdir}/spm.model"
    train_tokenizer(paths, tokenizer_url, args.vocab_size, "unigram", 2000, CommonCrawlConfig().clean, 0,
                    ["--runner=FnApiRunner"])

    with Clock() as read:
        wet = [d for p in paths for d in read_web_documents(p) if isinstance(d, WebDocument)]
    megabytes = sum(len(d.text.encode()) for d in wet) / 1e6
    config = dict(dataset="commoncrawl", groups=2, eval_fraction=0.1, shards_per_group=2, eval_shards=1, seed=17,
                  block_rows=256, input=paths[0],
                  commoncrawl=CommonCrawlConfig(tokenizer=tokenizer_url, dedup=DedupConfig(near_threshold=0.7)))

    with Clock() as plain:
        plain_hashes = plain_loop(paths, DataConfig(output=f"{workdir}/plain", **config), tokenizer_url)
    with Clock() as piped:
        beam_hashes = beam_pipeline(paths, DataConfig(output=f"{workdir}/beam", **config), tokenizer_url)

    cleaner, tokenizer = Cleaner(CommonCrawlConfig().clean), load_tokenizer(tokenizer_url)
    texts = [r.text for r in (cleaner.clean(d) for d in wet) if r.text is not None]
    with Clock() as encode:
        tokenizer.encode(texts)
    clean_mb = sum(len(t.encode()) for t in texts) / 1e6

    d = DedupConfig(near_threshold=0.7)
    with Clock() as ours:
        cc.fingerprint_documents(0, [WebDocument(str(i), "", "", None, t, "", 0) for i, t in enumerate(texts)],
                                 CommonCrawlConfig(dedup=d), 0)
    with Clock() as theirs:
        datasketch_lsh(texts, d.near_threshold, d.num_perm, d.shingle_words)

    repeats = 20
    with Clock() as warc:
        pages = sum(isinstance(item, WebDocument) or item.reason.startswith(("not_html", "http_status"))
                    for _ in range(repeats) for item in read_web_documents(str(REAL_WARC)))

    same = sum(plain_hashes[p] == beam_hashes[p] for p in beam_hashes)
    print(f"documents: {args.docs} in {args.files} WET files; WET text {megabytes:.2f} MB "
          f"({len(wet)} conversion records); cleaned text {clean_mb:.2f} MB; lsh {lsh_params(0.7, d.num_perm)}")
    print(f"{'':34} {'wall s':>7} {'cpu s':>7} {'MB/s wall':>10} {'MB/s cpu':>9}")
    for name, t, mb in [("read WET (fastwarc)", read, megabytes), ("plain loop (all steps)", plain, megabytes),
                        ("Beam pipeline (FnApiRunner, 1)", piped, megabytes),
                        ("sentencepiece encode alone", encode, clean_mb)]:
        print(f"{name:34} {t.wall:7.2f} {t.cpu:7.2f} {mb / t.wall:10.2f} {mb / t.cpu:9.2f}")
    print(f"Beam / plain loop (throughput):   {plain.wall / piped.wall:.2f}x wall, {plain.cpu / piped.cpu:.2f}x cpu")
    print(f"Beam / encode ceiling:            {encode.cpu / clean_mb * megabytes / piped.cpu:.2f}x cpu")
    print(f"MinHash+LSH, numpy (ours):        {len(texts) / ours.cpu:10,.0f} docs/s cpu")
    print(f"MinHash+LSH, datasketch 2.0.0:    {len(texts) / theirs.cpu:10,.0f} docs/s cpu "
          f"({theirs.cpu / ours.cpu:.1f}x slower)")
    print(f"WARC + HTML extraction:           {pages / warc.cpu:10,.0f} pages/s cpu ({pages} pages)")
    print(f"byte-identical shards (plain vs Beam): {same}/{len(beam_hashes)}")


if __name__ == "__main__":
    main()
