"""The Common Crawl language model workload: LSTM over sentencepiece tokens, two batch layouts.

Rows (CONTRACTS.md): `tokens` int32[L], `length` real tokens, `text_bytes` UTF-8 bytes they
decode to; within a shard consecutive rows are consecutive pieces of one token stream.

Batch layouts (`model.layout`), each batch a dict of numpy arrays:

* packed: every row an independent sequence, state from zero:
  inputs `tokens[:-1]`, targets `tokens[1:]`, mask `position + 1 < length`.
* stateful (the paper's): each rank reads B = `deepspeed.micro_batch_size` persistent
  streams of its group's tokens in windows of T = `model.window` tokens and the trainer
  carries every model's LSTM state from one window to the next (detached). The group's
  rows, in manifest shard order, are cut into `ranks x B` equal runs of rows
  (`rows // (ranks x B)` each; the remainder is left out and logged); each run's real
  tokens (padding dropped) form one stream, padded at its end to the same length, so
  every stream -- on every rank -- has exactly `(rows_per_stream x L - 1) // T` windows
  per epoch: all ranks take the same number of steps, and the batches are a pure
  function of (dataset, rank, world, B, T), so fast-forwarding on resume is exact.
  Each window carries `reset` (the stream starts again: zero its state) and, for
  `model.restart: warmup`, `history` (the stream's previous window). A model whose
  state was dropped (a newly adopted peer snapshot, a resumed run: the trainer passes
  state None) starts from zero and, with warmup, first runs over `history` without
  gradient; see `forward`.

Evaluation (both layouts) reads the eval split's rows as independent sequences with
every real token predicted once: inputs `[eod] + tokens[:-1]`, targets `tokens`, so the
summed negative log-likelihood over the `text_bytes` of the split is exactly the bits
per byte of its text, the unit of the generator's floor.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import IterableDataset, get_worker_info

from codistill import storage
from codistill.config import ExperimentConfig
from codistill.datasets.commoncrawl import LSTMConfig
from codistill.dataset import DatasetError, DatasetManifest, join
from codistill.shards import Block
from pipelines.formats import read_shard
from training.data import ShardStream, StreamSpec
from training.lstm import LSTMLanguageModel, reset_streams
from training.workloads import Rows, Workload

logger = logging.getLogger(__name__)


FEATURES = {"tokens": "int32", "length": "int32", "text_bytes": "int64"}


def tokenizer_facts(manifest: DatasetManifest) -> dict:
    """The dataset's tokenizer (vocab_size, eod_id, pad_id, ...), after checking it is a token dataset."""
    for name, dtype in FEATURES.items():
        feature = manifest.features.get(name)
        if feature is None or feature.dtype != dtype:
            raise DatasetError(f"{manifest.dataset} dataset: the language model needs feature {name!r} of {dtype}, "
                               f"the dataset has {feature}")
    facts = manifest.extra.get("tokenizer")
    if not facts or "vocab_size" not in facts:
        raise DatasetError(f"{manifest.dataset} dataset: its manifest has no extra.tokenizer.vocab_size; "
                           "rebuild it with `codistill preprocess commoncrawl`")
    return facts


def check_tokenizer(manifest: DatasetManifest, tokenizer_url: str) -> str:
    """The sha256 of the configured tokenizer model file; refuses a dataset encoded with another one."""
    try:
        with storage.open(tokenizer_url, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        raise DatasetError(f"the configured tokenizer {tokenizer_url} does not exist: training checks that the "
                           "dataset was tokenized with it (data.commoncrawl.tokenizer)") from None
    if manifest.tokenizer_sha256 != sha256:
        raise DatasetError(f"the dataset was tokenized with sentencepiece model sha256 {manifest.tokenizer_sha256}, "
                           f"the configured tokenizer {tokenizer_url} has sha256 {sha256}: rebuild the dataset "
                           "(`codistill preprocess commoncrawl`) or configure the tokenizer it was built with")
    return sha256


def build_model(config: LSTMConfig, manifest: DatasetManifest) -> nn.Module:
    if config.kind != "lstm":
        raise ValueError(f"model.kind: the commoncrawl workload trains an lstm, got {config.kind!r}")
    return LSTMLanguageModel(config, int(tokenizer_facts(manifest)["vocab_size"]))


# --- batches -----------------------------------------------------------------------------------------


def configured_tokenizer(config: ExperimentConfig) -> str:
    """The sentencepiece model the experiment names; without one, the pipeline trained it into the dataset."""
    # getattr: `data.commoncrawl.tokenizer` is the pipeline's field (ccpipe branch).
    return config.data.commoncrawl.tokenizer or join(config.data.output, "tokenizer/spm.model")


def batches(spec: StreamSpec, config: ExperimentConfig, train: bool) -> IterableDataset:
    facts = tokenizer_facts(spec.manifest)
    if not train:
        return RowBatches(ShardStream(spec), functools.partial(eval_batch, eod_id=int(facts["eod_id"])))
    check_tokenizer(spec.manifest, configured_tokenizer(config))  # training refuses another tokenizer's data
    if config.model.layout == "packed":
        return RowBatches(ShardStream(spec), packed_batch)
    return TokenStreams(spec, config.model.window, int(facts["pad_id"]), history=config.model.restart == "warmup")


class RowBatches(IterableDataset):
    """Batches of stored rows turned into model batches (inside the DataLoader worker that reads them)."""

    def __init__(self, rows: ShardStream, make: Callable[[Block], Block]):
        super().__init__()
        self.rows, self.make = rows, make

    def __iter__(self) -> Iterator[Block]:
        return map(self.make, self.rows)


def packed_batch(rows: Block) -> Block:
    tokens = rows["tokens"].astype(np.int64)
    positions = np.arange(tokens.shape[1] - 1)
    return {"key": rows["key"], "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "mask": positions[None, :] + 1 < rows["length"][:, None]}


def eval_batch(rows: Block, eod_id: int) -> Block:
    tokens = rows["tokens"].astype(np.int64)
    start = np.full((len(tokens), 1), eod_id, np.int64)
    return {"key": rows["key"], "inputs": np.concatenate([start, tokens[:, :-1]], axis=1), "targets": tokens,
            "mask": np.arange(tokens.shape[1])[None, :] < rows["length"][:, None],
            "text_bytes": rows["text_bytes"]}


class TokenStreams(IterableDataset):
    """The stateful layout: this rank's B streams, window after window (see the module docstring)."""

    def __init__(self, spec: StreamSpec, window: int, pad_id: int, history: bool):
        super().__init__()
        self.spec, self.window, self.pad_id, self.history = spec, window, pad_id, history
        self.streams = spec.batch_size
        consumers = spec.world * self.streams
        rows = sum(s.records for s in spec.shards)
        self.rows_per_stream = rows // consumers
        length = spec.manifest.features["tokens"].shape[0]
        if self.rows_per_stream * length < window + 1:
            raise DatasetError(f"stateful layout: {rows} rows of {length} tokens cannot feed {spec.world} ranks x "
                               f"{self.streams} streams windows of {window} tokens; use fewer streams "
                               "(deepspeed.micro_batch_size), a shorter model.window or model.layout=packed")
        self.windows_per_epoch = (self.rows_per_stream * length - 1) // window
        if rows % consumers and spec.rank == 0:
            logger.info("stateful layout: %d of %d rows left out (not a multiple of %d streams)",
                        rows % consumers, rows, consumers)

    def __iter__(self) -> Iterator[Block]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError(f"stateful layout: its {self.streams} streams are one ordered reader; with "
                             f"loader.workers={info.num_workers} every worker would repeat them (use 0 or 1)")
        spec, t = self.spec, self.window
        first = spec.rank * self.streams
        epoch, skip = 0, spec.skip  # resume: the batches before the data position are cut, never trained on
        while True:
            shards = _SharedShards(spec)
            streams = [_Stream(self._tokens((first + b) * self.rows_per_stream, shards), self.pad_id)
                       for b in range(self.streams)]
            previous = np.full((self.streams, t), self.pad_id, np.int64)
            for i in range(self.windows_per_epoch):
                # t + 1 tokens per stream: inputs and targets overlap by one (the next window starts with
                # this window's last target).
                pieces = [s.take(t + 1) for s in streams]
                tokens = np.stack([p[0] for p in pieces])
                real = np.stack([p[1] for p in pieces])
                batch = {"key": np.array([f"{first + b}:{epoch}:{i}".encode() for b in range(self.streams)]),
                         "inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": real[:, 1:],
                         "reset": np.full(self.streams, i == 0)}
                if self.history:
                    batch["history"] = previous
                    previous = batch["inputs"]
                if skip:
                    skip -= 1
                    continue
                yield batch
            epoch += 1
            if not spec.repeat:
                return

    def _tokens(self, start: int, shards: _SharedShards) -> Iterator[np.ndarray]:
        """The real tokens of rows [start, start + rows_per_stream) of the group, in order."""
        end, offset = start + self.rows_per_stream, 0
        for i, shard in enumerate(self.spec.shards):
            if offset >= end:
                return
            if offset + shard.records > start:
                row = offset
                for block in shards.blocks(i):
                    n = len(block["key"])
                    lo, hi = max(start - row, 0), min(end - row, n)
                    for tokens, length in zip(block["tokens"][lo:hi], block["length"][lo:hi]):
                        yield tokens[:length]
                    row += n
                    if row >= end:
                        return
            offset += shard.records


class _SharedShards:
    """The decoded blocks of the shards a rank's streams are reading, each shard read and verified once for
    all the streams inside it at the same time (streams in lockstep: typically every stream that shares it).

    A weak cache: a shard's blocks live while a stream iterates over them, so memory holds at most one
    shard per stream, as when every stream read its own copy.
    """

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.cache: weakref.WeakValueDictionary[int, _Blocks] = weakref.WeakValueDictionary()

    def blocks(self, i: int) -> list[Block]:
        blocks = self.cache.get(i)
        if blocks is None:
            shard = self.spec.shards[i]
            blocks = self.cache[i] = _Blocks(read_shard(join(self.spec.root, shard.path),
                                                        self.spec.manifest.features, self.spec.manifest.format,
                                                        expect_sha256=shard.sha256, expect_bytes=shard.bytes))
        return blocks


class _Blocks(list):
    """A list of blocks, which (unlike a plain list) a weak reference can point to."""


class _Stream:
    """A read cursor over one stream's token pieces; past the end it yields padding (not real).

    Consecutive takes overlap by one token: each starts with the last token of the one before.
    """

    def __init__(self, pieces: Iterator[np.ndarray], pad_id: int):
        self.pieces, self.pad_id = pieces, pad_id
        self.buffer = np.empty(0, np.int64)
        self.real = np.empty(0, bool)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        parts, real = [self.buffer], [self.real]
        have = len(self.buffer)
        while have < n:
            piece = next(self.pieces, None)
            if piece is None:
                parts.append(np.full(n - have, self.pad_id, np.int64))
                real.append(np.zeros(n - have, bool))
                break
            parts.append(piece.astype(np.int64))
            real.append(np.ones(len(piece), bool))
            have += len(piece)
        tokens, mask = np.concatenate(parts), np.concatenate(real)
        self.buffer, self.real = tokens[n - 1:], mask[n - 1:]
        return tokens[:n], mask[:n]


# --- model calls ---------------------------------------------------------------------------------------


def forward(model: nn.Module, batch: dict[str, Tensor], state) -> tuple[Tensor, object]:
    """Logits [B, T, V] and the state to carry (None for packed rows, which always start from zero)."""
    if "reset" not in batch:
        logits, _ = model(batch["inputs"])
        return logits, None
    reset = batch["reset"]
    if state is None and "history" in batch and not bool(reset.all()):
        with torch.no_grad():  # warm a restarted state up on the stream's previous window
            _, state = model(batch["history"])
    logits, state = model(batch["inputs"], reset_streams(state, reset))
    return logits, state


def targets(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    return batch["targets"], batch["mask"]


# --- evaluation ----------------------------------------------------------------------------------------


def eval_rows(logits: Tensor, batch: Block) -> Rows:
    """Per row: summed nll (nats) over its real tokens, their count, their text bytes; per position: the log
    probability of the target and the argmax token (0 and -1 at padding)."""
    # On the logits' device (the [B, T, V] logits stay there); only the per-row results come back.
    targets_ = torch.from_numpy(batch["targets"]).to(logits.device)
    mask = torch.from_numpy(batch["mask"]).to(logits.device)
    logits = logits.float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets_.flatten(), reduction="none")
    nll = torch.where(mask, nll.view(targets_.shape), 0.0)
    argmax = torch.where(mask, logits.argmax(-1), -1)
    return {"nll": nll.double().sum(1).cpu().numpy(), "tokens": mask.sum(1).cpu().numpy().astype(np.int64),
            "text_bytes": np.asarray(batch["text_bytes"], np.int64), "argmax": argmax.cpu().numpy().astype(np.int32),
            "target_logprob": (-nll).cpu().numpy()}


def eval_metrics(rows: Rows, manifest: DatasetManifest) -> dict[str, float]:
    tokens, nll, text_bytes = int(rows["tokens"].sum()), float(rows["nll"].sum()), int(rows["text_bytes"].sum())
    cross_entropy = nll / max(tokens, 1)
    out = {"loss": nll / math.log(2) / max(text_bytes, 1), "cross_entropy": cross_entropy,
           "perplexity": math.exp(min(cross_entropy, 700.0)), "tokens": tokens, "text_bytes": text_bytes,
           "rows": int(len(rows["tokens"]))}
    out["bits_per_byte"] = out["loss"]
    floor = manifest.extra.get("floor")
    if floor and floor.get("metric") == "bits_per_byte":
        out["floor"] = float(floor["value"])
    return out


def row_terms(rows: Rows) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"loss": (rows["nll"] / math.log(2), rows["text_bytes"].astype(np.float64))}


def churn_terms(a: Rows, b: Rows) -> tuple[np.ndarray, np.ndarray]:
    real = (a["argmax"] >= 0) & (b["argmax"] >= 0)
    return ((a["argmax"] != b["argmax"]) & real).sum(1).astype(np.float64), real.sum(1).astype(np.float64)


def ensemble(members: list[Rows]) -> Rows:
    """The target's probability under the averaged distributions, at every position (the next-token argmax of
    an average is unknown from the rows: -1)."""
    real = members[0]["argmax"] >= 0
    stacked = np.stack([m["target_logprob"].astype(np.float64) for m in members])
    logprob = np.where(real, np.logaddexp.reduce(stacked, axis=0) - math.log(len(members)), 0.0)
    return members[0] | {"nll": -logprob.sum(1), "target_logprob": logprob.astype(np.float32),
                         "argmax": np.full_like(members[0]["argmax"], -1)}


def describe(record: dict) -> str:
    floor = f" (floor {record['floor']:.4f})" if "floor" in record else ""
    return (f"{record['bits_per_byte']:.4f} bits/byte{floor}, {record['cross_entropy']:.4f} nats/token, "
            f"perplexity {record['perplexity']:.1f} ({record['rows']} rows, {record['tokens']} tokens)")


def churn(a: Rows, b: Rows, threshold: float = 0.5) -> dict[str, float]:
    """Next-token argmax disagreement between two retrains over the real positions, and the mean
    |nll/token| gap per row (`threshold` is for binary outputs: unused)."""
    real = (a["argmax"] >= 0) & (b["argmax"] >= 0)
    positions = int(real.sum())
    per_token = lambda r: r["nll"] / np.maximum(r["tokens"], 1)  # noqa: E731
    return {"disagreement": float(((a["argmax"] != b["argmax"]) & real).sum() / max(positions, 1)),
            "mean_abs_nll_diff": float(np.mean(np.abs(per_token(a) - per_token(b)))) if len(a["nll"]) else 0.0,
            "positions": positions, "rows": int(len(a["nll"]))}


def describe_churn(c: dict, threshold: float = 0.5) -> str:
    return (f"next-token argmax differs at {100 * c['disagreement']:.2f}% of {c['positions']} positions; "
            f"mean |nll/token a - b| per row {c['mean_abs_nll_diff']:.4f} nats")


WORKLOAD = Workload(
    name="commoncrawl", binary=False, build_model=build_model, batches=batches, forward=forward, targets=targets,
    row_terms=row_terms, churn_terms=churn_terms, ensemble=ensemble,
    eval_unit=lambda keys: np.strings.rpartition(keys, b"#")[0],  # a document's rows stay in one half
    check_dataset=lambda config, dataset: check_tokenizer(dataset, configured_tokenizer(config)),
    records_per_example=lambda config, dataset: (
        config.model.window / dataset.features["tokens"].shape[0] if config.model.layout == "stateful" else 1.0),
    eval_rows=eval_rows, eval_metrics=eval_metrics, describe=describe, churn=churn, describe_churn=describe_churn)
