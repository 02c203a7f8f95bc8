"""The Transformer pairs: shapes, intermediate outputs, explicit attention, padding invariance."""
from __future__ import annotations

import pytest
import torch

import kdplug
from kdplug.outputs import ModelOutput
from kdplug_transformer.models import TransformerClassifier, TransformerLM


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


TINY = dict(num_layers=2, d_model=16, num_heads=2, max_len=32, dropout=0.0)
TINY_STUDENT = dict(num_layers=1, d_model=8, num_heads=2, max_len=32, dropout=0.0)
VOCAB = 40


def test_presets_are_registered_with_the_issue_sizes():
    teachers, students = kdplug.list_teachers(), kdplug.list_students()
    for name in ("transformer-cls-teacher", "transformer-lm-teacher", "hf"):
        assert teachers[name].plugin == "transformer"
    for name in ("transformer-cls-student", "transformer-lm-student", "hf"):
        assert students[name].plugin == "transformer"
    cls_t = kdplug.create_teacher("transformer-cls-teacher", num_classes=5, max_len=8)
    cls_s = kdplug.create_student("transformer-cls-student", num_classes=5, max_len=8)
    lm_t = kdplug.create_teacher("transformer-lm-teacher", max_len=8)
    lm_s = kdplug.create_student("transformer-lm-student", max_len=8)
    assert (cls_t.num_layers, cls_t.d_model, cls_t.num_heads) == (6, 256, 8)
    assert (cls_s.num_layers, cls_s.d_model) == (2, 128)
    assert (lm_t.num_layers, lm_t.d_model) == (6, 384)
    assert (lm_s.num_layers, lm_s.d_model) == (2, 128)
    assert lm_t.vocab_size == 259  # byte-level tokenizer by default


def test_factories_take_data_facts_and_refuse_unknown_options():
    model = kdplug.create_student("transformer-lm-student", vocab_size=VOCAB, num_classes=VOCAB,
                                  task="lm", tokenizer="byte", max_len=8, num_layers=1)
    assert model.num_layers == 1 and model.vocab_size == VOCAB
    with pytest.raises(kdplug.KdplugError, match="unknown option.*colour"):
        kdplug.create_student("transformer-lm-student", colour="red")
    with pytest.raises(kdplug.KdplugError, match="classifier but the data.s task is .lm.; use transformer-lm-student"):
        kdplug.create_student("transformer-cls-student", task="lm", num_classes=3)


@pytest.mark.parametrize("cls", [TransformerClassifier, TransformerLM])
def test_outputs_and_intermediates(cls):
    torch.manual_seed(0)
    kw = dict(num_classes=3) if cls is TransformerClassifier else {}
    model = cls(vocab_size=VOCAB, **TINY, **kw).eval()
    x = torch.randint(0, VOCAB, (2, 7))
    out = model(x)
    assert isinstance(out, ModelOutput) and out.hidden_states is None and out.attentions is None
    full = model(x, output_hidden_states=True, output_attentions=True)
    assert len(full.hidden_states) == 3 and full.hidden_states[0].shape == (2, 7, 16)
    assert len(full.attentions) == 2 and full.attentions[0].shape == (2, 2, 7, 7)
    torch.testing.assert_close(full.attentions[1].sum(-1), torch.ones(2, 2, 7))
    # explicit attention (needed for the maps) computes what SDPA computes
    torch.testing.assert_close(full.logits, out.logits, atol=1e-5, rtol=1e-5)
    expected = (2, 3) if cls is TransformerClassifier else (2, 7, VOCAB)
    assert out.logits.shape == expected
    if cls is TransformerLM:  # causal: no attention to the future
        assert torch.all(full.attentions[0].triu(1) == 0)


def test_too_long_input_is_a_clear_error():
    model = TransformerLM(vocab_size=VOCAB, **TINY)
    with pytest.raises(kdplug.KdplugError, match="exceeds max_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def _pad(x, total, garbage_seed):
    """x [B, L] -> [B, total] with random garbage after L, and its attention mask."""
    g = torch.Generator().manual_seed(garbage_seed)
    B, L = x.shape
    padded = torch.randint(0, VOCAB, (B, total), generator=g)
    padded[:, :L] = x
    mask = torch.zeros(B, total, dtype=torch.bool)
    mask[:, :L] = True
    return padded, mask


def _loss_and_grads(student, teacher, loss, batch, requires):
    student.zero_grad()
    flags = dict(output_hidden_states="hidden_states" in requires,
                 output_attentions="attentions" in requires)
    kw = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
    with torch.no_grad():
        t_out = teacher(batch["inputs"], **kw, **flags)
    s_out = student(batch["inputs"], **kw, **flags)
    value = loss(s_out, t_out, batch)
    value.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return value.detach(), grads


@pytest.mark.parametrize("task", ["classification", "lm"])
@pytest.mark.parametrize("loss_name", ["kd+ce", "kd+ce+hidden+attention"])
def test_padding_changes_neither_loss_nor_gradient(task, loss_name):
    torch.manual_seed(0)
    if task == "lm":
        teacher, student = TransformerLM(VOCAB, **TINY), TransformerLM(VOCAB, **TINY_STUDENT)
    else:
        teacher = TransformerClassifier(3, VOCAB, **TINY)
        student = TransformerClassifier(3, VOCAB, **TINY_STUDENT)
    teacher.eval()
    loss = kdplug.create_loss(loss_name, temperature=2.0, alpha=0.5)
    requires = getattr(loss, "requires", frozenset())
    x = torch.randint(3, VOCAB, (3, 6))
    labels = torch.randint(0, VOCAB, (3, 6)) if task == "lm" else torch.tensor([0, 2, 1])
    unpadded = {"inputs": x, "labels": labels, "attention_mask": torch.ones(3, 6, dtype=bool)}
    results = []
    for total, seed in ((6, 0), (11, 1), (11, 2)):
        inputs, mask = _pad(x, total, seed)
        if task == "lm":
            lab = torch.full((3, total), -100)
            lab[:, :6] = labels
        else:
            lab = labels
        batch = unpadded if total == 6 else {"inputs": inputs, "labels": lab,
                                             "attention_mask": mask}
        if hasattr(loss, "prepare") and not results:
            flags = dict(output_hidden_states=True, output_attentions=True)
            loss.prepare(student(batch["inputs"], **flags), teacher(batch["inputs"], **flags),
                         batch)
        results.append(_loss_and_grads(student, teacher, loss, batch, requires))
    (l0, g0) = results[0]
    for value, grads in results[1:]:
        torch.testing.assert_close(value, l0, atol=1e-5, rtol=1e-5)
        assert grads.keys() == g0.keys()
        for name in g0:
            torch.testing.assert_close(grads[name], g0[name], atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in g0.values())


def test_lm_loss_is_per_token_not_per_sequence():
    """Per counted token: a batch of one long and one short sequence weighs every token alike."""
    torch.manual_seed(0)
    V, T = 11, 2.0
    s = torch.randn(2, 5, V)
    t = torch.randn(2, 5, V)
    labels = torch.randint(0, V, (2, 5))
    labels[1, 2:] = -100
    mask = labels != -100
    batch = {"inputs": torch.zeros(2, 5, dtype=torch.long), "labels": labels,
             "attention_mask": mask}
    got = kdplug.create_loss("kd", temperature=T)(ModelOutput(s), ModelOutput(t), batch)
    p = torch.softmax(t / T, -1)
    kl = (p * (p.log() - torch.log_softmax(s / T, -1))).sum(-1) * T * T
    torch.testing.assert_close(got, kl[mask].mean())
