"""Experiment manifests: YAML parsed into typed, frozen, validated dataclasses.

Every error names the field it is about (`data.groups: must be >= 1, got 0`),
so a wrong manifest fails before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml
from iso639 import Lang
from iso639.exceptions import DeprecatedLanguageValue, InvalidLanguageValue

REPO_MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


# Bounds that keep a typo from sizing the pipeline or the model beyond reason: shard names have five digits,
# and every categorical column gets an embedding table of cat_buckets rows.
MAX_GROUPS = 1024
MAX_SHARDS = 99_999
MAX_CAT_BUCKETS = 1 << 24


class ConfigError(ValueError):
    """A manifest field is missing, unknown, of the wrong type or impossible."""


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother, _SHORT_REPR.maxlong = 2, 60, 60, 40


def _bounded(value: Any) -> str:
    """A short repr for error messages: it looks at a bounded part of the value, however big it is."""
    return _SHORT_REPR.repr(value)


def _key_text(key: Any) -> str:
    """A manifest key as it goes into a dotted field name."""
    return key if isinstance(key, str) and len(key) <= 80 else _bounded(key)


def tagged(tag: str, choices: dict[str, type], *, sibling: bool = False, **kwargs: Any) -> Any:
    """A field whose dataclass is chosen by a tag: `model.kind` inside the section itself, or
    (sibling=True) another field of the same section, as `data.dataset` chooses `data.synth`."""
    return field(metadata={"tag": tag, "choices": choices, "sibling": sibling}, **kwargs)


@dataclass(frozen=True)
class SynthConfig:
    """Generate raw Criteo-format input instead of reading `data.input`."""

    rows: int = 20_000
    files: int = 2
    seed: int = 0
    gzip: bool = False

    def validate(self, name: str) -> None:
        _require(self.rows >= 1, f"{name}.rows", f"must be >= 1, got {self.rows}")
        _require(self.files >= 1, f"{name}.files", f"must be >= 1, got {self.files}")


@dataclass(frozen=True)
class CriteoConfig:
    # "tsv": Kaggle train.txt (40 tab-separated fields, no header).
    # "csv": the header CSV export seen in the wild (label,I1..I13,C1..C26; ints may be "260.0").
    dialect: Literal["tsv", "csv"] = "tsv"
    # Hash buckets per categorical column: one number for all 26, or a list of 26.
    cat_buckets: tuple[int, ...] = (100_000,)
    keep_raw: bool = False

    def validate(self, name: str) -> None:
        _require(len(self.cat_buckets) in (1, 26), f"{name}.cat_buckets",
                 f"must hold 1 or 26 numbers, got {len(self.cat_buckets)}")
        for b in self.cat_buckets:  # each column's embedding table has this many rows
            _require(2 <= b <= MAX_CAT_BUCKETS, f"{name}.cat_buckets", f"each must be in [2, 2^24], got {b}")

    def buckets_per_column(self) -> tuple[int, ...]:
        return self.cat_buckets * 26 if len(self.cat_buckets) == 1 else self.cat_buckets


@dataclass(frozen=True)
class CommonCrawlSynthConfig:
    """Generate WET files of a planted language instead of reading `data.input`."""

    docs: int = 2_000
    files: int = 2
    seed: int = 0

    def validate(self, name: str) -> None:
        _require(self.docs >= 1, f"{name}.docs", f"must be >= 1, got {self.docs}")
        _require(self.files >= 1, f"{name}.files", f"must be >= 1, got {self.files}")


@dataclass(frozen=True)
class CleaningConfig:
    """Language filter and C4/Gopher-style line and page rules (`data.commoncrawl.clean`).

    Every rule can be switched off: a true/false rule by `false`, a threshold by `null`. Defaults
    follow C4 (Raffel et al. 2020) for line rules and Gopher (Rae et al. 2021) for page rules.
    """

    # ISO 639-1 or 639-3 codes of the languages to keep; [] keeps every language.
    languages: tuple[str, ...] = ("en",)
    # Trust the record's WARC-Identified-Content-Language (its first, primary language) when present;
    # otherwise, and always when false, pycld2 decides.
    use_warc_language: bool = True
    # Line rules (C4): a line that fails one is removed and counted as `line:<rule>`.
    remove_citations: bool = True  # "[1]", "[edit]", "[citation needed]" removed from lines (not counted)
    terminal_punctuation: bool = True  # keep lines ending in . ! ? or " (not in ...)
    min_words_per_line: int | None = 5
    max_word_length: int | None = 1000  # a line with a longer word is removed
    javascript_lines: bool = True  # remove lines mentioning javascript ("enable JavaScript" notices)
    policy_lines: bool = True  # remove terms-of-use / privacy / cookie-policy lines
    # Page rules on lines: as in C4, checked on lines that pass the rules above; the page is dropped.
    lorem_ipsum: bool = True
    curly_braces: bool = True  # "{" in a line: most likely code
    # Page rules on the kept text (Gopher): the page is dropped.
    min_lines: int | None = 3
    min_words: int | None = 50
    max_chars: int | None = 500_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # "#" per word, or ellipses ("...", "…") per word
    max_duplicate_line_fraction: float | None = 0.3  # lines equal to an earlier line, per line
    max_duplicate_line_char_fraction: float | None = 0.2  # their characters, per character
    # Most frequent word n-gram's characters per word character, for n = 2, 3, 4, ...
    max_top_ngram_char_fraction: tuple[float, ...] | None = (0.20, 0.18, 0.16)
    # Words or phrases, one a line, at any fsspec URL: a page holding one (whole words, any case) is dropped.
    blocklist: str | None = None

    def validate(self, name: str) -> None:
        for i, code in enumerate(self.languages):
            try:
                Lang(code)
            except (InvalidLanguageValue, DeprecatedLanguageValue):
                raise ConfigError(f"{name}.languages[{i}]: {code!r} is not an ISO 639 language code") from None
        for field_name in ("min_words_per_line", "max_word_length", "min_lines", "min_words", "max_chars"):
            value = getattr(self, field_name)
            _require(value is None or value >= 1, f"{name}.{field_name}", f"must be >= 1 or null, got {value}")
        for field_name in ("min_mean_word_length", "max_mean_word_length", "max_symbol_word_ratio"):
            value = getattr(self, field_name)
            _require(value is None or value >= 0, f"{name}.{field_name}", f"must be >= 0 or null, got {value}")
        if self.min_mean_word_length is not None and self.max_mean_word_length is not None:
            _require(self.min_mean_word_length <= self.max_mean_word_length, f"{name}.max_mean_word_length",
                     f"must be >= min_mean_word_length ({self.min_mean_word_length}), "
                     f"got {self.max_mean_word_length}")
        for field_name in ("max_duplicate_line_fraction", "max_duplicate_line_char_fraction"):
            value = getattr(self, field_name)
            _require(value is None or 0 <= value <= 1, f"{name}.{field_name}",
                     f"must be in [0, 1] or null, got {value}")
        for i, value in enumerate(self.max_top_ngram_char_fraction or ()):
            _require(0 <= value <= 1, f"{name}.max_top_ngram_char_fraction[{i}]", f"must be in [0, 1], got {value}")
        _require(self.max_top_ngram_char_fraction != (), f"{name}.max_top_ngram_char_fraction",
                 "must hold one fraction per n-gram size from 2 on, or be null")
        _require(self.blocklist is None or bool(self.blocklist.strip()), f"{name}.blocklist",
                 "must be a file URL or null, got an empty string")


@dataclass(frozen=True)
class DedupConfig:
    """Whole-data-set deduplication before group assignment (`data.commoncrawl.dedup`).

    Steps, in this order, each over the documents the earlier ones kept: URLs
    (normalised; the newest capture wins), exact documents (normalised text),
    near-duplicate documents (MinHash LSH clusters, one kept per cluster), then
    repeated lines (each kept once, in a hash-chosen document). Which copy is kept
    is decided by a keyed hash of the WARC-Record-ID, never by processing order.
    """

    urls: bool = True
    exact: bool = True
    near: bool = True
    lines: bool = True
    near_threshold: float = 0.8  # Jaccard similarity of word shingles above which pages are near-duplicates
    num_perm: int = 128  # MinHash permutations
    shingle_words: int = 5  # words per shingle
    min_words: int = 20  # a page left with fewer words after line deduplication is dropped
    buckets: int = 16  # hash partitions each deduplication step's shuffle is spread over

    def validate(self, name: str) -> None:
        _require(0.0 < self.near_threshold < 1.0, f"{name}.near_threshold",
                 f"must be in (0, 1), got {self.near_threshold}")
        _require(2 <= self.num_perm <= 1024, f"{name}.num_perm", f"must be in [2, 1024], got {self.num_perm}")
        _require(self.shingle_words >= 1, f"{name}.shingle_words", f"must be >= 1, got {self.shingle_words}")
        _require(self.min_words >= 1, f"{name}.min_words", f"must be >= 1, got {self.min_words}")
        _require(self.buckets >= 1, f"{name}.buckets", f"must be >= 1, got {self.buckets}")


@dataclass(frozen=True)
class CommonCrawlConfig:
    """Reading, cleaning, deduplicating and tokenising web text (`data.dataset: commoncrawl`)."""

    # sentencepiece model (any fsspec URL, with its `<url>.json` sidecar); null = train one on the input first,
    # written to `<output>/tokenizer/spm.model`, with the three settings below.
    tokenizer: str | None = None
    vocab_size: int = 8000
    tokenizer_type: Literal["unigram", "bpe"] = "unigram"
    tokenizer_sample_docs: int = 20_000  # cleaned documents the tokenizer is trained on (a keyed-hash sample)
    sequence_length: int = 33  # tokens per packed row (inputs tokens[:-1], targets tokens[1:])
    samples_per_reason: int = 5  # dropped documents kept in rejected/samples/<reason>.jsonl
    clean: CleaningConfig = field(default_factory=CleaningConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)

    def validate(self, name: str) -> None:
        _require(self.tokenizer is None or bool(self.tokenizer), f"{name}.tokenizer",
                 "must be a model URL or null (train one first)")
        _require(300 <= self.vocab_size <= 1_000_000, f"{name}.vocab_size",
                 f"must be in [300, 1000000] (256 byte pieces are part of it), got {self.vocab_size}")
        _require(self.tokenizer_sample_docs >= 1, f"{name}.tokenizer_sample_docs",
                 f"must be >= 1, got {self.tokenizer_sample_docs}")
        _require(self.sequence_length >= 2, f"{name}.sequence_length",
                 f"must be >= 2 (inputs and targets are shifted by one), got {self.sequence_length}")
        _require(self.samples_per_reason >= 0, f"{name}.samples_per_reason",
                 f"must be >= 0, got {self.samples_per_reason}")
        self.clean.validate(f"{name}.clean")
        self.dedup.validate(f"{name}.dedup")


@dataclass(frozen=True)
class ImageNetSynthConfig:
    """Generate an ILSVRC-layout folder of images instead of reading `data.input`."""

    classes: int = 10
    per_class: int = 100  # train images per class (bad inputs included)
    val_per_class: int = 10  # flat `val/` folder + LOC_val_solution.csv; 0 = no val folder
    seed: int = 0
    min_size: int = 64  # image sides (pixels) are drawn from [min_size, max_size]
    max_size: int = 160
    faults: int = 1  # copies of each bad input kind (zero-byte, text, truncated, ...); 0 = a clean data set
    synsets: str | None = None  # take the wnids from this synset list (path or URL); None = made-up wnids

    def validate(self, name: str) -> None:
        _require(self.classes >= 1, f"{name}.classes", f"must be >= 1, got {self.classes}")
        _require(self.per_class >= 1, f"{name}.per_class", f"must be >= 1, got {self.per_class}")
        _require(self.val_per_class >= 0, f"{name}.val_per_class", f"must be >= 0, got {self.val_per_class}")
        _require(self.min_size >= 16, f"{name}.min_size", f"must be >= 16, got {self.min_size}")
        _require(self.max_size >= self.min_size, f"{name}.max_size",
                 f"must be >= min_size ({self.min_size}), got {self.max_size}")
        _require(self.faults >= 0, f"{name}.faults", f"must be >= 0, got {self.faults}")
        _require(self.faults * 8 <= self.classes * self.per_class, f"{name}.faults",
                 f"{self.faults} of each of the 8 bad-input kinds do not fit in {self.classes * self.per_class} "
                 "train images")


@dataclass(frozen=True)
class ImageNetConfig:
    """Labels, repairs and resizing of ILSVRC-layout JPEG folders (`data.dataset: imagenet`)."""

    # Synset list (one wnid per line, 0-based line = label; path or URL); None = the sorted train folder names.
    synsets: str | None = None
    label_offset: int = 0  # added to every label (1 for the TF-slim/TPU convention with 0 = background)
    # Where the shared eval split comes from: "auto" = the input's val/ folder when there is one, else a
    # keyed-hash `data.eval_fraction` of train; "val" requires the folder; "train" ignores it.
    eval_source: Literal["auto", "val", "train"] = "auto"
    # Labels of a flat val/ folder: Kaggle LOC_val_solution.csv or `filename<TAB>wnid` lines (path or URL);
    # None = <input>/LOC_val_solution.csv. Unused for the val/<wnid>/ layout.
    val_labels: str | None = None
    grayscale: Literal["keep", "rgb"] = "keep"  # grayscale JPEGs stay 1-channel, or become RGB JPEGs
    resize_shorter: int | None = None  # shrink images whose shorter side is longer (never upscales); None = keep
    jpeg_quality: int = 95  # for re-encoded images (repairs, resizes)
    max_image_bytes: int = 64 << 20  # bigger files are quarantined unread
    max_image_pixels: int = 89_478_485  # bigger images (decompression bombs) are quarantined; Pillow's default
    images_per_task: int = 256  # images per unit of parallel work

    def validate(self, name: str) -> None:
        _require(self.label_offset >= 0, f"{name}.label_offset", f"must be >= 0, got {self.label_offset}")
        _require(self.resize_shorter is None or self.resize_shorter >= 8, f"{name}.resize_shorter",
                 f"must be >= 8 or null, got {self.resize_shorter}")
        _require(95 <= self.jpeg_quality <= 100, f"{name}.jpeg_quality",
                 f"must be in [95, 100] (lower re-encodes lose detail), got {self.jpeg_quality}")
        _require(self.max_image_bytes >= 1, f"{name}.max_image_bytes", f"must be >= 1, got {self.max_image_bytes}")
        _require(self.max_image_pixels >= 1, f"{name}.max_image_pixels",
                 f"must be >= 1, got {self.max_image_pixels}")
        _require(self.images_per_task >= 1, f"{name}.images_per_task", f"must be >= 1, got {self.images_per_task}")


SYNTH_CONFIGS = {"criteo": SynthConfig, "commoncrawl": CommonCrawlSynthConfig, "imagenet": ImageNetSynthConfig}


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["criteo", "commoncrawl", "imagenet"] = "criteo"
    output: str = "runs/data"
    input: str | None = None  # glob or URL of raw files; None means `synth`
    # The generator of `dataset` (fields differ per dataset).
    synth: SynthConfig | CommonCrawlSynthConfig | ImageNetSynthConfig | None = tagged(
        "dataset", SYNTH_CONFIGS, sibling=True, default=None)
    groups: int = 2
    eval_fraction: float = 0.1
    shards_per_group: int = 2
    eval_shards: int = 1
    format: Literal["tfrecord", "webdataset"] = "tfrecord"
    seed: int = 0  # keys the hash that assigns records to eval/groups/shards
    block_rows: int = 1024  # most rows per stored record (TFRecord Example / WebDataset sample)
    split_bytes: int = 128 << 20  # uncompressed inputs are read in line-aligned ranges of about this size
    criteo: CriteoConfig = field(default_factory=CriteoConfig)
    commoncrawl: CommonCrawlConfig = field(default_factory=CommonCrawlConfig)
    imagenet: ImageNetConfig = field(default_factory=ImageNetConfig)

    def validate(self, name: str) -> None:
        _require((self.input is None) != (self.synth is None), name,
                 "give exactly one of `input` (raw files) or `synth` (generated data); to read files with a "
                 "manifest that generates its data, also set data.synth=null")
        _require(-2**63 <= self.seed < 2**63, f"{name}.seed", f"must fit in 64 bits, got {self.seed}")
        _require(self.groups >= 1, f"{name}.groups", f"must be >= 1, got {self.groups}")
        _require(self.groups <= MAX_GROUPS, f"{name}.groups", f"must be <= {MAX_GROUPS}, got {self.groups}")
        _require(0.0 < self.eval_fraction < 1.0, f"{name}.eval_fraction",
                 f"must be in (0, 1), got {self.eval_fraction}")
        for shards in ("shards_per_group", "eval_shards"):
            count = getattr(self, shards)
            _require(count >= 1, f"{name}.{shards}", f"must be >= 1, got {count}")
            _require(count <= MAX_SHARDS, f"{name}.{shards}", f"must be <= {MAX_SHARDS}, got {count}")
        _require(self.block_rows >= 1, f"{name}.block_rows", f"must be >= 1, got {self.block_rows}")
        _require(self.split_bytes >= 1 << 16, f"{name}.split_bytes", f"must be >= 65536, got {self.split_bytes}")
        if self.synth is not None:
            self.synth.validate(f"{name}.synth")
        self.criteo.validate(f"{name}.criteo")
        self.commoncrawl.validate(f"{name}.commoncrawl")
        self.imagenet.validate(f"{name}.imagenet")


@dataclass(frozen=True)
class CriteoDNNConfig:
    kind: Literal["criteo_dnn"] = "criteo_dnn"
    embedding_dim: int = 16
    hidden: tuple[int, ...] = (256, 128)
    dropout: float = 0.0

    def validate(self, name: str) -> None:
        _require(self.embedding_dim >= 1, f"{name}.embedding_dim", f"must be >= 1, got {self.embedding_dim}")
        _require(all(h >= 1 for h in self.hidden), f"{name}.hidden", f"sizes must be >= 1, got {self.hidden}")
        _require(0.0 <= self.dropout < 1.0, f"{name}.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class LSTMConfig:
    """The language model: embedding, stacked LSTM, softmax over the tokenizer's vocabulary.

    The vocabulary size is not a field: it is the dataset's tokenizer's
    (`manifest.extra["tokenizer"]["vocab_size"]`). Batches are
    `deepspeed.micro_batch_size` rows (packed sequences, or persistent streams) of
    `window` tokens.
    """

    kind: Literal["lstm"] = "lstm"
    embedding_dim: int = 256
    hidden: int = 1024
    layers: int = 2
    layer_norm: bool = True  # LayerNorm on every LSTM layer's outputs
    dropout: float = 0.0  # on the embeddings and on every layer's outputs
    tie_embeddings: bool = True  # output softmax shares the input embedding (through a projection if hidden != dim)
    # packed: every row is an independent sequence (state starts at zero per row).
    # stateful: each rank reads `micro_batch_size` persistent token streams in windows of
    # `window` tokens and carries the LSTM state across steps (the paper's setup).
    layout: Literal["packed", "stateful"] = "stateful"
    window: int = 32  # tokens per stream per step (stateful); packed uses the rows' sequence_length - 1
    # How a state that must restart mid-stream (a newly adopted peer snapshot, a resumed run)
    # begins: "zero", or "warmup": zero, then the model is run over the stream's previous window.
    restart: Literal["zero", "warmup"] = "warmup"

    def validate(self, name: str) -> None:
        for key in ("embedding_dim", "hidden", "layers", "window"):
            value = getattr(self, key)
            _require(value >= 1, f"{name}.{key}", f"must be >= 1, got {value}")
        _require(0.0 <= self.dropout < 1.0, f"{name}.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class ResNetConfig:
    """ResNet-18/34/50 for the image workload (torchvision's layout, training/resnet.py)."""

    kind: Literal["resnet"] = "resnet"
    depth: int = 50  # 18 or 34 (basic blocks), 50 (bottlenecks)
    width: int = 64  # channels of the first stage; each later stage doubles them
    # "imagenet": 7x7 stride-2 conv + max pool (/4); "small": one 3x3 stride-1 conv, no pool (for 32-64 px inputs)
    stem: Literal["imagenet", "small"] = "imagenet"
    zero_init_residual: bool = False  # each block's last BatchNorm starts at gamma 0 (Goyal et al. 2017)
    channels_last: bool = True  # NHWC inputs, so convolutions run NHWC (faster on CPU and on tensor cores)
    image_size: int = 224  # train crops and eval center crops are image_size x image_size

    def validate(self, name: str) -> None:
        _require(self.depth in (18, 34, 50), f"{name}.depth", f"must be 18, 34 or 50, got {self.depth}")
        _require(self.width >= 1, f"{name}.width", f"must be >= 1, got {self.width}")
        _require(self.image_size >= 16, f"{name}.image_size", f"must be >= 16, got {self.image_size}")


MODEL_CONFIGS = {"criteo_dnn": CriteoDNNConfig, "lstm": LSTMConfig, "resnet": ResNetConfig}
ModelConfig = CriteoDNNConfig | LSTMConfig | ResNetConfig


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adam", "adamw", "sgd", "adagrad"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    momentum: float = 0.0  # sgd only
    # [[step, weight decay], ...], steps increasing: from each step on, that weight decay (before the first,
    # `weight_decay`). E.g. [[0, 1e-4], [30000, 1e-5], [60000, 0]] drops it at the LR decays (Sodhani et al. 2021).
    weight_decay_schedule: tuple[tuple[float, ...], ...] = ()

    def validate(self, name: str) -> None:
        _require(self.lr > 0, f"{name}.lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"{name}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        previous = -1.0
        for i, entry in enumerate(self.weight_decay_schedule):
            where = f"{name}.weight_decay_schedule[{i}]"
            _require(len(entry) == 2, where, f"must be [step, weight decay], got {list(entry)}")
            _require(entry[0] >= 0 and entry[0] == int(entry[0]), where,
                     f"step must be an integer >= 0, got {entry[0]}")
            _require(entry[1] >= 0, where, f"weight decay must be >= 0, got {entry[1]}")
            _require(entry[0] > previous, where, f"steps must increase, got {entry[0]:g} after {previous:g}")
            previous = entry[0]
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{name}.betas",
                 f"must be two numbers in [0, 1), got {self.betas}")


@dataclass(frozen=True)
class ScheduleConfig:
    steps: int = 1000  # optimizer steps per group
    warmup_steps: int = 0
    decay: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0  # where cosine/linear decay ends, as a fraction of lr

    def validate(self, name: str) -> None:
        _require(self.steps >= 1, f"{name}.steps", f"must be >= 1, got {self.steps}")
        _require(0 <= self.warmup_steps <= self.steps, f"{name}.warmup_steps",
                 f"must be in [0, steps], got {self.warmup_steps}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"{name}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class DeepSpeedConfig:
    ranks_per_group: int = 1
    zero_stage: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp32 on CPU: bf16 is ~40x slower there
    micro_batch_size: int = 256  # per rank
    grad_accum: int = 1
    gradient_clipping: float = 0.0  # 0 = off

    def validate(self, name: str) -> None:
        _require(self.ranks_per_group >= 1, f"{name}.ranks_per_group", f"must be >= 1, got {self.ranks_per_group}")
        _require(self.zero_stage in (0, 1, 2, 3), f"{name}.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _require(self.micro_batch_size >= 1, f"{name}.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        _require(self.grad_accum >= 1, f"{name}.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _require(self.gradient_clipping >= 0, f"{name}.gradient_clipping",
                 f"must be >= 0, got {self.gradient_clipping}")


@dataclass(frozen=True)
class LoaderConfig:
    shuffle_buffer: int = 10_000  # rows
    workers: int = 0  # DataLoader worker processes per rank
    # Samples that fail to decode are skipped and counted; more than this many in one loader worker stops training.
    max_decode_failures: int = 100

    def validate(self, name: str) -> None:
        _require(self.shuffle_buffer >= 1, f"{name}.shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        _require(self.workers >= 0, f"{name}.workers", f"must be >= 0, got {self.workers}")
        _require(self.max_decode_failures >= 0, f"{name}.max_decode_failures",
                 f"must be >= 0, got {self.max_decode_failures}")


@dataclass(frozen=True)
class CodistillConfig:
    enabled: bool = True  # false: the plain baseline, same code path
    weight: float = 1.0
    burn_in_steps: int = 0
    ramp_steps: int = 0
    exchange_every: int = 50
    temperature: float = 1.0
    distance: Literal["ce", "kl", "mse_logits"] = "ce"
    max_staleness: int | None = None  # in steps; None = any age
    keep_snapshots: int = 3
    poll_seconds: float = 1.0

    def validate(self, name: str) -> None:
        _require(self.weight >= 0, f"{name}.weight", f"must be >= 0, got {self.weight}")
        _require(self.burn_in_steps >= 0, f"{name}.burn_in_steps", f"must be >= 0, got {self.burn_in_steps}")
        _require(self.ramp_steps >= 0, f"{name}.ramp_steps", f"must be >= 0, got {self.ramp_steps}")
        _require(self.exchange_every >= 1, f"{name}.exchange_every", f"must be >= 1, got {self.exchange_every}")
        _require(self.temperature > 0, f"{name}.temperature", f"must be > 0, got {self.temperature}")
        _require(self.max_staleness is None or self.max_staleness >= 0, f"{name}.max_staleness",
                 f"must be >= 0 or null, got {self.max_staleness}")
        _require(self.keep_snapshots >= 1, f"{name}.keep_snapshots", f"must be >= 1, got {self.keep_snapshots}")
        _require(self.poll_seconds > 0, f"{name}.poll_seconds", f"must be > 0, got {self.poll_seconds}")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 200  # steps
    batch_size: int = 4096
    max_rows: int | None = None  # None = the whole eval split

    def validate(self, name: str) -> None:
        _require(self.every >= 1, f"{name}.every", f"must be >= 1, got {self.every}")
        _require(self.batch_size >= 1, f"{name}.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    run_dir: str | None = None  # default runs/<name>
    store: str | None = None  # snapshot store URL; default <run_dir>/store
    log_every: int = 50
    checkpoint_every: int = 500
    # Also write training and eval metrics as TensorBoard events (DeepSpeed's monitor; the `tensorboard`
    # extra) to <run_dir>/group-<g>/tensorboard.
    tensorboard: bool = False
    # Which of the dataset's groups train in this run (null = all). One group alone is the plain
    # baseline or, with `reads: union` and twice the batch, the synchronous 2x-batch control.
    groups: tuple[int, ...] | None = None
    # What each training group reads: its own split (disjoint data, the paper's set-up), the split
    # of the first training group ("same": same-data codistillation), or every train split ("union").
    reads: Literal["own", "same", "union"] = "own"

    def validate(self, name: str) -> None:
        _require(0 <= self.seed < 2**31, f"{name}.seed", f"must be in [0, 2^31), got {self.seed}")
        if self.groups is not None:
            _require(len(self.groups) >= 1 and len(set(self.groups)) == len(self.groups), f"{name}.groups",
                     f"must list distinct groups, got {list(self.groups)}")
        _require(self.log_every >= 1, f"{name}.log_every", f"must be >= 1, got {self.log_every}")
        _require(self.checkpoint_every >= 1, f"{name}.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")


@dataclass(frozen=True)
class StorageConfig:
    """fsspec options for every URL under `prefix` (the longest matching prefix wins), e.g. an S3 endpoint.

    `options` go to the file system as they are (s3fs: `endpoint_url`, `profile`, `anon`, `client_kwargs`...;
    gcsfs: `project`, `token`...). `env` names environment variables read where the file system is made (on
    each worker), so secrets never sit in a manifest: `{key: MY_S3_KEY, secret: MY_S3_SECRET}`. URLs no rule
    matches get only fsspec's own configuration (`FSSPEC_S3_*`, `AWS_*`, ~/.aws, ...).
    """

    prefix: str
    options: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def validate(self, name: str) -> None:
        protocol, sep, rest = self.prefix.partition("://")
        _require(bool(sep) and bool(protocol) and bool(rest), f"{name}.prefix",
                 f"must be a URL with a protocol and a location, e.g. s3://bucket/data, got {self.prefix!r}")
        _require(protocol in fsspec.available_protocols(), f"{name}.prefix",
                 f"unknown fsspec protocol {protocol!r} in {self.prefix!r}")
        both = sorted(set(self.options) & set(self.env))
        _require(not both, f"{name}.env", f"sets {both} that options already sets")
        for option, variable in self.env.items():
            _require(bool(variable), f"{name}.env.{option}", "must name an environment variable")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = tagged("kind", MODEL_CONFIGS, default_factory=CriteoDNNConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    codistill: CodistillConfig = field(default_factory=CodistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    storage: tuple[StorageConfig, ...] = ()

    def validate(self) -> None:
        # `runs/<name>` is the default run directory, which `--overwrite` deletes: `..` would be the working
        # directory's parent.
        _require(bool(self.name) and self.name not in (".", "..") and not any(c in self.name for c in "/\\"),
                 "name", f"must be a plain name (not '.' or '..', no '/' or '\\'), got {_bounded(self.name)}")
        _require(Path(self.run_dir).name not in ("", ".", ".."), "train.run_dir",
                 f"must end in a directory name (it names the run in the store), got {_bounded(self.run_dir)}")
        for section in ("data", "model", "optimizer", "schedule", "deepspeed", "loader", "codistill", "eval", "train"):
            getattr(self, section).validate(section)
        prefixes = [rule.prefix.rstrip("/") for rule in self.storage]
        for i, rule in enumerate(self.storage):
            rule.validate(f"storage[{i}]")
            _require(prefixes.index(prefixes[i]) == i, f"storage[{i}].prefix", f"{rule.prefix!r} is given twice")
        for g in self.train.groups or ():
            _require(0 <= g < self.data.groups, "train.groups",
                     f"groups must be in [0, data.groups={self.data.groups}), got {g}")
        if isinstance(self.model, LSTMConfig) and self.model.layout == "stateful":
            # The streams of a rank are one ordered reader: a second loader worker would repeat them.
            _require(self.loader.workers <= 1, "loader.workers",
                     f"must be 0 or 1 with model.layout: stateful, got {self.loader.workers}")

    @property
    def trained_groups(self) -> tuple[int, ...]:
        return self.train.groups if self.train.groups is not None else tuple(range(self.data.groups))

    @property
    def run_dir(self) -> str:
        return self.train.run_dir or f"runs/{self.name}"

    @property
    def store(self) -> str:
        return self.train.store or f"{self.run_dir}/store"

    @property
    def run_id(self) -> str:
        """Names the run in the snapshot store: `<store>/<run_id>/group-<g>/`."""
        return Path(self.run_dir).name


# --- parsing ---------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            _require(type(None) in options, name, "must not be empty")
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        _require(value in typing.get_args(tp), name,
                 f"must be one of {list(typing.get_args(tp))}, got {_bounded(value)}")
        return value
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        _require(isinstance(value, dict), name, f"expected a mapping, got {type(value).__name__} {_bounded(value)}")
        return {_coerce(k, key_tp, name): _coerce(v, value_tp, f"{name}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]  # a single number stands for a one-item list
        return tuple(_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**1023 else value
    if tp is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
        except ValueError:
            pass
    if tp is float and isinstance(value, float):
        _require(math.isfinite(value), name, f"must be a finite number, got {value}")
        return value
    # bool is an int subclass: `groups: true` must not pass as 1.
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    _require(ok, name, f"expected {_type_name(tp)}, got {type(value).__name__} {_bounded(value)}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "manifest"
    _require(isinstance(raw, dict), where, f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        _require(key in known, f"{prefix}.{_key_text(key)}" if prefix else _key_text(key),
                 f"unknown key (known: {', '.join(known)})")
    kwargs = {}
    for key, f in known.items():
        name = f"{prefix}.{key}" if prefix else key
        if key in raw and "choices" in f.metadata:
            defaults = {k: d.default for k, d in known.items() if d.default is not dataclasses.MISSING}
            kwargs[key] = _coerce_tagged(raw[key], f, defaults | kwargs, name)
        elif key in raw:
            kwargs[key] = _coerce(raw[key], hints[key], name)
        else:
            _require(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING,
                     name, "required field is missing")
    return cls(**kwargs)


def _coerce_tagged(value: Any, f: dataclasses.Field, siblings: dict, name: str) -> Any:
    """Build the dataclass that the field's tag chooses (siblings are the fields already built)."""
    tag, choices = f.metadata["tag"], f.metadata["choices"]
    if value is None:
        _require(f.default is None, name, "must not be empty")
        return None
    if f.metadata["sibling"]:
        chosen, where = siblings.get(tag), f"{name.rsplit('.', 1)[0]}.{tag}" if "." in name else tag
    else:
        _require(isinstance(value, dict), name, f"expected a mapping, got {type(value).__name__}")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        chosen, where = value.get(tag, getattr(default, tag, None)), f"{name}.{tag}"
    _require(chosen in choices, where, f"must be one of {list(choices)}, got {_bounded(chosen)}")
    return _build(choices[chosen], value, name)


def set_field(raw: dict, dotted: str, value: Any) -> None:
    """Set `a.b` in the raw manifest (validation happens when it is parsed)."""
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        _require(isinstance(node, dict), dotted, f"{key} is not a section")
    node[keys[-1]] = value


# A manifest is a few kB; with aliases, a few hundred bytes can stand for billions of nodes ("billion laughs"),
# which anything walking the result (validation, deepcopy into dicts, an error message) would expand.
MAX_MANIFEST_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


class _YAMLTooLarge(yaml.YAMLError):
    pass


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Nodes of the document once every alias is expanded, stopping as soon as that passes MAX_YAML_NODES."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in active:
        raise _YAMLTooLarge("a recursive alias (a node that contains itself)")
    active.add(id(node))
    children = [] if isinstance(node, yaml.ScalarNode) else (
        node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair])
    total = 1
    for child in children:
        total += _expanded_nodes(child, memo, active)
        if total > MAX_YAML_NODES:
            raise _YAMLTooLarge(f"more than {MAX_YAML_NODES} values once its aliases are expanded (alias bomb?)")
    active.discard(id(node))
    memo[id(node)] = total
    return total


class _ManifestLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing documents whose aliases expand past MAX_YAML_NODES."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_nodes(node, {}, set())
        return node


def _load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_ManifestLoader)
    except RecursionError:
        raise _YAMLTooLarge("nested too deeply") from None


def apply_override(raw: dict, assignment: str) -> None:
    """Apply `a.b=c` to the raw manifest; the value is parsed as YAML (`50`, `true`, `[1, 2]`)."""
    path, sep, text = assignment.partition("=")
    _require(bool(sep) and bool(path), _bounded(assignment), "override must look like section.field=value")
    try:
        value = _load_yaml(text)
    except _YAMLTooLarge as e:
        raise ConfigError(f"{_key_text(path)}: the value is too large: {e}") from None
    except yaml.YAMLError:
        value = text  # e.g. a glob like *.txt: take it as a string
    set_field(raw, path, value)


def parse_experiment(raw: Any, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    raw = copy.deepcopy(raw or {})
    _require(isinstance(raw, dict), "manifest", f"expected a mapping, got {type(raw).__name__}")
    for assignment in overrides:
        apply_override(raw, assignment)
    config = _build(ExperimentConfig, raw, "")
    config.validate()
    return config


def resolve_manifest(name_or_path: str) -> str:
    """A path or URL as given, or a bare name like `criteo-tiny` from the repo's manifests/."""
    if "/" in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return name_or_path
    return str(REPO_MANIFESTS / f"{name_or_path}.yaml")


def read_manifest_yaml(name_or_path: str) -> dict:
    path = resolve_manifest(name_or_path)
    try:
        with fsspec.open(path, "r") as f:
            text = f.read(MAX_MANIFEST_BYTES + 1)
        _require(len(text) <= MAX_MANIFEST_BYTES, path, f"larger than {MAX_MANIFEST_BYTES} bytes: not a manifest")
        raw = _load_yaml(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: manifest not found") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a manifest file ({type(e).__name__})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e)[:500]}") from None
    _require(isinstance(raw, dict), path, f"expected a mapping at the top, got {type(raw).__name__}")
    return raw


def load_experiment(name_or_path: str, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    raw = read_manifest_yaml(name_or_path)
    try:
        return parse_experiment(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{resolve_manifest(name_or_path)}: {e}") from None


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
