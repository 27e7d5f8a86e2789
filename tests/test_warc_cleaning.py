"""Reading WET/WARC files (pipelines/warc.py) and cleaning web text (pipelines/cleaning.py).

Conformance on every real Common Crawl sample in ../shared/data/commoncrawl, then damaged and
hostile inputs written here record by record (one gzip member each, as Common Crawl writes them),
then each cleaning rule on small texts, on and off.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import os
import random
import tracemalloc
from collections import Counter

import fsspec
import pytest
import warcio
from fastwarc.warc import ArchiveIterator, WarcRecordType

from codistill.config import ConfigError, parse_experiment
from codistill.datasets.commoncrawl import CleaningConfig
from pipelines.cleaning import DROP_REASONS, LINE_REASONS, Cleaner, detect_language
from pipelines.warc import (MAX_HTML_BYTES, MAX_HTML_DEPTH, QUARANTINE_REASONS, Quarantined, Skipped, WarcInputError,
                            WebDocument, html_depth, read_web_documents)

SAMPLES = "commoncrawl"
WET, WARC, RESILIPARSE = "whirlwind.warc.wet.gz", "whirlwind.warc.gz", "resiliparse_CC-MAIN-2020-34_warcfile.warc.gz"


def read(url, **kwargs) -> list:
    return list(read_web_documents(str(url), **kwargs))


def label(result) -> str:
    """A document's key, or why a record is not one."""
    return result.key if isinstance(result, WebDocument) else result.reason


def labels(results) -> list[str]:
    return [label(r) for r in results]


def kinds(results) -> Counter:
    return Counter("WebDocument" if isinstance(r, WebDocument) else r.reason for r in results)


# --- conformance on the real samples ---------------------------------------------------------------


@pytest.fixture(scope="module")
def samples(shared_data):
    folder = shared_data / SAMPLES
    names = sorted(os.listdir(folder))
    assert names == sorted([WET, WARC, RESILIPARSE]), f"new sample files in {folder}: add their expectations here"
    return {name: read(folder / name) for name in names}


def test_every_sample_file_is_read_completely(samples, shared_data):
    for name, results in samples.items():
        assert not [r for r in results if isinstance(r, Quarantined)], name
        # One result per record, at the offset fastwarc gives the record (its gzip member).
        with open(shared_data / SAMPLES / name, "rb") as f:
            offsets = [r.stream_pos for r in ArchiveIterator(f, parse_http=False)]
        assert [r.offset for r in results] == offsets, name
        assert all(r.source == str(shared_data / SAMPLES / name) for r in results)


def test_wet_sample(samples, shared_data):
    info, doc = samples[WET]
    assert info == Skipped(info.source, 0, "record_type:warcinfo")
    assert doc.key == "<urn:uuid:ba729a40-ff84-4085-8d48-0a5b2ee0c42d>"
    assert doc.url == "https://an.wikipedia.org/wiki/Escopete"
    assert doc.date == "2024-05-18T01:58:10Z"
    assert doc.language == "spa"
    with open(shared_data / SAMPLES / WET, "rb") as f:
        texts = [r.reader.read() for r in ArchiveIterator(f, record_types=WarcRecordType.conversion, parse_http=False)]
    assert [doc.text.encode("utf-8")] == texts
    assert doc.text.startswith("Escopete - Biquipedia, a enciclopedia libre\n")


def test_warc_sample(samples):
    results = samples[WARC]
    assert [r.reason for r in results if isinstance(r, Skipped)] == [
        "record_type:warcinfo", "record_type:request", "record_type:metadata"]
    (doc,) = [r for r in results if isinstance(r, WebDocument)]
    assert doc.key == "<urn:uuid:2aabeff2-67f5-4608-8466-e87c6296e2b6>"  # the response record's id
    assert doc.url == "https://an.wikipedia.org/wiki/Escopete"
    assert doc.language is None  # WARC responses carry no language header; the cleaner detects it
    assert doc.text.startswith("Escopete\n")
    assert "Biquipedia" in doc.text and "<div" not in doc.text and "</" not in doc.text


RESILIPARSE_URLS = [
    "http://003338.cn/l41/481397.html", "http://01spb.ru/company/",
    "http://035.psb556.com/24/i/u_1090813/article.html", "http://037426.cn/", "http://041696.com/15477/list_6_4.html",
    "http://044545.com/topic/20200207/015849.html", "http://0513mt.com/index.php/art/detail/id/8884.html",
    "http://05925.net/index.php/vod/type/id/53.html",
    "http://06.live-radsport.ch/fahrerstatistik_801/Anthony_Ravard.html",
    "http://06.live-radsport.ch/tippspiel/stats_140_petzi.html",
    "http://0615235.com/02mjqjo%7Bibotij2.btq?odmbtt=106&tdmbtt=121", "http://0755krk.com/76104/list_4_1.html",
    "http://0760.jxtdw.com/area/sanxiang/", "http://077678u.info/erxiaoshujinguang/list_6_2.html",
    "http://0900-hovenier.nl/gelderland/oosterbeek/", "http://096355.com/video/11073.html?11073-0-2",
]


def test_resiliparse_warc_sample(samples, shared_data):
    results = samples[RESILIPARSE]
    assert len(results) == 50
    assert kinds(results) == {"record_type:warcinfo": 1, "record_type:request": 17, "WebDocument": 16,
                              "record_type:metadata": 16}
    docs = [r for r in results if isinstance(r, WebDocument)]
    with open(shared_data / SAMPLES / RESILIPARSE, "rb") as f:
        response_ids = [r.record_id for r in ArchiveIterator(f, record_types=WarcRecordType.response)]
    assert [d.key for d in docs] == response_ids
    assert docs[0].key == "<urn:uuid:c4c112a5-3503-4483-abf8-51a0dd86dd53>"
    assert [d.url for d in docs] == RESILIPARSE_URLS
    assert all(d.date.startswith("2020-08-08T") for d in docs)
    by_url = {d.url: d.text for d in docs}
    for text in by_url.values():  # main text, not markup
        assert text.strip() and "<div" not in text and "<script" not in text and "</" not in text
    assert by_url["http://0900-hovenier.nl/gelderland/oosterbeek/"].startswith("Hovenier in Oosterbeek\n")
    # windows-1251 (declared in the HTTP header) decoded as such
    assert by_url["http://01spb.ru/company/"].startswith("О компании")
    assert "KUNSHAN STANLEY TRADING CO.,LTD." in by_url["http://037426.cn/"]


def test_damaged_real_warc_loses_only_the_damaged_records(samples, shared_data, tmp_path):
    data = (shared_data / SAMPLES / RESILIPARSE).read_bytes()
    clean_results = samples[RESILIPARSE]
    at = [r.offset for r in clean_results] + [len(data)]
    k = 20  # a response record: its member's deflate data is damaged
    assert isinstance(clean_results[k], WebDocument)
    damaged = data[:at[k] + 100] + bytes(b ^ 0x55 for b in data[at[k] + 100:at[k] + 140]) + data[at[k] + 140:]
    results = read(write(tmp_path, damaged, "damaged.warc.gz"))
    assert results[:k] + results[k + 1:] == [dataclasses.replace(r, source=results[0].source)
                                             for r in clean_results[:k] + clean_results[k + 1:]]
    assert (results[k].reason, results[k].offset) == ("corrupt_gzip", at[k])
    cut = read(write(tmp_path, data[:at[40] + (at[41] - at[40]) // 2], "cut.warc.gz"))
    assert labels(cut[:40]) == labels(clean_results[:40])
    assert (cut[40].reason, cut[40].offset, len(cut)) == ("truncated", at[40], 41)


def test_reads_any_fsspec_url(shared_data, memory_root):
    url = f"{memory_root}/{WET}"
    with fsspec.open(url, "wb") as f:
        f.write((shared_data / SAMPLES / WET).read_bytes())
    results = read(url)
    assert kinds(results) == {"record_type:warcinfo": 1, "WebDocument": 1}
    assert results[1].source == url and results[1].language == "spa"


# --- damaged and hostile inputs ----------------------------------------------------------------------


def warc_record(text: bytes = b"Some text.\n", *, kind: bytes = b"conversion", record_id: bytes | None = None,
                length: bytes | None = None, version: bytes = b"WARC/1.0", index: int = 0) -> bytes:
    """One WARC record, as bytes (a WET conversion record unless `kind` says otherwise)."""
    fields = [version, b"WARC-Type: " + kind, b"WARC-Target-URI: http://example.com/%d" % index,
              b"WARC-Date: 2024-05-18T01:58:10Z"]
    if record_id is None:
        record_id = b"<urn:uuid:00000000-0000-0000-0000-%012d>" % index
    if record_id:
        fields.append(b"WARC-Record-ID: " + record_id)
    fields.append(b"Content-Type: text/plain")
    fields.append(b"Content-Length: " + (str(len(text)).encode() if length is None else length))
    return b"\r\n".join(fields) + b"\r\n\r\n" + text + b"\r\n\r\n"


def members(*records: bytes) -> list[bytes]:
    return [gzip.compress(r) for r in records]


def good(n: int, start: int = 0) -> list[bytes]:
    return [warc_record(b"Document number %d.\n" % i, index=i) for i in range(start, start + n)]


def key(i: int) -> str:
    return "<urn:uuid:00000000-0000-0000-0000-%012d>" % i


def write(tmp_path, data: bytes, name: str = "input.warc.wet.gz") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def offsets(parts: list[bytes]) -> list[int]:
    out, at = [], 0
    for part in parts:
        out.append(at)
        at += len(part)
    return out


def test_records_written_here_are_valid_warc(tmp_path):
    path = write(tmp_path, b"".join(members(*good(3))))
    with open(path, "rb") as f:  # an independent reader agrees
        ids = [r.rec_headers.get_header("WARC-Record-ID") for r in warcio.ArchiveIterator(f)]
    assert ids == [key(i) for i in range(3)]
    assert labels(read(path)) == [key(i) for i in range(3)]


def test_truncated_last_member_is_quarantined_and_the_members_before_kept(tmp_path):
    parts = members(*good(4))
    at = offsets(parts)
    for cut in (len(parts[3]) // 2, len(parts[3]) - 3):  # inside the deflate data; inside the gzip trailer
        results = read(write(tmp_path, b"".join(parts[:3]) + parts[3][:cut]))
        assert [r.key for r in results[:3]] == [key(0), key(1), key(2)]
        assert results[3] == Quarantined(results[3].source, at[3], "truncated", results[3].detail)
        assert len(results) == 4


def flip(data: bytes, start: int, stop: int) -> bytes:
    return data[:start] + bytes(b ^ 0xFF for b in data[start:stop]) + data[stop:]


@pytest.mark.parametrize("damage", [
    lambda m: flip(m, 12, 30),  # deflate data
    lambda m: flip(m, len(m) - 8, len(m) - 4),  # CRC-32 of the trailer
    lambda m: flip(m, 3, 4),  # header flags
])
def test_corrupt_member_in_the_middle_reading_resumes_after_it(tmp_path, damage):
    parts = members(*good(5))
    at = offsets(parts)
    results = read(write(tmp_path, b"".join(parts[:2] + [damage(parts[2])] + parts[3:])))
    assert labels(results) == [key(0), key(1), "corrupt_gzip", key(3), key(4)]
    assert results[2].offset == at[2]


def test_corrupt_member_longer_than_a_read_piece_resumes_at_the_next_member(tmp_path):
    # The damage shows at the member's end (its CRC), after the reader has moved past the member's start.
    big = warc_record(base64.b64encode(random.Random(0).randbytes(3 << 20)) + b"\n", index=2)
    parts = members(*good(2), big, *good(2, start=3))
    assert len(parts[2]) > 2 * (1 << 20)
    at = offsets(parts)
    results = read(write(tmp_path, b"".join(parts[:2] + [flip(parts[2], len(parts[2]) - 8, len(parts[2]) - 4)]
                                  + parts[3:])))
    assert labels(results) == [key(0), key(1), "corrupt_gzip", key(3), key(4)]
    assert results[2].offset == at[2] and results[3].offset == at[3]


def test_torn_member_that_swallows_the_rest_of_the_file_loses_only_itself(tmp_path):
    # A stored (uncompressed) deflate block cut short takes the members after it as its data, up to the end
    # of the file: the reader goes back and resumes at the first of them, across read pieces.
    first = gzip.compress(warc_record(base64.b64encode(random.Random(0).randbytes(3 << 18)) + b"\n", index=0))
    torn = gzip.compress(warc_record(b"x" * 400_000 + b"\n", index=1), compresslevel=0)[:(1 << 20) - len(first) - 100]
    rest = members(*good(40, start=2))
    results = read(write(tmp_path, first + torn + b"".join(rest)))
    assert labels(results) == [key(0), "corrupt_gzip", *(key(i) for i in range(2, 42))]
    assert results[1].offset == len(first) and results[2].offset == len(first) + len(torn)


def test_member_cut_short_then_a_good_member(tmp_path):
    parts = members(*good(4))
    data = parts[0] + parts[1][: len(parts[1]) // 2] + parts[2] + parts[3]
    results = read(write(tmp_path, data))
    assert labels(results) == [key(0), "corrupt_gzip", key(2), key(3)]
    assert results[1].offset == len(parts[0])
    assert results[2].offset == len(parts[0]) + len(parts[1]) // 2


@pytest.mark.parametrize("compressed, seed", [(True, s) for s in range(40)] + [(False, s) for s in range(20)])
def test_random_damage_loses_only_the_damaged_records(tmp_path, compressed, seed):
    """Flip bytes inside a record (its gzip member), cut the file, or insert junk between records: every
    record the damage did not touch is still read, in order, and the damage is quarantined, never raised."""
    rng = random.Random(seed)
    parts = [warc_record(b"Document %d. " % i * rng.randint(1, 200), index=i) for i in range(6)]
    if compressed:
        parts = members(*parts)
    intact = set(range(6))
    damage = rng.choice(["flip", "cut", "junk"])
    target = rng.randrange(6 if compressed else 5)
    if damage == "flip":
        start = rng.randrange(len(parts[target]))
        parts[target] = flip(parts[target], start, min(start + rng.randint(1, 20), len(parts[target])))
        intact.discard(target)  # (a flip in the gzip header's mtime or OS byte leaves the member readable)
    elif damage == "cut":
        parts[target] = parts[target][:rng.randrange(len(parts[target]))]
        parts = parts[:target + 1]
        intact -= set(range(target, 6))
    else:  # an uncompressed file must start with its first record
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
        parts.insert(target if compressed else target + 1, junk)
    results = read(write(tmp_path, b"".join(parts)))
    documents = [r for r in results if isinstance(r, WebDocument)]
    assert {key(i) for i in intact} <= {d.key for d in documents}
    # (uncompressed records have no CRC: a flip can leave a well-framed record of an unknown type)
    assert all(isinstance(r, (WebDocument, Quarantined)) or r.reason == "record_type:unknown" for r in results)
    assert [r.offset for r in results] == sorted({r.offset for r in results})  # file order, one result each
    if damage == "cut" and parts[-1]:
        assert results[-1].reason == "truncated"


def test_garbage_before_and_between_members(tmp_path):
    parts = members(*good(3))
    results = read(write(tmp_path, parts[0] + b"\x1f\x8b\x08 not a member at all" + parts[1] + parts[2]))
    assert labels(results) == [key(0), "corrupt_gzip", key(1), key(2)]
    assert results[1].offset == len(parts[0])
    junk = b"a download error page, then the data\n"
    results = read(write(tmp_path, junk + b"".join(parts)))
    assert labels(results) == ["corrupt_gzip", key(0), key(1), key(2)]
    assert [r.offset for r in results] == [0] + [len(junk) + at for at in offsets(parts)]


@pytest.mark.parametrize("data, detail", [
    (b"label,value\n1,2\n", "holds no gzip member of a WARC record"),
    (gzip.compress(b"label,value\n1,2\n"), "not a WARC/1.x record"),
    (b"\x89PNG\r\n\x1a\n" + bytes(200) + gzip.compress(b"IDAT"), "holds no gzip member of a WARC record"),
])
def test_non_warc_file_is_one_quarantine(tmp_path, data, detail):
    (result,) = read(write(tmp_path, data))
    assert result.reason == "not_warc" and result.offset == 0 and detail in result.detail


def test_empty_file(tmp_path):
    assert [r.reason for r in read(write(tmp_path, b""))] == ["empty_file"]


def test_plain_uncompressed_warc(tmp_path):
    records = good(3)
    results = read(write(tmp_path, b"".join(records), "input.warc"))
    assert [r.key for r in results] == [key(0), key(1), key(2)]
    assert [r.offset for r in results] == offsets(records)
    # A record whose Content-Length lies: quarantined, the next `WARC/1.` line read on; a cut record at the end.
    liar = warc_record(b"Text of a lying record.\n", length=b"5", index=7)
    damaged = [records[0], liar, records[1], records[2][:-20]]
    results = read(write(tmp_path, b"".join(damaged), "damaged.warc"))
    assert labels(results) == [key(0), "bad_content_length", key(1), "truncated"]
    assert [r.offset for r in results] == offsets(damaged)


@pytest.mark.parametrize("record, reason", [
    (warc_record(version=b"WARX/1.0"), "malformed_header"),
    (warc_record().replace(b"conversion", b"conv\xe9rsion"), "malformed_header"),  # headers not UTF-8
    (warc_record().split(b"\r\n\r\n")[0] + b"\r\n", "malformed_header"),  # no blank line ends the headers
    (warc_record().replace(b"WARC-Date: 2024-05-18T01:58:10Z\r\n", b""), "malformed_header"),
    (warc_record().replace(b"WARC-Target-URI: http://example.com/0\r\n", b""), "malformed_header"),
    (warc_record(record_id=b""), "missing_record_id"),
    (warc_record(length=b"abc"), "bad_content_length"),
    (warc_record(length=b"-5"), "bad_content_length"),
    (warc_record(b"Ten bytes.\n", length=b"4"), "bad_content_length"),
    (warc_record(b"Ten bytes.\n", length=b"400"), "bad_content_length"),
    (warc_record().replace(b"Content-Length: 11\r\n", b""), "bad_content_length"),
    (warc_record(b"caf\xe9 au lait\n"), "undecodable"),
])
def test_malformed_record_is_quarantined_and_reading_goes_on(tmp_path, record, reason):
    parts = members(*good(1), record, *good(1, start=1))
    results = read(write(tmp_path, b"".join(parts)))
    assert labels(results) == [key(0), reason, key(1)]
    assert reason in QUARANTINE_REASONS
    assert results[1].offset == len(parts[0])


def test_empty_records_are_skipped(tmp_path):
    parts = members(warc_record(b""), warc_record(b" \n\n\t\n"), *good(1, start=1))
    assert labels(read(write(tmp_path, b"".join(parts)))) == [
        "empty_text", "empty_text", key(1)]


def test_huge_content_length_is_quarantined_without_allocating_it(tmp_path):
    # fastwarc's WarcRecord.from_bytes would try to allocate the declared 1 PB and abort the process.
    parts = members(*good(1), warc_record(length=b"1000000000000000"), *good(1, start=1))
    results = read(write(tmp_path, b"".join(parts)))
    assert labels(results) == [key(0), "too_large", key(1)]


def test_decompression_bomb_streams_past_in_bounded_memory(tmp_path):
    bomb = gzip.compress(warc_record(b"a" * (24 << 20)))  # 24 MiB inflated from ~24 KB
    parts = members(*good(1)) + [bomb] + members(*good(1, start=1))
    path = write(tmp_path, b"".join(parts))
    tracemalloc.start()
    try:
        results = read(path, max_record_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert labels(results) == [key(0), "too_large", key(1)]
    assert results[1].offset == len(parts[0])
    assert peak < 6 << 20, f"peak {peak} bytes: the oversized member was held in memory"


def test_several_records_in_one_member(tmp_path):
    one = gzip.compress(b"".join(good(3)))
    results = read(write(tmp_path, one + gzip.compress(good(1, start=3)[0])))
    assert [r.key for r in results] == [key(0), key(1), key(2), key(3)]
    assert [r.offset for r in results] == [0, 0, 0, len(one)]


def http_response(body: bytes, content_type: bytes = b"text/html; charset=utf-8", status: bytes = b"200 OK",
                  encoding: bytes | None = None, index: int = 0) -> bytes:
    headers = [b"HTTP/1.1 " + status, b"Content-Type: " + content_type]
    if encoding:
        headers.append(b"Content-Encoding: " + encoding)
        body = gzip.compress(body)
    headers.append(b"Content-Length: %d" % len(body))
    http = b"\r\n".join(headers) + b"\r\n\r\n" + body
    return warc_record(http, kind=b"response", index=index).replace(
        b"Content-Type: text/plain", b"Content-Type: application/http; msgtype=response")


PAGE = ("<html><head><title>T</title><script>var x = 1;</script></head><body><nav>Home | About</nav>"
        "<main><h1>Caf\u00e9 news</h1><p>The first paragraph of the article is here.</p>"
        "<p>A second paragraph follows it.</p></main></body></html>")


def test_warc_responses(tmp_path):
    records = [
        http_response(PAGE.encode("utf-8"), index=0),
        http_response(PAGE.encode("cp1252"), b"text/html; charset=windows-1252", index=1),
        http_response(PAGE.encode("utf-8"), encoding=b"gzip", index=2),
        http_response(b"%PDF-1.4 ...", b"application/pdf", index=3),
        http_response(b"<html>gone</html>", status=b"404 Not Found", index=4),
        http_response(b"<html><body><script>only()</script></body></html>", index=5),
        warc_record(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", kind=b"request", index=6),
        warc_record(b"not an HTTP message", kind=b"response", index=7).replace(
            b"Content-Type: text/plain", b"Content-Type: application/http; msgtype=response"),
        warc_record(b"<html>a response record that holds no HTTP</html>", kind=b"response", index=8),
    ]
    results = read(write(tmp_path, b"".join(members(*records)), "input.warc.gz"))
    assert labels(results) == [key(0), key(1), key(2), "not_html", "http_status:404", "empty_text",
                               "record_type:request", "bad_http", "not_html"]
    for doc in results[:3]:
        assert "Caf\u00e9 news" in doc.text and "The first paragraph of the article is here." in doc.text
        assert "var x" not in doc.text and "<p>" not in doc.text
        assert doc.url == f"http://example.com/{results.index(doc)}"


@pytest.mark.timeout(20)
def test_special_files_raise_a_clear_error_without_hanging(tmp_path):
    zero = tmp_path / "zero.warc.gz"
    zero.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.warc.gz"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    for path in (zero, fifo, tmp_path):
        with pytest.raises(WarcInputError, match="not a regular file"):
            read(path)


def test_missing_file_and_bad_limit(tmp_path):
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "absent.warc.gz")
    with pytest.raises(ValueError, match="max_record_bytes must be >= 1"):
        read(write(tmp_path, b"".join(members(*good(1)))), max_record_bytes=0)


# --- cleaning ------------------------------------------------------------------------------------------

ALL_OFF = CleaningConfig(
    languages=(), remove_citations=False, terminal_punctuation=False, min_words_per_line=None, max_word_length=None,
    javascript_lines=False, policy_lines=False, lorem_ipsum=False, curly_braces=False, min_lines=None,
    min_words=None, max_chars=None, min_mean_word_length=None, max_mean_word_length=None,
    max_symbol_word_ratio=None, max_duplicate_line_fraction=None, max_duplicate_line_char_fraction=None,
    max_top_ngram_char_fraction=None, blocklist=None)

GOOD_LINES = [
    "The river runs through the old town before it reaches the sea.",
    "Many visitors come in summer to walk along its quiet banks.",
    "Local bakers sell fresh bread and small cakes every morning.",
    "In winter the streets are calm and the museums are nearly empty.",
    "A short train ride takes you to the mountains in under an hour.",
    "Most people agree that the spring is the best season to visit.",
]


def doc(text: str, language: str | None = "eng") -> WebDocument:
    return WebDocument(key="<urn:uuid:1>", url="http://example.com/", date="2024-01-01T00:00:00Z",
                       language=language, text=text, source="test", offset=0)


def clean(text: str, config: CleaningConfig = ALL_OFF, **rule):
    return Cleaner(dataclasses.replace(config, **rule)).clean(doc(text))


def test_default_config_keeps_good_english_prose():
    text = "\n".join(GOOD_LINES).replace("sea.", "sea.[1]")
    result = Cleaner(CleaningConfig()).clean(doc(text))
    assert result.drop_reason is None and result.lines_dropped == {}
    assert result.text == "\n".join(GOOD_LINES)  # citation mark cut
    assert Cleaner(CleaningConfig()).clean(doc("\n".join(GOOD_LINES[:4]))).drop_reason == "too_few_words"  # < 50


@pytest.mark.parametrize("rule, value, bad_line, reason", [
    ("terminal_punctuation", True, "Read more", "line:no_terminal_punctuation"),
    ("terminal_punctuation", True, "And then there was more...", "line:no_terminal_punctuation"),
    ("min_words_per_line", 5, "Too short here.", "line:too_few_words"),
    ("max_word_length", 20, "A line with " + "x" * 21 + " in it.", "line:too_long_word"),
    ("javascript_lines", True, "Please enable JavaScript to view this page.", "line:javascript"),
    ("policy_lines", True, "By using this site you agree to our Terms of Use.", "line:policy"),
    ("policy_lines", True, "This website uses cookies to improve your experience.", "line:policy"),
])
def test_line_rule_removes_its_lines_and_its_switch_turns_it_off(rule, value, bad_line, reason):
    text = "\n".join(GOOD_LINES[:2] + [bad_line] + GOOD_LINES[2:])
    on = clean(text, **{rule: value})
    assert on.drop_reason is None and on.lines_dropped == {reason: 1}
    assert on.text == "\n".join(GOOD_LINES)
    off = clean(text)
    assert off.lines_dropped == {} and bad_line in off.text
    assert reason in LINE_REASONS


def test_blank_lines_are_counted():
    result = clean("\n".join(["", GOOD_LINES[0], "   ", GOOD_LINES[1]]))
    assert result.lines_dropped == {"line:empty": 2} and result.text == "\n".join(GOOD_LINES[:2])


def test_citations_are_cut_from_lines():
    text = "Rivers flow to the sea.[1] They carry silt.[citation needed] Rain feeds them.[edit]"
    assert clean(text, remove_citations=True).text == "Rivers flow to the sea. They carry silt. Rain feeds them."
    assert clean(text).text == text


@pytest.mark.parametrize("rule, bad_line, reason", [
    ("lorem_ipsum", "Lorem ipsum dolor sit amet, consectetur adipiscing elit.", "lorem_ipsum"),
    ("curly_braces", "function show() { return window.open(url); }.", "curly_braces"),
])
def test_page_rules_on_lines_follow_c4(rule, bad_line, reason):
    text = "\n".join(GOOD_LINES[:3] + [bad_line] + GOOD_LINES[3:])
    assert clean(text, **{rule: True}).drop_reason == reason
    assert clean(text).drop_reason is None
    # As in C4, only lines that pass the punctuation and word-count rules are looked at.
    unpunctuated = text.replace(bad_line, bad_line.rstrip("."))
    assert clean(unpunctuated, **{rule: True}, terminal_punctuation=True).drop_reason is None


PROSE = "\n".join(GOOD_LINES)


@pytest.mark.parametrize("rule, value, text, reason", [
    ("min_lines", 7, PROSE, "too_few_lines"),
    ("min_words", 100, PROSE, "too_few_words"),
    ("max_chars", 100, PROSE, "too_long"),
    ("min_mean_word_length", 3.0, "a b c d e f g h i j k.", "mean_word_length"),
    ("max_mean_word_length", 10.0, "Pneumonoultramicroscopic supercalifragilistic antidisestablishment.",
     "mean_word_length"),
    ("max_symbol_word_ratio", 0.1, PROSE + "\n#sale #deal #cheap #buy #now #win #free #best #top #hot", "symbol_ratio"),
    ("max_symbol_word_ratio", 0.1, PROSE + "\nWait... what... really... no... yes... so... ok... fine... done.",
     "symbol_ratio"),
    ("max_symbol_word_ratio", 0.1, PROSE + "\nWait\u2026 what\u2026 really\u2026 no\u2026 yes\u2026 so\u2026 ok\u2026 "
     "fine\u2026 done.", "symbol_ratio"),
    ("max_duplicate_line_fraction", 0.3, "\n".join(GOOD_LINES[:3] * 2), "duplicate_lines"),
    ("max_duplicate_line_char_fraction", 0.2, PROSE + "\n" + GOOD_LINES[0] * 3 + "\n" + GOOD_LINES[0] * 3,
     "duplicate_line_chars"),
    ("max_top_ngram_char_fraction", (0.2, 0.18, 0.16), PROSE + " buy now" * 30 + ".", "top_ngram"),
])
def test_page_rule_drops_the_page_and_its_switch_turns_it_off(rule, value, text, reason):
    assert clean(text, **{rule: value}).drop_reason == reason
    assert clean(text).drop_reason is None
    assert reason in DROP_REASONS


def test_symbol_ratio_counts_hashes_and_ellipses_apart_as_gopher_does():
    text = PROSE + "\nWait... so #1 #2 #3 #4 #5... and then... #6 #7."  # 81 words, 7 hashes, 3 ellipses
    assert clean(text, max_symbol_word_ratio=0.1).drop_reason is None
    assert clean(text, max_symbol_word_ratio=0.08).drop_reason == "symbol_ratio"


def test_top_ngram_once_is_not_repetition():
    # Six words: each bigram is a big share of the characters, but none repeats.
    assert clean("Quick brown foxes jump over dogs.", max_top_ngram_char_fraction=(0.2,)).drop_reason is None


def test_a_page_with_no_lines_left_is_always_dropped():
    assert clean("Read more\nClick here", terminal_punctuation=True).drop_reason == "too_few_lines"


def test_blocklist_whole_words_any_case_and_phrases(memory_root):
    url = f"{memory_root}/blocklist.txt"
    with fsspec.open(url, "w") as f:
        f.write("# words and phrases\nbadword\nbuy now\nx$y\n\n")
    blocked = Cleaner(dataclasses.replace(ALL_OFF, blocklist=url))
    for extra, dropped in [("", False), ("A BadWord here.", True), ("badwords, plural.", False),
                           ("You should Buy\n  Now.", True), ("You should buy   now.", True), ("the x$y sign.", True),
                           ("the ax$y sign.", False)]:
        text = PROSE + "\n" + extra
        assert (blocked.clean(doc(text)).drop_reason == "blocklist") == dropped, text
    assert Cleaner(ALL_OFF).clean(doc(PROSE + "\nA BadWord here.")).drop_reason is None
    with pytest.raises(FileNotFoundError):
        Cleaner(dataclasses.replace(ALL_OFF, blocklist=f"{memory_root}/absent.txt"))


def test_language_from_the_warc_header_then_pycld2():
    keep_en = dataclasses.replace(ALL_OFF, languages=("en",))
    english = PROSE
    german = ("Der Fluss fließt durch die alte Stadt, bevor er das Meer erreicht. Viele Besucher kommen im "
              "Sommer, um an seinen ruhigen Ufern spazieren zu gehen.")
    assert Cleaner(keep_en).clean(doc(german, "eng")).drop_reason is None  # the header is trusted
    for language, dropped in [("eng", False), ("eng,fra", False), ("fra,eng", True), ("spa", True), ("ENG", False)]:
        assert (Cleaner(keep_en).clean(doc(english, language)).drop_reason == "language") == dropped, language
    assert Cleaner(keep_en).clean(doc(english, None)).drop_reason is None
    assert Cleaner(keep_en).clean(doc(german, None)).drop_reason == "language"
    distrust = dataclasses.replace(keep_en, use_warc_language=False)
    assert Cleaner(distrust).clean(doc(german, "eng")).drop_reason == "language"
    for codes in (("de",), ("deu",), ("ger",), ("en", "de")):
        assert Cleaner(dataclasses.replace(ALL_OFF, languages=codes)).clean(doc(german, None)).drop_reason is None
    assert Cleaner(ALL_OFF).clean(doc(german, "spa")).drop_reason is None  # languages=() keeps all
    for odd in ("\x00", "\x85", "\ufdd0", "\U0010ffff", "\ud800"):  # code points pycld2 refuses
        assert detect_language(f"Hello{odd} world, this text has an odd code point in it and is English.") == "en"
    hebrew = "שלום עולם, זהו טקסט בעברית לבדיקה של זיהוי השפה. אנחנו כותבים עוד משפט כדי שיהיה מספיק טקסט."
    assert detect_language(hebrew) == "he"  # CLD2 says "iw"
    assert Cleaner(dataclasses.replace(ALL_OFF, languages=("heb",))).clean(doc(hebrew, None)).drop_reason is None


def test_cleaning_the_real_samples(samples):
    wet_doc = samples[WET][1]
    assert Cleaner(CleaningConfig()).clean(wet_doc).drop_reason == "language"  # Aragonese page, header `spa`
    spanish = Cleaner(CleaningConfig(languages=("es",), min_words=20)).clean(wet_doc)
    assert spanish.drop_reason is None and "Escopete" in spanish.text and spanish.lines_dropped
    cleaner = Cleaner(ALL_OFF)
    languages = {d.url: cleaner.language(d) for d in samples[RESILIPARSE] if isinstance(d, WebDocument)}
    assert languages["http://0900-hovenier.nl/gelderland/oosterbeek/"] == "nl"
    assert languages["http://01spb.ru/company/"] == "ru"
    assert languages["http://003338.cn/l41/481397.html"] == "zh"
    reasons = Counter(Cleaner(CleaningConfig()).clean(d).drop_reason for d in samples[RESILIPARSE]
                      if isinstance(d, WebDocument))
    assert reasons["language"] >= 14 and sum(reasons.values()) == 16


MANIFEST = {"name": "cc", "data": {"dataset": "commoncrawl", "input": "crawl/*.warc.wet.gz"}}


def test_cleaning_config_from_the_manifest():
    config = parse_experiment(MANIFEST, ["data.commoncrawl.clean.min_words=null",
                                         "data.commoncrawl.clean.languages=[en, de]",
                                         "data.commoncrawl.clean.max_top_ngram_char_fraction=[0.3]"])
    clean_config = config.data.commoncrawl.clean
    assert clean_config.min_words is None and clean_config.languages == ("en", "de")
    assert clean_config.max_top_ngram_char_fraction == (0.3,)
    for override, message in [
        ("data.commoncrawl.clean.min_words=0", "data.commoncrawl.clean.min_words: must be >= 1 or null, got 0"),
        ("data.commoncrawl.clean.languages=[en, zz]", "data.commoncrawl.clean.languages[1]: 'zz' is not an ISO 639"),
        ("data.commoncrawl.clean.max_duplicate_line_fraction=1.5", "max_duplicate_line_fraction: must be in [0, 1]"),
        ("data.commoncrawl.clean.max_mean_word_length=2", "max_mean_word_length: must be >= min_mean_word_length"),
        ("data.commoncrawl.clean.terminal_punctuation=3", "data.commoncrawl.clean.terminal_punctuation: expected bool"),
        ("data.commoncrawl.clean.blocklist=''", "data.commoncrawl.clean.blocklist: must be a file URL or null"),
        ("data.commoncrawl.clean.unknown_rule=1", "data.commoncrawl.clean.unknown_rule: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_experiment(MANIFEST, [override])


# --- bounded work per HTML page ----------------------------------------------------------------------


@pytest.mark.timeout(30)  # resiliparse alone would take hours on the deep page
def test_deep_or_huge_html_is_quarantined_and_the_other_records_come_out(tmp_path):
    deep = "<html><body>" + "<div>" * 100_000 + "deep text " + "</div>" * 100_000 + "</body></html>"
    huge = "<html><body>" + "<p>The same paragraph of text, over and over.</p>\n" * 120_000 + "</body></html>"
    assert len(huge) > MAX_HTML_BYTES
    records = [http_response(PAGE.encode(), index=0), http_response(deep.encode(), index=1),
               http_response(PAGE.encode(), index=2), http_response(huge.encode(), index=3),
               http_response(PAGE.encode(), index=4)]
    parts = members(*records)
    assert len(parts[1]) < 10_000  # a few KB of gzip hold 1.1 MB of nesting
    results = read(write(tmp_path, b"".join(parts), "input.warc.gz"))
    assert labels(results) == [key(0), "too_deep", key(2), "too_large", key(4)]  # records in = out + rejected
    assert [r.offset for r in results] == offsets(parts)
    assert f"MAX_HTML_DEPTH={MAX_HTML_DEPTH}" in results[1].detail
    assert f"MAX_HTML_BYTES={MAX_HTML_BYTES}" in results[3].detail


@pytest.mark.parametrize("html, deeper_than", [
    ("<div/>" * 3000, MAX_HTML_DEPTH),  # outside SVG the slash is ignored: 3000 nested divs
    (("<b>" + "<div>" * 100 + "</b>") * 30, MAX_HTML_DEPTH),  # an end tag far down closes nothing
    ("<table><tr><td>" * 1000, MAX_HTML_DEPTH),
    ("<p><b>" * 3000, MAX_HTML_DEPTH),  # `p` closes `p`, the tree builder reopens `b` inside the next one
])
def test_html_depth_is_not_fooled_by_tags_that_look_closed(html, deeper_than):
    assert html_depth(html, MAX_HTML_DEPTH) > deeper_than


@pytest.mark.parametrize("html, at_most", [
    ("<p>x" * 5000, 1), ("<table>" + "<tr><td>a<td>b" * 5000 + "</table>", 3),
    ("<ul>" + "<li>x" * 5000 + "</ul>", 2), ("<svg>" + "<path d='m0 0'/>" * 5000 + "</svg>", 1),
    ("<br><img src=x><hr>" * 5000, 0), ("<!-- <div> -->" * 5000 + "<script>'<div>'</script>" * 5000, 1),
])
def test_html_depth_of_flat_pages_stays_small(html, at_most):
    assert html_depth(html, 100) <= at_most  # 100: below their start tags, so the tags are scanned

