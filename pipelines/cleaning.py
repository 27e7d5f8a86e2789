"""Language identification and C4/Gopher-style cleaning of one web document at a time.

`Cleaner(config).clean(doc)` returns the cleaned text, or why the page was dropped, plus how
many lines each line rule removed. In order:

1. Language: the record's WARC-Identified-Content-Language (its first, primary code) when
   present and trusted, else pycld2's guess (its model ships inside the wheel), must be one of
   the configured languages (`language`).
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

import numpy as np
import pycld2
from iso639 import Lang

from codistill import storage
from codistill.datasets.commoncrawl import CleaningConfig
from pipelines.warc import WebDocument

LINE_REASONS = ("line:empty", "line:no_terminal_punctuation", "line:too_few_words", "line:javascript",
                "line:policy", "line:too_long_word")
DROP_REASONS = ("language", "lorem_ipsum", "curly_braces", "too_few_lines", "too_long", "too_few_words",
                "mean_word_length", "symbol_ratio", "duplicate_lines", "duplicate_line_chars", "top_ngram",
                "blocklist")

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_TERMINAL = (".", "!", "?", '"')  # C4's line ends (but not an ellipsis)
# What pycld2 refuses: C0/C1 controls but tab, newlines and form feed; lone surrogates; noncharacters.
_NONCHARACTERS = "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
_CLD2_REJECTS = re.compile(f"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef{_NONCHARACTERS}]")
_CLD2_LEGACY = {"iw": "he", "jw": "jv"}  # CLD2 still says Hebrew and Javanese with withdrawn ISO 639-1 codes
_WORD = re.compile(r"\w+")
_PRIME = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier that mixes word hashes into n-gram hashes


@dataclass(frozen=True)
class CleanResult:
    text: str | None  # the cleaned text, None when the page is dropped
    drop_reason: str | None  # one of DROP_REASONS, None when kept
    lines_dropped: dict[str, int]  # LINE_REASONS -> lines removed (up to the page rule that dropped it)


def _is_policy(low: str) -> bool:
    """C4's policy phrases: terms of use, privacy policy, cookie policy, (uses / use of / use) cookies."""
    return ("terms of use" in low or "privacy policy" in low
            or ("cookie" in low and ("cookie policy" in low or "use cookies" in low or "uses cookies" in low
                                     or "use of cookies" in low)))


def language_codes(code: str) -> frozenset[str]:
    """Every ISO 639 spelling of a language ("en" -> {"en", "eng"}): WARC headers use 639-3, pycld2 639-1."""
    lang = Lang(code)
    return frozenset(c for c in (lang.pt1, lang.pt2b, lang.pt2t, lang.pt3) if c)


def detect_language(text: str) -> str:
    """pycld2's top language as an ISO 639-1 code ("un" if unknown); nothing is downloaded."""
    try:
        details = pycld2.detect(text)[2]
    except (pycld2.error, UnicodeEncodeError):  # it refuses some code points a str can hold
        details = pycld2.detect(_CLD2_REJECTS.sub(" ", text))[2]
    code = details[0][1].split("-", 1)[0]  # "zh-Hant" -> "zh"
    return _CLD2_LEGACY.get(code, code)


def read_blocklist(url: str) -> tuple[frozenset[str], re.Pattern | None]:
    """Blocked single words (lower case) and one pattern for the phrases; lines starting `#` are comments."""
    with storage.open(url, "rt", encoding="utf-8") as f:
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
        self._word_rules = any(v is not None for v in (
            config.min_words, config.min_mean_word_length, config.max_mean_word_length, config.max_symbol_word_ratio,
            config.max_top_ngram_char_fraction))

    def clean(self, doc: WebDocument) -> CleanResult:
        if self._languages and self.language(doc) not in self._languages:
            return CleanResult(None, "language", {})
        lines, dropped, reason = self._kept_lines(doc.text)
        text = "\n".join(lines)
        if reason is None:
            reason = self._page_reason(lines, text)
        if reason is not None:
            return CleanResult(None, reason, dropped)
        return CleanResult(text, None, dropped)

    def language(self, doc: WebDocument) -> str:
        if self.config.use_warc_language and doc.language:
            return doc.language.split(",", 1)[0].strip().lower()
        return detect_language(doc.text)

    def _kept_lines(self, text: str) -> tuple[list[str], dict[str, int], str | None]:
        """The lines that pass every line rule, lines removed per rule, and the page rule that dropped the page.

        One pass in C4's order. A rule that needs the lower-cased line runs only if the page as a whole
        holds what it looks for: most pages have no javascript, policy phrase or lorem ipsum. (Measured:
        one pass with early exits beats a list comprehension per rule, which lower-cases lines once per
        rule, and a multi-line regex for the punctuation rule, by 1.5-3x.)"""
        c = self.config
        if c.remove_citations and "[" in text:
            text = _CITATION.sub("", text)
        lower = text.lower()
        punctuation = c.terminal_punctuation
        min_words = c.min_words_per_line or 0
        longest = c.max_word_length
        lorem = c.lorem_ipsum and "lorem ipsum" in lower
        javascript = c.javascript_lines and "javascript" in lower
        curly = c.curly_braces and "{" in text
        policy = c.policy_lines and (
            "terms of use" in lower or "privacy policy" in lower or "cookie" in lower)  # see _is_policy
        lowered = lorem or javascript or policy
        empty = unpunctuated = few_words = scripts = policies = long_words = 0
        kept = []
        reason = None
        for line in map(str.strip, text.splitlines()):
            if not line:
                empty += 1
                continue
            if punctuation and (not line.endswith(_TERMINAL) or line.endswith("...")):
                unpunctuated += 1
                continue
            words = line.split()
            if len(words) < min_words:
                few_words += 1
                continue
            if lowered:
                low = line.lower()
                if lorem and "lorem ipsum" in low:
                    reason = "lorem_ipsum"
                    break
                if javascript and "javascript" in low:
                    scripts += 1
                    continue
            if curly and "{" in line:
                reason = "curly_braces"
                break
            if policy and _is_policy(low):
                policies += 1
                continue
            if longest is not None and len(line) > longest and max(map(len, words)) > longest:
                long_words += 1
                continue
            kept.append(line)
        counts = zip(LINE_REASONS, (empty, unpunctuated, few_words, scripts, policies, long_words))
        return kept, {rule: n for rule, n in counts if n}, reason

    def _page_reason(self, lines: list[str], text: str) -> str | None:
        c = self.config
        if not lines or (c.min_lines is not None and len(lines) < c.min_lines):
            return "too_few_lines"  # a page with no line left is never kept
        if c.max_chars is not None and len(text) > c.max_chars:
            return "too_long"
        words = text.split() if self._word_rules else []
        if c.min_words is not None and len(words) < c.min_words:
            return "too_few_words"
        word_chars = len("".join(words))
        if c.min_mean_word_length is not None or c.max_mean_word_length is not None:
            mean = word_chars / len(words)
            if (c.min_mean_word_length is not None and mean < c.min_mean_word_length) or (
                    c.max_mean_word_length is not None and mean > c.max_mean_word_length):
                return "mean_word_length"
        if c.max_symbol_word_ratio is not None:
            symbols = max(text.count("#"), text.count("...") + text.count("\u2026"))  # Gopher: each on its own
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
        if c.max_top_ngram_char_fraction and _top_ngram_too_frequent(words, word_chars,
                                                                     c.max_top_ngram_char_fraction):
            return "top_ngram"
        if self._blocked_words or self._blocked_phrases is not None:
            lower = text.lower()
            if not self._blocked_words.isdisjoint(_WORD.findall(lower)) or (
                    self._blocked_phrases is not None and self._blocked_phrases.search(lower)):
                return "blocklist"
        return None


def _top_ngram_too_frequent(words: list[str], word_chars: int, max_fractions: tuple[float, ...]) -> bool:
    """Gopher's rule: the characters of the most frequent word n-gram (n = 2, 3, ...), counted once per
    occurrence, above the n's fraction of all word characters (of tied n-grams, the longest counts, so
    the result does not depend on hash order). An n-gram seen once is not repetition."""
    # str hashes differ between processes (PYTHONHASHSEED); only a 64-bit collision could change the answer.
    hashes = np.fromiter(map(hash, words), np.int64, len(words)).view(np.uint64)
    ends = np.zeros(len(words) + 1, np.int64)  # ends[i] = characters of words[:i]
    np.cumsum(np.fromiter(map(len, words), np.int64, len(words)), out=ends[1:])
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
