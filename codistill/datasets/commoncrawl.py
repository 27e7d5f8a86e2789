"""Common Crawl web text: WET/WARC files -> cleaned, deduplicated, tokenised token rows, trained by an LSTM LM."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from iso639 import Lang
from iso639.exceptions import DeprecatedLanguageValue, InvalidLanguageValue

from codistill.datasets.spec import DatasetSpec, Flag
from codistill.fields import ConfigError, require


@dataclass(frozen=True)
class CommonCrawlSynthConfig:
    """Generate WET files of a planted language instead of reading `data.input`."""

    docs: int = 2_000
    files: int = 2
    seed: int = 0

    def validate(self, name: str) -> None:
        require(self.docs >= 1, f"{name}.docs", f"must be >= 1, got {self.docs}")
        require(self.files >= 1, f"{name}.files", f"must be >= 1, got {self.files}")


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
            require(value is None or value >= 1, f"{name}.{field_name}", f"must be >= 1 or null, got {value}")
        for field_name in ("min_mean_word_length", "max_mean_word_length", "max_symbol_word_ratio"):
            value = getattr(self, field_name)
            require(value is None or value >= 0, f"{name}.{field_name}", f"must be >= 0 or null, got {value}")
        if self.min_mean_word_length is not None and self.max_mean_word_length is not None:
            require(self.min_mean_word_length <= self.max_mean_word_length, f"{name}.max_mean_word_length",
                     f"must be >= min_mean_word_length ({self.min_mean_word_length}), "
                     f"got {self.max_mean_word_length}")
        for field_name in ("max_duplicate_line_fraction", "max_duplicate_line_char_fraction"):
            value = getattr(self, field_name)
            require(value is None or 0 <= value <= 1, f"{name}.{field_name}",
                     f"must be in [0, 1] or null, got {value}")
        for i, value in enumerate(self.max_top_ngram_char_fraction or ()):
            require(0 <= value <= 1, f"{name}.max_top_ngram_char_fraction[{i}]", f"must be in [0, 1], got {value}")
        require(self.max_top_ngram_char_fraction != (), f"{name}.max_top_ngram_char_fraction",
                 "must hold one fraction per n-gram size from 2 on, or be null")
        require(self.blocklist is None or bool(self.blocklist.strip()), f"{name}.blocklist",
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
        require(0.0 < self.near_threshold < 1.0, f"{name}.near_threshold",
                 f"must be in (0, 1), got {self.near_threshold}")
        require(2 <= self.num_perm <= 1024, f"{name}.num_perm", f"must be in [2, 1024], got {self.num_perm}")
        require(self.shingle_words >= 1, f"{name}.shingle_words", f"must be >= 1, got {self.shingle_words}")
        require(self.min_words >= 1, f"{name}.min_words", f"must be >= 1, got {self.min_words}")
        require(self.buckets >= 1, f"{name}.buckets", f"must be >= 1, got {self.buckets}")


@dataclass(frozen=True)
class CommonCrawlConfig:
    """Reading, cleaning, deduplicating and tokenising web text (`data.dataset: commoncrawl`)."""

    # A paths file as Common Crawl publishes it (`wet.paths.gz`; gzip or plain, one path a line), read instead of
    # `data.input`: each path is joined to `base_url` (a line holding a URL is taken as it is).
    input_list: str | None = None
    # Common Crawl's public HTTPS endpoint; inside AWS `s3://commoncrawl/` (with `storage` giving `anon: true`).
    base_url: str = "https://data.commoncrawl.org/"
    limit: int | None = None  # read only this many listed files: those with the lowest keyed hash of their file name
    # sentencepiece model (any fsspec URL, with its `<url>.json` sidecar); null = train one on the input first,
    # written to `<output>/tokenizer/spm.model`, with the three settings below.
    tokenizer: str | None = None
    vocab_size: int = 8000
    tokenizer_type: Literal["unigram", "bpe"] = "unigram"
    tokenizer_sample_docs: int = 20_000  # cleaned documents the tokenizer is trained on (a keyed-hash sample)
    # Input files those documents are drawn from (the lowest keyed hash of their file name): not every input is read
    # and cleaned twice. A WET file holds ~30k documents.
    tokenizer_sample_files: int = 16
    sequence_length: int = 33  # tokens per packed row (inputs tokens[:-1], targets tokens[1:])
    samples_per_reason: int = 5  # dropped documents kept in rejected/samples/<reason>.jsonl
    clean: CleaningConfig = field(default_factory=CleaningConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)

    def validate(self, name: str) -> None:
        require(self.input_list is None or bool(self.input_list.strip()), f"{name}.input_list",
                "must be a paths file URL or null")
        require(bool(self.base_url.strip()), f"{name}.base_url", "must be a URL or folder")
        require(self.limit is None or self.limit >= 1, f"{name}.limit", f"must be >= 1 or null, got {self.limit}")
        require(self.tokenizer is None or bool(self.tokenizer), f"{name}.tokenizer",
                 "must be a model URL or null (train one first)")
        require(300 <= self.vocab_size <= 1_000_000, f"{name}.vocab_size",
                 f"must be in [300, 1000000] (256 byte pieces are part of it), got {self.vocab_size}")
        require(self.tokenizer_sample_docs >= 1, f"{name}.tokenizer_sample_docs",
                 f"must be >= 1, got {self.tokenizer_sample_docs}")
        require(self.tokenizer_sample_files >= 1, f"{name}.tokenizer_sample_files",
                 f"must be >= 1, got {self.tokenizer_sample_files}")
        require(self.sequence_length >= 2, f"{name}.sequence_length",
                 f"must be >= 2 (inputs and targets are shifted by one), got {self.sequence_length}")
        require(self.samples_per_reason >= 0, f"{name}.samples_per_reason",
                 f"must be >= 0, got {self.samples_per_reason}")
        self.clean.validate(f"{name}.clean")
        self.dedup.validate(f"{name}.dedup")


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
            require(value >= 1, f"{name}.{key}", f"must be >= 1, got {value}")
        require(0.0 <= self.dropout < 1.0, f"{name}.dropout", f"must be in [0, 1), got {self.dropout}")


def check(config) -> None:
    """Rules across sections: the stateful layout's streams are one ordered reader per rank."""
    if config.model.layout == "stateful":
        # A second loader worker would repeat the streams.
        require(config.loader.workers <= 1, "loader.workers",
                f"must be 0 or 1 with model.layout: stateful, got {config.loader.workers}")


SPEC = DatasetSpec(
    summary="Common Crawl WET/WARC files",
    name="commoncrawl", config=CommonCrawlConfig, synth=CommonCrawlSynthConfig, models=(LSTMConfig,),
    pipeline="pipelines.commoncrawl", workload="training.workloads.lm",
    flags=(Flag("input_list", "A paths file (wet.paths.gz, gzip or plain, one path a line) instead of --input.",
                source=True),
           Flag("base_url", "What the listed paths are joined to (s3://commoncrawl/ inside AWS)."),
           Flag("limit", "Read only N listed files (a deterministic sample: lowest keyed hash of the file name)."),
           Flag("tokenizer", "sentencepiece model URL (with its .json sidecar); default: train one first."),
           Flag("sequence_length", "Tokens per packed row.")),
    synth_flags=(Flag("docs", "WET conversion records in all files together.", required=True),
                 Flag("files", "Files to spread the records over."), Flag("seed")),
    resumable=True,
    # Staging (`.staged`, `.done`), the cleaned `documents` and the `tokenizer` it trained.
    entries=(".staged", ".done", "documents", "tokenizer"),
    check=check)
