"""The CIFAR zoo, torchvision:NAME models and the CIFAR-100 provider of the cifar plugin."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import kdplug
from kdplug.outputs import ModelOutput

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- the CIFAR zoo

# Parameter counts as RepDistiller/CRD (Tian et al. 2020, Table 1) and mdistiller publish them,
# for CIFAR-100's 100 classes.
PUBLISHED_MILLIONS = {"resnet20": 0.28, "resnet56": 0.86, "resnet8x4": 1.23, "resnet32x4": 7.43,
                      "wrn_16_2": 0.70, "wrn_40_2": 2.26}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_zoo_models_have_the_published_parameter_counts(name):
    from kdplug_cifar import ZOO_MODELS

    for kind in ("teacher", "student"):
        model = kdplug.get_registration(kind, name).create()
        assert round(n_params(model) / 1e6, 2) == PUBLISHED_MILLIONS[name]
    assert ZOO_MODELS[name][0] == PUBLISHED_MILLIONS[name]  # what `kdplug plugins` shows


def test_zoo_block_structure_matches_the_benchmarks():
    r = kdplug.create_student("resnet8x4")
    assert [len(getattr(r, f"layer{i}")) for i in (1, 2, 3)] == [1, 1, 1]
    assert [getattr(r, f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3)] == [64, 128, 256]
    assert r.conv1.out_channels == 32 and r.layer1[0].downsample is not None  # 32 -> 64
    r56 = kdplug.create_teacher("resnet56")
    assert [len(getattr(r56, f"layer{i}")) for i in (1, 2, 3)] == [9, 9, 9]
    assert r56.layer1[0].downsample is None  # 16 -> 16: identity shortcut
    w = kdplug.create_teacher("wrn_40_2")
    assert [len(getattr(w, f"block{i}").layer) for i in (1, 2, 3)] == [6, 6, 6]
    assert w.block1.layer[0].convShortcut is not None and w.block1.layer[1].convShortcut is None
    assert w.fc.in_features == 128


def test_zoo_forward_hidden_states_and_options():
    model = kdplug.create_student("wrn_16_2", num_classes=10, in_channels=1).eval()
    x = torch.randn(2, 1, 32, 32)
    out = model(x, output_hidden_states=True)
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 10)
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, 32, 32, 32), (2, 64, 16, 16),
                                                           (2, 128, 8, 8)]
    torch.testing.assert_close(model(x), out.logits)
    assert kdplug.create_student("resnet20")(torch.randn(2, 3, 16, 16)).shape == (2, 100)
    with pytest.raises(kdplug.KdplugError, match=r"expects images \[B, 1, H, W\]"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(kdplug.KdplugError, match="num_classes must be a positive int"):
        kdplug.create_student("resnet20", num_classes=0)


def test_zoo_weights_path_loads_a_saved_checkpoint(tmp_path):
    torch.manual_seed(0)
    trained = kdplug.create_teacher("resnet20", num_classes=10).eval()
    path = tmp_path / "resnet20.pt"
    torch.save({"epoch": 240, "model": trained.state_dict()}, path)  # RepDistiller's layout
    loaded = kdplug.create_teacher("resnet20", num_classes=10, weights=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), trained(x))
    with pytest.warns(UserWarning, match="left at their initialization.*fc.weight"):
        kdplug.create_teacher("resnet20", num_classes=100, weights=str(path))  # another head
    with pytest.raises(kdplug.KdplugError, match="does not fit this WideResNet: only 2 of its 83"):
        kdplug.create_teacher("wrn_16_2", weights=str(path))
    with pytest.raises(kdplug.KdplugError, match="does not exist"):
        kdplug.create_teacher("resnet20", weights=str(tmp_path / "missing.pt"))


# ----------------------------------------------------------------------------- torchvision

def test_torchvision_name_builds_the_classifier_with_the_datas_classes_and_channels():
    model = kdplug.create_student("torchvision:mobilenet_v3_small", num_classes=7, in_channels=1)
    assert type(model).__name__ == "MobileNetV3"  # torchvision's own module, paths unchanged
    assert model.features[0][0].in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    with pytest.raises(kdplug.KdplugError, match="no classifier 'resnet5'.*'resnet50'"):
        kdplug.create_teacher("torchvision:resnet5")
    with pytest.raises(kdplug.KdplugError, match="torchvision:NAME"):
        kdplug.create_teacher("torchvision")


def test_cifar_stem_swaps_the_imagenet_stem():
    plain = kdplug.create_teacher("torchvision:resnet18", num_classes=10)
    cifar = kdplug.create_teacher("torchvision:resnet18", num_classes=10, cifar_stem=True)
    assert plain.conv1.kernel_size == (7, 7) and plain.conv1.stride == (2, 2)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    x = torch.randn(1, 3, 32, 32)
    feats = {}
    for name, model in (("plain", plain.eval()), ("cifar", cifar.eval())):
        model.layer4.register_forward_hook(lambda m, a, o, name=name: feats.__setitem__(name, o))
        model(x)
    assert feats["plain"].shape[-1] == 1 and feats["cifar"].shape[-1] == 4  # 32/8, not 32/32
    dense = kdplug.create_teacher("torchvision:densenet121", num_classes=10, cifar_stem=True)
    assert isinstance(dense.features.pool0, torch.nn.Identity)
    with pytest.raises(kdplug.KdplugError, match="vision transformer"):
        kdplug.create_teacher("torchvision:vit_b_32", cifar_stem=True, image_size=32)


def _fake_hub_checkpoint(monkeypatch, tmp_path, name, weights_name):
    """Put a state_dict where torch.hub keeps its downloads (TORCH_HOME), as a download would."""
    import torchvision.models

    from kdplug_cifar.torchvision_models import hub_cache_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    member = torchvision.models.get_model_weights(name)[weights_name]
    file = hub_cache_file(member.url)
    assert str(file).startswith(str(tmp_path))
    torch.manual_seed(3)
    source = torchvision.models.get_model(name, num_classes=1000)
    file.parent.mkdir(parents=True)
    torch.save(source.state_dict(), file)
    return source, file


def test_torchvision_weights_come_from_the_hub_cache_only(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(kdplug.KdplugError, match="not in the torch hub cache.*downloads nothing"):
        kdplug.create_teacher("torchvision:squeezenet1_1", weights="IMAGENET1K_V1")
    source, _ = _fake_hub_checkpoint(monkeypatch, tmp_path, "squeezenet1_1", "IMAGENET1K_V1")
    full = kdplug.create_teacher("torchvision:squeezenet1_1",
                                 weights="SqueezeNet1_1_Weights.IMAGENET1K_V1").eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(full(x), source.eval()(x))
    with pytest.warns(UserWarning, match="classifier.1.weight"):  # the 1000-class head
        headless = kdplug.create_teacher("torchvision:squeezenet1_1", num_classes=10,
                                         weights="IMAGENET1K_V1")
    torch.testing.assert_close(headless.features[0].weight, source.features[0].weight)
    with pytest.raises(kdplug.KdplugError, match="not a torchvision weights name.*IMAGENET1K_V1"):
        kdplug.create_teacher("torchvision:squeezenet1_1", weights="IMAGENET9K")


def test_torchvision_weights_path_round_trips(tmp_path):
    torch.manual_seed(4)
    model = kdplug.create_student("torchvision:resnet18", num_classes=5, cifar_stem=True).eval()
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    again = kdplug.create_student("torchvision:resnet18", num_classes=5, cifar_stem=True,
                                  weights=str(tmp_path / "r18.pt")).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again(x), model(x))


# ----------------------------------------------------------------------------- CIFAR-100

FINE = [f"class_{i}" for i in range(100)]


def write_cifar100(root: Path, train: int = 12, test: int = 6, seed: int = 0) -> Path:
    """A small CIFAR-100 copy in the real format: cifar-100-python/{train,test,meta}."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", train), ("test", test)):
        fine = rng.integers(0, 100, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"filenames": [f"img_{i}.png" for i in range(n)],
                         "batch_label": f"{name} batch", "fine_labels": fine,
                         "coarse_labels": [label // 5 for label in fine],
                         "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": FINE,
                     "coarse_label_names": [f"super_{i}" for i in range(20)]}, f, protocol=2)
    return folder


def test_cifar100_reads_a_generated_copy_in_the_real_format(tmp_path):
    write_cifar100(tmp_path)
    splits = kdplug.create_dataset("cifar100", root=str(tmp_path), download=False, verify=False)
    assert (len(splits.train), len(splits.test)) == (12, 6)
    assert splits.num_classes == 100 and splits.input_shape == (3, 32, 32)
    assert splits.model_options == {"in_channels": 3, "image_size": 32, "num_classes": 100}
    assert splits.info["classes"] == FINE
    image, label = splits.test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 100
    student = kdplug.create_student("resnet8x4", num_classes=splits.num_classes)
    assert student(torch.stack([splits.test[i][0] for i in range(2)])).shape == (2, 100)


def test_cifar100_errors_match_cifar10s(tmp_path):
    with pytest.raises(kdplug.KdplugError) as info:
        kdplug.create_dataset("cifar100", root=str(tmp_path), download=False)
    message = str(info.value)
    assert "CIFAR-100 not found" in message and str(tmp_path / "cifar-100-python") in message
    assert "cifar-100-python.tar.gz" in message and "download=true" in message
    folder = write_cifar100(tmp_path)
    with pytest.raises(kdplug.KdplugError, match="CIFAR-100 files .* md5 check.*verify=false"):
        kdplug.create_dataset("cifar100", root=str(tmp_path), download=False)
    (folder / "test").write_bytes(b"not a pickle")
    with pytest.raises(kdplug.KdplugError, match="not in the CIFAR-100 python format"):
        kdplug.create_dataset("cifar100", root=str(tmp_path), download=False, verify=False)


def test_failed_cifar100_download_is_one_clear_message(tmp_path, monkeypatch):
    from kdplug_cifar import data

    def offline(root, spec):
        assert spec.name == "CIFAR-100"
        raise OSError("Network is unreachable")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(kdplug.KdplugError, match="CIFAR-100 not found.*downloading it failed: "
                                                 "OSError: Network is unreachable.*To get it"):
        kdplug.create_dataset("cifar100", root=str(tmp_path))


def test_tiny_cnn_student_is_small_and_size_agnostic():
    student = kdplug.create_student("cnn-tiny-student", in_channels=1, num_classes=10)
    assert n_params(student) == 5226  # 16·9+16 + 32·16·9+32 + 2·(16+32) BN + 32·10+10
    for size in (8, 16):
        out = student(torch.randn(2, 1, size, size), output_hidden_states=True)
        assert out.logits.shape == (2, 10)
        assert [tuple(h.shape[1:]) for h in out.hidden_states] == [(16, size, size),
                                                                   (32, size, size)]
    with pytest.raises(kdplug.KdplugError, match=r"expects inputs \[B, 1, H, W\]"):
        student(torch.randn(2, 3, 8, 8))
