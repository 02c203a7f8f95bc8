"""Hugging Face interop: local checkpoint folders as teachers and students (extra kdplug[hf])."""
from __future__ import annotations

import sys

import pytest
import torch

import kdplug


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


def test_missing_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(kdplug.KdplugError, match=f"folder '{missing}' does not exist.*downloads "
                                                 "nothing"):
        kdplug.create_teacher(f"hf:{missing}")
    with pytest.raises(kdplug.KdplugError, match="not a Hugging Face checkpoint folder"):
        kdplug.create_student(f"hf:{tmp_path}")


def test_without_transformers_the_error_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(kdplug.KdplugError, match=r"pip install 'kdplug\[hf\]'"):
        kdplug.create_teacher(f"hf:{tmp_path}")


# ----------------------------------------------------------------------------- with transformers

def _tokenizer(transformers):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Tiny random BERT classifiers and GPT-2 LMs (teacher and student) saved offline."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tok = _tokenizer(transformers)
    root = tmp_path_factory.mktemp("hf")
    folders = {}
    for name, layers, width in (("teacher", 2, 32), ("student", 1, 16)):
        cls = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=len(tok), hidden_size=width, num_hidden_layers=layers,
            num_attention_heads=2, intermediate_size=2 * width, max_position_embeddings=64,
            num_labels=2, pad_token_id=tok.pad_token_id))
        lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=len(tok), n_embd=width, n_layer=layers, n_head=2, n_positions=64,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id))
        for kind, model in (("cls", cls), ("lm", lm)):
            folder = root / f"{kind}-{name}"
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            folders[f"{kind}-{name}"] = folder
    folders["vocab"] = len(tok)
    return folders


def _byte_batch(texts):
    from kdplug_transformer.tokenizer import get_tokenizer

    tok = get_tokenizer("byte")
    rows = [[tok.bos_id] + tok.encode(t) for t in texts]
    length = max(map(len, rows))
    x = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return x, mask


def test_hf_classifier_retokenizes_byte_data_with_its_own_tokenizer(hf_folders):
    folder = hf_folders["cls-teacher"]
    model = kdplug.create_teacher(f"hf:{folder}", num_classes=2, tokenizer="byte",
                                  task="classification", max_len=32, vocab_size=259)
    assert model.retokenize and model.task == "classification"
    model.eval()
    x, mask = _byte_batch(["the quick fox", "a lazy dog jumps over"])
    out = model(x, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (2, 2)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape[-1] == 32
    assert len(out.attentions) == 2 and out.attentions[0].dim() == 4
    # the same texts tokenized by the model's own tokenizer give the same logits
    hf_tok = model.tokenizer.hf
    enc = hf_tok(["the quick fox", "a lazy dog jumps over"], padding=True, return_tensors="pt")
    with torch.no_grad():
        direct = model.model(**enc).logits
    torch.testing.assert_close(out.logits.detach(), direct)


def test_hf_classifier_with_another_label_count_gets_a_new_head(hf_folders):
    with pytest.warns(UserWarning, match="2 labels but the data has 5 classes"):
        model = kdplug.create_student(f"hf:{hf_folders['cls-student']}", num_classes=5,
                                      task="classification")
    x, mask = _byte_batch(["hello"])
    assert model(x, attention_mask=mask).logits.shape == (1, 5)


def test_hf_lm_vocabulary_mismatch_names_both_sizes(hf_folders):
    folder = hf_folders["lm-teacher"]
    vocab = hf_folders["vocab"]
    with pytest.raises(kdplug.KdplugError, match=f"has {vocab} tokens but the data's tokenizer "
                                                 f"\\(byte\\) has 259.*tokenizer=hf:"):
        kdplug.create_teacher(f"hf:{folder}", vocab_size=259, tokenizer="byte", task="lm")
    model = kdplug.create_teacher(f"hf:{folder}", vocab_size=vocab, tokenizer=f"hf:{folder}",
                                  task="lm")  # the LM task is also found from the config
    assert model.task == "lm" and not model.retokenize
    assert kdplug.create_teacher(f"hf:{folder}").task == "lm"
    ids = torch.randint(3, vocab, (2, 7))
    out = model(ids, attention_mask=torch.ones(2, 7, dtype=torch.bool), output_attentions=True)
    assert out.logits.shape == (2, 7, vocab) and len(out.attentions) == 2



def test_hf_lm_gives_the_fused_linear_loss_its_hidden_states_and_head(hf_folders):
    from kdplug.engine.batching import call_model
    from kdplug.ops import fused_linear_kd, kd_loss
    from kdplug.output_head import head_of, missing_output_head

    vocab = hf_folders["vocab"]
    student, teacher = (kdplug.create_teacher(f"hf:{hf_folders[name]}", task="lm").eval()
                        for name in ("lm-student", "lm-teacher"))
    assert missing_output_head(student) is None and missing_output_head(teacher) is None
    classifier = kdplug.create_teacher(f"hf:{hf_folders['cls-student']}", task="classification")
    assert missing_output_head(classifier) is not None
    ids = torch.randint(3, vocab, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    batch = {"inputs": ids, "labels": ids, "attention_mask": mask}
    heads = [head_of(call_model(m, batch, frozenset({"output_head"})))
             for m in (student, teacher)]
    logits = [m(ids, attention_mask=mask).logits for m in (student, teacher)]
    torch.testing.assert_close(heads[0].hidden @ heads[0].weight.t(), logits[0])
    fused = fused_linear_kd(heads[0].hidden, heads[0].weight, heads[1].hidden, heads[1].weight,
                            temperature=2.0, mask=mask, chunk_size=3)
    torch.testing.assert_close(fused, kd_loss(logits[0], logits[1], 2.0, mask=mask))

def test_hf_teacher_and_student_distil_end_to_end(hf_folders, tmp_path):
    try:
        from kdplug import distill
    except ImportError:
        from kdplug.engine import distill
    texts = tmp_path / "reviews.jsonl"
    rows = [{"text": f"{'quick brown fox' if i % 2 else 'lazy dog over'} {i}",
             "label": i % 2} for i in range(24)]
    texts.write_text("\n".join(__import__("json").dumps(r) for r in rows))
    common = dict(epochs=1, teacher_epochs=1, batch_size=8, quiet=True, device="cpu",
                  temperature=2.0, alpha=0.5)
    cls = distill(f"hf:{hf_folders['cls-teacher']}", f"hf:{hf_folders['cls-student']}",
                  f"text-classification:{texts}", "kd+ce+hidden", out=str(tmp_path / "cls"),
                  **common)
    assert cls.student.model.retokenize  # byte data, each model with its own tokenizer
    assert cls.teacher.params > cls.student.params
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("the quick brown fox jumps over the lazy dog " * (i % 3 + 1)
                                  for i in range(12)))
    teacher = hf_folders["lm-teacher"]
    lm = distill(f"hf:{teacher}", f"hf:{hf_folders['lm-student']}", f"text:{corpus}",
                 "kd+ce+attention", data_options={"tokenizer": f"hf:{teacher}", "seq_len": 16},
                 out=str(tmp_path / "lm"), **common)
    assert lm.task == "lm" and lm.student.metrics["perplexity"] > 1
    # a byte-level student cannot learn token by token from an LM with another vocabulary
    with pytest.raises(kdplug.KdplugError, match="vocabulary mismatch.*has 2\\d\\d tokens but the "
                                                 "data's tokenizer \\(byte\\) has 259"):
        distill(f"hf:{teacher}", "transformer-lm-student", f"text:{corpus}",
                out=str(tmp_path / "bad"), **common)
