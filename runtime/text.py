"""Tokenization for the runtime: ``tokenizer.json`` -> padded int64 arrays.

The ``tokenizers.Tokenizer`` is configured once at load (truncation on, padding off) and never
mutated afterwards, so one :class:`TextEncoder` can be shared by many threads. Padding is done
here in numpy, per batch, to the longest sequence of that batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from .manifest import ExportFileError

_PAD_TOKENS = ("[PAD]", "<pad>", "<PAD>")


@dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray  # int64 [batch, seq]
    token_type_ids: np.ndarray  # int64 [batch, seq]

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }


def check_texts(texts) -> list[str]:
    """Accept a list/tuple of str (or one str); raise TypeError/ValueError otherwise."""
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, (bytes, bytearray)) or not hasattr(texts, "__iter__"):
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError("empty batch: texts must contain at least one string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be str, got {type(t).__name__}")
    return texts


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizers`` file; :class:`ExportFileError` naming it when it cannot be read as one
    (``tokenizers`` itself raises a bare ``Exception`` that names no file)."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for bad JSON and unknown models
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportFileError(f"{path} is not a readable tokenizers file (truncated or corrupt?): {first}") from None


class TextEncoder:
    """Tokenizer + numpy padding; the same code tokenizes for training, export checks and the runtime."""

    def __init__(self, tokenizer: str | Path | Tokenizer, max_length: int):
        self.max_length = int(max_length)
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        # Configure once; a tokenizer.json may carry its own (e.g. fixed-length) settings.
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_length)
        self._tok = tok
        self.pad_id = self._find_pad_id(tok)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def _find_pad_id(tok: Tokenizer) -> int:
        for name in _PAD_TOKENS:
            idx = tok.token_to_id(name)
            if idx is not None:
                return int(idx)
        return 0

    def tokenize(self, texts: list[str]) -> list[Encoding]:
        """Token ids per text, truncated to ``max_length`` (special tokens included)."""
        return self._tok.encode_batch(texts)

    def tokenize_words(self, words: list[list[str]]) -> list[Encoding]:
        """Like :meth:`tokenize` for texts already split into words (token classification);
        ``Encoding.word_ids`` then index those words."""
        return self._tok.encode_batch(words, is_pretokenized=True)

    def pad(self, encs: list[Encoding]) -> Batch:
        """Pad a group of encodings to its longest member."""
        n = len(encs)
        seq = max(1, max(len(e.ids) for e in encs))
        ids = np.full((n, seq), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, seq), dtype=np.int64)
        types = np.zeros((n, seq), dtype=np.int64)
        for i, e in enumerate(encs):
            k = len(e.ids)
            ids[i, :k] = e.ids
            mask[i, :k] = 1
            types[i, :k] = e.type_ids
        return Batch(ids, mask, types)

    def encode(self, texts: list[str]) -> Batch:
        return self.pad(self.tokenize(texts))


def was_truncated(enc: Encoding) -> bool:
    return len(enc.overflowing) > 0
