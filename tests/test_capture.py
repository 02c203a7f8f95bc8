"""Features by module path (kdplug.capture) on plain torchvision models: no change to forward."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import kdplug
from kdplug.capture import FeatureCapture, FeatureSpec, capture_features, parse_feature_paths

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def hooks_of(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_paths_parse_outputs_inputs_and_lists():
    assert parse_feature_paths("layer2, output:layer3,input:fc") == [
        FeatureSpec("layer2"), FeatureSpec("layer3"), FeatureSpec("fc", "input")]
    assert parse_feature_paths(["features.6"]) == [FeatureSpec("features.6")]
    for bad in ("", " , ", "inptu:fc", "input:"):
        with pytest.raises(kdplug.KdplugError, match="feature path|no feature path"):
            parse_feature_paths(bad)


def test_resnet_stages_and_the_classifier_input_are_captured(resnet):
    x = torch.randn(2, 3, 32, 32)
    with FeatureCapture(resnet, "layer2,layer3,input:fc,output:avgpool") as capture:
        assert hooks_of(resnet) == 4
        logits = resnet(x)
        layer2, layer3, fc_in, pooled = capture.features()
    assert hooks_of(resnet) == 0  # removed on leaving the block
    assert layer2.shape == (2, 128, 4, 4) and layer3.shape == (2, 256, 2, 2)
    torch.testing.assert_close(fc_in, torch.flatten(pooled, 1))
    torch.testing.assert_close(resnet.fc(fc_in), logits)  # the very tensor the classifier saw
    # and the same as running the modules by hand
    with torch.no_grad():
        h = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        torch.testing.assert_close(layer2, resnet.layer2(resnet.layer1(h)))


def test_mobilenet_sequential_paths_and_gradients_reach_the_model():
    torch.manual_seed(1)
    model = torchvision.models.mobilenet_v3_small(num_classes=5)
    capture = FeatureCapture(model, "features.6")
    model(torch.randn(2, 3, 32, 32))
    (feature,) = capture.features()
    assert feature.shape[:2] == (2, 40) and feature.requires_grad
    feature.pow(2).mean().backward()
    assert model.features[0][0].weight.grad.abs().sum() > 0
    assert model.classifier[-1].weight.grad is None  # only the path up to features.6
    capture.remove()
    assert hooks_of(model) == 0 and not capture.active
    capture.remove()  # twice is fine


def test_each_forward_replaces_the_features_and_clear_forgets_them(resnet):
    capture = FeatureCapture(resnet, ["layer4"], what="the teacher")
    try:
        resnet(torch.zeros(1, 3, 32, 32))
        first = capture.features()[0]
        resnet(torch.ones(1, 3, 32, 32))
        assert not torch.equal(first, capture.features()[0])
        capture.clear()
        with pytest.raises(kdplug.KdplugError, match="'layer4' of the teacher was not captured"):
            capture.features()
    finally:
        capture.remove()


def test_unknown_path_lists_the_closest_module_names(resnet):
    with pytest.raises(kdplug.KdplugError) as info:
        FeatureCapture(resnet, "layer2,layr3", what="the student")
    message = str(info.value)
    assert "the student has no module 'layr3'" in message and "layer3" in message
    assert hooks_of(resnet) == 0  # the hook put on layer2 before the error is gone again
    with pytest.raises(kdplug.KdplugError, match="top-level modules: conv1, bn1, relu"):
        FeatureCapture(resnet, "zzzzzz")


def test_a_module_that_did_not_run_or_gave_no_tensor_is_named():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.unused = nn.Linear(4, 4)
            self.pair = nn.LSTM(4, 4, batch_first=True)

        def forward(self, x):
            out, _ = self.pair(self.body(x)[:, None])
            return out[:, 0]

    model = TwoHeads()
    out, (seq,) = capture_features(model, "pair", torch.randn(2, 3))  # (output, (h, c)) -> output
    torch.testing.assert_close(seq[:, 0], out)
    with pytest.raises(kdplug.KdplugError, match="'unused' did not run"):
        capture_features(model, "unused", torch.randn(2, 3))
    assert hooks_of(model) == 0


def test_ddp_hooks_sit_on_the_inner_module(tmp_path, resnet):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(2)
        inner = torchvision.models.resnet18(num_classes=3)
        ddp = nn.parallel.DistributedDataParallel(inner)
        x = torch.randn(2, 3, 32, 32)
        for path in ("layer3", "module.layer3"):  # the inner name, or the wrapper's
            with FeatureCapture(ddp, path) as capture:
                assert hooks_of(inner) == 1
                logits = ddp(x)
                (feature,) = capture.features()
            assert feature.shape == (2, 256, 2, 2) and hooks_of(inner) == 0
        logits.sum().backward()  # DDP's reducer is happy with the hooks gone
    finally:
        dist.destroy_process_group()


def test_a_compiled_model_is_refused_with_the_reason():
    compiled = torch.compile(nn.Linear(2, 2))
    with pytest.raises(kdplug.KdplugError, match="compiled with torch.compile.*before compiling"):
        FeatureCapture(compiled, "weight")
