import base64
import hashlib
import itertools
import json
import re
import uuid
import zlib
from collections import Counter
from dataclasses import replace

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner
from warcio.archiveiterator import ArchiveIterator

from codistill.cli import main
from pipelines import synth_commoncrawl as S
from pipelines import synth_commoncrawl_words as T

DOCS = 600
TERMINAL = (".", "!", "?")
C4_PHRASES = ("javascript", "lorem ipsum", "{", "terms of use", "privacy policy", "cookie policy", "uses cookies",
              "use of cookies", "use cookies")


def _members(data: bytes) -> list[bytes]:
    """Each gzip member of a file, decompressed on its own."""
    out = []
    while data:
        d = zlib.decompressobj(31)
        out.append(d.decompress(data) + d.flush())
        data = d.unused_data
    return out


def _records(out: str, sidecar: dict) -> list:
    """(file, warcio record headers, block bytes) of every record of every file, in order."""
    rows = []
    for f in sidecar["files"]:
        with fsspec.open(f"{out}/{f['name']}", "rb") as stream:
            for r in ArchiveIterator(stream):
                rows.append((f["name"], r.rec_headers, r.content_stream().read()))
    return rows


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cc"))
    sidecar = S.generate_commoncrawl(out, DOCS, files=2, seed=3)
    return out, sidecar, _records(out, sidecar)


def _conversion_blocks(out, sidecar):
    return [(h.headers, b) for _, h, b in _records(out, sidecar)
            if h.get_header("WARC-Type") == "conversion"]


def test_deterministic_by_seed_whatever_the_files(generated, memory_root):
    out, sidecar, _ = generated
    again = S.generate_commoncrawl(memory_root + "/a", DOCS, files=3, seed=3)
    assert _conversion_blocks(memory_root + "/a", again) == _conversion_blocks(out, sidecar)
    strip = lambda s: {k: {f: v for f, v in d.items() if f != "file"} for k, d in s["documents"].items()}  # noqa: E731
    assert strip(again) == strip(sidecar) and again["floor"] == sidecar["floor"]
    other = S.generate_commoncrawl(memory_root + "/b", DOCS, files=2, seed=4)
    assert set(other["documents"]).isdisjoint(sidecar["documents"])
    with fsspec.open(f"{out}/synth.json") as f:
        assert json.load(f) == sidecar
    # Regenerating into the same place under another split leaves no file of the earlier one behind.
    S.generate_commoncrawl(memory_root + "/a", 50, files=2, seed=3)
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(memory_root + "/a", detail=False)) == [
        "synth-00000-of-00002.warc.wet.gz", "synth-00001-of-00002.warc.wet.gz", "synth.json"]


def test_one_gzip_member_per_record(generated):
    out, sidecar, records = generated
    for f in sidecar["files"]:
        with fsspec.open(f"{out}/{f['name']}", "rb") as stream:
            members = _members(stream.read())
        assert len(members) == f["records"] + 1  # warcinfo first
        for m in members:
            assert m.startswith(b"WARC/1.0\r\n") and m.count(b"WARC/1.0\r\n") == 1 and m.endswith(b"\r\n\r\n")


def test_headers_as_common_crawl_writes_them(generated):
    out, sidecar, records = generated
    names = [f["name"] for f in sidecar["files"]]
    assert [h.get_header("WARC-Filename") for _, h, _ in records if h.get_header("WARC-Type") == "warcinfo"] == names
    seen = set()
    for i, (name, h, block) in enumerate(records):
        kind = h.get_header("WARC-Type")
        if kind == "warcinfo":
            assert i == 0 or records[i - 1][0] != name
            continue
        assert kind == "conversion"
        keys = [k for k, _ in h.headers]
        expected = ["WARC-Type", "WARC-Target-URI", "WARC-Date", "WARC-Record-ID", "WARC-Refers-To",
                    "WARC-Block-Digest", "WARC-Identified-Content-Language", "Content-Type", "Content-Length",
                    "WARC-Payload-Digest"]
        assert keys == [k for k in expected if k in keys] and len(keys) >= len(expected) - 1
        rid = h.get_header("WARC-Record-ID")
        assert re.fullmatch(r"<urn:uuid:[0-9a-f-]{36}>", rid) and uuid.UUID(rid[10:-1]).version == 4
        assert rid not in seen
        seen.add(rid)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", h.get_header("WARC-Date"))
        assert h.get_header("WARC-Target-URI").startswith("https://www.")
        digest = "sha1:" + base64.b32encode(hashlib.sha1(block).digest()).decode()
        assert h.get_header("WARC-Block-Digest") == digest == h.get_header("WARC-Payload-Digest")
        assert h.get_header("Content-Type") == "text/plain" and int(h.get_header("Content-Length")) == len(block)
        block.decode("utf-8")
    assert len(seen) == DOCS


def test_fastwarc_reads_the_same_records(generated):
    warc = pytest.importorskip("fastwarc.warc")  # the pipeline's reader, when installed
    out, sidecar, records = generated
    got = []
    for f in sidecar["files"]:
        with fsspec.open(f"{out}/{f['name']}", "rb") as stream:
            for r in warc.ArchiveIterator(stream, parse_http=False):
                assert r.verify_block_digest()
                got.append((r.headers["WARC-Record-ID"], r.reader.read()))
    assert got == [(h.get_header("WARC-Record-ID"), b) for _, h, b in records]


def _clean(lines: list[str], repeated: set[str]) -> tuple[list[str], dict]:
    """A cleaner that drops exactly the planted noise: the title, boilerplate and repeated lines."""
    kept, dropped = [], {"nav": 1}
    category = {line: c for c, texts in T.BOILERPLATE.items() for line in texts}
    for line in lines[1:]:
        if line in category:
            dropped[category[line]] = dropped.get(category[line], 0) + 1
        elif line not in repeated:
            kept.append(line)
    return kept, dropped


def test_sidecar_counts_match_the_files(generated):
    _, sidecar, records = generated
    docs, counts = sidecar["documents"], sidecar["counts"]
    kinds = {}
    for d in docs.values():
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    assert kinds == {k: v for k, v in counts["kinds"].items() if v} and sum(kinds.values()) == DOCS
    assert min(counts["kinds"].values()) > 0
    repeated = {r["text"]: r["records"] for r in sidecar["repeated_lines"]}
    occurrences, headers, boilerplate = {}, {}, {}
    for name, h, block in records[1:]:
        if h.get_header("WARC-Type") != "conversion":
            continue
        rid, d = h.get_header("WARC-Record-ID"), docs[h.get_header("WARC-Record-ID")]
        assert d["file"] == name and d["url"] == h.get_header("WARC-Target-URI")
        assert d["language"] == h.get_header("WARC-Identified-Content-Language")
        key = d["language"] or "absent"
        headers.setdefault(d["kind"], {})[key] = headers.get(d["kind"], {}).get(key, 0) + 1
        lines = block.decode().split("\n")
        assert lines[-1] == ""
        for line in set(lines) & set(repeated):
            occurrences.setdefault(line, []).append(rid)
        kept, dropped = _clean(lines[:-1], set(repeated))
        assert dropped == d["boilerplate"]
        for c, n in dropped.items():
            boilerplate[c] = boilerplate.get(c, 0) + n
        assert len("\n".join(kept).encode()) == d["bytes"]
        assert len(kept) == d["lines"]
    assert headers == counts["language_headers"] and boilerplate == counts["boilerplate_lines"]
    assert occurrences == repeated and all(len(v) >= 2 for v in repeated.values())
    assert counts["repeated_lines"] == len(repeated) > 0
    english = [d for d in docs.values() if d["true_language"] == "eng"]
    absent = sum(d["language"] is None for d in english)
    assert 0 < absent < 0.25 * len(english)
    foreign = [d for d in docs.values() if d["kind"] == "foreign"]
    assert 0 < sum(d["language"] is None for d in foreign) < len(foreign)
    assert all(d["language"] in (None, d["true_language"]) for d in foreign)
    assert counts["accidental_repeated_planted_lines"] == 0


def test_planted_lines_pass_c4_rules_and_noise_is_what_it_says(generated):
    _, sidecar, records = generated
    docs = sidecar["documents"]
    bodies = {h.get_header("WARC-Record-ID"): b.decode() for _, h, b in records[1:]}
    repeated = {r["text"] for r in sidecar["repeated_lines"]}
    position = {h.get_header("WARC-Record-ID"): i for i, (_, h, _) in enumerate(records)}
    order = []  # is the older capture read first?
    for rid, d in docs.items():
        main_lines, _ = _clean(bodies[rid].split("\n")[:-1], repeated)
        if d["kind"] in ("clean", "near_duplicate", "exact_duplicate", "stale_capture"):
            for line in main_lines:
                assert len(line.split()) >= 5 and line.endswith(TERMINAL), line
                assert not any(p in line.lower() for p in C4_PHRASES), line
        src = docs.get(d["source"] or "")
        if d["kind"] == "exact_duplicate":
            assert bodies[rid] == bodies[d["source"]] and d["url"] != src["url"] and src["kind"] == "clean"
        if d["kind"] == "near_duplicate":
            assert 0.8 < d["similarity"] < 1 and bodies[rid] != bodies[d["source"]] and src["kind"] == "clean"
        if d["kind"] == "stale_capture":
            assert d["url"] == src["url"] and d["date"] < src["date"] and src["kind"] == "clean"
            order.append(position[rid] < position[d["source"]])
        if d["kind"] == "spam":
            assert len(main_lines) - len(set(main_lines)) > len(main_lines) / 3  # mostly repeated lines
        if d["kind"] == "placeholder":  # every line would drop the page under C4's rule, or itself
            assert all("lorem ipsum" in line.lower() and len(line.split()) >= 5 and line.endswith(TERMINAL)
                       for line in main_lines)
    assert any(order) and not all(order)  # "newest wins" is not "first wins"
    for category, texts in T.BOILERPLATE.items():
        for line in texts:
            assert (category in ("nav", "curly_braces")) == (len(line.split()) < 5 or not line.endswith(TERMINAL))
    urls = [d["url"] for d in docs.values() if d["kind"] != "stale_capture"]
    assert len(set(urls)) == len(urls)


def _duplicate_ngram_chars(words: list[str], n: int) -> float:
    """Gopher: fraction of characters inside word n-grams that occur more than once."""
    grams = list(zip(*[words[i:] for i in range(n)]))
    counts, covered = Counter(grams), np.zeros(len(words), bool)
    for i, g in enumerate(grams):
        covered[i:i + n] |= counts[g] > 1
    return sum(len(w) for w, c in zip(words, covered) if c) / sum(map(len, words))


def test_planted_text_passes_gopher_quality_rules(generated):
    """At the published thresholds (Rae et al. 2021, table A1), with a margin."""
    docs = generated[1]["documents"]
    texts = [t for t in _main_texts(generated) if docs[t[0]]["kind"] == "clean"]
    for _, text in texts:
        words = text.split()
        assert len(words) >= 50 and 3 <= np.mean([len(w) for w in words]) <= 10
        assert sum(w in {"the", "be", "to", "of", "and", "that", "have", "with"} for w in words) >= 2
        (gram, count), = Counter(zip(words, words[1:])).most_common(1)
        assert count * len("".join(gram)) / sum(map(len, words)) < 0.15  # threshold 0.20
        assert _duplicate_ngram_chars(words, 5) < 0.12  # threshold 0.15
        assert _duplicate_ngram_chars(words, 10) < 0.08  # threshold 0.10


def _main_texts(generated) -> list[tuple[str, str]]:
    """(record id, main text) of every planted record, as the exact cleaner leaves it."""
    _, sidecar, records = generated
    repeated = {r["text"] for r in sidecar["repeated_lines"]}
    return [(h.get_header("WARC-Record-ID"), "\n".join(_clean(b.decode().split("\n")[:-1], repeated)[0]))
            for _, h, b in records if h.get_header("WARC-Type") == "conversion"
            and sidecar["documents"][h.get_header("WARC-Record-ID")]["bits"] is not None]


def _parse(lang: S.Language, texts: list[str]) -> S.Docs:
    """Planted main texts back into token arrays (the rendering must be a bijection)."""
    index = {w: i for i, w in enumerate(lang.words.tolist())}
    words, lens, punct, newline, doc_sents = [], [], [], [], []
    for text in texts:
        n = 0
        for line in text.split("\n"):
            sentences = re.split(r"(?<=[.!?]) ", line)
            for j, s in enumerate(sentences):
                w = s[:-1].split(" ")
                assert w[0][0].isupper() and w[0].lower() == w[0][0].lower() + w[0][1:]
                words += [index[w[0][0].lower() + w[0][1:]]] + [index[x] for x in w[1:]]
                lens.append(len(w))
                punct.append(".!?".index(s[-1]))
                newline.append(j == len(sentences) - 1)
            n += len(sentences)
        doc_sents.append(n)
    return S.Docs(np.array(words), np.array(lens), np.zeros(len(lens), np.int64), np.array(punct),
                  np.array(newline), np.array(doc_sents))


def test_bits_are_those_of_the_text(generated):
    """Re-deriving the floor from the rendered text alone gives the sidecar's bits: text and token sequence
    carry the same probability."""
    sidecar = generated[1]
    docs, lang = sidecar["documents"], S.plant(S.CommonCrawlParams(), seed=3)
    ids, texts = zip(*_main_texts(generated))
    assert [len(t.encode()) for t in texts] == [docs[rid]["bytes"] for rid in ids]
    bits, end_bits = S.doc_bits(lang, _parse(lang, texts))
    np.testing.assert_allclose(bits, [docs[rid]["bits"] for rid in ids], rtol=1e-12)
    np.testing.assert_allclose(end_bits, [docs[rid]["end_bits"] for rid in ids], rtol=1e-12)
    clean = [d for d in docs.values() if d["kind"] == "clean"]
    floor = sidecar["floor"]
    assert floor["value"] == pytest.approx(sum(d["bits"] for d in clean) / sum(d["bytes"] for d in clean))
    assert floor["documents"] == len(clean) and 0.3 < floor["value"] < 2
    assert 1000 < np.mean([d["bytes"] for d in clean]) < 3000


TINY = S.CommonCrawlParams(vocab_size=T.ENGLISH.__len__() + 40, topics=3, successors=4, topic_switch=0.3,
                           sentence_min_words=5, sentence_max_words=8, sentence_continue=0.5, line_min_sentences=2,
                           line_break=0.6, doc_min_sentences=3, doc_min_lines=2, doc_end=0.6, topic_boost=3.0,
                           topic_words=0.1)


def _brute_force_bits(lang: S.Language, d: S.Docs) -> list[float]:
    """-log2 P(text) by summing over every topic path, from dense transition matrices, replaying the
    generator's decisions one by one."""
    p, V = lang.p, lang.p.vocab_size
    dense_b = np.zeros((V + 1, V))
    rows = np.repeat(np.arange(V + 1), np.diff(lang.row_ptr))
    dense_b[rows, lang.succ] = np.exp(lang.log_b)
    chains = dense_b[None] * np.exp(lang.beta)[:, None, :]
    chains /= chains.sum(2, keepdims=True)
    prior, switch = np.exp(lang.log_prior), np.exp(lang.log_switch)
    out, w, s = [], 0, 0
    for n in d.doc_sents:
        like = np.ones((n, p.topics))  # P(words of sentence | topic)
        rest = 1.0  # lengths, punctuation, separators
        line, lines = 0, 1  # sentences in the current line, its number
        for j in range(n):
            prev = V
            for _ in range(d.sent_len[s + j]):
                like[j] *= chains[:, prev, d.words[w]]
                prev = d.words[w]
                w += 1
            extra = d.sent_len[s + j] - p.sentence_min_words
            rest *= p.sentence_continue ** extra * (1 - p.sentence_continue
                                                    if extra < p.sentence_max_words - p.sentence_min_words else 1)
            rest *= p.punctuation[d.punct[s + j]]
            line += 1
            if j + 1 < n and line >= p.line_min_sentences:
                rest *= (1 - p.doc_end) if j + 1 >= p.doc_min_sentences and lines >= p.doc_min_lines else 1
                rest *= p.line_break if d.newline[s + j] else 1 - p.line_break
                line, lines = (0, lines + 1) if d.newline[s + j] else (line, lines)
        total = 0.0
        for path in itertools.product(range(p.topics), repeat=n):
            q = prior[path[0]] * np.prod([switch[a, b] for a, b in zip(path, path[1:])])
            total += q * np.prod([like[j, k] for j, k in enumerate(path)])
        out.append(-np.log2(total * rest))
        s += n
    return out


def test_exact_filter_equals_brute_force_enumeration():
    lang = S.plant(TINY, seed=5)
    d = S.sample_docs(lang, 40, np.random.default_rng(0))
    d = S.take(d, np.flatnonzero(d.doc_sents <= 7))  # 3^7 topic paths at most
    assert len(d.doc_sents) >= 20
    bits, end_bits = S.doc_bits(lang, d)
    np.testing.assert_allclose(bits, _brute_force_bits(lang, d), rtol=1e-10)
    np.testing.assert_allclose(end_bits, -np.log2(TINY.doc_end))


def test_the_chains_are_distributions():
    lang = S.plant(TINY, seed=5)
    rows = np.repeat(np.arange(TINY.vocab_size + 1), np.diff(lang.row_ptr))
    p = np.exp(lang.log_b + lang.beta[:, lang.succ] - lang.log_z[:, rows])
    np.testing.assert_allclose(np.add.reduceat(p, lang.row_ptr[:-1], axis=1), 1.0, rtol=1e-12)
    # The sampler's CDFs end every row at exactly 1.
    cdf = lang.cum.reshape(TINY.topics, -1) - rows - (np.arange(TINY.topics) * (TINY.vocab_size + 1))[:, None]
    np.testing.assert_array_equal(cdf[:, lang.row_ptr[1:] - 1], 1.0)
    # Sampled successor frequencies follow the chain of the sentence's topic.
    topic, n = np.zeros(200_000, np.int64), np.full(200_000, 1)
    first = S.sample_words(lang, topic, n, np.random.default_rng(1))
    start = slice(lang.row_ptr[-2], lang.row_ptr[-1])
    expected = np.zeros(TINY.vocab_size)
    expected[lang.succ[start]] = p[0, start]
    np.testing.assert_allclose(np.bincount(first, minlength=TINY.vocab_size) / len(first), expected, atol=0.005)


def test_sampler_draws_what_the_floor_scores():
    """Layouts (sentence lengths, punctuation, line breaks, end), first topics and topic switches are drawn with
    the probabilities the floor assigns them (within 4 standard errors; fixed seed)."""
    lang = S.plant(TINY, seed=5)
    n = 50_000
    d = S.sample_docs(lang, n, np.random.default_rng(3))
    off = d.doc_offsets()
    layouts = Counter(tuple(zip(d.sent_len[a:b].tolist(), d.punct[a:b].tolist(), d.newline[a:b].tolist()))
                      for a, b in zip(off[:-1], off[1:]))
    top = [k for k, _ in layouts.most_common(20)]
    sents = [s for layout in top for s in layout]
    lens, punct, newline = (np.array(x) for x in zip(*sents))
    probe = S.Docs(np.zeros(lens.sum(), np.int32), lens, np.zeros(len(lens), np.int64), punct, newline,
                   np.array([len(layout) for layout in top]))
    expected = np.exp(S.layout_log_prob(TINY, probe)) * TINY.doc_end  # ... and then the document ends
    seen = np.array([layouts[k] for k in top]) / n
    assert np.all(np.abs(seen - expected) < 4 * np.sqrt(expected * (1 - expected) / n)), (seen, expected)

    prior = np.exp(lang.log_prior)
    first = np.bincount(d.topic[off[:-1]], minlength=TINY.topics) / n
    assert np.all(np.abs(first - prior) < 4 * np.sqrt(prior * (1 - prior) / n))
    later = np.ones(len(d.topic), bool)
    later[off[:-1]] = False
    switched = (d.topic[1:] != d.topic[:-1])[later[1:]]
    q = TINY.topic_switch
    assert abs(switched.mean() - q) < 4 * np.sqrt(q * (1 - q) / len(switched))


def test_filter_sits_between_knowing_the_topics_and_ignoring_their_persistence():
    """Knowing the latent topics (which no predictor of the text can) beats the floor; a predictor that treats
    each sentence's topic as independent does worse than it."""
    p = replace(S.CommonCrawlParams(), topic_switch=0.05)
    lang = S.plant(p, seed=2)
    d = S.sample_docs(lang, 300, np.random.default_rng(7))
    bits, _ = S.doc_bits(lang, d)
    ll = S.sentence_log_likelihood(lang, d)
    doc_of = np.repeat(np.arange(len(d.doc_sents)), d.doc_sents)
    layout = S.layout_log_prob(p, d)
    oracle = -(np.bincount(doc_of, ll[np.arange(len(ll)), d.topic]) + layout) / np.log(2)
    independent = -(np.bincount(doc_of, np.logaddexp.reduce(ll + lang.log_prior, axis=1)) + layout) / np.log(2)
    assert oracle.mean() < bits.mean() < independent.mean()
    print(f"bits/doc: knowing the topics {oracle.mean():.1f}, floor {bits.mean():.1f}, "
          f"independent topics {independent.mean():.1f}")


def test_bad_arguments():
    with pytest.raises(ValueError, match="docs >= 1"):
        S.generate_commoncrawl("memory://unused", 0)
    with pytest.raises(ValueError, match="seed >= 0"):
        S.generate_commoncrawl("memory://unused", 5, seed=-1)
    with pytest.raises(ValueError, match="CommonCrawlParams.sentence_min_words"):
        S.CommonCrawlParams(sentence_min_words=3)
    with pytest.raises(ValueError, match="CommonCrawlParams.topic_switch"):
        S.CommonCrawlParams(topic_switch=0.0)


def test_cli(tmp_path):
    result = CliRunner().invoke(main, ["synth", "commoncrawl", "--docs", "80", "--out", str(tmp_path),
                                       "--files", "2", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "bits per byte" in result.output
    sidecar = json.loads((tmp_path / "synth.json").read_text())
    assert sidecar["docs"] == 80 and len(sidecar["files"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f["name"] for f in sidecar["files"]] + ["synth.json"])
    bad = CliRunner().invoke(main, ["synth", "commoncrawl", "--docs", "0", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "--docs" in bad.output
