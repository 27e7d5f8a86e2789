"""Train the Common Crawl tokenizer on a deterministic sample of cleaned web text, drawn with Beam.

The sample is the `sample_docs` cleaned documents with the lowest keyed hash of
their WARC-Record-ID (bottom-k: uniform, and the same whatever the runner or
file order), read and cleaned by the same code as the preprocessing pipeline
(`pipelines.commoncrawl_records`). The model itself is `tokenizer.train`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import logging
import posixpath
import time
from collections.abc import Callable

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from codistill import storage
from codistill.datasets.commoncrawl import CleaningConfig
from codistill.storage import write_atomically
from codistill.units import duration
from pipelines.cleaning import Cleaner
from pipelines.commoncrawl_records import clean_file, dedup_prio, document_hash
from pipelines.run import new_pipeline, pipeline_options
from pipelines.worker import WorkerDoFn
from tokenizer.encode import TokenizerError, load_tokenizer
from tokenizer.train import sentences, train_sentencepiece, write_tokenizer

logger = logging.getLogger(__name__)


class SampleFile(WorkerDoFn):
    """A file -> its `k` cleaned documents with the lowest keyed hash, as [(hash, text)]."""

    def __init__(self, clean: CleaningConfig, seed: int, k: int):
        super().__init__()
        self.clean, self.seed, self.k = clean, seed, k

    def setup(self):
        super().setup()
        self.cleaner = Cleaner(self.clean)

    def process(self, path: str):
        documents = clean_file(path, self.cleaner, self.seed, samples_per_reason=0).documents
        prio = dedup_prio(np.array([document_hash(d.key, self.seed) for d in documents], np.uint64))
        yield heapq.nsmallest(self.k, zip(prio.tolist(), (d.text for d in documents)))


class WriteSample(WorkerDoFn):
    """The sample -> one JSON string a line at `url`, in hash order."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url

    def process(self, sample):
        write_atomically(self.url, "".join(json.dumps(text) + "\n" for _, text in sorted(sample)))


class SampleCleanText(beam.PTransform):
    """Input paths -> one element: the `k` cleaned documents with the lowest keyed hash over all files."""

    def __init__(self, paths: list[str], clean: CleaningConfig, seed: int, k: int):
        super().__init__()
        self.paths, self.clean, self.seed, self.k = paths, clean, seed, k

    def expand(self, pbegin):
        k = self.k
        return (pbegin
                | "Files" >> beam.Create(self.paths)
                | "Spread" >> beam.Reshuffle()
                | "Sample" >> beam.ParDo(SampleFile(self.clean, self.seed, k))
                | "Lowest" >> beam.CombineGlobally(lambda lists: heapq.nsmallest(k, (s for x in lists for s in x))))


def train_tokenizer(paths: list[str], out: str, vocab_size: int, model_type: str, sample_docs: int,
                    clean: CleaningConfig, seed: int, beam_args: list[str] | PipelineOptions = (),
                    reuse: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Sample with Beam, train, write the model and its sidecar; returns the sidecar.

    `beam_args`: the runner's flags, or the options of the pipeline the model is trained for. With `reuse`, a
    model already at `out` that was trained with the same settings is kept (a resumed run). `progress` gets a
    line as each step starts and ends (sentencepiece's own log stays off)."""
    say = progress or (lambda line: None)
    names = sorted(posixpath.basename(p) for p in paths)  # which files, wherever they are read from
    trained_with = json.loads(json.dumps({"vocab_size": vocab_size, "type": model_type, "sample_docs": sample_docs,
                                          "seed": seed, "clean": dataclasses.asdict(clean), "files": len(paths),
                                          "file_names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()
                                          }))  # as read back
    if reuse:
        try:
            info = load_tokenizer(out).info
            if info.get("trained_with") == trained_with:
                logger.info("keeping the tokenizer %s, trained with the same settings", out)
                return info
        except TokenizerError:  # none there, or cut short before its sidecar was written
            pass
    options = beam_args if isinstance(beam_args, PipelineOptions) else pipeline_options(list(beam_args))
    # The sample is written beside the model and read back: the driver sees it on any runner.
    sample_url = f"{out}.sample.jsonl"
    say(f"tokenizer: sampling {sample_docs} cleaned documents from {len(paths)} input file(s)")
    start = time.monotonic()
    with new_pipeline(options) as p:
        _ = (p | "SampleCleanText" >> SampleCleanText(paths, clean, seed, sample_docs)
             | "WriteSample" >> beam.ParDo(WriteSample(sample_url)))
        p.run().wait_until_finish()
    fs, path = storage.url_to_fs(sample_url)
    with fs.open(path, "r") as f:
        texts = [json.loads(line) for line in f]
    fs.rm(path)
    if not texts:
        raise ValueError(f"no documents left after cleaning in {len(paths)} input file(s): nothing to train on")
    lines = sum(1 for _ in sentences(texts))
    say(f"tokenizer: sampled {len(texts)} documents, {lines} sentences, in {duration(time.monotonic() - start)}")
    say(f"tokenizer: training a {model_type} model of {vocab_size} pieces on {lines} sentences")
    logger.info("training a %s tokenizer (vocab %d) on %d documents", model_type, vocab_size, len(texts))
    start = time.monotonic()
    model = train_sentencepiece(texts, vocab_size, model_type)
    say(f"tokenizer: trained in {duration(time.monotonic() - start)}")
    return write_tokenizer(model, out, model_type, len(texts), trained_with)
