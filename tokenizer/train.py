"""Train a sentencepiece model on documents, and write it with its sidecar (sentencepiece only: what the
documents are and how they are sampled is the caller's, e.g. `pipelines.commoncrawl_tokenizer`).

Settings that make `decode(encode(text)) == text` hold for any cleaned text:
identity normalisation (no NFKC), no whitespace folding or dummy prefix, byte
fallback (no unknown pieces), newline as a user-defined symbol; digits are
split (numbers do not eat the vocabulary). Ids: 0 = padding, 1 = end of
document, 2 = unknown (never produced with byte fallback), no BOS.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from codistill import storage
from codistill.storage import write_atomically
from tokenizer.encode import sidecar_url

PAD_ID, EOD_ID, UNK_ID = 0, 1, 2


def sentences(documents: Iterable[str]) -> Iterator[str]:
    """What sentencepiece trains on: the documents' non-empty lines (the newline itself is a user-defined
    piece)."""
    return (line for doc in documents for line in doc.split("\n") if line)


def train_sentencepiece(documents: Iterable[str], vocab_size: int, model_type: str) -> bytes:
    """A serialized sentencepiece model trained on the documents' `sentences`."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(documents), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        byte_fallback=True, user_defined_symbols=["\n"], split_digits=True, allow_whitespace_only_pieces=True,
        pad_id=PAD_ID, eos_id=EOD_ID, unk_id=UNK_ID, bos_id=-1, shuffle_input_sentence=False, num_threads=1,
        hard_vocab_limit=False, minloglevel=2)
    return model.getvalue()


def write_tokenizer(model: bytes, url: str, model_type: str, documents: int, trained_with: dict) -> dict:
    """The model at `url` and its sidecar at `<url>.json` (written last)."""
    processor = spm.SentencePieceProcessor(model_proto=model)
    info = {"sha256": hashlib.sha256(model).hexdigest(), "vocab_size": processor.get_piece_size(),
            "eod_id": EOD_ID, "pad_id": PAD_ID, "unk_id": UNK_ID, "type": model_type, "normalization": "identity",
            "byte_fallback": True, "newline": processor.piece_to_id("\n"), "trained_on_documents": documents,
            "trained_with": trained_with}
    with storage.open(url, "wb", auto_mkdir=True) as f:
        f.write(model)
    write_atomically(sidecar_url(url), json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info
