"""The fused linear head in the engine: kdplug's LM pair and Hugging Face causal LMs give their
final hidden states and output head; the KD losses choose the fused head when both models can.
(A run with fused_linear on against one with it off: tests/test_transformer_distill.py.)"""
from __future__ import annotations

import pytest
import torch

import kdplug
from kdplug.engine.batching import call_model
from kdplug.losses import KDCrossEntropyLoss, KDLoss
from kdplug.output_head import head_of, missing_output_head
from kdplug_transformer.models import TransformerClassifier, TransformerLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models

TEACHER = dict(num_layers=2, d_model=32, num_heads=2)
STUDENT = dict(num_layers=1, d_model=16, num_heads=2)


def test_the_lm_gives_hidden_states_whose_head_is_its_logits():
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=50, max_len=16, **STUDENT).eval()
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    batch = {"inputs": ids, "labels": ids, "attention_mask": mask}
    head = head_of(call_model(model, batch, frozenset({"output_head"})))
    assert head.weight is model.head.weight and head.hidden.shape == (2, 9, 16)
    torch.testing.assert_close(head.hidden @ head.weight.t(),
                               model(ids, attention_mask=mask).logits)


def test_the_loss_chooses_the_fused_head_only_when_both_models_have_one():
    lm, cls = TransformerLM(vocab_size=50, **STUDENT), TransformerClassifier(**STUDENT)
    loss = KDCrossEntropyLoss(2.0, 0.5)
    assert "chunk by chunk" in loss.configure_models(lm, lm)
    assert loss.requires == {"output_head"}
    note = loss.configure_models(lm, cls)
    assert loss.requires == frozenset() and "TransformerClassifier has no get_output_emb" in note
    assert loss.configure_models(cls, cls) is None  # not a language model: nothing to say
    assert loss.configure_models(lm, None, cached_teacher=True) is not None
    assert loss.requires == {"output_head"}  # a cached teacher comes as logits or top-k
    with pytest.raises(kdplug.KdplugError, match="fused_linear=on, but TransformerClassifier"):
        KDLoss(fused_linear="on").configure_models(lm, cls)
    assert KDLoss(fused_linear="off").configure_models(lm, lm) is None
    assert KDLoss(fused_linear=False).fused_linear == "off"  # a TOML boolean
    with pytest.raises(kdplug.KdplugError, match="fused_linear must be one of auto, on, off"):
        KDLoss(fused_linear="yes")
