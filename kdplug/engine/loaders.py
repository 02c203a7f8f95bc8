"""The run's training and test loaders.

The training order is a function of (seed, epoch) alone (:class:`EpochSampler`), each item's
augmentation of (seed, epoch, index) (:class:`SeededDataset`), and the loaders draw their worker
seeds from their own generators, never from the global RNG, so a resumed run's RNG stream is the
uninterrupted run's. With a teacher cache the training items carry their index and the batches the
cached targets (:mod:`kdplug.cache.integration`).

A split that does work per item (anything but fixed tensors in memory) is loaded by worker
processes: :func:`default_num_workers` of them unless ``num_workers`` is given (a split of fixed
tensors is read in the training process either way: workers would only copy it). They stay up for
the whole phase (the epoch travels to them with each index, :class:`EpochKeys`), prefetch, and
hand over pinned batches when the run trains on CUDA. Each phase gets a fresh training loader,
so its workers start from the data set and collate as that phase sets them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..cache.integration import CachedCollate, IndexedDataset
from ..cache.reader import TeacherCache
from ..data import DataSplits
from .batching import (EpochItems, EpochKeys, EpochSampler, SeededDataset, ShardSampler,
                       holds_fixed_tensors, needs_seeding)
from .config import DistillConfig
from .distributed import DistEnv

__all__ = ["Loaders", "build_loaders", "default_num_workers", "MAX_DEFAULT_WORKERS"]

#: the most worker processes chosen by default (per training process)
MAX_DEFAULT_WORKERS = 8
#: batches each worker loads ahead
PREFETCH_BATCHES = 4


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_workers(dataset: Dataset, processes_per_node: int = 1) -> int:
    """Worker processes for loading ``dataset``: none for fixed tensors in memory (a worker would
    only add copies); otherwise this process's share of the cores less one for the training loop,
    at least 1 and at most :data:`MAX_DEFAULT_WORKERS`."""
    if holds_fixed_tensors(dataset):
        return 0
    cores = available_cores() // max(1, processes_per_node)
    return max(1, min(MAX_DEFAULT_WORKERS, cores - 1))


def _worker_options(workers: int, device: torch.device) -> Dict[str, Any]:
    options: Dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers:
        options.update(persistent_workers=True, prefetch_factor=PREFETCH_BATCHES)
    return options


@dataclass
class Loaders:
    """What every phase of a run trains and evaluates on."""

    train_dataset: Any  # the training split as the loader reads it (seeded, indexed for a cache)
    sampler: EpochSampler
    test: DataLoader
    train_collate: Callable
    train_workers: int
    seed: int
    device: torch.device
    #: with a teacher cache: the training collate, whose ``enabled`` says whether batches carry
    #: the cached targets (only the distilled student reads them)
    cached_collate: Optional[CachedCollate] = None

    def read_cached_targets(self, enabled: bool) -> None:
        if self.cached_collate is not None:
            self.cached_collate.enabled = enabled

    def train_loader(self) -> DataLoader:
        """A training loader for one phase; its workers copy the data set and collate as they
        are now and stay up until the loader is dropped."""
        dataset, sampler = self.train_dataset, self.sampler
        if hasattr(dataset, "set_epoch"):  # the epoch must reach the workers' copies
            dataset, sampler = EpochItems(dataset), EpochKeys(sampler)
        return DataLoader(dataset, batch_size=self.sampler.local_batch, sampler=sampler,
                          collate_fn=self.train_collate,
                          generator=torch.Generator().manual_seed(self.seed),
                          **_worker_options(self.train_workers, self.device))


def build_loaders(splits: DataSplits, collate: Callable, cfg: DistillConfig, env: DistEnv,
                  cache: Optional[TeacherCache] = None) -> Loaders:
    train = splits.train
    train_dataset = SeededDataset(train, cfg.seed) if needs_seeding(train) else train
    train_collate = collate
    cached_collate = None
    if cache is not None:
        train_dataset = IndexedDataset(train_dataset, cache.views,
                                       replay_views=not cache.deterministic)
        train_collate = cached_collate = CachedCollate(collate, cache)
    sampler = EpochSampler(len(train), cfg.batch_size, cfg.seed, env.rank, env.world_size)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))

    def workers(dataset: Dataset) -> int:
        if cfg.num_workers is None or holds_fixed_tensors(dataset):
            return default_num_workers(dataset, per_node)
        return cfg.num_workers

    test_loader = DataLoader(
        splits.test, batch_size=cfg.eval_batch_size,
        sampler=ShardSampler(len(splits.test), env.rank, env.world_size), collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.seed),
        **_worker_options(workers(splits.test), env.device))
    return Loaders(train_dataset=train_dataset, sampler=sampler, test=test_loader,
                   train_collate=train_collate, train_workers=workers(train), seed=cfg.seed,
                   device=env.device, cached_collate=cached_collate)
