"""Transfer-set augmentation (kdplug.kd_augment): mixup of the inputs both models see."""
from __future__ import annotations

import pytest
import torch

import kdplug
from kdplug.kd_augment import augment_batch, check_kd_augment, mixup_inputs


def test_mixup_is_a_convex_mix_with_another_input_leaning_to_its_own():
    x = torch.arange(8, dtype=torch.float64).reshape(8, 1, 1, 1) * torch.ones(8, 1, 2, 2)
    mixed = mixup_inputs(x, 1.0, seed=3)
    values = mixed[:, 0, 0, 0]
    assert torch.equal(mixed, values.reshape(8, 1, 1, 1).expand(8, 1, 2, 2))  # per sample
    for i, v in enumerate(values.tolist()):
        # v = λ·i + (1−λ)·j with λ ≥ ½ for some input j of the batch
        assert any(abs(v - i) <= abs(v - j) + 1e-12 and min(i, j) - 1e-12 <= v <= max(i, j)
                   + 1e-12 for j in range(8))
    assert not torch.equal(mixed, x)
    torch.testing.assert_close(mixup_inputs(x, 1.0, seed=3), mixed)  # a function of the seed
    assert not torch.equal(mixup_inputs(x, 1.0, seed=4), mixed)


def test_small_alpha_mixes_little():
    x = torch.randn(256, 3)
    lam_gap = (mixup_inputs(x, 0.05, seed=0) - x).norm(dim=1) / (x.norm(dim=1) + 1e-6)
    big_gap = (mixup_inputs(x, 4.0, seed=0) - x).norm(dim=1) / (x.norm(dim=1) + 1e-6)
    assert lam_gap.median() < big_gap.median()


def test_augment_batch_keeps_labels_and_leaves_the_batch_alone():
    batch = {"inputs": torch.randn(4, 2), "labels": torch.tensor([0, 1, 2, 3])}
    assert augment_batch(batch, "none", seed=0) is batch
    mixed = augment_batch(batch, "mixup", seed=0)
    assert mixed["labels"] is batch["labels"] and mixed["inputs"] is not batch["inputs"]
    assert mixed["inputs"].shape == (4, 2)


def test_bad_settings_are_named():
    with pytest.raises(kdplug.KdplugError, match="kd_augment must be one of none, mixup"):
        check_kd_augment("cutmix")
    with pytest.raises(kdplug.KdplugError, match="kd_mixup_alpha must be a number > 0"):
        check_kd_augment("mixup", 0)
    with pytest.raises(kdplug.KdplugError, match="token ids cannot be mixed"):
        mixup_inputs(torch.zeros(2, 5, dtype=torch.long), 1.0, seed=0)
