"""The sentencepiece package on its own (tests/test_layering.py keeps it free of pipelines, training and
Beam): bad model files or sidecars fail with an error that names the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

@pytest.fixture(scope="module")
def model_url(tmp_path_factory):
    """A real (tiny) model and its sidecar, written by tokenizer.train."""
    from tokenizer.train import train_sentencepiece, write_tokenizer

    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bats".split()
    documents = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + "." for i in range(200)]
    url = str(tmp_path_factory.mktemp("tok") / "spm.model")
    write_tokenizer(train_sentencepiece(documents, 300, "unigram"), url, "unigram", len(documents), {})
    return url


def _copy(model_url: str, tmp_path: Path, model: bytes | None = None, sidecar: str | None = None) -> str:
    url = tmp_path / "spm.model"
    url.write_bytes(Path(model_url).read_bytes() if model is None else model)
    Path(f"{url}.json").write_text(Path(f"{model_url}.json").read_text() if sidecar is None else sidecar)
    return str(url)


def test_a_good_model_loads(model_url):
    from tokenizer.encode import load_tokenizer

    tokenizer = load_tokenizer(model_url)
    assert tokenizer.decode(tokenizer.encode(["the lazy dog."])[0]) == "the lazy dog."


def _sidecar_with(model_url: str, **fields) -> str:
    info = json.loads(Path(f"{model_url}.json").read_text())
    info.update(fields)
    return json.dumps(info)


@pytest.mark.parametrize("case, message", [
    ("garbage_model", "not a sentencepiece model"),
    ("sidecar_not_json", "not JSON"),
    ("sidecar_not_utf8", "not JSON"),
    ("sidecar_a_list", "a JSON list, not an object"),
    ("sidecar_without_sha256", "sha256 is None"),
    ("eod_id_a_string", "eod_id is '1'"),
    ("pad_id_out_of_range", "pad_id 100000 is outside"),
    ("sidecar_empty", "not JSON"),
])
def test_a_bad_model_or_sidecar_is_a_tokenizer_error_naming_the_file(model_url, tmp_path, case, message):
    from tokenizer.encode import TokenizerError, load_tokenizer

    garbage = b"\x00\x01 this is not a sentencepiece model \xff" * 10
    model, sidecar = {
        "garbage_model": (garbage, _sidecar_with(model_url, sha256=hashlib.sha256(garbage).hexdigest())),
        "sidecar_not_json": (None, "{not json"),
        "sidecar_not_utf8": (None, None),
        "sidecar_a_list": (None, "[1, 2]"),
        "sidecar_without_sha256": (None, _sidecar_with(model_url, sha256=None)),
        "eod_id_a_string": (None, _sidecar_with(model_url, eod_id="1")),
        "pad_id_out_of_range": (None, _sidecar_with(model_url, pad_id=100_000)),
        "sidecar_empty": (None, ""),
    }[case]
    url = _copy(model_url, tmp_path, model, sidecar)
    if case == "sidecar_not_utf8":
        Path(f"{url}.json").write_bytes(b'{"sha256": "\xff\xfe"}')
    with pytest.raises(TokenizerError, match=message) as raised:
        load_tokenizer(url)
    assert url in str(raised.value)  # the model, or its sidecar `<url>.json`
