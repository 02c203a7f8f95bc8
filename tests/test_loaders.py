"""The run's loaders: worker defaults, persistent prefetching workers, and the same batches
whatever the number of workers."""
from __future__ import annotations

import time

import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

import kdplug
from kdplug.data import DataSplits
from kdplug.engine import loaders as loaders_module
from kdplug.engine.batching import collate
from kdplug.engine.config import DistillConfig
from kdplug.engine.distributed import DistEnv
from kdplug.engine.loaders import (MAX_DEFAULT_WORKERS, batch_load_seconds, build_loaders,
                                   default_num_workers)


class Augmented(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.rand(2), 0


class Slow(Dataset):
    """Items that take a while to load (decoding an image, say)."""

    seconds = 0.002

    def __len__(self):
        return 10

    def __getitem__(self, index):
        time.sleep(self.seconds)
        return torch.zeros(2), 0


def epochs_of_batches(loaders, epochs):
    """What PhaseRun feeds on: per epoch, the sampler's and the data set's epoch set first."""
    loader = loaders.train_loader()
    out = []
    for epoch in range(epochs):
        loaders.sampler.set_epoch(epoch)
        loaders.train_dataset.set_epoch(epoch)
        out.append([batch for batch in loader])
    return loader, out


def test_zero_and_two_workers_give_the_same_batches():
    splits = kdplug.create_dataset("digits", augment=1, train_size=96)
    got = {}
    for workers in (0, 2):
        cfg = DistillConfig(num_workers=workers, batch_size=32, seed=5)
        loader, got[workers] = epochs_of_batches(build_loaders(splits, collate, cfg, DistEnv()), 3)
        assert loader.num_workers == workers
        if workers:  # the workers stay up across the epochs: the epoch reaches them by the keys
            assert loader.persistent_workers and loader.prefetch_factor == 4
    for epoch_0, epoch_2 in zip(got[0], got[2]):
        assert len(epoch_0) == len(epoch_2) == 3
        for a, b in zip(epoch_0, epoch_2):
            assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["labels"], b["labels"])
    # each epoch has its own order and augmentation
    assert not torch.equal(got[2][0][0]["inputs"], got[2][1][0]["inputs"])


def test_default_workers_follow_the_work_per_item_and_the_cores(monkeypatch):
    tensors = TensorDataset(torch.randn(8, 2))
    assert default_num_workers(tensors, 64, collate) == 0
    assert default_num_workers(Subset(tensors, [0, 1]), 64, collate) == 0
    # items quicker to load than a batch is to hand over from a worker: no workers either
    assert default_num_workers(Augmented(), 64, collate) == 0
    seconds, tensors_per_batch = batch_load_seconds(Slow(), 64, collate)
    assert seconds >= 64 * Slow.seconds and tensors_per_batch == 2
    for cores, per_node, want in ((1, 1, 1), (2, 1, 1), (6, 1, 5), (64, 1, MAX_DEFAULT_WORKERS),
                                  (16, 4, 3), (4, 8, 1)):
        monkeypatch.setattr(loaders_module, "available_cores", lambda: cores)
        assert default_num_workers(Slow(), 64, collate, per_node) == want, (cores, per_node)


def test_loaders_take_the_default_or_the_given_workers(monkeypatch):
    monkeypatch.setattr(loaders_module, "available_cores", lambda: 2)
    splits = DataSplits(train=Slow(), test=TensorDataset(torch.randn(4, 2), torch.zeros(4).long()),
                        num_classes=2, input_shape=(2,))
    auto = build_loaders(splits, collate, DistillConfig(batch_size=4), DistEnv())
    assert (auto.train_workers, auto.test.num_workers) == (1, 0)
    assert auto.test.persistent_workers is False and auto.train_loader().pin_memory is False
    given = build_loaders(splits, collate, DistillConfig(batch_size=4, num_workers=0), DistEnv())
    assert (given.train_workers, given.test.num_workers) == (0, 0)
    given = build_loaders(splits, collate, DistillConfig(batch_size=4, num_workers=2), DistEnv())
    assert (given.train_workers, given.test.num_workers) == (2, 0)  # tensors need no workers
    with pytest.raises(kdplug.KdplugError,
                       match=r"num_workers \(--num-workers\) must be an int >= 0, got -1"):
        DistillConfig(num_workers=-1).validate()
    with pytest.raises(kdplug.KdplugError,
                       match=r"eval_every \(--eval-every\) must be an int >= 1, got 0"):
        DistillConfig(eval_every=0).validate()
