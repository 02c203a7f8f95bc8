"""The CIFAR plugin: the CNN pair, the CIFAR-10 provider on a generated on-disk copy, digits."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import kdplug
from kdplug.engine.batching import SeededDataset
from kdplug.outputs import ModelOutput

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]


def write_cifar(root: Path, per_batch: int = 8, test: int = 10, seed: int = 0) -> Path:
    """A small CIFAR-10 copy in the real format: cifar-10-batches-py/ with pickled dicts."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)

    def batch(n, name):
        return {"batch_label": name, "labels": rng.integers(0, 10, n).tolist(),
                "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                "filenames": [f"img_{i}.png" for i in range(n)]}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per_batch, f"training batch {i} of 5"), f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(test, "testing batch 1 of 1"), f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": LABEL_NAMES, "num_cases_per_batch": per_batch,
                     "num_vis": 3072}, f, protocol=2)
    return folder


# ----------------------------------------------------------------------------- models

def test_the_pair_has_the_sketch_architecture():
    teacher = kdplug.create_teacher("cnn-teacher")
    student = kdplug.create_student("cnn-student")
    assert [teacher.conv1.out_channels, teacher.conv2.out_channels] == [32, 64]
    assert (teacher.fc1.in_features, teacher.fc1.out_features) == (64 * 32 * 32, 512)
    assert [student.conv1.out_channels, student.conv2.out_channels] == [16, 32]
    assert (student.fc1.in_features, student.fc1.out_features) == (32 * 32 * 32, 256)
    assert sum(p.numel() for p in teacher.parameters()) == 33_579_658
    assert sum(p.numel() for p in student.parameters()) == 8_396_618


def test_models_adapt_to_options_and_expose_feature_maps():
    model = kdplug.create_student("cnn-student", in_channels=1, image_size=8, num_classes=4)
    x = torch.randn(3, 1, 8, 8)
    assert model(x).shape == (3, 4)
    out = model(x, output_hidden_states=True)
    assert isinstance(out, ModelOutput)
    assert [tuple(h.shape) for h in out.hidden_states] == [(3, 16, 8, 8), (3, 32, 8, 8)]
    torch.testing.assert_close(out.logits, model(x))
    with pytest.raises(kdplug.KdplugError, match="no attention maps"):
        model(x, output_attentions=True)
    with pytest.raises(kdplug.KdplugError, match=r"expects inputs \[B, 1, 8, 8\]"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(kdplug.KdplugError, match="image_size"):
        kdplug.create_teacher("cnn-teacher", image_size=0)


# ----------------------------------------------------------------------------- CIFAR-10

def test_cifar10_reads_a_generated_copy_in_the_real_format(tmp_path):
    write_cifar(tmp_path)
    splits = kdplug.create_dataset("cifar10", root=str(tmp_path), download=False, verify=False)
    assert (len(splits.train), len(splits.test)) == (40, 10)
    assert splits.num_classes == 10 and splits.input_shape == (3, 32, 32)
    assert splits.model_options == {"in_channels": 3, "image_size": 32, "num_classes": 10}
    assert splits.info["classes"] == LABEL_NAMES
    image, label = splits.test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 10
    assert -3 < float(image.mean()) < 3  # normalized
    # augmentation is random per call, and pinned down by the engine's per-item seeding
    seeded = SeededDataset(splits.train, seed=0)
    torch.testing.assert_close(seeded[3][0], seeded[3][0])
    seeded.set_epoch(1)
    assert not torch.equal(seeded[3][0], SeededDataset(splits.train, seed=0)[3][0])
    small = kdplug.create_dataset("cifar10", root=str(tmp_path), download=False, verify=False,
                                  train_size=5, test_size=3, augment=False)
    assert (len(small.train), len(small.test)) == (5, 3)
    teacher = kdplug.create_teacher("cnn-teacher", **splits.model_options)
    assert teacher(torch.stack([splits.test[i][0] for i in range(2)])).shape == (2, 10)


def test_cifar10_verify_keeps_torchvisions_md5_check(tmp_path):
    write_cifar(tmp_path)
    with pytest.raises(kdplug.KdplugError, match="md5 check.*verify=false"):
        kdplug.create_dataset("cifar10", root=str(tmp_path), download=False)


def test_cifar10_wrong_format_is_named(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(kdplug.KdplugError, match="not in the CIFAR-10 python format"):
        kdplug.create_dataset("cifar10", root=str(tmp_path), download=False, verify=False)


def test_missing_cifar10_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(kdplug.KdplugError) as info:
        kdplug.create_dataset("cifar10", root=str(tmp_path), download=False)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "download=true" in message
    assert "cifar-10-python.tar.gz" in message


def test_failed_download_is_one_clear_message(tmp_path, monkeypatch):
    from kdplug_cifar import data

    def offline(root, *spec):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(kdplug.KdplugError, match="downloading it failed: OSError: Network is "
                                                 "unreachable.*To get it"):
        kdplug.create_dataset("cifar10", root=str(tmp_path))


# ----------------------------------------------------------------------------- digits

def test_digits_ships_with_sklearn_and_fits_the_models():
    splits = kdplug.create_dataset("digits")
    assert (len(splits.train), len(splits.test)) == (1347, 450)
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 10
    x = torch.stack([splits.train[i][0] for i in range(4)])
    assert abs(float(splits.train.tensors[0].mean())) < 1e-4  # standardized on the train split
    student = kdplug.create_student("cnn-student", **splits.model_options)
    assert student(x).shape == (4, 10)
    big = kdplug.create_dataset("digits", image_size=16, channels=3, train_size=100, augment=1)
    assert big.input_shape == (3, 16, 16) and len(big.train) == 100
    assert big.train[0][0].shape == (3, 16, 16)
    with pytest.raises(kdplug.KdplugError, match="image_size"):
        kdplug.create_dataset("digits", image_size=0)


def test_digits_split_is_stratified_and_seeded():
    labels = {seed: kdplug.create_dataset("digits", split_seed=seed) for seed in (0, 1)}
    train, test = labels[0].train.tensors[1], labels[0].test.tensors[1]
    counts, held = torch.bincount(torch.cat([train, test])), torch.bincount(test)
    assert int(held.sum()) == 450 and torch.all((held - counts * 0.25).abs() < 1)  # per class
    assert torch.equal(kdplug.create_dataset("digits").train.tensors[0], labels[0].train.tensors[0])
    assert not torch.equal(labels[1].test.tensors[0], labels[0].test.tensors[0])
    assert len(set(train[:20].tolist())) > 5  # the training order mixes classes (train_size)


def test_digits_augment_reads_true_and_false_as_the_switch_it_looks_like():
    on = kdplug.create_dataset("digits", augment=True, train_size=10)
    assert on.train.shift == 1 and on.info["augment"] == 1
    off = kdplug.create_dataset("digits", augment=False, train_size=10)
    assert off.info["augment"] == 0 and not hasattr(off.train, "shift")
