"""Per-item seeding (SeededDataset) and the epoch keys that carry it to persistent workers.

An item's randomness is a function of (seed, epoch, index). Issue 16 made the seeding cheap (torch's
CPU generator only, once per batch; Python's random only for data sets that use it): the items must
be exactly those of the former global-RNG round trip.
"""
from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

import kdplug
from kdplug.engine.batching import (EpochItems, EpochKeys, EpochSampler, SeededDataset,
                                    holds_fixed_tensors, mix_seed, uses_python_random)
from test_cifar import write_cifar


class Mixed(Dataset):
    """Draws from torch's generator and from Python's random."""

    def __len__(self):
        return 50

    def __getitem__(self, index):
        return (torch.randint(0, 1000, (3,)), torch.rand(2), random.randrange(1000),
                random.random())


class TorchOnly(Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, index):
        return torch.rand(3) + index


def old_round_trip_item(dataset, seed, epoch, index):
    """SeededDataset.__getitem__ before issue 16, verbatim: the oracle."""
    item_seed = mix_seed(seed, epoch, index)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    torch.manual_seed(item_seed)
    random.seed(item_seed)
    try:
        return dataset[index]
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


def assert_same_item(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_item(x, y)
    else:
        assert a == b


# Mixed()'s items as the code before issue 16 gave them (commit fab5cea), for (seed, epoch, index)
CAPTURED = {
    (0, 0, 0): ([197, 74, 13], [0.824373722076416, 0.588300883769989], 199, 0.08334422465665337),
    (0, 3, 7): ([215, 896, 571], [0.9415227770805359, 0.7363589406013489], 111,
                0.10725818770299689),
    (5, 0, 33): ([440, 856, 169], [0.8353583812713623, 0.11583346128463745], 485,
                 0.9032251655525774),
    (5, 3, 1): ([893, 43, 247], [0.24924176931381226, 0.4109172821044922], 532,
                0.4944579204651569),
}


@pytest.mark.parametrize("key", sorted(CAPTURED))
def test_seeded_items_equal_the_ones_captured_before_the_change(key):
    seed, epoch, index = key
    ints, floats, py_int, py_float = CAPTURED[key]
    seeded = SeededDataset(Mixed(), seed)
    seeded.set_epoch(epoch)
    for item in (seeded[index], seeded.__getitems__([3, index, 9])[1]):
        assert item[0].tolist() == ints
        assert torch.equal(item[1], torch.tensor(floats, dtype=torch.float32))
        assert (item[2], item[3]) == (py_int, py_float)


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    """Real augmentations: digits' random shifts and CIFAR-10's random crop + flip."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root)
    return {"digits": kdplug.create_dataset("digits", augment=1, train_size=40).train,
            "cifar10": kdplug.create_dataset("cifar10", root=str(root), download=False,
                                             verify=False).train}


@pytest.mark.parametrize("name", ["digits", "cifar10"])
def test_seeded_items_equal_the_global_rng_round_trip(augmented, name):
    dataset = augmented[name]
    for seed in (0, 7):
        seeded = SeededDataset(dataset, seed)
        for epoch in (0, 1, 5):
            seeded.set_epoch(epoch)
            indices = [0, 3, 17, 39]
            batch = seeded.__getitems__(indices)
            for index, item in zip(indices, batch):
                want = old_round_trip_item(dataset, seed, epoch, index)
                assert_same_item(item, want)
                assert_same_item(seeded[index], want)
    seeded = SeededDataset(dataset, 0)
    first = seeded[3][0]
    seeded.set_epoch(1)
    assert not torch.equal(first, seeded[3][0])  # another epoch, another augmentation


def test_seeding_restores_the_global_rngs_and_never_seeds_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    for dataset in (Mixed(), TorchOnly()):
        seeded = SeededDataset(dataset, 3)
        torch_state, python_state = torch.get_rng_state(), random.getstate()
        seeded[4]
        seeded.__getitems__([1, 2, 3])
        assert torch.equal(torch.get_rng_state(), torch_state)
        assert random.getstate() == python_state
    assert calls == []  # torch.manual_seed would queue the (slow) lazy CUDA seeding


def test_python_random_is_seeded_only_for_data_sets_that_draw_from_it(monkeypatch):
    assert uses_python_random(Mixed()) and not uses_python_random(TorchOnly())
    assert SeededDataset(Mixed(), 0).python_random
    torch_only = SeededDataset(TorchOnly(), 0)
    assert not torch_only.python_random

    class Declared(TorchOnly):
        uses_python_random = True  # draws only for some items, say

    assert SeededDataset(Declared(), 0).python_random
    assert not SeededDataset(Mixed(), 0, python_random=False).python_random
    tensors = TensorDataset(torch.randn(5, 2))
    assert not uses_python_random(tensors) and not uses_python_random(Subset(tensors, [0, 1]))

    def forbidden():
        raise AssertionError("Python's random state was read for a data set that does not use it")

    monkeypatch.setattr(random, "getstate", forbidden)
    torch_only.__getitems__([0, 1, 2])
    torch_only[5]


def test_which_data_sets_hold_fixed_tensors():
    tensors = TensorDataset(torch.randn(4, 2))
    assert holds_fixed_tensors(tensors) and holds_fixed_tensors(Subset(tensors, [1]))
    assert not holds_fixed_tensors(TorchOnly()) and not holds_fixed_tensors(Subset(Mixed(), [0]))

    class InMemory(TorchOnly):
        fixed_tensors = True

    assert holds_fixed_tensors(InMemory())


def test_epoch_keys_carry_the_epoch_to_the_data_set():
    sampler = EpochSampler(12, batch_size=4, seed=1)
    keyed = EpochItems(SeededDataset(TorchOnly(), 1))
    sampler.set_epoch(2)
    keys = list(EpochKeys(sampler))
    assert [k for k, _ in keys] == [2] * 12 and [i for _, i in keys] == list(sampler)
    reference = SeededDataset(TorchOnly(), 1)
    reference.set_epoch(2)
    assert torch.equal(keyed[keys[0]], reference[keys[0][1]])
    assert keyed.dataset.epoch == 2
    reference.set_epoch(5)
    got = keyed.__getitems__([(5, i) for _, i in keys[:4]])
    assert all(torch.equal(a, reference[i]) for a, (_, i) in zip(got, keys[:4]))
