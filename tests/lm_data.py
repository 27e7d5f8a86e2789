"""A tiny Common Crawl-layout token dataset written straight with the shard writer and the dataset
manifest (no pipeline, no sentencepiece): rows as CONTRACTS.md describes them.

Each shard is one token stream of documents, each ending with EOD; the tokens follow a
learnable rule (next = m * current + 3 mod the word ids, 10% noise, m drawn per document
from 4 values), so a model's loss drops within a few steps and its state matters.
Every token stands for `BYTES_PER_TOKEN` bytes of text (EOD for 0).
"""

from __future__ import annotations

import hashlib

import fsspec
import numpy as np

from codistill.dataset import DatasetManifest, ShardEntry, write_manifest
from codistill.shards import Feature
from pipelines.formats import write_shard

PAD, EOD, VOCAB = 0, 1, 48
BYTES_PER_TOKEN = 3
TOKENIZER = b"not a real sentencepiece model, only its bytes are hashed"


def document(rng: np.random.Generator, vocab: int = VOCAB) -> list[int]:
    """A latent topic per document picks the rule's multiplier: the state must remember it."""
    multiplier = int(rng.choice([5, 7, 11, 13]))
    tokens = [int(rng.integers(2, vocab))]
    for _ in range(int(rng.integers(4, 30))):
        rule = (multiplier * tokens[-1] + 3) % (vocab - 2) + 2
        tokens.append(rule if rng.random() < 0.9 else int(rng.integers(2, vocab)))
    return tokens + [EOD]


def shard_rows(stream: list[int], length: int, name: str) -> dict[str, np.ndarray]:
    """One token stream cut into rows of `length` (the last padded), keyed `<name>#<offset>`."""
    n = -(-len(stream) // length)
    tokens = np.full((n, length), PAD, np.int32)
    flat = np.asarray(stream, np.int32)
    tokens.reshape(-1)[:len(flat)] = flat
    lengths = np.minimum(length, len(flat) - length * np.arange(n)).astype(np.int32)
    real = np.arange(length)[None, :] < lengths[:, None]
    text_bytes = (((tokens != EOD) & real).sum(1) * BYTES_PER_TOKEN).astype(np.int64)
    keys = np.array([f"{name}#{i * length}".encode() for i in range(n)])
    return {"key": keys, "tokens": tokens, "length": lengths, "text_bytes": text_bytes}


def write_lm_dataset(root: str, groups: int = 2, shards_per_group: int = 2, tokens_per_shard: int = 1200,
                     length: int = 17, fmt: str = "tfrecord", seed: int = 0, tokenizer: bytes = TOKENIZER,
                     block_rows: int = 16, parameters: dict | None = None, vocab: int = VOCAB) -> DatasetManifest:
    features = {"key": Feature("bytes"), "tokens": Feature("int32", (length,)), "length": Feature("int32"),
                "text_bytes": Feature("int64")}
    rng = np.random.default_rng(seed)
    layout = [("eval", None, 0)] + [("train", g, s) for g in range(groups) for s in range(shards_per_group)]
    shards, token_counts = [], {"train": 0, "eval": 0}
    for split, group, index in layout:
        stream: list[int] = []
        while len(stream) < tokens_per_shard:
            stream += document(rng, vocab)
        prefix = f"{split}/{index}" if group is None else f"{split}/{group}/{index}"
        rows = shard_rows(stream, length, prefix.replace("/", "-"))
        count = shards_per_group if group is not None else 1
        path = f"{prefix.rsplit('/', 1)[0]}/commoncrawl-{index:05d}-of-{count:05d}.{fmt.replace('webdataset', 'tar')}"
        blocks = [{k: v[i:i + block_rows] for k, v in rows.items()} for i in range(0, len(rows["key"]), block_rows)]
        written = write_shard(f"{root}/{path}", blocks, features, fmt, prefix.replace("/", "-"))
        shards.append(ShardEntry(path, split, group, written.records, written.bytes, written.sha256))
        token_counts[split] += len(stream)
    with fsspec.open(f"{root}/tokenizer/spm.model", "wb", auto_mkdir=True) as f:  # where the pipeline puts its own
        f.write(tokenizer)
    rows = sum(s.records for s in shards)
    manifest = DatasetManifest(
        dataset="commoncrawl", format=fmt, features=features, groups=groups, shards=tuple(shards),
        inputs=({"source": "tests/lm_data.py", "rows": rows},), rejected={}, parameters=parameters or {},
        tokenizer_sha256=hashlib.sha256(tokenizer).hexdigest(),
        extra={"tokenizer": {"url": "test", "sha256": hashlib.sha256(tokenizer).hexdigest(), "vocab_size": vocab,
                             "eod_id": EOD, "pad_id": PAD, "type": "unigram"},
               "tokens": token_counts, "floor": {"metric": "bits_per_byte", "value": 0.25}})
    write_manifest(root, manifest)
    return manifest
