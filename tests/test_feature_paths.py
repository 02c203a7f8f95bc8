"""Feature losses fed by module paths (student_layers/teacher_layers, forward hooks)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kdplug
from kdplug.feature_source import attach_models, detach_models, feature_sources
from kdplug.outputs import ModelOutput, as_model_output

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hooks_of(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hint_between_torchvision_models_by_module_path_with_a_learned_projection():
    torch.manual_seed(0)
    teacher = kdplug.create_teacher("torchvision:resnet18", num_classes=10).eval()
    student = kdplug.create_student("torchvision:mobilenet_v3_small", num_classes=10)
    loss = kdplug.create_loss("kd+ce+hint", student_layers="features.6",
                              teacher_layers="layer2")
    assert loss.requires == frozenset()  # the models need not return hidden states
    assert attach_models(loss, student=student, teacher=teacher) == 1
    assert hooks_of(student) == 1 and hooks_of(teacher) == 1
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        t_out = teacher(x)
    s_out = student(x)
    loss.prepare(s_out, t_out, {"inputs": x, "labels": labels})  # sizes the projection
    value = loss(s_out, t_out, {"inputs": x, "labels": labels})
    projection = loss.hidden.projections["s0_t0"]
    assert isinstance(projection, nn.Conv2d)
    assert (projection.in_channels, projection.out_channels) == (40, 128)
    assert set(loss.last_terms) == {"kd+ce", "hidden"} and torch.isfinite(value)
    value.backward()
    assert projection.weight.grad.abs().sum() > 0
    assert student.features[0][0].weight.grad.abs().sum() > 0
    detach_models(loss)
    assert hooks_of(student) == 0 and hooks_of(teacher) == 0
    with pytest.raises(kdplug.KdplugError, match="no student model is attached.*attach_models"):
        loss(s_out, t_out, {"inputs": x, "labels": labels})


def test_paths_give_the_same_loss_as_the_same_features_as_hidden_states():
    """A zoo model's hidden_states are its stage outputs: AT by paths == AT by hidden states."""
    torch.manual_seed(1)
    teacher = kdplug.create_teacher("resnet56", num_classes=5).eval()
    student = kdplug.create_student("resnet20", num_classes=5)
    x, labels = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 4])
    batch = {"inputs": x, "labels": labels}
    by_states = kdplug.create_loss("at")
    by_paths = kdplug.create_loss("at", student_layers="layer1,layer2,layer3",
                                  teacher_layers=["layer1", "layer2", "output:layer3"])
    attach_models(by_paths, student=student, teacher=teacher)
    try:
        with torch.no_grad():
            t_out = teacher(x, output_hidden_states=True)
        s_out = student(x, output_hidden_states=True)
        torch.testing.assert_close(by_paths(as_model_output(s_out.logits), t_out.logits, batch),
                                   by_states(s_out, t_out, batch))
    finally:
        detach_models(by_paths)
    assert hooks_of(student) == 0 and hooks_of(teacher) == 0


def test_relation_methods_pair_the_given_paths_in_order():
    torch.manual_seed(2)
    teacher = kdplug.create_teacher("torchvision:resnet18", num_classes=4).eval()
    student = kdplug.create_student("resnet8x4", num_classes=4)
    loss = kdplug.create_loss("rkd", base="none", student_layers="input:fc",
                              teacher_layers="input:fc")
    attach_models(loss, student=student, teacher=teacher)
    try:
        x = torch.randn(5, 3, 32, 32)
        with torch.no_grad():
            teacher(x)
        s_logits = student(x)
        value = loss(s_logits, torch.zeros(5, 4), {})
        (term,) = [m for m in loss.modules() if hasattr(m, "feature_source")]
        assert term.layer_map == "uniform"  # not rkd's "last": the given paths, in order
        assert value > 0
        value.backward()
        assert student.conv1.weight.grad.abs().sum() > 0
    finally:
        detach_models(loss)


def test_module_path_options_are_checked():
    with pytest.raises(kdplug.KdplugError, match="student_layers is given alone"):
        kdplug.create_loss("hint", student_layers="layer2")
    with pytest.raises(kdplug.KdplugError, match="both hidden_weight and attention_weight"):
        kdplug.create_loss("kd+ce+hidden+attention", student_layers="a", teacher_layers="b")
    loss = kdplug.create_loss("sp", student_layers="layer9", teacher_layers="layer3")
    model = kdplug.create_student("resnet20")
    with pytest.raises(kdplug.KdplugError, match="the student has no module 'layer9'.*layer1"):
        attach_models(loss, student=model, teacher=model)
    assert hooks_of(model) == 0
    assert [repr(s) for s in feature_sources(loss)] == [
        "FeatureSource(student=layer9, teacher=layer3)"]


def test_models_returning_hidden_states_keep_working_without_paths():
    s_feats = (torch.randn(2, 4, 3, 3),)
    t_feats = (torch.randn(2, 6, 3, 3),)
    loss = kdplug.create_loss("hint")
    assert loss.requires == frozenset({"hidden_states"})
    assert attach_models(loss, student=nn.Linear(1, 1), teacher=nn.Linear(1, 1)) == 0
    with pytest.warns(UserWarning, match="created its projections on its first call"):
        value = loss(ModelOutput(torch.zeros(2, 3), hidden_states=s_feats),
                     ModelOutput(torch.zeros(2, 3), hidden_states=t_feats), {})
    assert value > 0
    with pytest.raises(kdplug.KdplugError, match="returned no hidden_states.*student_layers"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3), {})
