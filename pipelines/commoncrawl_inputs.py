"""Which files a Common Crawl dataset reads: `data.input` (globs), or a paths file as Common Crawl publishes it.

A crawl lists its ~90k WET files in `wet.paths.gz` (one path a line, relative to the crawl's
endpoint). The list is read once on the driver, without touching the listed files; `limit`
(with `data.input` too) keeps the files with the lowest keyed hash of their path (a sample spread over the crawl's
segments, the same for the same list and seed), in list order.
"""

from __future__ import annotations

import posixpath
import zlib

import numpy as np

from codistill import storage
from codistill.datasets.commoncrawl import CommonCrawlConfig
from pipelines.sharding import string_hash
from pipelines.textfiles import expand_inputs

MAX_LIST_BYTES = 256 << 20  # a crawl's wet.paths is ~12 MB
PATHS_SUFFIXES = (".paths", ".paths.gz")  # Common Crawl's wet.paths.gz, warc.paths.gz, ...


class InputListError(ValueError):
    """A paths file that cannot be used: unreadable, empty, oversized, or naming one file twice."""


def input_paths(source: str | None, options: CommonCrawlConfig, seed: int) -> list[str]:
    """The files to read: the paths file's (joined to `base_url`, sampled to `limit`), else `source`'s."""
    if options.input_list is not None:
        return read_input_list(options.input_list, options.base_url, options.limit, seed)
    paths = expand_inputs(source)
    listed = [p for p in paths if p.endswith(PATHS_SUFFIXES)]
    if listed:
        raise InputListError(f"{listed[0]} is a list of paths, not a WET/WARC file: give it as --input-list "
                             "(data.commoncrawl.input_list); its paths are joined to --base-url")
    return sample(paths, options.limit, seed)


def sample(paths: list[str], limit: int | None, seed: int) -> list[str]:
    """The `limit` paths with the lowest keyed hash of their file names, in their order (all of them without a
    limit). File names, as the record keys: the same files sample alike wherever they are (https, s3, a copy)."""
    if limit is None or limit >= len(paths):
        return paths
    hashes = np.array([string_hash(posixpath.basename(p), seed) for p in paths], np.uint64)
    return [paths[i] for i in np.sort(np.argsort(hashes, kind="stable")[:limit]).tolist()]


def read_input_list(url: str, base_url: str, limit: int | None, seed: int) -> list[str]:
    paths = sample([line.strip() for line in _list_text(url).splitlines() if line.strip()], limit, seed)
    if not paths:
        raise InputListError(f"{url}: the paths file lists no paths")
    names = [posixpath.basename(p) for p in paths]
    if len(set(names)) < len(names):  # the file name is the first half of every record key
        repeated = next(n for n in names if names.count(n) > 1)
        raise InputListError(f"{url}: file names must be unique (they key the records); {repeated!r} is listed twice")
    return [p if "://" in p else f"{base_url.rstrip('/')}/{p.lstrip('/')}" for p in paths]


def _list_text(url: str) -> str:
    with storage.open(url, "rb") as f:
        data = f.read(MAX_LIST_BYTES + 1)
    if len(data) > MAX_LIST_BYTES:
        raise InputListError(f"{url}: over {MAX_LIST_BYTES} bytes, not a paths file")
    if data[:2] == b"\x1f\x8b":
        inflater = zlib.decompressobj(31)
        try:
            data = inflater.decompress(data, MAX_LIST_BYTES + 1)
        except zlib.error as e:
            raise InputListError(f"{url}: damaged gzip ({e})") from None
        if len(data) > MAX_LIST_BYTES or not inflater.eof:
            raise InputListError(f"{url}: cut short or over {MAX_LIST_BYTES} bytes inflated, not a paths file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputListError(f"{url}: not a text file of paths ({e})") from None
