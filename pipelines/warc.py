"""Common Crawl WET and WARC files read into documents, with damage quarantined, never fatal.

Each input record becomes exactly one of `WebDocument`, `Skipped` (well formed, not a document:
warcinfo, request, metadata, non-HTML or non-2xx responses, empty text) or `Quarantined`
(damaged), so records in = documents + skipped + quarantined.

Files are gzip-compressed WARC with one gzip member per record (Common Crawl's layout), or
uncompressed WARC (which has no checksum: damage inside a payload cannot be seen there). fastwarc
and warcio both pass a truncated member silently and stop at a corrupt one, so the members are
inflated here with zlib, one at a time from a streamed window of the file (a
member is never longer than `max_record_bytes` in memory, the file never read whole), and each
member's WARC and HTTP headers are parsed by fastwarc. A damaged member is quarantined with its
byte offset, and reading resumes at the next verified member header: one quarantine stands for
the damaged stretch, however many records it held. Damage reasons:

- `not_warc`: the file starts with neither a gzip member nor `WARC/` and holds no gzip member of a
  WARC record, or its first member is not WARC (one quarantine, nothing read).
- `empty_file`: zero bytes.
- `corrupt_gzip`: a member that zlib rejects (bad header, data or CRC), or bytes before or between
  members.
- `truncated`: the file ends inside a member or record (always the last thing in the file).
- `too_large`: declared Content-Length or inflated member size above `max_record_bytes`;
  the member is inflated through in bounded pieces and discarded, never allocated.
- `malformed_header`: no `WARC/1.x` line, no blank line ending the headers, headers that are not
  UTF-8, or a missing WARC-Type, WARC-Date or (documents) WARC-Target-URI.
- `missing_record_id`: no WARC-Record-ID (documents are keyed by it).
- `bad_content_length`: missing or non-numeric Content-Length, or one that does not end at the
  record's closing CRLF CRLF.
- `undecodable`: a WET (conversion) payload that is not UTF-8, as the WET format requires: the
  text was damaged, so it is not guessed at. HTML is decoded by its declared or detected charset
  with replacement characters for stray bytes, as browsers do.
- `bad_http`, `bad_html`: an HTTP response that fastwarc or resiliparse cannot parse.
- `too_deep`: HTML nested deeper than `MAX_HTML_DEPTH` (estimated from its tags before parsing).
  resiliparse's parse and extraction grow with the square of the nesting depth (16k nested
  `<div>` take ~10 s, 100k take hours), so such a page is never given to it. HTML above
  `MAX_HTML_BYTES` is `too_large`: extraction time grows with its size too.

A FIFO, device or directory given as input raises `WarcInputError` before anything is read. Transient read
errors (HTTP 5xx, connection resets, S3 throttling) are retried, reopening the file where it was
(`pipelines.transient`); the last one fails the file.
"""

from __future__ import annotations

import collections
import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

from fastwarc.warc import WarcRecord, WarcRecordType
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding
from resiliparse.parse.html import HTMLParserException, HTMLTree
# zlib-ng's inflate, with zlib's API and errors: read_web_documents reads 1.19x the compressed MB/s of zlib
# (docs/benchmarks.md), and refuses the same damaged members (tests/test_warc_cleaning.py).
from zlib_ng import zlib_ng as zlib

from codistill import storage
from pipelines.transient import retrying

DEFAULT_MAX_RECORD_BYTES = 16 << 20  # Common Crawl truncates payloads at 1 MiB (5 MiB since 2024)
MAX_HEADER_BYTES = 64 << 10
GZIP_MAGIC = b"\x1f\x8b\x08"
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
_READ_BYTES = 1 << 20  # read from the file in pieces of this size
_FEED_BYTES = 64 << 10  # zlib input per call
_INFLATE_BYTES = 1 << 20  # zlib output per call at most (bounds memory on a decompression bomb)
_END = b"\r\n\r\n"
# Work bounds for one HTML page given to resiliparse. Real pages nest < ~1000 deep; 2048 costs ~0.2 s, while
# time grows x4 per doubling beyond. Common Crawl truncates payloads at 5 MiB (~2 s to extract when flat).
MAX_HTML_DEPTH = 2048
MAX_HTML_BYTES = 5 << 20


@dataclass(frozen=True)
class WebDocument:
    key: str  # WARC-Record-ID, e.g. "<urn:uuid:...>" (WARC: the response record's id)
    url: str  # WARC-Target-URI
    date: str  # WARC-Date as written
    language: str | None  # WARC-Identified-Content-Language as written (e.g. "eng,fra"), None if absent
    text: str  # main text (WET payload; WARC: extracted from HTML)
    source: str  # input file (the URL as given)
    offset: int  # byte offset of the record (its gzip member) in the file


@dataclass(frozen=True)
class Quarantined:
    """A damaged stretch of a file: `offset` is where it starts, `reason` one of the module's identifiers."""

    source: str
    offset: int
    reason: str
    detail: str


@dataclass(frozen=True)
class Skipped:
    """A well-formed record that is not a document: `record_type:<type>`, `not_html`, `http_status:<code>`,
    `empty_text`."""

    source: str
    offset: int
    reason: str


ReadResult = WebDocument | Quarantined | Skipped
QUARANTINE_REASONS = ("not_warc", "empty_file", "corrupt_gzip", "truncated", "too_large", "malformed_header",
                      "missing_record_id", "bad_content_length", "undecodable", "bad_http", "bad_html", "too_deep")


class WarcInputError(ValueError):
    """The input is not a regular file (a FIFO, device or directory): reading it could hang or never end."""


class _Damage(Exception):
    """Why a stretch of the file is quarantined; `resume` is where reading goes on if it is known."""

    def __init__(self, reason: str, detail: str, resume: int | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.resume = reason, detail, resume


def read_web_documents(url: str, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[ReadResult]:
    """Every record of one WET or WARC file (gzip member per record, or uncompressed), in file order."""
    if max_record_bytes < 1:
        raise ValueError(f"max_record_bytes must be >= 1, got {max_record_bytes}")
    fs, path = storage.url_to_fs(url)
    kind = retrying(lambda: fs.info(path), url).get("type")
    if kind != "file":
        raise WarcInputError(f"{url}: not a regular file (fsspec type {kind!r}); give WARC/WET files only")
    with contextlib.closing(_RetryingFile(fs, path, url)) as f:
        window = _Window(f)
        head = bytes(window.view(0, 5)[:5])
        if not head:
            yield Quarantined(url, 0, "empty_file", "the file has no bytes")
        elif head.startswith(GZIP_MAGIC):
            yield from _read_gzip_members(window, url, max_record_bytes, 0)
        elif head.startswith(b"WARC/"):
            yield from _read_plain(window, url, max_record_bytes)
        elif window.view(first := _next_member(window, 1)):  # junk before the first member
            yield Quarantined(url, 0, "corrupt_gzip", f"{first} bytes that are not a gzip member before offset {first}")
            yield from _read_gzip_members(window, url, max_record_bytes, first)
        else:
            yield Quarantined(url, 0, "not_warc", f"starts with {head!r} and holds no gzip member of a WARC record")


class _RetryingFile:
    """Reads and seeks of one file; a transient error (`pipelines.transient`) reopens it where it was."""

    def __init__(self, fs, path: str, url: str):
        self._fs, self._path, self._url, self._f, self._pos = fs, path, url, None, 0

    def read(self, size: int) -> bytes:
        return retrying(lambda: self._read(size), self._url)

    def _read(self, size: int) -> bytes:
        try:
            if self._f is None:
                self._f = self._fs.open(self._path, "rb")
                self._f.seek(self._pos)
            data = self._f.read(size)
        except Exception:
            self.close()  # the next try starts on a fresh connection
            raise
        self._pos += len(data)
        return data

    def seek(self, pos: int) -> None:
        if self._f is not None:
            self._f.seek(pos)
        self._pos = pos

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()


class _Window:
    """The file's bytes from some offset on, read forward in pieces: the file is never read whole."""

    def __init__(self, f):
        self._f, self._buf, self._base = f, b"", 0

    def view(self, pos: int, at_least: int = 1) -> memoryview:
        """Bytes from file offset `pos` on: at least `at_least` of them unless the file ends first; empty at
        the end of the file."""
        end = self._base + len(self._buf)
        if pos < self._base:  # back to the start of a damaged member that spanned several pieces
            self._f.seek(pos)
            self._buf, self._base, end = b"", pos, pos
        if pos + at_least > end:
            pieces = [self._buf[pos - self._base:]]
            have = len(pieces[0])
            while have < at_least and (piece := self._f.read(max(_READ_BYTES, at_least - have))):
                pieces.append(piece)
                have += len(piece)
            self._buf, self._base = b"".join(pieces), pos
        return memoryview(self._buf)[pos - self._base:]

    def find(self, sub: bytes, pos: int, within: int | None = None) -> int:
        """Offset of the first `sub` at or after `pos` (and before `pos + within`), or -1. Reads forward in
        pieces; nothing is copied."""
        stop = None if within is None else pos + within
        while True:
            data = self.view(pos, _READ_BYTES)
            found = self._buf.find(sub, pos - self._base)
            if found >= 0 and (stop is None or self._base + found < stop):
                return self._base + found
            pos += len(data) - len(sub) + 1
            if found >= 0 or len(data) < _READ_BYTES or (stop is not None and pos >= stop):
                return -1


# --- gzip members ----------------------------------------------------------------------------


def _read_gzip_members(window: _Window, source: str, limit: int, pos: int) -> Iterator[ReadResult]:
    while window.view(pos):
        if window.view(pos, 3)[:3] != GZIP_MAGIC:
            following = _next_member(window, pos + 1)
            yield Quarantined(source, pos, "corrupt_gzip",
                              f"{following - pos} bytes that are not a gzip member before offset {following}")
            pos = following
            continue
        try:
            member, end = _inflate_member(window, pos, limit)
        except _Damage as damage:
            resume = damage.resume if damage.resume is not None else _next_member(window, pos + 1)
            reason, detail = damage.reason, damage.detail
            if reason == "truncated" and window.view(resume):  # a torn member (e.g. stored blocks) swallowed good ones
                reason, detail = "corrupt_gzip", f"gzip member at {pos} cut short: the next member starts at {resume}"
            yield Quarantined(source, pos, reason, detail)
            pos = resume
            continue
        if pos == 0 and not member.startswith(b"WARC/"):
            yield Quarantined(source, 0, "not_warc",
                              f"gzip data starting {member[:16]!r}, not a WARC/1.x record")
            return
        yield from _member_records(member, source, pos, limit)
        pos = end


def _inflate_member(window: _Window, start: int, limit: int) -> tuple[bytes, int]:
    """Inflate the gzip member at `start`: (its bytes, offset just after it). Raises _Damage."""
    inflater = zlib.decompressobj(31)  # 31: gzip framing, exactly one member
    pieces: list[bytes] = []
    size, pos = 0, start
    while not inflater.eof:
        data = window.view(pos)[:_FEED_BYTES]
        tail = data
        try:
            while True:  # bounded output per call; a full buffer means more may be pending
                out = inflater.decompress(tail, _INFLATE_BYTES)
                size += len(out)
                if size <= limit:
                    pieces.append(out)
                tail = inflater.unconsumed_tail
                if inflater.eof or (not tail and len(out) < _INFLATE_BYTES):
                    break
        except zlib.error as e:
            raise _Damage("corrupt_gzip", f"gzip member at {start}: {e}") from None
        if not data and not inflater.eof:
            raise _Damage("truncated", f"the file ends {pos - start} bytes into the gzip member at {start}")
        # At the member's end zlib leaves the rest of the input in unused_data (and in unconsumed_tail, too).
        pos += len(data) - len(inflater.unused_data if inflater.eof else inflater.unconsumed_tail)
    if size > limit:
        raise _Damage("too_large", f"gzip member inflates to {size} bytes > max_record_bytes={limit}", resume=pos)
    return b"".join(pieces), pos


def _next_member(window: _Window, pos: int) -> int:
    """Offset of the next gzip member header at or after `pos` whose data inflates to a WARC record
    (the three magic bytes alone occur in compressed data); the end of the file if none."""
    while (found := window.find(GZIP_MAGIC, pos)) >= 0:
        if _starts_warc_member(window.view(found, 4096)[:4096]):
            return found
        pos = found + 1
    return _end_of_file(window, pos)


def _end_of_file(window: _Window, pos: int) -> int:
    while data := window.view(pos, _READ_BYTES):
        pos += len(data)
    return pos


def _starts_warc_member(data: memoryview) -> bool:
    try:
        return zlib.decompressobj(31).decompress(data, 8).startswith(b"WARC/")
    except zlib.error:
        return False


# --- uncompressed WARC -----------------------------------------------------------------------


def _read_plain(window: _Window, source: str, limit: int) -> Iterator[ReadResult]:
    """Uncompressed WARC: records are framed by their headers and Content-Length; after damage, reading
    resumes at the next `WARC/1.`."""
    pos = 0
    while window.view(pos):
        head = window.view(pos, MAX_HEADER_BYTES)[:MAX_HEADER_BYTES]
        try:
            header_end = window.find(_END, pos, MAX_HEADER_BYTES)
            if header_end < 0:
                raise _Damage("truncated" if len(head) < MAX_HEADER_BYTES else "malformed_header",
                              f"no blank line ends the WARC headers in {len(head)} bytes")
            if head[:5] != b"WARC/":
                raise _Damage("malformed_header", "no WARC/1.x line where a record should start")
            body = header_end + 4 - pos
            length = _content_length(_header_fields(_parse_headers(bytes(head[:body]))), limit)
        except _Damage as damage:
            yield Quarantined(source, pos, damage.reason, damage.detail)
            if damage.reason == "truncated":
                return
            pos = _next_plain_record(window, pos + 1)
            continue
        size = body + length + 4
        record = window.view(pos, size)[:size]
        if len(record) < size:
            yield Quarantined(source, pos, "truncated", f"the file ends inside the record (Content-Length {length})")
            return
        if record[-4:] != _END:
            yield Quarantined(source, pos, "bad_content_length",
                              f"Content-Length {length} does not end at the record's closing CRLF CRLF")
            pos = _next_plain_record(window, pos + 1)
            continue
        yield from _member_records(bytes(record), source, pos, limit)
        pos += size


def _next_plain_record(window: _Window, pos: int) -> int:
    """Where the next record may start: the next `WARC/1.` (the end of the file if none)."""
    found = window.find(b"WARC/1.", pos)
    return found if found >= 0 else _end_of_file(window, pos)


# --- records ---------------------------------------------------------------------------------


def _parse_headers(block: bytes) -> WarcRecord:
    """fastwarc's parse of a WARC header block (up to and including its blank line), which must be UTF-8
    (WARC 1.1; fastwarc would quietly replace what is not)."""
    try:
        block.decode("utf-8")
        return WarcRecord.from_reader(io.BytesIO(block))
    except UnicodeDecodeError as e:
        raise _Damage("malformed_header", f"WARC headers are not UTF-8 at byte {e.start}") from None
    except OSError as e:
        raise _Damage("malformed_header", str(e)) from None


def _header_fields(record: WarcRecord) -> dict[str, str]:
    """The WARC headers by lower-case name (names are case-insensitive); one call, faster than a lookup each."""
    return {name.lower(): value for name, value in record.headers.items()}


def _content_length(headers: dict[str, str], limit: int) -> int:
    raw = headers.get("content-length")
    if raw is None or not (raw.isascii() and raw.isdigit()):
        raise _Damage("bad_content_length", f"Content-Length {raw!r} is not a byte count")
    length = int(raw)
    if length > limit:
        raise _Damage("too_large", f"Content-Length {length} > max_record_bytes={limit}")
    return length


def _member_records(data: bytes, source: str, offset: int, limit: int) -> Iterator[ReadResult]:
    """The records of one inflated member (Common Crawl: exactly one); damage ends the member."""
    pos = 0
    while pos < len(data):
        try:
            record, end = _record_at(data, pos, source, offset, limit)
        except _Damage as damage:
            yield Quarantined(source, offset, damage.reason, damage.detail)
            return
        yield record
        pos = end


def _record_at(data: bytes, pos: int, source: str, offset: int, limit: int) -> tuple[ReadResult, int]:
    header_end = data.find(_END, pos)
    if not data.startswith(b"WARC/", pos):
        raise _Damage("malformed_header", f"no WARC/1.x line at byte {pos} of the record data")
    if header_end < 0:
        raise _Damage("malformed_header", "no blank line ends the WARC headers")
    body = header_end + 4
    record = _parse_headers(data[pos:body])
    headers = _header_fields(record)
    length = _content_length(headers, limit)
    end = body + length
    if data[end:end + 4] != _END:
        raise _Damage("bad_content_length", f"Content-Length {length} does not end at the record's closing CRLF "
                                            f"CRLF ({len(data) - body} bytes follow the headers)")
    for name in ("warc-type", "warc-date"):
        if not headers.get(name):
            raise _Damage("malformed_header", f"no {name} header")
    if not headers.get("warc-record-id"):
        raise _Damage("missing_record_id", "no WARC-Record-ID header")
    kind = record.record_type
    if kind == WarcRecordType.conversion:
        result = _wet_document(headers, data[body:end], source, offset)
    elif kind == WarcRecordType.response:
        result = _html_document(data[pos:end + 4], headers, source, offset, limit)
    else:
        result = Skipped(source, offset, f"record_type:{kind}")
    return result, end + 4


def _document(headers: dict[str, str], text: str, source: str, offset: int) -> WebDocument | Skipped:
    url = headers.get("warc-target-uri")
    if not url:
        raise _Damage("malformed_header", "no WARC-Target-URI header")
    if not text.strip():
        return Skipped(source, offset, "empty_text")
    return WebDocument(key=headers["warc-record-id"], url=url, date=headers["warc-date"],
                       language=headers.get("warc-identified-content-language"), text=text, source=source,
                       offset=offset)


def _wet_document(headers: dict[str, str], payload: bytes, source: str, offset: int) -> WebDocument | Skipped:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Damage("undecodable", f"WET text is not UTF-8 at byte {e.start} of the payload: {e.reason}") from None
    return _document(headers, text, source, offset)


def _html_document(data: bytes, headers: dict[str, str], source: str, offset: int,
                   limit: int) -> WebDocument | Skipped:
    record = WarcRecord.from_reader(io.BytesIO(data))
    if not record.is_http:
        return Skipped(source, offset, "not_html")
    try:
        record.parse_http(auto_decode="all")  # the payload is read with Content-Encoding and chunking undone
    except OSError as e:
        raise _Damage("bad_http", str(e)) from None
    status = record.http_headers.status_code
    if status is None:
        raise _Damage("bad_http", "no HTTP status line")
    if not 200 <= status < 300:
        return Skipped(source, offset, f"http_status:{status}")
    mime = (record.http_content_type or headers.get("warc-identified-payload-type") or "").lower()
    if mime not in HTML_TYPES:
        return Skipped(source, offset, "not_html")
    try:
        payload = record.reader.read(limit + 1)
    except OSError as e:
        raise _Damage("bad_http", str(e)) from None
    if len(payload) > limit:
        raise _Damage("too_large", f"HTTP payload decodes to more than max_record_bytes={limit}")
    if len(payload) > MAX_HTML_BYTES:
        raise _Damage("too_large", f"HTML of {len(payload)} bytes > MAX_HTML_BYTES={MAX_HTML_BYTES}")
    # The HTTP charset wins over the page's <meta>, as in browsers; otherwise meta, then uchardet.
    encoding = record.http_charset or detect_encoding(payload, from_html_meta=True)
    html = bytes_to_str(payload, encoding, errors="replace")
    if (depth := html_depth(html, MAX_HTML_DEPTH)) > MAX_HTML_DEPTH:
        raise _Damage("too_deep", f"HTML nested more than MAX_HTML_DEPTH={MAX_HTML_DEPTH} deep (at least {depth})")
    try:
        tree = HTMLTree.parse(html)
        text = extract_plain_text(tree, preserve_formatting=True, main_content=True, list_bullets=False,
                                  alt_texts=False)
    except (HTMLParserException, LookupError, UnicodeError) as e:
        raise _Damage("bad_html", f"{type(e).__name__}: {e}") from None
    return _document(headers, text, source, offset)


# --- HTML nesting depth, before parsing -------------------------------------------------------

# Comments and raw-text elements (their content holds no tags), or one tag: (end slash, name, attributes).
_HTML_TAG = re.compile(r"<!--.*?(?:-->|\Z)|<(script|style|textarea|title|xmp|noembed|noframes|plaintext)\b[^>]*>.*?"
                       r"(?:</\1\s*>|\Z)|<(/?)([a-zA-Z][^\s/>]*)([^>]*)>", re.S | re.I)
_VOID = frozenset("area base basefont bgsound br col command embed frame hr image img input keygen link meta param "
                  "source track wbr".split())
_NEVER_NESTED = frozenset(("html", "head", "body", "form"))  # a repeated one is merged or ignored
# Elements whose end tag may be left out: the next start tag of one of the group closes the open one (with
# what is above it), as in the HTML tree builder, unless an element that scopes it (a list for `li`, a table for
# cells) lies between; a group with no scopes closes only the element on top. Formatting elements closed by
# `p` stay counted: the tree builder reopens them inside the next element. Elsewhere nothing is closed (counted
# deeper than built, never shallower).
_SCOPED = frozenset("ul ol dl table select ruby div button svg math template".split())
_FORMATTING = frozenset("a b big code em font i nobr s small strike strong tt u".split())
_CLOSES = {name: (group, scopes, reopens) for group, scopes, reopens in (
    (("p",), _SCOPED, True), (("td", "th"), _SCOPED, False), (("tr",), _SCOPED, False),
    (("li",), None, False), (("dd", "dt"), None, False), (("option", "optgroup"), None, False), (("a",), None, False),
    (("nobr",), None, False), (("button",), None, False), (("h1", "h2", "h3", "h4", "h5", "h6"), None, False),
    (("table",), None, False)) for name in group}
_CELLS = frozenset(("td", "th", "tr"))
# In SVG and MathML `/>` closes an element (in HTML it is ignored), except on these, which leave foreign content.
_BREAKOUT = frozenset("b big blockquote body br center code dd div dl dt em embed h1 h2 h3 h4 h5 h6 head hr i img "
                      "li listing menu meta nobr ol p pre ruby s small span strike strong sub sup table tt u ul "
                      "var".split())
_NEAR = 64  # an end tag or implied close looks this far down the open elements (bounded: linear time)


def html_depth(html: str, stop: int) -> int:
    """The deepest nesting of elements in `html`, estimated from its tags in one linear pass (stops once above
    `stop`; a page with at most `stop` start tags gives their number). Meant never to fall far below what an
    HTML parser builds: where the tag soup is unclear (an end tag far from its start, `/>` outside SVG),
    elements are counted as still open."""
    start_tags = html.count("<") - html.count("</") - html.count("<!")  # counted in C: most pages stop here
    if start_tags <= stop:
        return max(0, start_tags)  # an element opens only at a start tag: never deeper than their number
    stack: list[str] = []
    open_count: collections.defaultdict = collections.defaultdict(int)  # name -> open elements of that name
    deepest = 0
    for _, end, name, attributes in _HTML_TAG.findall(html):  # tuples, not match objects: twice as fast
        if not name:
            continue  # a comment or raw text
        name = name.lower()
        if end:
            if open_count[name]:
                _close(stack, open_count, (name,))
            continue
        if name in _VOID or name in _NEVER_NESTED:
            continue
        if attributes.endswith("/") and open_count["svg"] + open_count["math"] and name not in _BREAKOUT:
            continue  # a self-closed SVG or MathML element
        if name in _CLOSES and (name not in _CELLS or open_count["table"]):  # cells outside a table are ignored
            _close(stack, open_count, *_CLOSES[name])
        stack.append(name)
        open_count[name] += 1
        if len(stack) > deepest:
            deepest = len(stack)
            if deepest > stop:
                break
    return deepest


def _close(stack: list[str], open_count: collections.defaultdict, names: tuple[str, ...],
           scopes: frozenset | None = frozenset(), reopens: bool = False) -> None:
    """Pop the nearest open element named in `names` and everything above it, if it is within `_NEAR` of the
    top and no element in `scopes` lies above it (`scopes` None: only the element on top); with `reopens`,
    the formatting elements above it stay."""
    for i in range(len(stack) - 1, max(-1, len(stack) - 1 - _NEAR), -1):
        if stack[i] in names:
            kept = [name for name in stack[i + 1:] if name in _FORMATTING] if reopens else []
            for name in stack[i:]:
                open_count[name] -= 1
            del stack[i:]
            for name in kept:
                stack.append(name)
                open_count[name] += 1
            return
        if scopes is None or stack[i] in scopes:
            return
