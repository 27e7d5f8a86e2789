"""Language identification and C4/Gopher-style cleaning of one web document at a time.

`Cleaner(config).clean(doc)` returns the cleaned text, or why the page was dropped, plus how
many lines each line rule removed. In order:

1. Language: the record's WARC-Identified-Content-Language (its first, primary code) when
   present and trusted, else pycld2 (its model ships inside the wheel), must be configured.
2. Line rules (C4, Raffel et al. 2020), each line stripped first: blank lines go (`line:empty`),
   citation marks are cut, then a line is removed without terminal punctuation
   (`line:no_terminal_punctuation`), with too few words (`line:too_few_words`), mentioning
   javascript (`line:javascript`), with a terms/privacy/cookie phrase (`line:policy`), or with a
   word longer than max_word_length (`line:too_long_word`). As in C4, "lorem ipsum" or a curly
   brace in a line that passed the punctuation and word-count rules drops the whole page
   (`lorem_ipsum`, `curly_braces`).
3. Page rules (Gopher, Rae et al. 2021) on the kept lines: `too_few_lines`, `too_long`,
   `too_few_words`, `mean_word_length`, `symbol_ratio`, `duplicate_lines`, `duplicate_line_chars`,
   `top_ngram`, then the user's word blocklist (`blocklist`).

Speed: a page-level test (`"javascript" in page`, ...) decides whether a rule needs to look at
each line at all, and the n-gram statistics hash words once into a numpy array.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import fsspec
import numpy as np
import pycld2
from iso639 import Lang

from codistill.config import CleaningConfig
from pipelines.warc import WebDocument

LINE_REASONS = ("line:empty", "line:no_terminal_punctuation", "line:too_few_words", "line:javascript",
                "line:policy", "line:too_long_word")
DROP_REASONS = ("language", "lorem_ipsum", "curly_braces", "too_few_lines", "too_long", "too_few_words",
                "mean_word_length", "symbol_ratio", "duplicate_lines", "duplicate_line_chars", "top_ngram",
                "blocklist")

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_TERMINAL = (".", "!", "?", '"')
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_CLD2_REJECTS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ud800-\udfff]")  # control chars, lone surrogates
_WORD = re.compile(r"\w+")
_PRIME = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier that mixes word hashes into n-gram hashes


@dataclass(frozen=True)
class CleanResult:
    text: str | None  # the cleaned text, None when the page is dropped
    drop_reason: str | None  # one of DROP_REASONS, None when kept
    lines_dropped: dict[str, int]  # LINE_REASONS -> lines removed (up to the page rule that dropped it)


def language_codes(code: str) -> frozenset[str]:
    """Every ISO 639 spelling of a language ("en" -> {"en", "eng"}): WARC headers use 639-3, pycld2 639-1."""
    lang = Lang(code)
    return frozenset(c for c in (lang.pt1, lang.pt2b, lang.pt2t, lang.pt3) if c)


def detect_language(text: str) -> str:
    """pycld2's top language as an ISO 639-1 code ("un" if unknown); nothing is downloaded."""
    try:
        details = pycld2.detect(text)[2]
    except pycld2.error:  # it refuses some code points that valid UTF-8 can hold
        details = pycld2.detect(_CLD2_REJECTS.sub(" ", text))[2]
    return details[0][1].split("-", 1)[0]  # "zh-Hant" -> "zh"


def read_blocklist(url: str) -> tuple[frozenset[str], re.Pattern | None]:
    """Blocked single words (lower case) and one pattern for the phrases; lines starting `#` are comments."""
    with fsspec.open(url, "rt", encoding="utf-8") as f:
        entries = {line.strip().lower() for line in f if line.strip() and not line.lstrip().startswith("#")}
    words = frozenset(e for e in entries if _WORD.fullmatch(e))
    phrases = sorted(entries - words, key=len, reverse=True)
    pattern = None
    if phrases:
        alternatives = "|".join(r"\s+".join(map(re.escape, p.split())) for p in phrases)
        pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")
    return words, pattern


class Cleaner:
    def __init__(self, config: CleaningConfig):
        self.config = config
        self._languages = frozenset().union(*map(language_codes, config.languages))
        self._blocked_words, self._blocked_phrases = (
            read_blocklist(config.blocklist) if config.blocklist else (frozenset(), None))

    def clean(self, doc: WebDocument) -> CleanResult:
        if self._languages and self.language(doc) not in self._languages:
            return CleanResult(None, "language", {})
        lines, dropped, reason = self._kept_lines(doc.text)
        if reason is None:
            reason = self._page_reason(lines)
        if reason is not None:
            return CleanResult(None, reason, dropped)
        return CleanResult("\n".join(lines), None, dropped)

    def language(self, doc: WebDocument) -> str:
        if self.config.use_warc_language and doc.language:
            return doc.language.split(",", 1)[0].strip().lower()
        return detect_language(doc.text)

    def _kept_lines(self, text: str) -> tuple[list[str], dict[str, int], str | None]:
        c = self.config
        lower = text.lower()
        # A rule looks at single lines only if the page holds what it looks for.
        citations = c.remove_citations and "[" in text
        javascript = c.javascript_lines and "javascript" in lower
        policy = c.policy_lines and any(p in lower for p in _POLICY)  # substring tests: faster than a regex
        lorem = c.lorem_ipsum and "lorem ipsum" in lower
        curly = c.curly_braces and "{" in text
        lowered = javascript or policy or lorem
        min_words, max_word = c.min_words_per_line or 0, c.max_word_length
        dropped: Counter[str] = Counter()
        kept = []
        for line in text.splitlines():
            if citations and "[" in line:
                line = _CITATION.sub("", line)
            line = line.strip()
            if not line:
                dropped["line:empty"] += 1
                continue
            if c.terminal_punctuation and (not line.endswith(_TERMINAL) or line.endswith("...")):
                dropped["line:no_terminal_punctuation"] += 1
                continue
            words = line.split()
            if len(words) < min_words:
                dropped["line:too_few_words"] += 1
                continue
            low = line.lower() if lowered else line
            if lorem and "lorem ipsum" in low:
                return kept, dict(dropped), "lorem_ipsum"
            if javascript and "javascript" in low:
                dropped["line:javascript"] += 1
                continue
            if curly and "{" in line:
                return kept, dict(dropped), "curly_braces"
            if policy and any(p in low for p in _POLICY):
                dropped["line:policy"] += 1
                continue
            if max_word is not None and len(line) > max_word and max(map(len, words)) > max_word:
                dropped["line:too_long_word"] += 1
                continue
            kept.append(line)
        return kept, dict(dropped), None

    def _page_reason(self, lines: list[str]) -> str | None:
        c = self.config
        if not lines or (c.min_lines is not None and len(lines) < c.min_lines):
            return "too_few_lines"  # a page with no line left is never kept
        text = "\n".join(lines)
        if c.max_chars is not None and len(text) > c.max_chars:
            return "too_long"
        words = text.split()
        if c.min_words is not None and len(words) < c.min_words:
            return "too_few_words"
        word_lengths = np.fromiter(map(len, words), np.int64, len(words))
        word_chars = int(word_lengths.sum())
        mean = word_chars / len(words)
        if (c.min_mean_word_length is not None and mean < c.min_mean_word_length) or (
                c.max_mean_word_length is not None and mean > c.max_mean_word_length):
            return "mean_word_length"
        if c.max_symbol_word_ratio is not None:
            symbols = text.count("#") + text.count("...") + text.count("\u2026")
            if symbols / len(words) > c.max_symbol_word_ratio:
                return "symbol_ratio"
        if c.max_duplicate_line_fraction is not None or c.max_duplicate_line_char_fraction is not None:
            counts = Counter(lines)
            if (c.max_duplicate_line_fraction is not None
                    and (len(lines) - len(counts)) / len(lines) > c.max_duplicate_line_fraction):
                return "duplicate_lines"
            repeated_chars = sum(len(line) * (n - 1) for line, n in counts.items() if n > 1)
            if (c.max_duplicate_line_char_fraction is not None
                    and repeated_chars / len(text) > c.max_duplicate_line_char_fraction):
                return "duplicate_line_chars"
        if c.max_top_ngram_char_fraction and _top_ngram_too_frequent(words, word_lengths, word_chars,
                                                                     c.max_top_ngram_char_fraction):
            return "top_ngram"
        if self._blocked_words or self._blocked_phrases is not None:
            lower = text.lower()
            if not self._blocked_words.isdisjoint(_WORD.findall(lower)) or (
                    self._blocked_phrases is not None and self._blocked_phrases.search(lower)):
                return "blocklist"
        return None


def _top_ngram_too_frequent(words: list[str], word_lengths: np.ndarray, word_chars: int,
                            max_fractions: tuple[float, ...]) -> bool:
    """Gopher's rule: the characters of the most frequent word n-gram (n = 2, 3, ...), counted once per
    occurrence, above the n's fraction of all word characters (of tied n-grams, the longest counts, so
    the result does not depend on hash order). An n-gram seen once is not repetition."""
    hashes = np.fromiter(map(hash, words), np.int64, len(words)).view(np.uint64)
    ends = np.concatenate(([0], np.cumsum(word_lengths)))  # ends[i] = characters of words[:i]
    grams = hashes.copy()
    for n, max_fraction in enumerate(max_fractions, start=2):
        if len(words) < n:
            return False
        grams = grams[:-1] * _PRIME + hashes[n - 1:]  # wraps mod 2^64: a hash of the n words
        _, first, counts = np.unique(grams, return_index=True, return_counts=True)
        top = counts.max()
        if top < 2:
            continue
        starts = first[counts == top]
        if top * int((ends[starts + n] - ends[starts]).max()) / word_chars > max_fraction:
            return True
    return False
