"""Reading WET/WARC and cleaning web text, each next to a baseline measured in the same run.

    .venv/bin/python bench/commoncrawl_read_clean.py [--docs 4000] [--repeat 3] [--workdir DIR]

- WET read: `read_web_documents` (members inflated one by one with zlib, headers by fastwarc,
  damage detected) vs warcio's ArchiveIterator and fastwarc's own ArchiveIterator (neither
  detects a truncated or corrupt member), all decoding every conversion payload to str.
- WARC read with HTML extraction: `read_web_documents` on the real CC-MAIN-2020-34 sample
  repeated to ~400 pages vs fastwarc's iterator + the same resiliparse extraction.
- Cleaning: `Cleaner` with C4's line rules only vs a straightforward per-line loop of the same
  rules (TFDS c4_utils style), then the full default config (header languages trusted) and
  with pycld2 deciding every page.

The WET text is generated: web-like pages of English sentences (Python's own documentation)
mixed with navigation, cookie and javascript lines. Best of `--repeat` runs; MB = 10^6 bytes of
UTF-8 document text. Times are this process's CPU time (`time.process_time`), so that other
work on a shared machine inflates them less than wall time; ratios are the figures to trust.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import random
import tempfile
import time
import uuid
from pathlib import Path

import pydoc_data.topics
import warcio
from fastwarc.warc import ArchiveIterator, WarcRecordType
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding
from resiliparse.parse.html import HTMLTree

from codistill.datasets.commoncrawl import CleaningConfig
from pipelines.cleaning import Cleaner
from pipelines.warc import WebDocument, read_web_documents

SAMPLE = (Path(__file__).resolve().parents[1].parent
          / "shared/data/commoncrawl/resiliparse_CC-MAIN-2020-34_warcfile.warc.gz")
BOILERPLATE = ["Home | About | Contact", "Click here to subscribe",
               "This site uses cookies to improve your experience.", "Please enable JavaScript to view the comments.",
               "Share on Facebook", "Read more", "Copyright 2024", "Terms of Use | Privacy Policy"]


def write_wet(path: Path, docs: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    sentences = [s.strip() + "." for s in " ".join(pydoc_data.topics.topics.values()).split(". ")
                 if 5 <= len(s.split()) <= 40 and "{" not in s]
    text_bytes = 0
    with open(path, "wb") as f:
        for i in range(docs):
            lines = []
            for _ in range(rng.randint(5, 60)):
                if rng.random() < 0.3:
                    lines.append(rng.choice(BOILERPLATE))
                else:
                    lines.append(" ".join(rng.choice(sentences) for _ in range(rng.randint(1, 4))))
            body = ("\n".join(lines) + "\n").encode()
            text_bytes += len(body)
            record_id = uuid.UUID(int=rng.getrandbits(128))
            header = (f"WARC/1.0\r\nWARC-Type: conversion\r\nWARC-Target-URI: http://example.com/{i}\r\n"
                      f"WARC-Date: 2024-05-18T01:58:10Z\r\nWARC-Record-ID: <urn:uuid:{record_id}>"
                      f"\r\nWARC-Identified-Content-Language: eng\r\nContent-Type: text/plain\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode()
            f.write(gzip.compress(header + body + b"\r\n\r\n"))
    return text_bytes


def write_warc(path: Path, copies: int) -> None:
    data = SAMPLE.read_bytes()
    path.write_bytes(data * copies)  # gzip members concatenate: the same 50 records, `copies` times


def best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.process_time()
        out = fn()
        times.append(time.process_time() - start)
    return min(times), out


def wet_ours(path):
    return sum(len(r.text) for r in read_web_documents(str(path)) if isinstance(r, WebDocument))


def wet_warcio(path):
    n = 0
    with open(path, "rb") as f:
        for r in warcio.ArchiveIterator(f):
            if r.rec_type == "conversion":
                r.rec_headers.get_header("WARC-Record-ID")
                n += len(r.content_stream().read().decode("utf-8"))
    return n


def wet_fastwarc(path):
    n = 0
    with open(path, "rb") as f:
        for r in ArchiveIterator(f, record_types=WarcRecordType.conversion, parse_http=False):
            r.headers.get("WARC-Record-ID")
            n += len(r.reader.read().decode("utf-8"))
    return n


def warc_fastwarc_extract(path):
    pages = 0
    with open(path, "rb") as f:
        for r in ArchiveIterator(f, record_types=WarcRecordType.response):
            payload = r.reader.read()
            html = bytes_to_str(payload, r.http_charset or detect_encoding(payload, from_html_meta=True))
            extract_plain_text(HTMLTree.parse(html), preserve_formatting=True, main_content=True,
                               list_bullets=False, alt_texts=False)
            pages += 1
    return pages


def c4_reference(text: str) -> str | None:
    """C4's line rules as a plain per-line loop (TFDS c4_utils, without its sentence tokenizer)."""
    kept = []
    for line in text.splitlines():
        line = line.strip()
        if not line.endswith((".", "!", "?", '"')) or line.endswith("..."):
            continue
        words = line.split()
        if len(words) < 5:
            continue
        low = line.lower()
        if "lorem ipsum" in low:
            return None
        if "javascript" in low:
            continue
        if "{" in line:
            return None
        if any(p in low for p in ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                                  "use cookies")):
            continue
        if any(len(w) > 1000 for w in words):
            continue
        kept.append(line)
    return "\n".join(kept) if len(kept) >= 3 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    wet, warc = work / "bench.warc.wet.gz", work / "bench.warc.gz"
    text_bytes = write_wet(wet, args.docs)
    write_warc(warc, 25)
    mb = text_bytes / 1e6
    print(f"WET: {args.docs} docs, {mb:.1f} MB of text, {wet.stat().st_size / 1e6:.1f} MB gzipped")

    times, chars = {}, set()
    for name, fn in [("warcio ArchiveIterator (baseline)", wet_warcio), ("fastwarc ArchiveIterator", wet_fastwarc),
                     ("read_web_documents", wet_ours)]:
        times[name], n = best(lambda fn=fn: fn(wet), args.repeat)
        chars.add(n)
    assert len(chars) == 1, f"the readers disagree on the text: {chars}"
    base = times["warcio ArchiveIterator (baseline)"]
    for name, t in times.items():
        print(f"  read {name:38s} {mb / t:6.1f} MB/s  {base / t:5.2f}x warcio")

    t_base, pages = best(lambda: warc_fastwarc_extract(warc), args.repeat)
    t_ours, results = best(lambda: list(read_web_documents(str(warc))), args.repeat)
    docs = sum(isinstance(r, WebDocument) for r in results)
    assert docs == pages, (docs, pages)
    print(f"WARC: {len(results)} records, {pages} HTML pages")
    print(f"  fastwarc + resiliparse extraction (baseline)  {pages / t_base:6.0f} pages/s")
    print(f"  read_web_documents                            {pages / t_ours:6.0f} pages/s  {t_base / t_ours:5.2f}x")

    documents = [r for r in read_web_documents(str(wet)) if isinstance(r, WebDocument)]
    c4_only = CleaningConfig(languages=(), min_lines=3, min_words=None, max_chars=None, min_mean_word_length=None,
                             max_mean_word_length=None, max_symbol_word_ratio=None, max_duplicate_line_fraction=None,
                             max_duplicate_line_char_fraction=None, max_top_ngram_char_fraction=None,
                             remove_citations=False)
    t_ref, ref = best(lambda: [c4_reference(d.text) for d in documents], args.repeat)
    print(f"Cleaning {len(documents)} docs:")
    print(f"  C4 line rules, plain per-line loop (baseline)  {mb / t_ref:6.1f} MB/s")
    for name, config in [("Cleaner, C4 line rules only", c4_only), ("Cleaner, default config", CleaningConfig()),
                         ("Cleaner, default, pycld2 on every page",
                          dataclasses.replace(CleaningConfig(), use_warc_language=False))]:
        cleaner = Cleaner(config)
        t, out = best(lambda cleaner=cleaner: [cleaner.clean(d) for d in documents], args.repeat)
        kept = sum(r.text is not None for r in out)
        print(f"  {name:45s} {mb / t:6.1f} MB/s  {t_ref / t:5.2f}x  ({kept} kept)")
        if config is c4_only:
            assert [r.text for r in out] == ref, "Cleaner's C4 rules disagree with the reference loop"


if __name__ == "__main__":
    main()
