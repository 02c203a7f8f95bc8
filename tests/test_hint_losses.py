"""Intermediate-layer losses (kdplug.feature_losses): gradients, layer maps, projections, CNN hints."""
from __future__ import annotations

import pytest
import torch

import kdplug
from kdplug.feature_losses import (AttentionKLLoss, FeatureDistillLoss, HiddenStateLoss,
                                   parse_layer_map, resolve_layer_map, uniform_attention_map)
from kdplug.outputs import ModelOutput


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


def test_losses_are_registered_by_a_plugin():
    losses = kdplug.list_losses()
    for name in ("hidden", "attention", "hint", "kd+ce+hidden", "kd+ce+attention",
                 "kd+ce+hidden+attention", "kd+ce+hint"):
        assert losses[name].plugin == "features", name
    assert kdplug.create_loss("hidden").requires == {"hidden_states"}
    assert kdplug.create_loss("kd+ce+hidden+attention").requires == {"hidden_states",
                                                                     "attentions"}
    assert kdplug.create_loss("kd+ce+hint", hidden_weight=0).requires == frozenset()


def test_layer_maps():
    assert resolve_layer_map("uniform", 3, 7) == [(0, 0), (1, 3), (2, 6)]  # TinyBERT, with emb.
    assert resolve_layer_map("uniform", 2, 2) == [(0, 0), (1, 1)]
    assert resolve_layer_map("uniform", 1, 4) == [(0, 3)]
    assert resolve_layer_map("last", 3, 7) == [(2, 6)]
    assert resolve_layer_map("middle", 3, 7) == [(1, 3)]
    assert resolve_layer_map(parse_layer_map("1:3, 2:-1"), 3, 7) == [(1, 3), (2, 6)]
    assert resolve_layer_map(parse_layer_map({0: 1}), 3, 7) == [(0, 1)]
    assert uniform_attention_map(2, 6) == [(0, 2), (1, 5)]
    with pytest.raises(kdplug.KdplugError, match="out of range.*3 hidden_states"):
        resolve_layer_map(parse_layer_map("3:1"), 3, 7)
    with pytest.raises(kdplug.KdplugError, match="student:teacher"):
        parse_layer_map("1-3")


def _hidden_outputs(shapes_s, shapes_t, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = tuple(torch.randn(*sh, generator=g, dtype=dtype, requires_grad=True) for sh in shapes_s)
    t = tuple(torch.randn(*sh, generator=g, dtype=dtype) for sh in shapes_t)
    logits = torch.zeros(2, 3, dtype=dtype)
    return ModelOutput(logits, hidden_states=s), ModelOutput(logits, hidden_states=t)


def test_hidden_loss_value_and_gradients_reach_student_and_projection():
    s_out, t_out = _hidden_outputs([(2, 5, 4)] * 2, [(2, 5, 6)] * 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    batch = {"attention_mask": mask}
    loss = HiddenStateLoss("uniform")
    assert loss.build(s_out.hidden_states, t_out.hidden_states) == 2
    assert loss.pairs == [(0, 0), (1, 2)]
    value = loss(s_out, t_out, batch)
    # by hand: masked mean of squared error over real tokens × teacher width, averaged over pairs
    expected = 0
    for s, t in loss.pairs:
        proj = loss.projections[f"s{s}_t{t}"]
        err = (proj(s_out.hidden_states[s]) - t_out.hidden_states[t]).pow(2).sum(-1)
        expected = expected + err[mask].sum() / (mask.sum() * 6)
    torch.testing.assert_close(value, expected / 2)
    value.backward()
    for s in range(2):
        assert s_out.hidden_states[s].grad is not None
        assert torch.all(s_out.hidden_states[s].grad[0, 3:] == 0)  # padding: zero gradient
    for p in loss.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0

    # gradcheck through the projection weight and the student's features (float64)
    weight = loss.projections["s1_t2"].weight

    def f(feature, w):
        with torch.no_grad():
            weight.copy_(w)
        proj = loss.projections["s1_t2"]
        out = torch.nn.functional.linear(feature, w, proj.bias)
        return ((out - t_out.hidden_states[2]).pow(2).sum(-1)[mask]).sum() / (mask.sum() * 6)

    feat = s_out.hidden_states[1].detach().clone().requires_grad_(True)
    torch.autograd.gradcheck(f, (feat, weight.detach().clone().requires_grad_(True)))
    # and the module's own gradient for the weight equals autograd of the formula
    loss.zero_grad()
    single = HiddenStateLoss("1:2").double()
    single.projections["s1_t2"] = loss.projections["s1_t2"]
    single(s_out, t_out, batch).backward()
    w = weight.detach().clone().requires_grad_(True)
    f(feat.detach(), w).backward()
    torch.testing.assert_close(single.projections["s1_t2"].weight.grad, w.grad)


def test_hidden_loss_never_reaches_the_teacher():
    s_out, t_out = _hidden_outputs([(2, 4)], [(2, 8)])
    t_feat = t_out.hidden_states[0].detach().requires_grad_(True)
    t_out = ModelOutput(t_out.logits, hidden_states=(t_feat,))
    loss = HiddenStateLoss("last").double()
    with pytest.warns(UserWarning, match="created its projections on its first call"):
        loss(s_out, t_out, {}).backward()
    assert t_feat.grad is None


def _attention(B, H, L, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, L, L, generator=g, dtype=torch.float64)
    return scores.requires_grad_(requires_grad)


def test_attention_kl_value_gradient_and_mask():
    s_scores = _attention(2, 2, 4, 0, requires_grad=True)
    t_prob = _attention(2, 2, 4, 1).softmax(-1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    batch = {"attention_mask": mask}
    loss = AttentionKLLoss("last")

    def f(scores):
        out = ModelOutput(torch.zeros(2, 3), attentions=(scores.softmax(-1),))
        return loss(out, ModelOutput(torch.zeros(2, 3), attentions=(t_prob,)), batch)

    value = f(s_scores)
    kl = (t_prob * (t_prob.log() - s_scores.log_softmax(-1))).sum(-1)  # [B, H, L]
    torch.testing.assert_close(value, kl.permute(0, 2, 1)[mask].mean())
    torch.autograd.gradcheck(f, (s_scores,))
    value.backward()
    assert torch.all(s_scores.grad[0, :, 3] == 0)  # the padding query row: no gradient
    same = ModelOutput(torch.zeros(1, 1), attentions=(t_prob,))
    assert float(loss(same, same, batch)) == pytest.approx(0.0, abs=1e-12)


def test_attention_kl_with_different_head_counts_averages_heads():
    s = _attention(1, 2, 3, 0).softmax(-1)
    t = _attention(1, 4, 3, 1).softmax(-1)
    got = AttentionKLLoss()(ModelOutput(torch.zeros(1), attentions=(s,)),
                            ModelOutput(torch.zeros(1), attentions=(t,)), {})
    ps, pt = s.mean(1), t.mean(1)
    torch.testing.assert_close(got, (pt * (pt.log() - ps.log())).sum(-1).mean())


def test_missing_intermediates_and_mismatched_logits_are_clear_errors():
    loss = kdplug.create_loss("kd+ce+hidden")
    plain = ModelOutput(torch.zeros(2, 3))
    with pytest.raises(kdplug.KdplugError, match="student returned no hidden_states.*"
                                                 "output_hidden_states=True"):
        loss(plain, plain, {"labels": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(kdplug.KdplugError, match="vocabulary: teacher logits have 50, student "
                                                 "logits 40"):
        loss.prepare(ModelOutput(torch.zeros(2, 4, 40)), ModelOutput(torch.zeros(2, 4, 50)), {})
    with pytest.raises(kdplug.KdplugError, match="no term"):
        kdplug.create_loss("hidden", hidden_weight=0)
    with pytest.raises(kdplug.KdplugError, match="hidden_weight must be >= 0"):
        kdplug.create_loss("kd+ce+hidden", hidden_weight=-1)


def test_projections_are_saved_and_restored_through_state_dict():
    s_out, t_out = _hidden_outputs([(2, 3, 4, 4), (2, 5, 2, 2)], [(2, 6, 4, 4), (2, 7, 2, 2)],
                                   dtype=torch.float32)
    loss = kdplug.create_loss("kd+ce+hint", temperature=2.0, alpha=0.5)
    batch = {"labels": torch.zeros(2, dtype=torch.long)}
    loss.prepare(s_out, t_out, batch)
    value = loss(s_out, t_out, batch)
    state = loss.state_dict()
    assert {k for k in state if "projections" in k} == {
        "hidden.projections.s0_t0.weight", "hidden.projections.s0_t0.bias",
        "hidden.projections.s1_t1.weight", "hidden.projections.s1_t1.bias"}
    assert state["hidden.projections.s0_t0.weight"].shape == (6, 3, 1, 1)  # 1×1 conv
    fresh = kdplug.create_loss("kd+ce+hint", temperature=2.0, alpha=0.5)
    fresh.load_state_dict(state)  # strict: the projections are created from the saved shapes
    for key, tensor in fresh.state_dict().items():
        torch.testing.assert_close(tensor, state[key])
    torch.testing.assert_close(fresh(s_out, t_out, batch), value)


def test_fitnets_hint_on_the_cnn_pair():
    teacher = kdplug.create_teacher("cnn-teacher", in_channels=1, image_size=8, num_classes=10)
    student = kdplug.create_student("cnn-student", in_channels=1, image_size=8, num_classes=10)
    teacher.eval()
    loss = kdplug.create_loss("kd+ce+hint", temperature=4.0, alpha=0.9, hidden_weight=0.5)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    batch = {"inputs": x, "labels": y}
    with torch.no_grad():
        t_out = teacher(x, output_hidden_states=True)
    s_out = student(x, output_hidden_states=True)
    loss.prepare(s_out, t_out, batch)
    assert all(isinstance(p, torch.nn.Conv2d) for p in loss.hidden.projections.values())
    opt = torch.optim.SGD(list(student.parameters()) + list(loss.parameters()), lr=0.05)
    first = None
    for _ in range(5):
        opt.zero_grad()
        value = loss(student(x, output_hidden_states=True), t_out, batch)
        value.backward()
        assert all(p.grad is not None for p in loss.parameters())
        opt.step()
        first = float(value.detach()) if first is None else first
    assert float(value.detach()) < first
    assert set(loss.last_terms) == {"kd+ce", "hidden"}


def test_feature_map_spatial_mismatch_is_pooled():
    s_out, t_out = _hidden_outputs([(2, 3, 8, 8)], [(2, 5, 4, 4)], dtype=torch.float32)
    loss = FeatureDistillLoss(base="none", hidden_weight=1.0)
    loss.prepare(s_out, t_out, {})
    assert loss(s_out, t_out, {}).shape == ()
