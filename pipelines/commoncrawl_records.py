"""One Common Crawl input file -> its cleaned documents, and the keyed hashes of record ids that decide their fate.

Shared by the preprocessing pipeline (`pipelines.commoncrawl`) and the tokenizer's sample
(`pipelines.commoncrawl_tokenizer`), so both read and clean text with the same code.
"""

from __future__ import annotations

import collections
import posixpath
from dataclasses import dataclass

import numpy as np

from pipelines.cleaning import Cleaner
from pipelines.sharding import mix64, string_hash
from pipelines.sinks import Rejected
from pipelines.warc import Quarantined, Skipped, WebDocument, read_web_documents

SAMPLE_CHARS = 2000  # of a dropped document's text kept in its sample
_SALT_PRIO = np.uint64(0xD6E8FEB86659FD93)


def document_hash(key: str, seed: int) -> int:
    """The keyed hash of a WARC-Record-ID that assigns the document to eval / group / shard."""
    return string_hash(key, seed)


def dedup_prio(key_hashes: np.ndarray) -> np.ndarray:
    """Which copy of a duplicate is kept (lowest wins): independent bits of the same keyed hash."""
    return mix64(np.asarray(key_hashes, np.uint64) ^ _SALT_PRIO)


def _sample(doc: WebDocument, reason: str, text: str, prio: int) -> tuple[int, dict]:
    return prio, {"reason": reason, "key": doc.key, "url": doc.url, "source": posixpath.basename(doc.source),
                  "offset": doc.offset, "text": text[:SAMPLE_CHARS]}


def _keep_smallest(samples: dict[str, list], k: int) -> dict[str, list]:
    return {reason: sorted(found, key=lambda s: s[0])[:k] for reason, found in samples.items()}


@dataclass
class CleanedFile:
    """What reading and cleaning one input file left, and everything it dropped, counted."""

    source: str  # file name
    documents: list[WebDocument]  # kept, with their cleaned text
    records: int  # documents read + quarantined records
    dropped: dict[str, int]  # documents, by reason
    lines_dropped: dict[str, int]
    skipped: dict[str, int]  # records that are not documents (warcinfo, request, ...), by reason
    quarantined: list[Rejected]
    samples: dict[str, list]  # reason -> [(prio, sample)], the k lowest prio


def clean_file(path: str, cleaner: Cleaner, seed: int, samples_per_reason: int) -> CleanedFile:
    source = posixpath.basename(path)
    kept, records, position = [], 0, 0
    dropped, lines_dropped, skipped = collections.Counter(), collections.Counter(), collections.Counter()
    quarantined, samples = [], collections.defaultdict(list)
    for item in read_web_documents(path):
        position += 1
        if isinstance(item, Skipped):
            skipped[item.reason] += 1
            continue
        records += 1
        if isinstance(item, Quarantined):
            quarantined.append(Rejected(source, position, item.reason, item.detail, "", offset=item.offset))
            continue
        result = cleaner.clean(item)
        lines_dropped.update(result.lines_dropped)
        if result.text is None:
            dropped[result.drop_reason] += 1
            if samples_per_reason:
                prio = int(dedup_prio(np.uint64(document_hash(item.key, seed))))
                samples[result.drop_reason].append(_sample(item, result.drop_reason, item.text, prio))
                if len(samples[result.drop_reason]) > 4 * samples_per_reason:
                    samples.update(_keep_smallest({result.drop_reason: samples[result.drop_reason]},
                                                  samples_per_reason))
            continue
        kept.append(WebDocument(item.key, item.url, item.date, item.language, result.text, item.source, item.offset))
    return CleanedFile(source, kept, records, dict(dropped), dict(lines_dropped), dict(skipped), quarantined,
                       _keep_smallest(samples, samples_per_reason))
