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


def test_sharded_models_take_full_logits_under_auto_and_refuse_on():
    """FSDP2 gathers parameters in a unit's forward: the head read outside it would be a shard."""
    lm = TransformerLM(vocab_size=50, **STUDENT)
    loss = KDCrossEntropyLoss(2.0, 0.5)
    note = loss.configure_models(lm, lm, sharded=True)
    assert loss.requires == frozenset() and "sharded (--strategy fsdp)" in note
    with pytest.raises(kdplug.KdplugError, match=r"fused_linear=on, but the models are sharded"):
        KDLoss(fused_linear="on").configure_models(lm, lm, sharded=True)


def test_the_trainer_tells_the_loss_when_the_strategy_shards(monkeypatch):
    """Trainer passes sharded=True only where the strategy gathers parameters collectively
    (fsdp); elsewhere a plugin's configure_models need not know the keyword."""
    from kdplug.engine import loop
    from kdplug.engine.distributed import DistEnv
    from kdplug.engine.config import DistillConfig

    seen = []

    class Recording:
        def __init__(self, lockstep):
            self.lockstep = lockstep

        def prepare_teacher(self, teacher):
            pass

        def wrap(self, module):
            return module

    class Loss(torch.nn.Module):
        def configure_models(self, **options):
            seen.append(options)

        def forward(self, student_out, teacher_out, batch):
            return student_out.logits.sum()

    lm = TransformerLM(vocab_size=50, **STUDENT)
    for lockstep in (False, True):  # DDP's parameters are whole, FSDP's gathered collectively
        loop.Trainer(lm, Loss(), cfg=DistillConfig(), env=DistEnv(), lr=0.1, total_steps=1,
                     teacher=None, strategy=Recording(lockstep))
    assert "sharded" not in seen[0] and seen[1]["sharded"] is True
