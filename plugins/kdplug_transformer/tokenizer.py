"""Tokenizers for the text data providers: byte-level by default, a local Hugging Face one on request.

A tokenizer is named by a *spec* string, so data providers, models and the CLI can pass it around:

  "byte"         every UTF-8 byte is a token (ids 3..258) plus PAD=0, BOS=1, EOS=2: 259 ids, no
                 vocabulary file, nothing to download
  "words"        a word-level vocabulary built from the training texts by the data provider
                 (lower-cased words and punctuation, the most frequent ``max_vocab``, the rest
                 UNK); once built its spec reads "words:<hash>" and names it in this process
  "hf:PATH"      the tokenizer saved in a local Hugging Face folder (AutoTokenizer, offline only)

Byte-level is the default: it needs no vocabulary and reads any text, but a byte-level model needs
much more data to learn words than a word-level one does; "words" suits small classification sets.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import re
from typing import Dict, Iterable, List, Sequence

import kdplug

from .hf_folder import load_hf_tokenizer

BYTE_SPEC = "byte"
WORDS_SPEC = "words"
WORDS_PREFIX = "words:"
HF_PREFIX = "hf:"


class ByteTokenizer:
    """UTF-8 bytes as tokens; PAD=0, BOS=1 (also the classifier's first token), EOS=2."""

    spec = BYTE_SPEC
    pad_id = 0
    bos_id = 1
    eos_id = 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no BOS/EOS; callers add them)."""
        return [b + self.offset for b in text.encode("utf-8", errors="replace")]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special ids are dropped, broken UTF-8 is replaced."""
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
_BUILT: Dict[str, "WordTokenizer"] = {}


class WordTokenizer:
    """Words and punctuation (lower-cased) from a vocabulary built on training texts.

    PAD=0, BOS=1, EOS=2, UNK=3, then the words by decreasing frequency.
    """

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    offset = 4

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(words)
        self.index = {w: i + self.offset for i, w in enumerate(self.words)}
        self.vocab_size = len(self.words) + self.offset
        digest = hashlib.sha1("\n".join(self.words).encode("utf-8")).hexdigest()[:12]
        self.spec = WORDS_PREFIX + digest
        _BUILT[self.spec] = self

    @staticmethod
    def split(text: str) -> List[str]:
        return _WORD_RE.findall(text.lower())

    @classmethod
    def build(cls, texts: Iterable[str], max_vocab: int = 8000,
              min_count: int = 2) -> "WordTokenizer":
        counts = collections.Counter(w for text in texts for w in cls.split(text))
        ranked = sorted((w for w, c in counts.items() if c >= min_count),
                        key=lambda w: (-counts[w], w))
        return cls(ranked[:max(0, int(max_vocab) - cls.offset)])

    def encode(self, text: str) -> List[int]:
        return [self.index.get(w, self.unk_id) for w in self.split(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[int(i) - self.offset] if int(i) >= self.offset else "<unk>"
                        for i in ids if int(i) >= self.offset or int(i) == self.unk_id)

    def __repr__(self) -> str:
        return f"WordTokenizer({len(self.words)} words, {self.spec!r})"


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder, with the same small interface as ByteTokenizer."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.spec = HF_PREFIX + path
        self.hf = load_hf_tokenizer(path)
        self.vocab_size = len(self.hf)
        self.bos_id = self.hf.bos_token_id if self.hf.bos_token_id is not None else self.hf.cls_token_id
        self.eos_id = self.hf.eos_token_id if self.hf.eos_token_id is not None else self.hf.sep_token_id
        pad = self.hf.pad_token_id
        if pad is None:
            pad = self.eos_id if self.eos_id is not None else 0
        self.pad_id = pad

    def encode(self, text: str) -> List[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


@functools.lru_cache(maxsize=8)
def _hf_tokenizer(path: str) -> HFTokenizer:
    return HFTokenizer(path)


def get_tokenizer(spec: str = BYTE_SPEC):
    """The tokenizer named by ``spec``: "byte" or "hf:PATH" (see the module docstring)."""
    if not isinstance(spec, str):
        if hasattr(spec, "encode") and hasattr(spec, "vocab_size"):
            return spec  # already a tokenizer object (Python API)
        raise kdplug.KdplugError(f"tokenizer must be 'byte' or 'hf:PATH', got {spec!r}")
    if spec == BYTE_SPEC:
        return ByteTokenizer()
    if spec.startswith(WORDS_PREFIX):
        if spec in _BUILT:
            return _BUILT[spec]
        raise kdplug.KdplugError(f"tokenizer {spec!r} is a word vocabulary built by a data "
                                 f"provider in another process; build the data here first")
    if spec == WORDS_SPEC:
        raise kdplug.KdplugError("the 'words' tokenizer is built from training texts: pass it "
                                 "to a text data provider (tokenizer=words)")
    if spec.startswith(HF_PREFIX) and len(spec) > len(HF_PREFIX):
        return _hf_tokenizer(spec[len(HF_PREFIX):])
    raise kdplug.KdplugError(f"unknown tokenizer {spec!r}; expected 'byte' (the default), "
                             f"'words' or 'hf:PATH' (a local Hugging Face folder)")


def resolve_tokenizer(spec, train_texts: Sequence[str], max_vocab: int = 8000,
                      min_count: int = 2):
    """get_tokenizer(spec), except that "words" builds a vocabulary from ``train_texts``."""
    if spec == WORDS_SPEC:
        return WordTokenizer.build(train_texts, max_vocab, min_count)
    return get_tokenizer(spec)


def tokenizer_spec(tokenizer) -> str:
    """The spec string of a tokenizer object or spec (for model_options)."""
    return tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "spec", repr(tokenizer))
