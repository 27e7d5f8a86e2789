"""Train a sentencepiece model on a deterministic sample of cleaned web text, drawn with Beam.

The sample is the `sample_docs` cleaned documents with the lowest keyed hash of
their WARC-Record-ID (bottom-k: uniform, and the same whatever the runner or
file order), read and cleaned by the same code as the preprocessing pipeline.

Settings that make `decode(encode(text)) == text` hold for any cleaned text:
identity normalisation (no NFKC), no whitespace folding or dummy prefix, byte
fallback (no unknown pieces), newline as a user-defined symbol; digits are
split (numbers do not eat the vocabulary). Ids: 0 = padding, 1 = end of
document, 2 = unknown (never produced with byte fallback), no BOS.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import io
import json
import logging
from collections.abc import Iterable

import apache_beam as beam
import numpy as np
import sentencepiece as spm
from apache_beam.options.pipeline_options import PipelineOptions

from codistill import storage
from codistill.datasets.commoncrawl import CleaningConfig
from codistill.storage import write_atomically
from pipelines.worker import WorkerDoFn
from tokenizer.encode import load_tokenizer, sidecar_url

PAD_ID, EOD_ID, UNK_ID = 0, 1, 2
logger = logging.getLogger(__name__)


def train_sentencepiece(documents: Iterable[str], vocab_size: int, model_type: str) -> bytes:
    """A serialized sentencepiece model trained on the documents' lines (sentencepiece trains on lines;
    the newline itself is a user-defined piece)."""
    sentences = (line for doc in documents for line in doc.split("\n") if line)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size, model_type=model_type,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        byte_fallback=True, user_defined_symbols=["\n"], split_digits=True, allow_whitespace_only_pieces=True,
        pad_id=PAD_ID, eos_id=EOD_ID, unk_id=UNK_ID, bos_id=-1, shuffle_input_sentence=False, num_threads=1,
        hard_vocab_limit=False, minloglevel=2)
    return model.getvalue()


def write_tokenizer(model: bytes, url: str, model_type: str, documents: int, trained_with: dict) -> dict:
    """The model at `url` and its sidecar at `<url>.json` (written last)."""
    processor = spm.SentencePieceProcessor(model_proto=model)
    info = {"sha256": hashlib.sha256(model).hexdigest(), "vocab_size": processor.get_piece_size(),
            "eod_id": EOD_ID, "pad_id": PAD_ID, "unk_id": UNK_ID, "type": model_type, "normalization": "identity",
            "byte_fallback": True, "newline": processor.piece_to_id("\n"), "trained_on_documents": documents,
            "trained_with": trained_with}
    with storage.open(url, "wb", auto_mkdir=True) as f:
        f.write(model)
    write_atomically(sidecar_url(url), json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info


class SampleFile(WorkerDoFn):
    """A file -> its `k` cleaned documents with the lowest keyed hash, as [(hash, text)]."""

    def __init__(self, clean: CleaningConfig, seed: int, k: int):
        super().__init__()
        self.clean, self.seed, self.k = clean, seed, k

    def setup(self):
        super().setup()
        from pipelines.cleaning import Cleaner

        self.cleaner = Cleaner(self.clean)

    def process(self, path: str):
        from pipelines.commoncrawl import clean_file, dedup_prio, document_hash

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
                    reuse: bool = False) -> dict:
    """Sample with Beam, train, write the model and its sidecar; returns the sidecar.

    `beam_args`: the runner's flags, or the options of the pipeline the model is trained for. With `reuse`, a
    model already at `out` that was trained with the same settings is kept (a resumed run)."""
    from pipelines.run import pipeline_options

    trained_with = json.loads(json.dumps({"vocab_size": vocab_size, "type": model_type, "sample_docs": sample_docs,
                                          "seed": seed, "clean": dataclasses.asdict(clean)}))  # as read back
    if reuse:
        try:
            info = load_tokenizer(out).info
            if info.get("trained_with") == trained_with:
                logger.info("keeping the tokenizer %s, trained with the same settings", out)
                return info
        except ValueError:  # TokenizerError: none there, or cut short before its sidecar was written
            pass
    options = beam_args if isinstance(beam_args, PipelineOptions) else pipeline_options(list(beam_args))
    # The sample is written beside the model and read back: the driver sees it on any runner.
    sample_url = f"{out}.sample.jsonl"
    with beam.Pipeline(options=options) as p:
        _ = (p | "SampleCleanText" >> SampleCleanText(paths, clean, seed, sample_docs)
             | "WriteSample" >> beam.ParDo(WriteSample(sample_url)))
    fs, path = storage.url_to_fs(sample_url)
    with fs.open(path, "r") as f:
        texts = [json.loads(line) for line in f]
    fs.rm(path)
    if not texts:
        raise ValueError(f"no documents left after cleaning in {len(paths)} input file(s): nothing to train on")
    logger.info("training a %s tokenizer (vocab %d) on %d documents", model_type, vocab_size, len(texts))
    return write_tokenizer(train_sentencepiece(texts, vocab_size, model_type), out, model_type, len(texts),
                           trained_with)
