"""A sentencepiece model with an exact round trip, loaded from any fsspec URL, and its batch encoding.

The model file travels with a sidecar `<url>.json` (`sha256`, `vocab_size`,
`eod_id`, `pad_id`, `type`, `normalization`; `trained_with`: the settings it was
trained with, so a resumed run knows whether to keep it). Loading checks the model's bytes
against the sidecar, so a dataset's recorded `tokenizer_sha256` always names
the model that encoded it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import sentencepiece as spm

from codistill import storage

SPACE = "\u2581"  # sentencepiece's visible space


class TokenizerError(ValueError):
    """A tokenizer model is missing, does not match its sidecar, or cannot round-trip text."""


def sidecar_url(url: str) -> str:
    return f"{url}.json"


@dataclass
class Tokenizer:
    """Encode text to int32 ids; every id's UTF-8 byte length is known, so bytes per row need no decoding."""

    model: bytes
    info: dict  # the sidecar

    def __post_init__(self):
        self.processor = spm.SentencePieceProcessor(model_proto=self.model)
        self.eod_id, self.pad_id = self.info["eod_id"], self.info["pad_id"]
        self.piece_bytes = _piece_bytes(self.processor)
        self.space_ids = [self.processor.piece_to_id(f"<0x{b:02X}>") for b in SPACE.encode()]

    @property
    def sha256(self) -> str:
        return self.info["sha256"]

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """One batched call into sentencepiece (its C++ loop, one thread: Beam already runs one worker per core).

        sentencepiece reads U+2581 as a space; a text holding one is encoded around it, the character
        itself as its three UTF-8 byte pieces, so the round trip stays exact.
        """
        ids = self.processor.encode(texts, out_type=int, num_threads=1)
        for i, text in enumerate(texts):
            if SPACE in text:
                parts = self.processor.encode(text.split(SPACE), out_type=int, num_threads=1)
                ids[i] = parts[0]
                for part in parts[1:]:
                    ids[i] += self.space_ids + part
        return ids

    def decode(self, ids) -> str:
        return self.processor.decode([int(i) for i in ids])

    def text_bytes(self, ids: np.ndarray) -> np.ndarray:
        """UTF-8 bytes each id decodes to (end-of-document and padding: 0)."""
        return self.piece_bytes[ids]

    def manifest_entry(self, url: str) -> dict:
        return {"url": url, "sha256": self.sha256, "vocab_size": self.vocab_size, "eod_id": self.eod_id,
                "pad_id": self.pad_id, "type": self.info["type"]}


def _piece_bytes(processor: spm.SentencePieceProcessor) -> np.ndarray:
    sizes = np.zeros(processor.get_piece_size(), np.int64)
    for i in range(processor.get_piece_size()):
        if processor.is_control(i) or processor.is_unknown(i):
            continue
        if processor.is_byte(i):
            sizes[i] = 1  # <0xNN>
        else:
            sizes[i] = len(processor.id_to_piece(i).replace(SPACE, " ").encode())
    return sizes


SIDECAR_FIELDS = {"sha256": str, "eod_id": int, "pad_id": int, "type": str}


def load_tokenizer(url: str) -> Tokenizer:
    """The model at `url`, checked against its sidecar; anything missing, malformed or mismatched is a
    `TokenizerError` naming the file."""
    sidecar = sidecar_url(url)
    try:
        with storage.open(url, "rb") as f:
            model = f.read()
        with storage.open(sidecar, "r") as f:
            info = json.load(f)
    except FileNotFoundError as e:
        raise TokenizerError(f"tokenizer {url}: {e.filename or e} not found (a model needs its {url}.json "
                             "sidecar; train one with `codistill tokenizer train`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"tokenizer sidecar {sidecar}: not JSON ({e})") from None
    if not isinstance(info, dict):
        raise TokenizerError(f"tokenizer sidecar {sidecar}: a JSON {type(info).__name__}, not an object")
    for name, kind in SIDECAR_FIELDS.items():
        if not isinstance(info.get(name), kind) or isinstance(info.get(name), bool):
            raise TokenizerError(f"tokenizer sidecar {sidecar}: {name} is {info.get(name)!r}, not a {kind.__name__}")
    digest = hashlib.sha256(model).hexdigest()
    if info["sha256"] != digest:
        raise TokenizerError(f"tokenizer {url}: sha256 {digest} does not match its sidecar's {info['sha256']}")
    try:
        tokenizer = Tokenizer(model, info)
    except RuntimeError as e:  # sentencepiece cannot parse the bytes
        raise TokenizerError(f"tokenizer {url}: not a sentencepiece model ({str(e).strip()})") from None
    for name in ("eod_id", "pad_id"):
        if not 0 <= info[name] < tokenizer.vocab_size:
            raise TokenizerError(f"tokenizer sidecar {sidecar}: {name} {info[name]} is outside the model's "
                                 f"{tokenizer.vocab_size} pieces")
    return tokenizer
